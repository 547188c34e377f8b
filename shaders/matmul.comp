#version 450
#extension GL_GOOGLE_include_directive : require
// Linear / batched matmul: Y[b] = act(X[b] W[b]^T + bias). X (M,K), W (N,K) (PyTorch Linear layout),
// Y (M,N), all row-major; fp32 accumulation. W is fp32, or fp16 (VKG_W_F16: packed pairs in uints,
// decoded with unpackHalf2x16, so no 16-bit storage feature is needed).
//
// Variants (one per embedded blob, chosen per device by runtime/kernels/matmul.c):
//  VKG_MM_TILED  shared-memory tiles, TM x TN outputs per invocation: the shape for real GPUs.
//  VKG_MM_TEXEL  X and W through uniform texel buffers, no shared memory, X rows shared by
//                subgroupBroadcast: the shape for lavapipe (see the comment at its main()).
// VKG_MM_LORA adds a second K segment, acc += T[m, :] . LB[n, :] over the R LoRA ranks, with T = the
// scaled down-projection from lora.comp and LB = lora_b (N, R). It lands in the same accumulators
// before the epilogue, so bias, activation, scale and residual see x W^T + LoRA, as the op defines.
// Without the define the blobs are exactly the plain matmul: LoRA costs nothing when absent.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint BM = 64;
layout(constant_id = 2) const uint BN = 64;
layout(constant_id = 3) const uint BK = 16;
layout(constant_id = 4) const uint TM = 4;
layout(constant_id = 5) const uint TN = 4;

layout(push_constant) uniform P {
    uint M, N, K, flags; // flags: bit0 bias, bits 1-2 activation (ACT_*), bit3 scale, bit4 residual
    uint sx, sw, sy, R; // batch strides in elements (0 = shared across the batch); LoRA rank sum
} pc;

#ifdef VKG_MM_LORA
layout(constant_id = 6) const bool LORA_F16 = false; // tiled: LB holds packed halves
layout(constant_id = 7) const bool LORA_V4 = false;  // texel: T and LB through 4-wide views (R % 4 == 0)
#endif

layout(std430, binding = 2) readonly buffer Bias { float bias[]; };
layout(std430, binding = 3) writeonly buffer Yb { float y[]; };
layout(std430, binding = 4) readonly buffer Scale { float scale[]; };
layout(std430, binding = 5) readonly buffer Res { float res[]; };

// The epilogue: y = residual + scale * act(acc + bias). A transformer's LayerScale and residual add
// ride on the projection that feeds them instead of costing two more passes over the tensor.
void store(uint m, uint n, float v)
{
    if ((pc.flags & 1u) != 0u) v += bias[n];
    v = vkg_act(v, (pc.flags >> 1) & 3u);
    uint o = gl_WorkGroupID.z * pc.sy + m * pc.N + n;
    if ((pc.flags & 8u) != 0u) v *= scale[n];
    if ((pc.flags & 16u) != 0u) v += res[o];
    y[o] = v;
}

#ifdef VKG_MM_TILED
layout(std430, binding = 0) readonly buffer Xb { float x[]; };
#ifdef VKG_W_F16
layout(std430, binding = 1) readonly buffer Wb { uint w[]; };
float loadw(uint e) { vec2 h = unpackHalf2x16(w[e >> 1]); return (e & 1u) != 0u ? h.y : h.x; }
#else
layout(std430, binding = 1) readonly buffer Wb { float w[]; };
float loadw(uint e) { return w[e]; }
#endif

shared float As[BK * BM];
shared float Ws[BK * BN];

#ifdef VKG_MM_LORA
layout(std430, binding = 6) readonly buffer Tb { float tl[]; };
layout(std430, binding = 7) readonly buffer LBb { uint lb[]; };
float loadlb(uint e)
{
    if (LORA_F16) {
        vec2 h = unpackHalf2x16(lb[e >> 1]);
        return (e & 1u) != 0u ? h.y : h.x;
    }
    return uintBitsToFloat(lb[e]);
}
#endif

// One BK slice of the product, out of the shared tiles (both K segments use it).
#define MM_TILE_MAC() \
        for (uint kk = 0; kk < BK; kk++) { \
            float a[TM], b[TN]; \
            for (uint i = 0; i < TM; i++) a[i] = As[kk * BM + tm + i * (BM / TM)]; \
            for (uint j = 0; j < TN; j++) b[j] = Ws[kk * BN + tn + j * tn_count]; \
            for (uint i = 0; i < TM; i++) \
                for (uint j = 0; j < TN; j++) acc[i * TN + j] = fma(a[i], b[j], acc[i * TN + j]); \
        }

