#version 450
#extension GL_GOOGLE_include_directive : require
// Grouped matmul over MoE expert segments: rows are (token, slot) pairs in expert-contiguous order,
// one tile of rows never crosses an expert, and each workgroup's tile comes from the list the
// dispatch SCAN wrote (the grid is indirect: only real tiles run). For a tile of expert e:
//   Y[row] = epilogue(X[src(row)] W_e^T),  W (E, N, K), src(row) = perm[row] / k (gather: rows of the
//   token matrix) or row (rows already in pair order).
// Epilogue (flags): + bias_e, activation, * gate of the pair, * Y[row] (the up half of SwiGLU).
// Variants as matmul.comp: VKG_GM_TILED (shared memory, GPUs), VKG_GM_TEXEL (lavapipe).
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint BM = 32;
layout(constant_id = 2) const uint BN = 64;
layout(constant_id = 3) const uint BK = 16;
layout(constant_id = 4) const uint TM = 2;
layout(constant_id = 5) const uint TN = 4;

layout(push_constant) uniform P {
    uint N, K, k, flags; // flags: bit0 bias, bits1-2 act, bit3 gate, bit4 gather, bit5 multiply into Y,
                         // bit6 add the token's row of U before the activation
    uint ldx, xe;        // X row stride and per-expert column offset, in elements
    float alpha;         // multiplies the product (the LoRA scale)
    uint pad;
} pc;

layout(std430, binding = 2) readonly buffer Bias { float bias[]; };
layout(std430, binding = 3) buffer Yb { float y[]; };
layout(std430, binding = 4) readonly buffer Perm { uint perm[]; };
layout(std430, binding = 5) readonly buffer G { float gates[]; };
layout(std430, binding = 6) readonly buffer Tiles { uvec4 tiles[]; };
#if defined(VKG_GM_TEXEL) || defined(VKG_GM_SKINNY)
layout(binding = 7) uniform samplerBuffer U; // R32F: llvmpipe gathers texels faster than storage words
float load_u(uint i) { return texelFetch(U, int(i)).x; }
#else
layout(std430, binding = 7) readonly buffer Ub { float urow[]; };
float load_u(uint i) { return urow[i]; }
#endif

uint src_row(uint row) { return (pc.flags & 16u) != 0u ? perm[row] / pc.k : row; }

// pair = perm[m], read once per row by the caller: per-element storage reads are what cost here.
void store(uint e, uint m, uint pair, uint n, float v)
{
    v *= pc.alpha;
    if ((pc.flags & 1u) != 0u) v += bias[e * pc.N + n];
    if ((pc.flags & 64u) != 0u) v += load_u((pair / pc.k) * pc.N + n);
    v = vkg_act(v, (pc.flags >> 1) & 3u);
    if ((pc.flags & 8u) != 0u) v *= gates[pair];
    uint o = m * pc.N + n;
    if ((pc.flags & 32u) != 0u) v *= y[o];
    y[o] = v;
}

#ifdef VKG_GM_TILED
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
shared uint Src[BM];
shared uint Pm[BM];

