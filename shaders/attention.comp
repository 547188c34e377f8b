#version 450
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
// Fused multi-head attention forward, flash-attention style: out = softmax(q k^T * scale + mask +
// key_padding) v per (batch, head). A workgroup owns a block of query rows of one (batch, head)
// (grid: row blocks x heads x batch) and loops over blocks of keys with an online softmax in fp32:
// the running max starts at the finite -FLT_MAX/2, scores go through exp2 (q.k pre-multiplied by
// scale * log2 e, masks by log2 e), and a row whose every score is -inf (or below -FLT_MAX/2) keeps
// a zero sum and is written as 0. No score matrix leaves registers; every sum runs in a fixed order.
//
// Variants (one blob each, chosen per device by runtime/kernels/attention.c):
//  VKG_ATT_TILED  K/V tiles in shared memory, one query row per invocation: the shape for GPUs.
//  VKG_ATT_TEXEL  q/k/v/mask through uniform texel buffers, no shared memory, one subgroup of 8 per
//                 workgroup, operands shared by subgroupBroadcast: the shape for lavapipe (why:
//                 shaders/matmul.comp, VKG_MM_TEXEL). VKG_ATT_SCALAR reads one float per fetch for
//                 head dims, strides or columns that are not multiples of 4.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint D = 64;   // head dim
layout(constant_id = 2) const uint TM = 2;   // texel: query rows per lane (8*TM rows per workgroup)
layout(constant_id = 3) const uint TN = 8;   // texel: keys per lane per block (8*TN keys); tiled: keys per tile

// Offsets are in fetch units (vec4 for the texel variant unless VKG_ATT_SCALAR, else floats) and
// already include the binding's alignment slack and the column (q_col, k_col, v_col).
layout(push_constant) uniform P {
    uint tq, tk, heads, flags; // flags: bit0 mask, bit1 key padding
    uint qs, ks, q0, k0;       // row strides of q and of k/v; bases of q and k
    uint v0, m0, mbs, kp0;     // base of v; mask base, mask batch stride (0: shared); key padding base
    uint o0, os;               // out base and row stride (floats)
    float sl2e;                // scale * log2(e)
    uint pad;
} pc;

#define NEG_INF uintBitsToFloat(0xff800000u)
const float M_INIT = -1.70141173e38; // -FLT_MAX / 2: finite, so m_old - m_new never gives inf - inf
const float LOG2E = 1.44269504088896341;

#ifdef VKG_ATT_TILED
layout(std430, binding = 0) readonly buffer Qb { float q[]; };
layout(std430, binding = 1) readonly buffer Kb { float k[]; };
layout(std430, binding = 2) readonly buffer Vb { float v[]; };
layout(std430, binding = 3) readonly buffer Mb { float msk[]; };
layout(std430, binding = 4) readonly buffer KPb { float kpad[]; };
layout(std430, binding = 5) writeonly buffer Ob { float o[]; };

shared float Ks[TN * D];
shared float Vs[TN * D];
shared float Ss[TN * gl_WorkGroupSize.x]; // scores of the tile, one column per invocation

