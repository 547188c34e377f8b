#version 450
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
// LoRA down-projection of the fused linear: T (M, R) = s_a * X A_a^T, where the adapters are stacked
// by rows in A (R, K) and adapter a owns rows [end[a-1], end[a]) with scale s[a]. X (M, K) fp32; A
// fp32 or fp16; T fp32. T is then the second K segment of matmul.comp (VKG_MM_LORA), so the scale is
// applied here once per (row, rank) instead of once per output in the matmul.
//
// Variants (runtime/kernels/lora.c picks the one matching the matmul's):
//  VKG_LORA_TEXEL  X and A through texel buffers, one subgroup of 8 per workgroup, X rows shared by
//                  subgroupBroadcast: the shape of matmul.comp's texel variant, for lavapipe.
//                  VKG_LORA_SCALAR_K fetches one float at a time (K not a multiple of 4).
//  (neither)       storage buffers and shared-memory tiles: any device.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint BM = 32;
layout(constant_id = 2) const uint BN = 32;
layout(constant_id = 3) const uint BK = 16;
layout(constant_id = 4) const uint TM = 4;
layout(constant_id = 5) const uint TN = 2;
layout(constant_id = 6) const bool A_F16 = false; // storage variant: A holds packed halves

layout(push_constant) uniform P {
    uint M, K, R, pad;
    uint end[8]; // adapter a owns ranks [end[a-1], end[a]); unused adapters end at R (empty)
    float s[8];
} pc;

layout(std430, binding = 2) writeonly buffer Tb { float t[]; };

void store(uint m, uint j, float v)
{
    // Adapter bounds come from push constants at constant indices, so this is a handful of scalar
    // compares per output, paid once per (row, rank) rather than per matmul output.
    float sc = 0.0;
    uint lo = 0u;
    [[unroll]] for (uint a = 0u; a < 8u; a++) {
        if (j >= lo && j < pc.end[a]) sc = pc.s[a];
        lo = pc.end[a];
    }
    t[m * pc.R + j] = sc * v;
}

#ifdef VKG_LORA_TEXEL
// See matmul.comp's texel main(): on llvmpipe storage and shared loads are per-lane loops while texel
// fetches and subgroup shuffles are not. Shuffles still cost about as much as a few FMAs each, so the
// side that is broadcast must feed many FMAs: with few ranks (LANE_ROWS) each lane owns TM rows of its
// own and the 8*TN ranks are fetched once per subgroup and broadcast (4*TM FMAs per broadcast); with
// many ranks, as in matmul, each lane owns TN ranks and the 8*TM rows are broadcast (4*TN per).
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_ballot : require
layout(constant_id = 7) const bool LANE_ROWS = false;
layout(binding = 0) uniform samplerBuffer X;
layout(binding = 1) uniform samplerBuffer A;
const uint SG = 8u;

#ifdef VKG_LORA_SCALAR_K
const uint VW = 1u; // floats per fetch
#else
const uint VW = 4u;
#endif

void main()
{
    uint lane = gl_LocalInvocationID.x % SG;
    uint m0 = gl_WorkGroupID.y * (SG * TM), j0 = gl_WorkGroupID.x * (SG * TN);
    uint kv = pc.K / VW;
    // Rows and ranks past the edge read the last valid one (clamped) and are never stored. Either way
    // lane l fetches rows m0 + i*8 + l and ranks j0 + j*8 + l.
    int xr[TM], ar[TN];
    [[unroll]] for (uint i = 0; i < TM; i++) xr[i] = int(min(m0 + i * SG + lane, pc.M - 1u) * kv);
    [[unroll]] for (uint j = 0; j < TN; j++) ar[j] = int(min(j0 + j * SG + lane, pc.R - 1u) * kv);

    // acc[(i * TN + j) * SG + l]: row m0 + i*8 + (LANE_ROWS ? lane : l), rank j0 + j*8 + (LANE_ROWS ? l : lane).
    float acc[TM * TN * SG];
    [[unroll]] for (uint i = 0; i < TM * TN * SG; i++) acc[i] = 0.0;
    for (int k = 0; k < int(kv); k++) {
        vec4 xv[TM], av[TN];
        [[unroll]] for (uint i = 0; i < TM; i++) xv[i] = texelFetch(X, xr[i] + k);
        [[unroll]] for (uint j = 0; j < TN; j++) av[j] = texelFetch(A, ar[j] + k);
#ifdef VKG_LORA_SCALAR_K
#define LORA_FMA(o, u, v) acc[o] = fma((u).x, (v).x, acc[o]);
#else
#define LORA_FMA(o, u, v) { float a = acc[o]; a = fma((u).x, (v).x, a); a = fma((u).y, (v).y, a); \
            a = fma((u).z, (v).z, a); a = fma((u).w, (v).w, a); acc[o] = a; }
#endif
        // subgroupBroadcast needs a constant lane index: the 8 lanes are spelled out.
#define LORA_BC_RANK(l) { vec4 as = subgroupBroadcast(av[j], l); \
            [[unroll]] for (uint i = 0; i < TM; i++) LORA_FMA((i * TN + j) * SG + l, xv[i], as) }