void main()
{
    const uint tn_count = BN / TN;
    uint t = gl_LocalInvocationID.x;
    uint tn = t % tn_count, tm = t / tn_count;
    uint m0 = gl_WorkGroupID.y * BM, n0 = gl_WorkGroupID.x * BN;
    uint xb = gl_WorkGroupID.z * pc.sx, wb = gl_WorkGroupID.z * pc.sw;

    float acc[TM * TN];
    for (uint i = 0; i < TM * TN; i++) acc[i] = 0.0;

    for (uint k0 = 0; k0 < pc.K; k0 += BK) {
        for (uint e = t; e < BK * BM; e += gl_WorkGroupSize.x) {
            uint mm = e / BK, kk = e % BK, gm = m0 + mm, gk = k0 + kk;
            As[kk * BM + mm] = (gm < pc.M && gk < pc.K) ? x[xb + gm * pc.K + gk] : 0.0;
        }
        for (uint e = t; e < BK * BN; e += gl_WorkGroupSize.x) {
            uint nn = e / BK, kk = e % BK, gn = n0 + nn, gk = k0 + kk;
            Ws[kk * BN + nn] = (gn < pc.N && gk < pc.K) ? loadw(wb + gn * pc.K + gk) : 0.0;
        }
        barrier();
        MM_TILE_MAC()
        barrier();
    }
#ifdef VKG_MM_LORA
    for (uint j0 = 0; j0 < pc.R; j0 += BK) {
        for (uint e = t; e < BK * BM; e += gl_WorkGroupSize.x) {
            uint mm = e / BK, jj = e % BK, gm = m0 + mm, gj = j0 + jj;
            As[jj * BM + mm] = (gm < pc.M && gj < pc.R) ? tl[gm * pc.R + gj] : 0.0;
        }
        for (uint e = t; e < BK * BN; e += gl_WorkGroupSize.x) {
            uint nn = e / BK, jj = e % BK, gn = n0 + nn, gj = j0 + jj;
            Ws[jj * BN + nn] = (gn < pc.N && gj < pc.R) ? loadlb(gn * pc.R + gj) : 0.0;
        }
        barrier();
        MM_TILE_MAC()
        barrier();
    }
#endif
    for (uint i = 0; i < TM; i++) {
        uint gm = m0 + tm + i * (BM / TM);
        if (gm >= pc.M) continue;
        for (uint j = 0; j < TN; j++) {
            uint gn = n0 + tn + j * tn_count;
            if (gn < pc.N) store(gm, gn, acc[i * TN + j]);
        }
    }
}
#endif

#ifdef VKG_MM_TEXEL
// Lavapipe variant. llvmpipe runs a subgroup as the 8 SIMD lanes of one CPU thread and turns every
// storage-buffer or shared-memory load into a per-lane loop, so the kernel avoids both: X and W come
// through texel fetches (4 consecutive k per RGBA fetch; an RGBA16F view decodes fp16 weights for
// free), and X rows are shared across the subgroup by subgroupBroadcast, a register shuffle. A
// subgroup owns 8*TM rows (each lane fetches TM of them) and 8*TN columns (each lane TN); the
// 8*TM*TN accumulators per lane are what amortise the loads (bench/RESULTS.md has the sweep).
// Requires subgroup size 8 (the host picks this variant only then). VKG_MM_SCALAR_K fetches one
// float at a time through R32F/R16F views, for K not a multiple of 4.
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_ballot : require
#extension GL_EXT_control_flow_attributes : require
layout(binding = 0) uniform samplerBuffer X;
layout(binding = 1) uniform samplerBuffer W;
#ifdef VKG_MM_LORA
layout(binding = 6) uniform samplerBuffer T;
layout(binding = 7) uniform samplerBuffer LB;
#endif
const uint SG = 8u;

// subgroupBroadcast needs a constant lane index: the 8 lanes are spelled out (MM_BC_ALL). MM_BC1
// serves one-float fetches, MM_BC4 four; the main loop and the LoRA segment share them.
#define MM_BC1(i) { float xs = subgroupBroadcast(xv[r].x, i); \
            [[unroll]] for (uint j = 0; j < TN; j++) { uint o = (r * SG + i) * TN + j; \
                acc[o] = fma(xs, wv[j].x, acc[o]); } }