void main()
{
    const uint tn_count = BN / TN;
    uvec4 tile = tiles[gl_WorkGroupID.y];
    uint e = tile.x, r0 = tile.y, r1 = tile.z;
    uint t = gl_LocalInvocationID.x;
    uint tn = t % tn_count, tm = t / tn_count;
    uint n0 = gl_WorkGroupID.x * BN;
    uint wb = e * pc.N * pc.K;
    for (uint i = t; i < BM; i += gl_WorkGroupSize.x) {
        Src[i] = r0 + i < r1 ? src_row(r0 + i) : 0u;
        Pm[i] = r0 + i < r1 ? perm[r0 + i] : 0u;
    }
    barrier();

    float acc[TM * TN];
    for (uint i = 0; i < TM * TN; i++) acc[i] = 0.0;
    for (uint k0 = 0; k0 < pc.K; k0 += BK) {
        for (uint q = t; q < BK * BM; q += gl_WorkGroupSize.x) {
            uint mm = q / BK, kk = q % BK, gk = k0 + kk;
            As[kk * BM + mm] = (r0 + mm < r1 && gk < pc.K) ? x[Src[mm] * pc.ldx + e * pc.xe + gk] : 0.0;
        }
        for (uint q = t; q < BK * BN; q += gl_WorkGroupSize.x) {
            uint nn = q / BK, kk = q % BK, gn = n0 + nn, gk = k0 + kk;
            Ws[kk * BN + nn] = (gn < pc.N && gk < pc.K) ? loadw(wb + gn * pc.K + gk) : 0.0;
        }
        barrier();
        for (uint kk = 0; kk < BK; kk++) {
            float a[TM], b[TN];
            for (uint i = 0; i < TM; i++) a[i] = As[kk * BM + tm + i * (BM / TM)];
            for (uint j = 0; j < TN; j++) b[j] = Ws[kk * BN + tn + j * tn_count];
            for (uint i = 0; i < TM; i++)
                for (uint j = 0; j < TN; j++) acc[i * TN + j] = fma(a[i], b[j], acc[i * TN + j]);
        }
        barrier();
    }
    for (uint i = 0; i < TM; i++) {
        uint mm = tm + i * (BM / TM), m = r0 + mm;
        if (m >= r1) continue;
        for (uint j = 0; j < TN; j++) {
            uint gn = n0 + tn + j * tn_count;
            if (gn < pc.N) store(e, m, Pm[mm], gn, acc[i * TN + j]);
        }
    }
}
#endif

#ifdef VKG_GM_TEXEL
// One subgroup of 8 per workgroup; each lane fetches TM rows and TN columns, rows are shared by
// subgroupBroadcast (see matmul.comp). A tile is 8*TM rows of one expert.
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_ballot : require
#extension GL_EXT_control_flow_attributes : require
layout(binding = 0) uniform samplerBuffer X;
layout(binding = 1) uniform samplerBuffer W;
const uint SG = 8u;

void main()
{
#ifdef VKG_GM_SCALAR_K
    const uint VW = 1u;
#else
    const uint VW = 4u;
#endif
    uvec4 tile = tiles[gl_WorkGroupID.y];
    uint e = tile.x, r0 = tile.y, r1 = tile.z;
    uint lane = gl_LocalInvocationID.x % SG;
    uint n0 = gl_WorkGroupID.x * (SG * TN);
    uint kv = pc.K / VW;
    int wb = int(e * pc.N * kv);
    int xr[TM], wr[TN];
    [[unroll]] for (uint r = 0; r < TM; r++)
        xr[r] = int((src_row(min(r0 + r * SG + lane, r1 - 1u)) * pc.ldx + e * pc.xe) / VW);
    [[unroll]] for (uint j = 0; j < TN; j++) wr[j] = wb + int(min(n0 + j * SG + lane, pc.N - 1u) * kv);

    float acc[TM * SG * TN];
    [[unroll]] for (uint i = 0; i < TM * SG * TN; i++) acc[i] = 0.0;
    for (int k = 0; k < int(kv); k++) {
        vec4 xv[TM], wv[TN];
        [[unroll]] for (uint r = 0; r < TM; r++) xv[r] = texelFetch(X, xr[r] + k);
        [[unroll]] for (uint j = 0; j < TN; j++) wv[j] = texelFetch(W, wr[j] + k);
        [[unroll]] for (uint r = 0; r < TM; r++) {
#ifdef VKG_GM_SCALAR_K
#define GM_BC(i) { float xs = subgroupBroadcast(xv[r].x, i); \
            [[unroll]] for (uint j = 0; j < TN; j++) { uint o = (r * SG + i) * TN + j; \
                acc[o] = fma(xs, wv[j].x, acc[o]); } }
#else
#define GM_BC(i) { vec4 xs = subgroupBroadcast(xv[r], i); \
            [[unroll]] for (uint j = 0; j < TN; j++) { uint o = (r * SG + i) * TN + j; float a = acc[o]; \
                a = fma(xs.x, wv[j].x, a); a = fma(xs.y, wv[j].y, a); \
                a = fma(xs.z, wv[j].z, a); a = fma(xs.w, wv[j].w, a); acc[o] = a; } }
#endif
            GM_BC(0) GM_BC(1) GM_BC(2) GM_BC(3) GM_BC(4) GM_BC(5) GM_BC(6) GM_BC(7)
        }
    }
    uint pr[TM * SG];
    [[unroll]] for (uint i = 0; i < TM * SG; i++) pr[i] = r0 + i < r1 ? perm[r0 + i] : 0u;
    [[unroll]] for (uint j = 0; j < TN; j++) {
        uint n = n0 + j * SG + lane;
        if (n >= pc.N) continue;
        [[unroll]] for (uint r = 0; r < TM; r++)
            [[unroll]] for (uint i = 0; i < SG; i++) {
                uint m = r0 + r * SG + i;
                if (m < r1) store(e, m, pr[r * SG + i], n, acc[(r * SG + i) * TN + j]);
            }
    }
}
#endif