// Loops over the keys of a tile stay loops (only the head dim is unrolled): compile time and code
// size stay small for every (head dim, tile) preset.
void main()
{
    const uint BR = gl_WorkGroupSize.x, BC = TN;
    uint t = gl_LocalInvocationID.x, b = gl_WorkGroupID.z, h = gl_WorkGroupID.y;
    uint i = gl_WorkGroupID.x * BR + t;
    uint ic = min(i, pc.tq - 1u);
    uint qb = pc.q0 + (b * pc.tq + ic) * pc.qs + h * D;
    uint kb = pc.k0 + b * pc.tk * pc.ks + h * D, vb = pc.v0 + b * pc.tk * pc.ks + h * D;
    uint mb = pc.m0 + b * pc.mbs + ic * pc.tk, kpb = pc.kp0 + b * pc.tk;
    float qr[D], acc[D];
    [[unroll]] for (uint c = 0; c < D; c++) {
        qr[c] = q[qb + c] * pc.sl2e;
        acc[c] = 0.0;
    }
    float m = M_INIT, l = 0.0;
    for (uint j0 = 0; j0 < pc.tk; j0 += BC) {
        barrier();
        for (uint e = t; e < BC * D; e += BR) {
            uint jj = e / D, c = e % D, j = min(j0 + jj, pc.tk - 1u);
            Ks[e] = k[kb + j * pc.ks + c];
            Vs[e] = v[vb + j * pc.ks + c];
        }
        barrier();
        uint n = min(BC, pc.tk - j0);
        float mx = NEG_INF;
        for (uint jj = 0; jj < n; jj++) {
            float a = 0.0;
            [[unroll]] for (uint c = 0; c < D; c++) a = fma(qr[c], Ks[jj * D + c], a);
            float bias = 0.0;
            if ((pc.flags & 1u) != 0u) bias += msk[mb + j0 + jj];
            if ((pc.flags & 2u) != 0u) bias += kpad[kpb + j0 + jj];
            a = fma(bias, LOG2E, a);
            Ss[jj * BR + t] = a;
            mx = max(mx, a);
        }
        float mn = max(m, mx), alpha = exp2(m - mn);
        m = mn;
        l *= alpha;
        [[unroll]] for (uint c = 0; c < D; c++) acc[c] *= alpha;
        for (uint jj = 0; jj < n; jj++) {
            float p = exp2(Ss[jj * BR + t] - mn);
            l += p;
            [[unroll]] for (uint c = 0; c < D; c++) acc[c] = fma(p, Vs[jj * D + c], acc[c]);
        }
    }
    if (i >= pc.tq) return;
    float inv = l > 0.0 ? 1.0 / l : 0.0; // every key masked: 0
    uint ob = pc.o0 + (b * pc.tq + i) * pc.os + h * D;
    [[unroll]] for (uint c = 0; c < D; c++) o[ob + c] = acc[c] * inv;
}
#endif

#ifdef VKG_ATT_TEXEL
// One subgroup of 8 lanes per workgroup; BR = 8*TM query rows, BC = 8*TN keys per block.
//  S = q k^T: lane l owns keys j0 + 8t + l (t < TN); it fetches those K rows and the q rows 8r + l,
//    and the q rows reach every lane by subgroupBroadcast (as in the texel matmul).
//  O += P v: lane l owns head-dim columns (in fetch units) l + 8u (u < U) of every row; P[row][key]
//    lives in the lane that owns the key and is broadcast with a constant lane index.
// Each lane keeps its own partial row sums (its keys only), added across the subgroup at the end.
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_ballot : require
#extension GL_KHR_shader_subgroup_arithmetic : require
layout(binding = 0) uniform samplerBuffer Q;
layout(binding = 1) uniform samplerBuffer K;
layout(binding = 2) uniform samplerBuffer V;
layout(binding = 3) uniform samplerBuffer MK;  // R32F
layout(binding = 4) uniform samplerBuffer KPD; // R32F
layout(std430, binding = 5) writeonly buffer Ob { float o[]; };
const uint SG = 8u;
#ifdef VKG_ATT_SCALAR
#define VT float
#define FETCH(s, i) texelFetch(s, int(i)).x
#define DOT(a, b, acc) fma(a, b, acc)
const uint VW = 1u;
#else
#define VT vec4
#define FETCH(s, i) texelFetch(s, int(i))
#define DOT(a, b, acc) fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, acc))))
const uint VW = 4u;
#endif
const uint DV = D / VW;         // fetches per head row
const uint U = (DV + SG - 1u) / SG; // output columns per lane