#define MM_BC4(i) { vec4 xs = subgroupBroadcast(xv[r], i); \
            [[unroll]] for (uint j = 0; j < TN; j++) { uint o = (r * SG + i) * TN + j; float a = acc[o]; \
                a = fma(xs.x, wv[j].x, a); a = fma(xs.y, wv[j].y, a); \
                a = fma(xs.z, wv[j].z, a); a = fma(xs.w, wv[j].w, a); acc[o] = a; } }
#define MM_BC_ALL(BC) BC(0) BC(1) BC(2) BC(3) BC(4) BC(5) BC(6) BC(7)

void main()
{
#ifdef VKG_MM_SCALAR_K
    const uint VW = 1u; // floats per fetch
#else
    const uint VW = 4u;
#endif
    uint lane = gl_LocalInvocationID.x % SG, sg = gl_LocalInvocationID.x / SG;
    uint m0 = gl_WorkGroupID.y * (SG * TM);
    uint n0 = gl_WorkGroupID.x * (gl_WorkGroupSize.x * TN) + sg * (SG * TN);
    uint kv = pc.K / VW;
    int xb = int(gl_WorkGroupID.z * pc.sx / VW), wb = int(gl_WorkGroupID.z * pc.sw / VW);
    // Rows and columns past the edge read the last valid one (clamped) and are never stored.
    int xr[TM], wr[TN];
    [[unroll]] for (uint r = 0; r < TM; r++) xr[r] = xb + int(min(m0 + r * SG + lane, pc.M - 1u) * kv);
    [[unroll]] for (uint j = 0; j < TN; j++) wr[j] = wb + int(min(n0 + j * SG + lane, pc.N - 1u) * kv);

    float acc[TM * SG * TN];
    [[unroll]] for (uint i = 0; i < TM * SG * TN; i++) acc[i] = 0.0;
    for (int k = 0; k < int(kv); k++) {
        vec4 xv[TM], wv[TN];
        [[unroll]] for (uint r = 0; r < TM; r++) xv[r] = texelFetch(X, xr[r] + k);
        [[unroll]] for (uint j = 0; j < TN; j++) wv[j] = texelFetch(W, wr[j] + k);
        [[unroll]] for (uint r = 0; r < TM; r++) {
#ifdef VKG_MM_SCALAR_K
            MM_BC_ALL(MM_BC1)
#else
            MM_BC_ALL(MM_BC4)
#endif
        }
    }
#ifdef VKG_MM_LORA
    // The LoRA segment: the same register blocking over R ranks instead of K; LORA_V4 is a
    // specialization constant, so only one of the two loops is compiled.
    uint rv = LORA_V4 ? pc.R / 4u : pc.R;
    [[unroll]] for (uint r = 0; r < TM; r++) xr[r] = int(min(m0 + r * SG + lane, pc.M - 1u) * rv);
    [[unroll]] for (uint j = 0; j < TN; j++) wr[j] = int(min(n0 + j * SG + lane, pc.N - 1u) * rv);
#define MM_LORA_LOOP(BC) \
    for (int k = 0; k < int(rv); k++) { \
        vec4 xv[TM], wv[TN]; \
        [[unroll]] for (uint r = 0; r < TM; r++) xv[r] = texelFetch(T, xr[r] + k); \
        [[unroll]] for (uint j = 0; j < TN; j++) wv[j] = texelFetch(LB, wr[j] + k); \
        [[unroll]] for (uint r = 0; r < TM; r++) { MM_BC_ALL(BC) } \
    }
    if (LORA_V4) {
        MM_LORA_LOOP(MM_BC4)
    } else {
        MM_LORA_LOOP(MM_BC1)
    }
#endif
    [[unroll]] for (uint j = 0; j < TN; j++) {
        uint n = n0 + j * SG + lane;
        if (n >= pc.N) continue;
        [[unroll]] for (uint r = 0; r < TM; r++)
            [[unroll]] for (uint i = 0; i < SG; i++) {
                uint m = m0 + r * SG + i;
                if (m < pc.M) store(m, n, acc[(r * SG + i) * TN + j]);
            }
    }
}
#endif
