#version 450
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_ballot : require
#extension GL_EXT_control_flow_attributes : require
// The expert MLP of an MoE layer in one dispatch. A workgroup is one subgroup of 8 lanes and takes
// one 16-row tile of the dispatch plan ((token, slot) pairs of one expert in expert-contiguous order;
// indirect grid, y = tiles). For each chunk of 8 * TF hidden units
//   H = act(X[src(row)] W1_e[chunk]^T + b1_e[chunk])   lane l holds units l*TF .. l*TF+TF-1 of the chunk
//   Y += H W2_e[:, chunk]^T                             lane l holds Y's columns c*8 + l, in registers
// then Y[row] = gate(pair) * (Y + b2_e). H never leaves registers: it moves between lanes by
// subgroupBroadcast, so there is no shared memory and no barrier (llvmpipe runs a barrier-free
// one-subgroup workgroup as straight SIMD code; a first version with 64 lanes, H in shared memory
// and two barriers per chunk was 3x slower). Not the default: see fused_mlp_allowed in ops_moe.c.
// Each sum runs in the order of the two grouped matmuls (moe_matmul.comp, texel variant: one fma per
// element of K, in ascending K), so the outputs equal theirs bit for bit, and each output has one
// owner: bit-identical run to run, no atomics.
#include "common.glsl"

layout(local_size_x_id = 0) in;            // 8 (the subgroup)
layout(constant_id = 1) const uint TD = 32; // output columns per lane: D <= 8 * TD
layout(constant_id = 2) const uint TM = 2;  // rows per lane: RM = 8 * TM rows, the plan's tile
layout(constant_id = 3) const uint TF = 4;  // hidden units per lane and chunk, a multiple of 4
const uint SG = 8u, FC = SG * TF, RM = SG * TM;

layout(push_constant) uniform P {
    uint D, F, k, flags; // flags: bit0 b1, bit1 b2, bits2-3 activation
} pc;

layout(binding = 0) uniform samplerBuffer X;  // (T, D) as vec4 texels
layout(binding = 1) uniform samplerBuffer W1; // (E, F, D)
layout(binding = 2) uniform samplerBuffer W2; // (E, D, F)
layout(std430, binding = 3) readonly buffer B1 { float b1[]; };  // (E, F)
layout(std430, binding = 4) readonly buffer B2 { float b2[]; };  // (E, D)
layout(std430, binding = 5) writeonly buffer Yb { float y[]; };  // (P, D) rows in position order
layout(std430, binding = 6) readonly buffer Perm { uint perm[]; };
layout(std430, binding = 7) readonly buffer G { float gates[]; };
layout(std430, binding = 8) readonly buffer Tiles { uvec4 tiles[]; };

// Phase 1, rows r*8 + i (lane i's x rows, broadcast; i must be a constant): h[row][c] += x_row . W1[unit c].
#define MLP_H(i) [[unroll]] for (uint r = 0; r < TM; r++) { vec4 xs = subgroupBroadcast(xv[r], i); \
    [[unroll]] for (uint c = 0; c < TF; c++) { uint o = (r * SG + i) * TF + c; float a = h[o]; \
        a = fma(xs.x, w1v[c].x, a); a = fma(xs.y, w1v[c].y, a); \
        a = fma(xs.z, w1v[c].z, a); a = fma(xs.w, w1v[c].w, a); h[o] = a; } }

// Phase 2, the chunk's units held by lane l (its TF/4 texels of H, broadcast; l must be a constant):
// acc[row][c] += H[row][4 units] . W2[column c][same 4 units], texel by texel in ascending units.
#define MLP_Y(l) [[unroll]] for (uint tt = 0; tt < TF / 4u; tt++) if (l * (TF / 4u) + tt < n4) { vec4 hb[RM]; \
    [[unroll]] for (uint i = 0; i < RM; i++) hb[i] = subgroupBroadcast(hv[i * (TF / 4u) + tt], l); \
    [[unroll]] for (uint c = 0; c < TD; c++) { \
        vec4 wv = texelFetch(W2, w2r[c] + int(f0 / 4u + l * (TF / 4u) + tt)); \
        [[unroll]] for (uint i = 0; i < RM; i++) { float a = acc[i * TD + c]; \
            a = fma(hb[i].x, wv.x, a); a = fma(hb[i].y, wv.y, a); \
            a = fma(hb[i].z, wv.z, a); a = fma(hb[i].w, wv.w, a); acc[i * TD + c] = a; } } }

void main()
{
    uvec4 tile = tiles[gl_WorkGroupID.y];
    uint e = tile.x, r0 = tile.y, r1 = tile.z;
    uint lane = gl_SubgroupInvocationID;
    uint d4 = pc.D / 4u, f4 = pc.F / 4u, act = (pc.flags >> 2) & 3u;
    int xr[TM];
    [[unroll]] for (uint r = 0; r < TM; r++) xr[r] = int((perm[min(r0 + r * SG + lane, r1 - 1u)] / pc.k) * d4);
    int w2r[TD];
    [[unroll]] for (uint c = 0; c < TD; c++) w2r[c] = int((e * pc.D + min(c * SG + lane, pc.D - 1u)) * f4);

    float acc[RM * TD];
    [[unroll]] for (uint i = 0; i < RM * TD; i++) acc[i] = 0.0;
    for (uint f0 = 0u; f0 < pc.F; f0 += FC) {
        float h[RM * TF];
        [[unroll]] for (uint i = 0; i < RM * TF; i++) h[i] = 0.0;
        int w1r[TF];
        [[unroll]] for (uint c = 0; c < TF; c++) w1r[c] = int((e * pc.F + min(f0 + lane * TF + c, pc.F - 1u)) * d4);
        for (int q = 0; q < int(d4); q++) {
            vec4 xv[TM], w1v[TF];
            [[unroll]] for (uint r = 0; r < TM; r++) xv[r] = texelFetch(X, xr[r] + q);
            [[unroll]] for (uint c = 0; c < TF; c++) w1v[c] = texelFetch(W1, w1r[c] + q);
            MLP_H(0) MLP_H(1) MLP_H(2) MLP_H(3) MLP_H(4) MLP_H(5) MLP_H(6) MLP_H(7)
        }
        vec4 hv[RM * TF / 4u];
        [[unroll]] for (uint c = 0; c < TF; c++) {
            uint f = min(f0 + lane * TF + c, pc.F - 1u);
            float bias = (pc.flags & 1u) != 0u ? b1[e * pc.F + f] : 0.0;
            [[unroll]] for (uint i = 0; i < RM; i++) hv[i * (TF / 4u) + c / 4u][c % 4u] = vkg_act(h[i * TF + c] + bias, act);
        }
        // Texels past F (the last chunk's idle lanes) are skipped, so their values never count.
        uint n4 = min(FC / 4u, f4 - f0 / 4u);
        MLP_Y(0) MLP_Y(1) MLP_Y(2) MLP_Y(3) MLP_Y(4) MLP_Y(5) MLP_Y(6) MLP_Y(7)
    }
    [[unroll]] for (uint i = 0; i < RM; i++) {
        uint m = r0 + i;
        if (m >= r1) continue;
        float g = gates[perm[m]];
        [[unroll]] for (uint c = 0; c < TD; c++) {
            uint n = c * SG + lane;
            if (n >= pc.D) continue;
            float v = acc[i * TD + c];
            if ((pc.flags & 2u) != 0u) v += b2[e * pc.D + n];
            y[m * pc.D + n] = v * g;
        }
    }
}
