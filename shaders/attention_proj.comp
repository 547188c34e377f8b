#version 450
#extension GL_EXT_control_flow_attributes : require
// Attention with its input projection in the same dispatch: one workgroup per (batch, head).
// Phase 1 computes this head's q columns of x W^T + b for every query row (packed: q, k and v,
// x being the self-attention input) into shared memory, reading only the W rows of this head, so no
// workgroup repeats another's work; cross-attention copies its head's k/v windows of the memory
// K/V tensor into shared memory instead. Phase 2 is the attention of that head, one query row per
// invocation, with the online softmax of attention.comp's tiled variant (exp2, scores in log2 units,
// finite running max, a fully masked row written as 0). Every sum runs in a fixed order: the output
// is identical run to run (it differs from linear then attention in the projection's summation order).
layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint D = 32;     // head dim
layout(constant_id = 2) const uint SMEM = 64;  // floats of shared memory (q, k, v of the head)

layout(push_constant) uniform P {
    uint tq, tk, heads, flags; // flags: bit0 mask, bit1 key padding, bit2 bias, bit3 packed
    uint kin, x0, w0, b0;      // in features; bases of x (floats), W (elements), bias
    uint kv0, ks, kc, vc;      // cross: base and row stride of the memory K/V, k and v columns
    uint m0, mbs, kp0, o0;     // mask base and batch stride (0: shared), key padding base, out base
    float sl2e;                // scale * log2(e)
} pc;

layout(std430, binding = 0) readonly buffer Xb { float x[]; };
#ifdef VKG_ATTP_F16
layout(std430, binding = 1) readonly buffer Wb { uint w[]; };
float loadw(uint e) { vec2 h = unpackHalf2x16(w[e >> 1]); return (e & 1u) != 0u ? h.y : h.x; }
#else
layout(std430, binding = 1) readonly buffer Wb { float w[]; };
float loadw(uint e) { return w[e]; }
#endif
layout(std430, binding = 2) readonly buffer Bb { float bias[]; };
layout(std430, binding = 3) readonly buffer KVb { float kv[]; };
layout(std430, binding = 4) readonly buffer Mb { float msk[]; };
layout(std430, binding = 5) readonly buffer KPb { float kpad[]; };
layout(std430, binding = 6) writeonly buffer Ob { float o[]; };

shared float S[SMEM]; // q rows (tq x D), then k rows and v rows (tk x D each)

#define NEG_INF uintBitsToFloat(0xff800000u)
const float M_INIT = -1.70141173e38; // -FLT_MAX / 2, as attention.comp
const float LOG2E = 1.44269504088896341;

void main()
{
    const uint WG = gl_WorkGroupSize.x;
    uint t = gl_LocalInvocationID.x, h = gl_WorkGroupID.x, b = gl_WorkGroupID.y;
    uint HD = pc.heads * D;
    bool packed = (pc.flags & 8u) != 0u, hasb = (pc.flags & 4u) != 0u;
    uint qoff = 0u, koff = pc.tq * D, voff = koff + pc.tk * D;
    uint np = packed ? 3u : 1u;
    // Phase 1: item = (block of RT query rows, projection column); neighbouring invocations take
    // neighbouring columns of one row block, so the x values they read are the same (one fetch
    // each on CPU implementations) and each W value read serves RT rows.
    const uint RT = 8u;
    uint nc = np * D, nrb = (pc.tq + RT - 1u) / RT;
    for (uint e = t; e < nrb * nc; e += WG) {
        uint r0 = (e / nc) * RT, c = e % nc, p = c / D, col = c % D;
        uint n = p * HD + h * D + col; // the W row, the column of the (packed) projection
        uint wb = pc.w0 + n * pc.kin, xb[RT];
        float a[RT];
        [[unroll]] for (uint r = 0; r < RT; r++) {
            xb[r] = pc.x0 + (b * pc.tq + min(r0 + r, pc.tq - 1u)) * pc.kin;
            a[r] = 0.0;
        }
        for (uint k = 0; k < pc.kin; k++) {
            float wv = loadw(wb + k);
            [[unroll]] for (uint r = 0; r < RT; r++) a[r] = fma(x[xb[r] + k], wv, a[r]);
        }
        float bv = hasb ? bias[pc.b0 + n] : 0.0;
        uint sb = (p == 0u ? qoff : p == 1u ? koff : voff) + col;
        [[unroll]] for (uint r = 0; r < RT; r++)
            if (r0 + r < pc.tq) S[sb + (r0 + r) * D] = a[r] + bv;
    }
    if (!packed)
        for (uint e = t; e < pc.tk * D; e += WG) {
            uint j = e / D, col = e % D, rb = pc.kv0 + (b * pc.tk + j) * pc.ks + h * D + col;
            S[koff + e] = kv[rb + pc.kc];
            S[voff + e] = kv[rb + pc.vc];
        }
    barrier();
    // Phase 2: query row i per invocation.
    for (uint i = t; i < pc.tq; i += WG) {
        float qr[D], acc[D];
        [[unroll]] for (uint c = 0; c < D; c++) {
            qr[c] = S[qoff + i * D + c] * pc.sl2e;
            acc[c] = 0.0;
        }
        uint mb = pc.m0 + b * pc.mbs + i * pc.tk, kpb = pc.kp0 + b * pc.tk;
        float m = M_INIT, l = 0.0;
        for (uint j = 0; j < pc.tk; j++) {
            float s = 0.0;
            [[unroll]] for (uint c = 0; c < D; c++) s = fma(qr[c], S[koff + j * D + c], s);
            float bs = 0.0;
            if ((pc.flags & 1u) != 0u) bs += msk[mb + j];
            if ((pc.flags & 2u) != 0u) bs += kpad[kpb + j];
            s = fma(bs, LOG2E, s);
            float mn = max(m, s), alpha = exp2(m - mn), pj = exp2(s - mn);
            m = mn;
            l = fma(l, alpha, pj);
            [[unroll]] for (uint c = 0; c < D; c++) acc[c] = fma(pj, S[voff + j * D + c], acc[c] * alpha);
        }
        float inv = l > 0.0 ? 1.0 / l : 0.0; // every key masked: 0
        uint ob = pc.o0 + (b * pc.tq + i) * HD + h * D;
        [[unroll]] for (uint c = 0; c < D; c++) o[ob + c] = acc[c] * inv;
    }
}