#ifdef VKG_GM_SKINNY
// Narrow outputs (N <= 8 per workgroup, a LoRA rank) with long K: the 8 lanes split K instead of N,
// each accumulates the tile's 16 rows x 8 columns over its share of K, and the partial sums meet in
// shared memory, added in lane order (a fixed order: bit-identical run to run).
#extension GL_EXT_control_flow_attributes : require
layout(binding = 0) uniform samplerBuffer X;
layout(binding = 1) uniform samplerBuffer W;
const uint SG = 8u, ROWS = 16u, COLS = 8u;
shared float part[SG * ROWS * COLS];

void main()
{
    uvec4 tile = tiles[gl_WorkGroupID.y];
    uint e = tile.x, r0 = tile.y, r1 = tile.z;
    uint lane = gl_LocalInvocationID.x;
    uint n0 = gl_WorkGroupID.x * COLS;
    uint kv = pc.K / 4u;
    int xr[ROWS], wr[COLS];
    [[unroll]] for (uint r = 0; r < ROWS; r++) xr[r] = int((src_row(min(r0 + r, r1 - 1u)) * pc.ldx + e * pc.xe) / 4u);
    [[unroll]] for (uint j = 0; j < COLS; j++) wr[j] = int((e * pc.N + min(n0 + j, pc.N - 1u)) * kv);
    float acc[ROWS * COLS];
    [[unroll]] for (uint i = 0; i < ROWS * COLS; i++) acc[i] = 0.0;
    for (uint k = lane; k < kv; k += SG) {
        vec4 wv[COLS];
        [[unroll]] for (uint j = 0; j < COLS; j++) wv[j] = texelFetch(W, wr[j] + int(k));
        [[unroll]] for (uint r = 0; r < ROWS; r++) {
            vec4 xv = texelFetch(X, xr[r] + int(k));
            [[unroll]] for (uint j = 0; j < COLS; j++) acc[r * COLS + j] += dot(xv, wv[j]);
        }
    }
    [[unroll]] for (uint i = 0; i < ROWS * COLS; i++) part[lane * ROWS * COLS + i] = acc[i];
    barrier();
    for (uint i = lane; i < ROWS * COLS; i += SG) {
        uint r = i / COLS, j = i % COLS, m = r0 + r, n = n0 + j;
        if (m >= r1 || n >= pc.N) continue;
        float v = 0.0;
        for (uint l = 0u; l < SG; l++) v += part[l * ROWS * COLS + i];
        store(e, m, perm[m], n, v);
    }
}
#endif
