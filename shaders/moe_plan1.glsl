// The one-workgroup dispatch plan (histogram, scan, stable scatter, tile list, indirect grids) for
// up to PLAN1_PAIRS pairs and PLAN1_EXPERTS experts, shared by moe_plan1 (moe_dispatch.comp) and
// the second phase of moe_route_plan1 (moe_route.comp), which bind the plan differently. The
// includer defines PLAN_ID(i) (a pair's expert id, visible to the whole workgroup) and the stores
// PLAN_TILE(i, v), PLAN_ARG(i, v), PLAN_SEG(i, v), PLAN_PERM(i, v), PLAN_INV(i, v).
const uint PLAN1_PAIRS = 1024u, PLAN1_EXPERTS = 256u; // = VKG_MOE_PLAN1_* in moe.h
shared int sid1[PLAN1_PAIRS];
shared uint cnt1[PLAN1_EXPERTS];
shared uint start1[PLAN1_EXPERTS];
shared uint tile1[PLAN1_EXPERTS];

// Same outputs and order as HIST -> SCAN -> SCATTER (hist is not needed: one block).
void plan1(uint P, uint E, uint tile_m, uvec4 grids)
{
    uint lane = gl_LocalInvocationID.x, W = gl_WorkGroupSize.x;
    for (uint i = lane; i < P; i += W) sid1[i] = PLAN_ID(i);
    barrier();
    for (uint e = lane; e < E; e += W) {
        uint n = 0u;
        for (uint i = 0u; i < P; i++) n += sid1[i] == int(e) ? 1u : 0u;
        cnt1[e] = n;
    }
    barrier();
    if (lane == 0u) {
        uint off = 0u, ntiles = 0u;
        for (uint e = 0u; e < E; e++) {
            start1[e] = off;
            tile1[e] = ntiles;
            PLAN_SEG(e, off);
            off += cnt1[e];
            ntiles += (cnt1[e] + tile_m - 1u) / tile_m;
        }
        PLAN_SEG(E, off);
        for (uint g = 0u; g < 4u; g++) {
            PLAN_ARG(3u * g, grids[g]);
            PLAN_ARG(3u * g + 1u, ntiles);
            PLAN_ARG(3u * g + 2u, 1u);
        }
    }
    barrier();
    for (uint e = lane; e < E; e += W) {
        uint pos = start1[e], end = pos + cnt1[e], tile = tile1[e];
        for (uint r = pos; r < end; r += tile_m) PLAN_TILE(tile++, uvec4(e, r, min(r + tile_m, end), 0u));
        for (uint i = 0u; i < P; i++) {
            if (sid1[i] != int(e)) continue;
            PLAN_PERM(pos, i);
            PLAN_INV(i, pos);
            pos++;
        }
    }
    for (uint i = lane; i < P; i += W)
        if (sid1[i] < 0 || sid1[i] >= int(E)) PLAN_INV(i, ~0u);
}