void main()
{
    const uint BR = SG * TM;
    uint lane = gl_LocalInvocationID.x, b = gl_WorkGroupID.z, h = gl_WorkGroupID.y;
    uint r0 = gl_WorkGroupID.x * BR;
    uint qrow[TM];
    [[unroll]] for (uint r = 0; r < TM; r++)
        qrow[r] = pc.q0 + (b * pc.tq + min(r0 + r * SG + lane, pc.tq - 1u)) * pc.qs + h * DV;
    uint kb = pc.k0 + b * pc.tk * pc.ks + h * DV, vb = pc.v0 + b * pc.tk * pc.ks + h * DV;
    uint vcol[U];
    [[unroll]] for (uint u = 0; u < U; u++) vcol[u] = min(lane + u * SG, DV - 1u);
    bool hasmask = (pc.flags & 1u) != 0u, haskp = (pc.flags & 2u) != 0u;

    float m[BR], l[BR];
    VT acc[BR * U];
    [[unroll]] for (uint i = 0; i < BR; i++) {
        m[i] = M_INIT;
        l[i] = 0.0;
        [[unroll]] for (uint u = 0; u < U; u++) acc[i * U + u] = VT(0.0);
    }

    for (uint j0 = 0; j0 < pc.tk; j0 += SG * TN) {
        uint krow[TN];
        [[unroll]] for (uint t = 0; t < TN; t++) krow[t] = kb + min(j0 + t * SG + lane, pc.tk - 1u) * pc.ks;
        float s[BR * TN];
        [[unroll]] for (uint i = 0; i < BR * TN; i++) s[i] = 0.0;
        for (uint c = 0; c < DV; c++) {
            VT qv[TM], kv[TN];
            [[unroll]] for (uint r = 0; r < TM; r++) qv[r] = FETCH(Q, qrow[r] + c);
            [[unroll]] for (uint t = 0; t < TN; t++) kv[t] = FETCH(K, krow[t] + c);
            [[unroll]] for (uint r = 0; r < TM; r++) {
#define ATT_BC(i) { VT qs = subgroupBroadcast(qv[r], i); \
                [[unroll]] for (uint t = 0; t < TN; t++) { uint e = (r * SG + i) * TN + t; s[e] = DOT(qs, kv[t], s[e]); } }
                ATT_BC(0) ATT_BC(1) ATT_BC(2) ATT_BC(3) ATT_BC(4) ATT_BC(5) ATT_BC(6) ATT_BC(7)
            }
        }
        // Scores in log2 units, the online-softmax update, P in s.
        float kp[TN];
        [[unroll]] for (uint t = 0; t < TN; t++) {
            uint j = min(j0 + t * SG + lane, pc.tk - 1u);
            kp[t] = haskp ? texelFetch(KPD, int(pc.kp0 + b * pc.tk + j)).x : 0.0;
        }
        [[unroll]] for (uint i = 0; i < BR; i++) {
            uint row = min(r0 + i, pc.tq - 1u);
            float mx = NEG_INF;
            [[unroll]] for (uint t = 0; t < TN; t++) {
                uint j = j0 + t * SG + lane;
                float bias = kp[t];
                if (hasmask) bias += texelFetch(MK, int(pc.m0 + b * pc.mbs + row * pc.tk + min(j, pc.tk - 1u))).x;
                float x = j < pc.tk ? fma(s[i * TN + t], pc.sl2e, bias * LOG2E) : NEG_INF;
                s[i * TN + t] = x;
                mx = max(mx, x);
            }
            float mn = max(m[i], subgroupMax(mx)), alpha = exp2(m[i] - mn);
            m[i] = mn;
            float ps = 0.0;
            [[unroll]] for (uint t = 0; t < TN; t++) {
                float p = exp2(s[i * TN + t] - mn);
                s[i * TN + t] = p;
                ps += p;
            }
            l[i] = fma(l[i], alpha, ps);
            [[unroll]] for (uint u = 0; u < U; u++) acc[i * U + u] *= alpha;
        }
        [[unroll]] for (uint t = 0; t < TN; t++) {
            if (j0 + t * SG >= pc.tk) break; // past the last key: all of P is 0 here
            // Key j0 + 8t + c: its V row (U fetches per lane), its P column from lane c.
#define ATT_PV(c) { uint vr = vb + min(j0 + t * SG + c, pc.tk - 1u) * pc.ks; VT vv[U]; \
                [[unroll]] for (uint u = 0; u < U; u++) vv[u] = FETCH(V, vr + vcol[u]); \
                [[unroll]] for (uint i = 0; i < BR; i++) { float p = subgroupBroadcast(s[i * TN + t], c); \
                    [[unroll]] for (uint u = 0; u < U; u++) acc[i * U + u] = fma(VT(p), vv[u], acc[i * U + u]); } }
            ATT_PV(0) ATT_PV(1) ATT_PV(2) ATT_PV(3) ATT_PV(4) ATT_PV(5) ATT_PV(6) ATT_PV(7)
        }
    }
    [[unroll]] for (uint i = 0; i < BR; i++) {
        float lt = subgroupAdd(l[i]);
        float inv = lt > 0.0 ? 1.0 / lt : 0.0; // every key masked: 0
        uint row = r0 + i;
        if (row >= pc.tq) continue;
        uint ob = pc.o0 + (b * pc.tq + row) * pc.os + h * D;
        [[unroll]] for (uint u = 0; u < U; u++) {
            uint col = lane + u * SG;
            if (col >= DV) continue;
            VT y = acc[i * U + u] * inv;
#ifdef VKG_ATT_SCALAR
            o[ob + col] = y;
#else
            o[ob + 4u * col] = y.x;
            o[ob + 4u * col + 1u] = y.y;
            o[ob + 4u * col + 2u] = y.z;
            o[ob + 4u * col + 3u] = y.w;
#endif
        }
    }
}
#endif