#define LORA_BC_ROW(l) { vec4 xs = subgroupBroadcast(xv[i], l); \
            [[unroll]] for (uint j = 0; j < TN; j++) LORA_FMA((i * TN + j) * SG + l, xs, av[j]) }
        if (LANE_ROWS) {
            [[unroll]] for (uint j = 0; j < TN; j++) {
                LORA_BC_RANK(0) LORA_BC_RANK(1) LORA_BC_RANK(2) LORA_BC_RANK(3)
                LORA_BC_RANK(4) LORA_BC_RANK(5) LORA_BC_RANK(6) LORA_BC_RANK(7)
            }
        } else {
            [[unroll]] for (uint i = 0; i < TM; i++) {
                LORA_BC_ROW(0) LORA_BC_ROW(1) LORA_BC_ROW(2) LORA_BC_ROW(3)
                LORA_BC_ROW(4) LORA_BC_ROW(5) LORA_BC_ROW(6) LORA_BC_ROW(7)
            }
        }
    }
    [[unroll]] for (uint i = 0; i < TM; i++)
        [[unroll]] for (uint j = 0; j < TN; j++)
            [[unroll]] for (uint l = 0; l < SG; l++) {
                uint m = m0 + i * SG + (LANE_ROWS ? lane : l), jj = j0 + j * SG + (LANE_ROWS ? l : lane);
                if (m < pc.M && jj < pc.R) store(m, jj, acc[(i * TN + j) * SG + l]);
            }
}
#else
layout(std430, binding = 0) readonly buffer Xb { float x[]; };
layout(std430, binding = 1) readonly buffer Ab { uint aw[]; };
float loada(uint e)
{
    if (A_F16) {
        vec2 h = unpackHalf2x16(aw[e >> 1]);
        return (e & 1u) != 0u ? h.y : h.x;
    }
    return uintBitsToFloat(aw[e]);
}

shared float Xs[BK * BM];
shared float As[BK * BN];

// The same blocking as matmul.comp's tiled variant, over a BM x BN tile of T.
void main()
{
    const uint tn_count = BN / TN;
    uint id = gl_LocalInvocationID.x;
    uint tn = id % tn_count, tm = id / tn_count;
    uint m0 = gl_WorkGroupID.y * BM, j0 = gl_WorkGroupID.x * BN;

    float acc[TM * TN];
    for (uint i = 0; i < TM * TN; i++) acc[i] = 0.0;
    for (uint k0 = 0; k0 < pc.K; k0 += BK) {
        for (uint e = id; e < BK * BM; e += gl_WorkGroupSize.x) {
            uint mm = e / BK, kk = e % BK, gm = m0 + mm, gk = k0 + kk;
            Xs[kk * BM + mm] = (gm < pc.M && gk < pc.K) ? x[gm * pc.K + gk] : 0.0;
        }
        for (uint e = id; e < BK * BN; e += gl_WorkGroupSize.x) {
            uint jj = e / BK, kk = e % BK, gj = j0 + jj, gk = k0 + kk;
            As[kk * BN + jj] = (gj < pc.R && gk < pc.K) ? loada(gj * pc.K + gk) : 0.0;
        }
        barrier();
        for (uint kk = 0; kk < BK; kk++) {
            float a[TM], b[TN];
            for (uint i = 0; i < TM; i++) a[i] = Xs[kk * BM + tm + i * (BM / TM)];
            for (uint j = 0; j < TN; j++) b[j] = As[kk * BN + tn + j * tn_count];
            for (uint i = 0; i < TM; i++)
                for (uint j = 0; j < TN; j++) acc[i * TN + j] = fma(a[i], b[j], acc[i * TN + j]);
        }
        barrier();
    }
    for (uint i = 0; i < TM; i++) {
        uint gm = m0 + tm + i * (BM / TM);
        if (gm >= pc.M) continue;
        for (uint j = 0; j < TN; j++) {
            uint gj = j0 + tn + j * tn_count;
            if (gj < pc.R) store(gm, gj, acc[i * TN + j]);
        }
    }
}
#endif
