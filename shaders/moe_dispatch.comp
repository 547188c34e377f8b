#version 450
#extension GL_GOOGLE_include_directive : require
// Token dispatch for MoE on the device, with no atomics and no host round trip:
//  HIST     per block of BLOCK (token, slot) pairs: how many pairs chose each expert;
//  SCAN     one workgroup: per-expert totals, the exclusive scan over experts, every block's start
//           inside its expert's segment, the tile list of the grouped matmuls and their indirect grid;
//  SCATTER  per block: pair -> position, stable (pairs keep token order inside an expert's segment);
//  PLAN1    HIST + SCAN + SCATTER in one workgroup, for up to PLAN1_PAIRS pairs and PLAN1_EXPERTS
//           experts (a decoder's few dozen tokens): two dispatches and their barriers fewer;
//  COMBINE  out[t] = residual[t] + scale * (sum over the token's slots, in ascending expert id, of
//           [gate *] rows[position of the slot]  [+ (sum of gates) * bias]): a fixed order, so outputs
//           are bit-identical run to run.
// A pair is p = token * k + slot; ids outside [0, E) are dropped (their position is ~0u).
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint BLOCK = 256;

layout(push_constant) uniform P {
    uint P_, E, k, nblocks;
    uint tile_m, D, T, flags; // SCAN: rows per tile; COMBINE: row width, tokens, flags (below)
    uint gx, pad0, pad1, pad2; // grid width of 1-d dispatches
    uvec4 grids;               // SCAN: column tiles of up to four grouped matmuls (indirect x)
} pc;

#if defined(VKG_MOE_HIST) || defined(VKG_MOE_SCATTER)
layout(std430, binding = 0) readonly buffer Ids { int ids[]; };
shared int sid[BLOCK];

void load_block(uint b)
{
    for (uint i = gl_LocalInvocationID.x; i < BLOCK; i += gl_WorkGroupSize.x) {
        uint p = b * BLOCK + i;
        sid[i] = p < pc.P_ ? ids[p] : -1;
    }
    barrier();
}
#endif

#ifdef VKG_MOE_HIST
layout(std430, binding = 1) writeonly buffer H { uint hist[]; }; // (nblocks, E)
void main()
{
    uint b = gl_WorkGroupID.y * pc.gx + gl_WorkGroupID.x;
    if (b >= pc.nblocks) return;
    load_block(b);
    for (uint e = gl_LocalInvocationID.x; e < pc.E; e += gl_WorkGroupSize.x) {
        uint n = 0u;
        for (uint i = 0u; i < BLOCK; i++) n += sid[i] == int(e) ? 1u : 0u;
        hist[b * pc.E + e] = n;
    }
}
#endif

#ifdef VKG_MOE_SCAN
layout(std430, binding = 0) buffer H { uint hist[]; };      // in: counts; out: each block's first position
layout(std430, binding = 1) writeonly buffer Tiles { uvec4 tiles[]; }; // (expert, row0, row1, 0)
layout(std430, binding = 2) writeonly buffer Args { uint args[]; };    // four indirect grids (x, y, z)
layout(std430, binding = 3) writeonly buffer Seg { uint seg[]; };      // (E + 1): segment starts, then the total
shared uint cnt[1024];
shared uint sstart[1024];
shared uint tstart[1024];
void main()
{
    uint lane = gl_LocalInvocationID.x;
    for (uint e = lane; e < pc.E; e += gl_WorkGroupSize.x) {
        uint run = 0u;
        for (uint b = 0u; b < pc.nblocks; b++) {
            uint h = hist[b * pc.E + e];
            hist[b * pc.E + e] = run;
            run += h;
        }
        cnt[e] = run;
    }
    barrier();
    if (lane == 0u) {
        uint off = 0u, ntiles = 0u;
        for (uint e = 0u; e < pc.E; e++) {
            sstart[e] = off;
            tstart[e] = ntiles;
            seg[e] = off;
            off += cnt[e];
            ntiles += (cnt[e] + pc.tile_m - 1u) / pc.tile_m;
        }
        seg[pc.E] = off;
        for (uint g = 0u; g < 4u; g++) {
            args[3u * g] = pc.grids[g];
            args[3u * g + 1u] = ntiles;
            args[3u * g + 2u] = 1u;
        }
    }
    barrier();
    for (uint e = lane; e < pc.E; e += gl_WorkGroupSize.x) {
        uint start = sstart[e], end = start + cnt[e];
        for (uint b = 0u; b < pc.nblocks; b++) hist[b * pc.E + e] += start;
        uint tile = tstart[e];
        for (uint r = start; r < end; r += pc.tile_m) tiles[tile++] = uvec4(e, r, min(r + pc.tile_m, end), 0u);
    }
}
#endif

