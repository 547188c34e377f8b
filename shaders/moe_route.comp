#version 450
#extension GL_GOOGLE_include_directive : require
// MoE routing: top-k selection with gates (VKG_MOE_SELECT, one invocation per token), the
// routing statistics (VKG_MOE_STATS, one workgroup), and both in one workgroup (VKG_MOE_ROUTE1, for
// up to VKG_MOE_ROUTE1_TOKENS tokens: a decoder's routers are latency-bound, and a dispatch and a
// barrier fewer count there), and ROUTE1 followed in the same workgroup by the dispatch plan of the
// experts that read the ids (VKG_MOE_ROUTE_PLAN1, moe_plan1.glsl): one more dispatch and barrier
// fewer per MoE layer. Logits z = router logits / temperature.
// Selection compares logits, ties going to the lower column: the strict '>' below scans columns in
// ascending order. Statistics reduce in a fixed order (tokens ascending per lane, then a fixed tree),
// so they are bit-identical run to run; no atomics.
#include "common.glsl"

layout(local_size_x_id = 0) in;

layout(push_constant) uniform P {
    uint T, C, first, k;
    uint flags;        // bit0 sigmoid score, bit1 gates = score (else softmax over the k), bit2 renorm
    float inv_temp, scale;
    uint gx;
#ifdef VKG_MOE_ROUTE_PLAN1
    // The plan: pairs, experts, rows per tile, then where tiles, args, seg, perm and inv start in
    // the plan binding (in words), then the column tiles of up to four grouped matmuls.
    uint P, E, tile_m, o_tiles;
    uint o_args, o_seg, o_perm, o_inv;
    uvec4 grids;
#endif
} pc;

layout(std430, binding = 0) readonly buffer Z { float logits[]; };

// Bindings: 0 logits; SELECT 1 ids, 2 gates, 3 lse; STATS 1 ids, 2 lse, 3.. statistics; ROUTE1 1 ids,
// 2 gates, 3 lse, 4.. statistics; ROUTE_PLAN1 as ROUTE1, then 9 the whole plan (one binding for
// its five arrays keeps the kernel within 12 bindings). ROUTE1 reads back what its own lanes wrote:
// coherent + barriers.
#if defined(VKG_MOE_SELECT)
layout(std430, binding = 1) writeonly buffer Ids { int ids[]; };
layout(std430, binding = 2) writeonly buffer G { float gates[]; };
layout(std430, binding = 3) writeonly buffer L { float lse[]; };
#elif defined(VKG_MOE_STATS)
layout(std430, binding = 1) readonly buffer Ids { int ids[]; };
layout(std430, binding = 2) readonly buffer L { float lse[]; };
#define STAT_BINDING 3
#else
layout(std430, binding = 1) coherent buffer Ids { int ids[]; };
layout(std430, binding = 2) writeonly buffer G { float gates[]; };
layout(std430, binding = 3) coherent buffer L { float lse[]; };
#define STAT_BINDING 4
#endif

#if defined(VKG_MOE_SELECT) || defined(VKG_MOE_ROUTE1)
const uint MAXC = 1024u, MAXK = 64u; // the host refuses more

void select_token(uint t)
{
    uint base = t * pc.C;
    float m = -3.402823e38;
    for (uint c = 0u; c < pc.C; c++) m = max(m, logits[base + c] * pc.inv_temp);
    float s = 0.0;
    for (uint c = 0u; c < pc.C; c++) s += exp(logits[base + c] * pc.inv_temp - m);
    float l = m + log(s);
    lse[t] = l;

    uint chosen[MAXC / 32u];
    for (uint i = 0u; i < (pc.C + 31u) / 32u; i++) chosen[i] = 0u;
    float top = 0.0, gsum = 0.0, gk[MAXK];
    for (uint j = 0u; j < pc.k; j++) {
        int best = -1;
        float bz = 0.0;
        for (uint c = pc.first; c < pc.C; c++) {
            if ((chosen[c >> 5u] & (1u << (c & 31u))) != 0u) continue;
            float z = logits[base + c] * pc.inv_temp;
            if (best < 0 || z > bz) { best = int(c); bz = z; }
        }
        uint b = uint(best);
        chosen[b >> 5u] |= 1u << (b & 31u);
        ids[t * pc.k + j] = best - int(pc.first);
        float g;
        if ((pc.flags & 2u) == 0u) {
            // softmax over the k selected logits; the first pick is their maximum
            if (j == 0u) top = bz;
            g = exp(bz - top);
        } else if ((pc.flags & 1u) != 0u) {
            g = 1.0 / (1.0 + exp(-bz));
        } else {
            g = exp(bz - l);
        }
        gk[j] = g;
        gsum += g;
    }
    bool norm = (pc.flags & 2u) == 0u || (pc.flags & 4u) != 0u;
    for (uint j = 0u; j < pc.k; j++) {
        float g = gk[j];
        if (norm) g = g / gsum;
        gates[t * pc.k + j] = g * pc.scale;
    }
}
#endif

#if defined(VKG_MOE_STATS) || defined(VKG_MOE_ROUTE1)
// counts (C - first), fraction (C - first), mean_score (C), load_balance, z_loss
layout(std430, binding = STAT_BINDING) writeonly buffer Counts { float counts[]; };
layout(std430, binding = STAT_BINDING + 1) writeonly buffer Frac { float fraction[]; };
layout(std430, binding = STAT_BINDING + 2) writeonly buffer Mean { float mean_score[]; };
layout(std430, binding = STAT_BINDING + 3) writeonly buffer LB { float load_balance[]; };
layout(std430, binding = STAT_BINDING + 4) writeonly buffer ZL { float z_loss[]; };

shared float red[256];

float tree(uint lane, float v)
{
    red[lane] = v;
    barrier();
    for (uint w = gl_WorkGroupSize.x / 2u; w > 0u; w >>= 1u) {
        if (lane < w) red[lane] += red[lane + w];
        barrier();
    }
    float r = red[0];
    barrier();
    return r;
}

void statistics()
{
    uint lane = gl_LocalInvocationID.x, W = gl_WorkGroupSize.x;
    uint E = pc.C - pc.first;
    float invT = pc.T > 0u ? 1.0 / float(pc.T) : 0.0;
    float total = float(pc.T) * float(pc.k);
    for (uint e = lane; e < E; e += W) {
        uint n = 0u;
        for (uint i = 0u; i < pc.T * pc.k; i++) n += ids[i] == int(e) ? 1u : 0u;
        counts[e] = float(n);
        fraction[e] = pc.T > 0u ? float(n) / total : 0.0;
    }
    float sq = 0.0;
    for (uint c = lane; c < pc.C; c += W) {
        float acc = 0.0;
        for (uint t = 0u; t < pc.T; t++) {
            float z = logits[t * pc.C + c] * pc.inv_temp;
            acc += (pc.flags & 1u) != 0u ? 1.0 / (1.0 + exp(-z)) : exp(z - lse[t]);
        }
        float mean = acc * invT;
        mean_score[c] = mean;
        sq += mean * mean;
    }
    float zs = 0.0;
    for (uint t = lane; t < pc.T; t += W) zs += lse[t] * lse[t];
    sq = tree(lane, sq);
    zs = tree(lane, zs);
    if (lane == 0u) {
        load_balance[0] = float(pc.C) * sq;
        z_loss[0] = zs * invT;
    }
}
#endif

#if defined(VKG_MOE_SELECT)
void main()
{
    uint t = VKG_FLAT_INDEX(pc.gx);
    if (t < pc.T) select_token(t);
}
#elif defined(VKG_MOE_STATS)
void main() { statistics(); }
#else
#ifdef VKG_MOE_ROUTE_PLAN1
layout(std430, binding = 9) writeonly buffer Plan { uint plan[]; };
#define PLAN_ID(i) ids[i]
#define PLAN_TILE(i, v) { uvec4 tv_ = (v); uint o_ = pc.o_tiles + 4u * (i); \
    plan[o_] = tv_.x; plan[o_ + 1u] = tv_.y; plan[o_ + 2u] = tv_.z; plan[o_ + 3u] = tv_.w; }
#define PLAN_ARG(i, v) plan[pc.o_args + (i)] = (v)
#define PLAN_SEG(i, v) plan[pc.o_seg + (i)] = (v)
#define PLAN_PERM(i, v) plan[pc.o_perm + (i)] = (v)
#define PLAN_INV(i, v) plan[pc.o_inv + (i)] = (v)
#include "moe_plan1.glsl"
#endif
void main()
{
    for (uint t = gl_LocalInvocationID.x; t < pc.T; t += gl_WorkGroupSize.x) select_token(t);
    memoryBarrierBuffer();
    barrier();
    statistics();
#ifdef VKG_MOE_ROUTE_PLAN1
    // The ids are visible to every lane since the barrier above (statistics read them too).
    plan1(pc.P, pc.E, pc.tile_m, pc.grids);
#endif
}
#endif