#ifdef VKG_MOE_SCATTER
layout(std430, binding = 1) readonly buffer H { uint boff[]; };  // (nblocks, E) first positions
layout(std430, binding = 2) writeonly buffer Perm { uint perm[]; }; // position -> pair
layout(std430, binding = 3) writeonly buffer Inv { uint inv[]; };   // pair -> position (~0u: dropped)
void main()
{
    uint b = gl_WorkGroupID.y * pc.gx + gl_WorkGroupID.x;
    if (b >= pc.nblocks) return;
    load_block(b);
    uint lane = gl_LocalInvocationID.x;
    for (uint e = lane; e < pc.E; e += gl_WorkGroupSize.x) {
        uint pos = boff[b * pc.E + e];
        for (uint i = 0u; i < BLOCK; i++) {
            if (sid[i] != int(e)) continue;
            perm[pos] = b * BLOCK + i;
            inv[b * BLOCK + i] = pos;
            pos++;
        }
    }
    for (uint i = lane; i < BLOCK; i += gl_WorkGroupSize.x) {
        uint p = b * BLOCK + i;
        if (p < pc.P_ && (sid[i] < 0 || sid[i] >= int(pc.E))) inv[p] = ~0u;
    }
}
#endif

#ifdef VKG_MOE_PLAN1
layout(std430, binding = 0) readonly buffer Ids { int ids[]; };
layout(std430, binding = 1) writeonly buffer Tiles { uvec4 tiles[]; };
layout(std430, binding = 2) writeonly buffer Args { uint args[]; };
layout(std430, binding = 3) writeonly buffer Seg { uint seg[]; };
layout(std430, binding = 4) writeonly buffer Perm { uint perm[]; };
layout(std430, binding = 5) writeonly buffer Inv { uint inv[]; };
#define PLAN_ID(i) ids[i]
#define PLAN_TILE(i, v) tiles[i] = (v)
#define PLAN_ARG(i, v) args[i] = (v)
#define PLAN_SEG(i, v) seg[i] = (v)
#define PLAN_PERM(i, v) perm[i] = (v)
#define PLAN_INV(i, v) inv[i] = (v)
#include "moe_plan1.glsl"
void main() { plan1(pc.P_, pc.E, pc.tile_m, pc.grids); }
#endif

#ifdef VKG_MOE_COMBINE
// One workgroup per token (grid split in y past the x limit): the slot order, positions and gates are
// read once, then the lanes stride over the row (texel reads of the rows are the cheap gather).
layout(std430, binding = 0) readonly buffer Ids { int ids[]; };
layout(std430, binding = 1) readonly buffer Inv { uint inv[]; };
layout(binding = 2) uniform samplerBuffer Rows;                     // (positions, D), R32F
layout(std430, binding = 3) readonly buffer G { float gates[]; };    // per pair, with flags bit1
layout(std430, binding = 4) readonly buffer R { float res[]; };      // (T, D), with flags bit0
layout(std430, binding = 5) writeonly buffer Y { float y[]; };       // (T, D)
layout(std430, binding = 6) readonly buffer Bias { float bias[]; };  // (D), times the gate sum, flags bit2
layout(std430, binding = 7) readonly buffer Scale { float scale[]; };// (D), flags bit3
const uint MAXK = 64u;
void main()
{
    uint t = gl_WorkGroupID.y * pc.gx + gl_WorkGroupID.x;
    if (t >= pc.T) return;
    // Slots in ascending (expert id, slot): insertion sort of k small keys.
    uint order[MAXK], pos[MAXK];
    float g[MAXK];
    uint n = 0u;
    float gsum = 0.0;
    for (uint j = 0u; j < pc.k; j++) {
        uint p = inv[t * pc.k + j];
        if (p == ~0u) continue;
        int id = ids[t * pc.k + j];
        uint i = n++;
        while (i > 0u && ids[t * pc.k + order[i - 1u]] > id) {
            order[i] = order[i - 1u];
            i--;
        }
        order[i] = j;
    }
    for (uint i = 0u; i < n; i++) {
        uint j = order[i];
        pos[i] = inv[t * pc.k + j];
        g[i] = (pc.flags & 6u) != 0u ? gates[t * pc.k + j] : 1.0;
        gsum += g[i];
    }
    for (uint d = gl_LocalInvocationID.x; d < pc.D; d += gl_WorkGroupSize.x) {
        float acc = 0.0;
        for (uint i = 0u; i < n; i++) {
            float v = texelFetch(Rows, int(pos[i] * pc.D + d)).x;
            acc += (pc.flags & 2u) != 0u ? v * g[i] : v;
        }
        if ((pc.flags & 4u) != 0u) acc += gsum * bias[d];
        if ((pc.flags & 8u) != 0u) acc *= scale[d];
        uint o = t * pc.D + d;
        y[o] = (pc.flags & 1u) != 0u ? res[o] + acc : acc;
    }
}
#endif
