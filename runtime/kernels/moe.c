/* MoE dispatch functions: routing, device-side token dispatch, grouped matmuls, combine. */
#include <string.h>

#include "moe.h"

enum { ROUTE_WG = 64, DISPATCH_WG = 64 };

static vkg_status need(vkg_tref r, const char *what, const char *kernel)
{
    if (!r.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: %s has no buffer", kernel, what);
    return VKG_SUCCESS;
}

/* An optional storage binding: absent ones bind `dummy`, which the shader never reads. */
static vkg_binding opt(vkg_tref r, VkDeviceSize range, vkg_tref dummy)
{
    if (r.buf) return (vkg_binding){r.buf, r.offset, range, 0, false};
    return (vkg_binding){dummy.buf, dummy.offset, 0, 0, false};
}

typedef struct route_push {
    uint32_t T, C, first, k, flags;
    float inv_temp, scale;
    uint32_t gx;
} route_push;

static vkg_status route_check(uint32_t C, uint32_t first, uint32_t k, float temperature)
{
    if (C > VKG_MOE_MAX_COLUMNS)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "moe router: %u columns; at most %d", C, VKG_MOE_MAX_COLUMNS);
    if (first >= C || k < 1 || k > C - first || k > VKG_MOE_MAX_K)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "moe router: k = %u of columns [%u, %u): need 1 <= k <= %u (and <= %d)",
                        k, first, C, first < C ? C - first : 0, VKG_MOE_MAX_K);
    if (!(temperature > 0.0f)) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "moe router: temperature %g must be > 0", temperature);
    return VKG_SUCCESS;
}

vkg_status vkg_moe_select(vkg_cmd *cmd, const vkg_moe_select_args *a)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    float temp = a->temperature ? a->temperature : 1.0f;
    VKG_TRY(route_check(a->C, a->first, a->k, temp));
    VKG_TRY(need(a->logits, "logits", "moe_select"));
    VKG_TRY(need(a->ids, "ids", "moe_select"));
    VKG_TRY(need(a->gates, "gates", "moe_select"));
    VKG_TRY(need(a->lse, "lse", "moe_select"));
    if (a->T == 0) return VKG_SUCCESS;
    route_push pc = {a->T, a->C, a->first, a->k,
                     (a->sigmoid ? 1u : 0u) | (a->gates_are_scores ? 2u : 0u) | (a->renorm ? 4u : 0u), 1.0f / temp,
                     a->scale ? a->scale : 1.0f, 0};
    uint32_t gy;
    vkg_grid_1d(ctx, (a->T + ROUTE_WG - 1) / ROUTE_WG, &pc.gx, &gy);
    vkg_pipeline_desc pd = {.shader = "moe_select", .nbindings = 4, .push_size = sizeof pc, .nspec = 1, .spec = {ROUTE_WG}};
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    VkDeviceSize tk = (VkDeviceSize)a->T * a->k * 4;
    vkg_binding b[4] = {{a->logits.buf, a->logits.offset, (VkDeviceSize)a->T * a->C * 4, 0, false},
                        {a->ids.buf, a->ids.offset, tk, 0, true},
                        {a->gates.buf, a->gates.offset, tk, 0, true},
                        {a->lse.buf, a->lse.offset, (VkDeviceSize)a->T * 4, 0, true}};
    return vkg_cmd_dispatch(cmd, p, b, &pc, pc.gx, gy, 1, "moe_select");
}

vkg_status vkg_moe_stats(vkg_cmd *cmd, const vkg_moe_stats_args *a)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    float temp = a->temperature ? a->temperature : 1.0f;
    VKG_TRY(route_check(a->C, a->first, a->k, temp));
    const vkg_tref *r[8] = {&a->logits, &a->ids, &a->lse, &a->counts, &a->fraction, &a->mean_score, &a->load_balance,
                            &a->z_loss};
    for (int i = 0; i < 8; i++) VKG_TRY(need(*r[i], "a statistics buffer", "moe_stats"));
    route_push pc = {a->T, a->C, a->first, a->k, a->sigmoid ? 1u : 0u, 1.0f / temp, 1.0f, 0};
    vkg_pipeline_desc pd = {.shader = "moe_stats", .nbindings = 8, .push_size = sizeof pc, .nspec = 1, .spec = {ROUTE_WG}};
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    VkDeviceSize E = a->C - a->first;
    vkg_binding b[8] = {{a->logits.buf, a->logits.offset, (VkDeviceSize)a->T * a->C * 4, 0, false},
                        {a->ids.buf, a->ids.offset, (VkDeviceSize)a->T * a->k * 4, 0, false},
                        {a->lse.buf, a->lse.offset, (VkDeviceSize)a->T * 4, 0, false},
                        {a->counts.buf, a->counts.offset, E * 4, 0, true},
                        {a->fraction.buf, a->fraction.offset, E * 4, 0, true},
                        {a->mean_score.buf, a->mean_score.offset, (VkDeviceSize)a->C * 4, 0, true},
                        {a->load_balance.buf, a->load_balance.offset, 4, 0, true},
                        {a->z_loss.buf, a->z_loss.offset, 4, 0, true}};
    return vkg_cmd_dispatch(cmd, p, b, &pc, 1, 1, 1, "moe_stats");
}

/* The push constants and the 9 bindings of the one-workgroup router (moe_route1, and the first nine
 * of moe_route_plan1), after checking its arguments. */
static vkg_status route1_setup(const vkg_moe_select_args *s, const vkg_tref stats[5], const char *who, route_push *pc,
                               vkg_binding b[9])
{
    float temp = s->temperature ? s->temperature : 1.0f;
    VKG_TRY(route_check(s->C, s->first, s->k, temp));
    const vkg_tref *r[4] = {&s->logits, &s->ids, &s->gates, &s->lse};
    for (int i = 0; i < 4; i++) VKG_TRY(need(*r[i], "a routing buffer", who));
    for (int i = 0; i < 5; i++) VKG_TRY(need(stats[i], "a statistics buffer", who));
    *pc = (route_push){s->T, s->C, s->first, s->k,
                       (s->sigmoid ? 1u : 0u) | (s->gates_are_scores ? 2u : 0u) | (s->renorm ? 4u : 0u), 1.0f / temp,
                       s->scale ? s->scale : 1.0f, 0};
    VkDeviceSize E = s->C - s->first, tk = (VkDeviceSize)s->T * s->k * 4;
    const vkg_binding bs[9] = {{s->logits.buf, s->logits.offset, (VkDeviceSize)s->T * s->C * 4, 0, false},
                               {s->ids.buf, s->ids.offset, tk, 0, true},
                               {s->gates.buf, s->gates.offset, tk, 0, true},
                               {s->lse.buf, s->lse.offset, (VkDeviceSize)s->T * 4, 0, true},
                               {stats[0].buf, stats[0].offset, E * 4, 0, true},
                               {stats[1].buf, stats[1].offset, E * 4, 0, true},
                               {stats[2].buf, stats[2].offset, (VkDeviceSize)s->C * 4, 0, true},
                               {stats[3].buf, stats[3].offset, 4, 0, true},
                               {stats[4].buf, stats[4].offset, 4, 0, true}};
    memcpy(b, bs, sizeof bs);
    return VKG_SUCCESS;
}

vkg_status vkg_moe_route(vkg_cmd *cmd, const vkg_moe_select_args *s, const vkg_tref stats[5])
{
    if (s->T > VKG_MOE_ROUTE1_TOKENS || s->T == 0) {
        VKG_TRY(vkg_moe_select(cmd, s));
        vkg_moe_stats_args t = {.logits = s->logits, .ids = s->ids, .lse = s->lse, .counts = stats[0],
                                .fraction = stats[1], .mean_score = stats[2], .load_balance = stats[3],
                                .z_loss = stats[4], .T = s->T, .C = s->C, .first = s->first, .k = s->k,
                                .sigmoid = s->sigmoid, .temperature = s->temperature};
        return vkg_moe_stats(cmd, &t);
    }
    route_push pc;
    vkg_binding b[9];
    VKG_TRY(route1_setup(s, stats, "moe_route", &pc, b));
    vkg_pipeline_desc pd = {.shader = "moe_route1", .nbindings = 9, .push_size = sizeof pc, .nspec = 1, .spec = {ROUTE_WG}};
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(vkg_cmd_context(cmd), &pd, &p));
    return vkg_cmd_dispatch(cmd, p, b, &pc, 1, 1, 1, "moe_route1");
}

/* ---- dispatch ---- */

typedef struct dispatch_push {
    uint32_t P, E, k, nblocks;
    uint32_t tile_m, D, T, flags;
    uint32_t gx, pad[3];
    uint32_t grids[4];
} dispatch_push;

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

uint64_t vkg_moe_plan_layout(const vkg_context *ctx, uint32_t T, uint32_t k, uint32_t E, vkg_mm_variant variant,
                             vkg_tref base, vkg_moe_plan *plan)
{
    memset(plan, 0, sizeof *plan);
    if (!variant) variant = ctx ? vkg_matmul_default_variant(ctx) : VKG_MM_TEXEL;
    plan->variant = variant;
    plan->T = T;
    plan->k = k;
    plan->E = E;
    uint64_t P = (uint64_t)T * k;
    plan->P = (uint32_t)P;
    plan->nblocks = (uint32_t)((P + VKG_MOE_BLOCK - 1) / VKG_MOE_BLOCK);
    plan->tile_m = variant == VKG_MM_TEXEL ? 16 : 32;
    plan->max_tiles = (uint32_t)(P / plan->tile_m + E + 1);
    /* 256 is the largest offset alignment Vulkan lets a device require; the base is aligned by
     * the arena planner. */
    uint64_t a = 256, off = 0;
    uint64_t sizes[6] = {(uint64_t)plan->nblocks * E * 4 + 4, (uint64_t)plan->max_tiles * 16, 48,
                         ((uint64_t)E + 1) * 4, P * 4 + 4, P * 4 + 4};
    vkg_tref *refs[6] = {&plan->hist, &plan->tiles, &plan->args, &plan->seg, &plan->perm, &plan->inv};
    for (int i = 0; i < 6; i++) {
        if (base.buf) *refs[i] = (vkg_tref){base.buf, base.offset + off};
        off = align_up(off + sizes[i], a);
    }
    return off;
}

static vkg_status plan_check(const vkg_context *ctx, const vkg_moe_plan *plan, const char *what)
{
    if (!plan->hist.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: the dispatch plan has no memory", what);
    if (plan->E == 0 || plan->E > VKG_MOE_MAX_COLUMNS)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: %u experts; 1 to %d are supported", what, plan->E, VKG_MOE_MAX_COLUMNS);
    if ((uint64_t)plan->T * plan->k > UINT32_MAX / 2)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: %u tokens x %u slots is too many pairs", what, plan->T, plan->k);
    if (plan->max_tiles > ctx->info.max_workgroup_count[1])
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: up to %u row tiles, over the device's y grid limit %u", what,
                        plan->max_tiles, ctx->info.max_workgroup_count[1]);
    return VKG_SUCCESS;
}

vkg_status vkg_moe_dispatch(vkg_cmd *cmd, vkg_tref ids, const vkg_moe_plan *plan, const uint32_t grids[4])
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    VKG_TRY(plan_check(ctx, plan, "moe_dispatch"));
    VKG_TRY(need(ids, "ids", "moe_dispatch"));
    dispatch_push pc = {.P = plan->P, .E = plan->E, .k = plan->k, .nblocks = plan->nblocks, .tile_m = plan->tile_m,
                        .T = plan->T};
    memcpy(pc.grids, grids, sizeof pc.grids);
    uint32_t gy;
    vkg_grid_1d(ctx, plan->nblocks, &pc.gx, &gy);
    VkDeviceSize idb = (VkDeviceSize)plan->P * 4, hb = (VkDeviceSize)plan->nblocks * plan->E * 4;
    const vkg_pipeline *p;
    if (plan->P > 0 && plan->P <= VKG_MOE_PLAN1_PAIRS && plan->E <= VKG_MOE_PLAN1_EXPERTS) {
        vkg_pipeline_desc pd = {.shader = "moe_plan1", .nbindings = 6, .push_size = sizeof pc, .nspec = 2,
                                .spec = {DISPATCH_WG, VKG_MOE_BLOCK}};
        VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
        vkg_binding b[6] = {{ids.buf, ids.offset, idb, 0, false},
                            {plan->tiles.buf, plan->tiles.offset, (VkDeviceSize)plan->max_tiles * 16, 0, true},
                            {plan->args.buf, plan->args.offset, 48, 0, true},
                            {plan->seg.buf, plan->seg.offset, ((VkDeviceSize)plan->E + 1) * 4, 0, true},
                            {plan->perm.buf, plan->perm.offset, idb + 4, 0, true},
                            {plan->inv.buf, plan->inv.offset, idb + 4, 0, true}};
        return vkg_cmd_dispatch(cmd, p, b, &pc, 1, 1, 1, "moe_plan1");
    }
    if (plan->nblocks) {
        vkg_pipeline_desc pd = {.shader = "moe_hist", .nbindings = 2, .push_size = sizeof pc, .nspec = 2,
                                .spec = {DISPATCH_WG, VKG_MOE_BLOCK}};
        VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
        vkg_binding b[2] = {{ids.buf, ids.offset, idb, 0, false}, {plan->hist.buf, plan->hist.offset, hb, 0, true}};
        VKG_TRY(vkg_cmd_dispatch(cmd, p, b, &pc, pc.gx, gy, 1, "moe_hist"));
    }
    {
        vkg_pipeline_desc pd = {.shader = "moe_scan", .nbindings = 4, .push_size = sizeof pc, .nspec = 2,
                                .spec = {DISPATCH_WG, VKG_MOE_BLOCK}};
        VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
        vkg_binding b[4] = {{plan->hist.buf, plan->hist.offset, hb + 4, 0, true},
                            {plan->tiles.buf, plan->tiles.offset, (VkDeviceSize)plan->max_tiles * 16, 0, true},
                            {plan->args.buf, plan->args.offset, 48, 0, true},
                            {plan->seg.buf, plan->seg.offset, ((VkDeviceSize)plan->E + 1) * 4, 0, true}};
        VKG_TRY(vkg_cmd_dispatch(cmd, p, b, &pc, 1, 1, 1, "moe_scan"));
    }
    if (plan->nblocks) {
        vkg_pipeline_desc pd = {.shader = "moe_scatter", .nbindings = 4, .push_size = sizeof pc, .nspec = 2,
                                .spec = {DISPATCH_WG, VKG_MOE_BLOCK}};
        VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
        vkg_binding b[4] = {{ids.buf, ids.offset, idb, 0, false},
                            {plan->hist.buf, plan->hist.offset, hb, 0, false},
                            {plan->perm.buf, plan->perm.offset, idb, 0, true},
                            {plan->inv.buf, plan->inv.offset, idb, 0, true}};
        VKG_TRY(vkg_cmd_dispatch(cmd, p, b, &pc, pc.gx, gy, 1, "moe_scatter"));
    }
    return VKG_SUCCESS;
}

/* ---- routing and plan in one dispatch ---- */

typedef struct route_plan_push {
    route_push r;
    uint32_t P, E, tile_m, o_tiles, o_args, o_seg, o_perm, o_inv;
    uint32_t grids[4];
} route_plan_push;

bool vkg_moe_route_plan_fits(const vkg_context *ctx, uint32_t T, uint32_t k, uint32_t E)
{
    uint64_t P = (uint64_t)T * k;
    return T >= 1 && T <= VKG_MOE_ROUTE1_TOKENS && P >= 1 && P <= VKG_MOE_PLAN1_PAIRS && E >= 1 &&
           E <= VKG_MOE_PLAN1_EXPERTS && ctx->max_storage_per_stage >= 10 &&
           sizeof(route_plan_push) <= ctx->info.max_push_constants;
}

vkg_status vkg_moe_route_plan(vkg_cmd *cmd, const vkg_moe_select_args *s, const vkg_tref stats[5],
                              const vkg_moe_plan *plan, const uint32_t grids[4])
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    VKG_TRY(plan_check(ctx, plan, "moe_route_plan"));
    if (plan->T != s->T || plan->k != s->k)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "moe_route_plan: a plan for %u x %u pairs, routing %u x %u", plan->T,
                        plan->k, s->T, s->k);
    if (!vkg_moe_route_plan_fits(ctx, s->T, s->k, plan->E)) {
        VKG_TRY(vkg_moe_route(cmd, s, stats));
        return vkg_moe_dispatch(cmd, s->ids, plan, grids);
    }
    route_plan_push pc;
    vkg_binding b[10];
    VKG_TRY(route1_setup(s, stats, "moe_route_plan", &pc.r, b));
    /* The plan's arrays lie in one range from tiles to inv (vkg_moe_plan_layout), at offsets that
     * are multiples of 256 bytes from each other: one binding, indexed in words. */
    VkDeviceSize base = plan->tiles.offset, end = plan->inv.offset + (VkDeviceSize)plan->P * 4 + 4;
    const vkg_tref *parts[5] = {&plan->tiles, &plan->args, &plan->seg, &plan->perm, &plan->inv};
    uint32_t words[5];
    for (int i = 0; i < 5; i++) {
        if (parts[i]->buf != plan->tiles.buf || parts[i]->offset < base || (parts[i]->offset - base) % 16)
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "moe_route_plan: the plan is not one vkg_moe_plan_layout range");
        words[i] = (uint32_t)((parts[i]->offset - base) / 4);
    }
    pc = (route_plan_push){pc.r, plan->P, plan->E, plan->tile_m, words[0], words[1], words[2], words[3], words[4],
                           {grids[0], grids[1], grids[2], grids[3]}};
    vkg_pipeline_desc pd = {.shader = "moe_route_plan1", .nbindings = 10, .push_size = sizeof pc, .nspec = 1,
                            .spec = {ROUTE_WG}};
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    b[9] = (vkg_binding){plan->tiles.buf, base, end - base, 0, true};
    return vkg_cmd_dispatch(cmd, p, b, &pc, 1, 1, 1, "moe_route_plan1");
}

/* ---- grouped matmul ---- */

static uint32_t texel_tn(uint32_t n)
{
    /* One subgroup covers 8 * TN columns: narrow outputs (a LoRA rank) take a narrow tile. */
    uint32_t tn = 1;
    while (tn < 16 && 8 * tn < n) tn *= 2;
    return tn;
}

/* Narrow outputs over a long K (a LoRA down-projection) split K across the lanes instead of N. */
static bool use_skinny(vkg_mm_variant variant, uint32_t n, uint32_t k)
{
    return variant == VKG_MM_TEXEL && n <= 8 && k >= 64 && k % 4 == 0;
}

uint32_t vkg_moe_gemm_grid_x(const vkg_context *ctx, vkg_mm_variant variant, uint32_t n, uint32_t k)
{
    if (!variant) variant = vkg_matmul_default_variant(ctx);
    uint32_t cols = use_skinny(variant, n, k) ? 8 : variant == VKG_MM_TEXEL ? 8 * texel_tn(n) : 64;
    return (n + cols - 1) / cols;
}

typedef struct gm_push {
    uint32_t N, K, k, flags;
    uint32_t ldx, xe;
    float alpha;
    uint32_t pad;
} gm_push;

vkg_status vkg_moe_gemm(vkg_cmd *cmd, const vkg_moe_plan *plan, const vkg_moe_gemm_args *a)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    const vkg_device_info *di = &ctx->info;
    VKG_TRY(plan_check(ctx, plan, "moe_gemm"));
    VKG_TRY(need(a->x, "x", "moe_gemm"));
    VKG_TRY(need(a->w, "w", "moe_gemm"));
    VKG_TRY(need(a->y, "y", "moe_gemm"));
    if (a->w_dtype != VKG_DTYPE_F32 && a->w_dtype != VKG_DTYPE_F16)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "moe_gemm: weight dtype %d (fp32 or fp16)", (int)a->w_dtype);
    if (a->grid > 3) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "moe_gemm: grid %u of 4", a->grid);
    if (a->n == 0 || a->k == 0 || plan->P == 0) {
        if (a->k == 0 && a->n && plan->P)
            return vkg_fail(VKG_ERROR_UNSUPPORTED, "moe_gemm: K = 0 (an empty expert width)");
        return VKG_SUCCESS;
    }
    uint64_t wn = (uint64_t)plan->E * a->n * a->k, xn = (uint64_t)a->x_rows * a->ldx, yn = (uint64_t)plan->P * a->n;
    if (wn > UINT32_MAX || xn > UINT32_MAX || yn > UINT32_MAX)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "moe_gemm: an operand exceeds 2^32 elements");
    VkDeviceSize wsz = a->w_dtype == VKG_DTYPE_F16 ? 2 : 4;
    gm_push pc = {a->n, a->k, plan->k,
                  (a->bias.buf ? 1u : 0u) | ((uint32_t)a->act << 1) | (a->gates.buf ? 8u : 0u) | (a->gather ? 16u : 0u) |
                      (a->mul_into_y ? 32u : 0u) | (a->urow.buf ? 64u : 0u),
                  a->ldx, a->xe, a->alpha ? a->alpha : 1.0f, 0};
    vkg_tref dummy = plan->perm;
    vkg_binding b[8] = {{a->x.buf, a->x.offset, xn * 4, 0, false},
                        {a->w.buf, a->w.offset, wn * wsz, 0, false},
                        opt(a->bias, (VkDeviceSize)plan->E * a->n * 4, dummy),
                        {a->y.buf, a->y.offset, yn * 4, 0, true},
                        {plan->perm.buf, plan->perm.offset, (VkDeviceSize)plan->P * 4, 0, false},
                        opt(a->gates, (VkDeviceSize)plan->P * 4, dummy),
                        {plan->tiles.buf, plan->tiles.offset, (VkDeviceSize)plan->max_tiles * 16, 0, false},
                        opt(a->urow, (VkDeviceSize)plan->T * a->n * 4, dummy)};
    vkg_pipeline_desc pd = {.nbindings = 8, .push_size = sizeof pc, .nspec = 6};
    if (plan->variant == VKG_MM_TEXEL) {
        if (!vkg_matmul_texel_supported(ctx))
            return vkg_fail(VKG_ERROR_UNSUPPORTED, "moe_gemm: the texel variant needs subgroup size 8 and RGBA32F/RGBA16F "
                            "texel buffers");
        bool vec4 = a->k % 4 == 0 && a->ldx % 4 == 0 && a->xe % 4 == 0 && a->x.offset % 16 == 0 && a->w.offset % 16 == 0;
        bool skinny = vec4 && use_skinny(plan->variant, a->n, a->k);
        pd.shader = skinny ? "moe_matmul_skinny" : vec4 ? "moe_matmul_texel" : "moe_matmul_texel_k1";
        pd.bindings[0] = pd.bindings[1] = pd.bindings[7] = VKG_BIND_UNIFORM_TEXEL;
        b[7].format = VK_FORMAT_R32_SFLOAT;
        if (!a->urow.buf) b[7] = (vkg_binding){a->x.buf, a->x.offset, 4, VK_FORMAT_R32_SFLOAT, false};
        b[0].format = vec4 ? VK_FORMAT_R32G32B32A32_SFLOAT : VK_FORMAT_R32_SFLOAT;
        b[1].format = a->w_dtype == VKG_DTYPE_F16 ? (vec4 ? VK_FORMAT_R16G16B16A16_SFLOAT : VK_FORMAT_R16_SFLOAT)
                                                  : b[0].format;
        if (plan->tile_m != 16) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "moe_gemm: plan made for another variant");
        uint32_t spec[6] = {8, 1, 1, 1, 2, texel_tn(a->n)};
        memcpy(pd.spec, spec, sizeof spec);
    } else {
        pd.shader = a->w_dtype == VKG_DTYPE_F16 ? "moe_matmul_tiled_f16w" : "moe_matmul_tiled";
        if (di->max_workgroup_invocations < 256)
            return vkg_fail(VKG_ERROR_UNSUPPORTED, "moe_gemm: the tiled variant needs 256 invocations per workgroup");
        if (plan->tile_m != 32) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "moe_gemm: plan made for another variant");
        uint32_t spec[6] = {256, 32, 64, 16, 2, 4};
        memcpy(pd.spec, spec, sizeof spec);
    }
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    return vkg_cmd_dispatch_indirect(cmd, p, b, &pc, plan->args.buf, plan->args.offset + 12 * a->grid, "moe_gemm");
}

static VkFormat texel4(vkg_dtype dt);

/* ---- fused expert MLP ---- */

bool vkg_moe_mlp_shapes(const vkg_context *ctx, vkg_mm_variant variant, uint32_t D, uint32_t F, vkg_act act)
{
    if (!variant) variant = vkg_matmul_default_variant(ctx);
    if (variant != VKG_MM_TEXEL || !vkg_matmul_texel_supported(ctx)) return false;
    if (act != VKG_ACT_RELU && act != VKG_ACT_GELU) return false;
    /* Each lane keeps the tile's 16 rows x D/8 outputs in registers: 512 floats at D = 256, twice
     * the texel matmul's budget already; wider layers take the grouped matmuls. */
    if (D == 0 || F == 0 || D % 4 || F % 4 || D > VKG_MOE_MLP_MAX_D) return false;
    return ctx->max_texel_per_stage >= 3 && ctx->max_storage_per_stage >= 6;
}

bool vkg_moe_mlp_supported(const vkg_context *ctx, const vkg_moe_plan *plan, const vkg_moe_mlp_args *a)
{
    if (!vkg_moe_mlp_shapes(ctx, plan->variant, a->D, a->F, a->act)) return false;
    const vkg_tref *t[3] = {&a->x, &a->w1, &a->w2};
    for (int i = 0; i < 3; i++)
        if (!t[i]->buf || t[i]->offset % 16) return false;
    return (a->w1_dtype == VKG_DTYPE_F32 || a->w1_dtype == VKG_DTYPE_F16) &&
           (a->w2_dtype == VKG_DTYPE_F32 || a->w2_dtype == VKG_DTYPE_F16);
}

typedef struct mlp_push {
    uint32_t D, F, k, flags;
} mlp_push;

vkg_status vkg_moe_mlp(vkg_cmd *cmd, const vkg_moe_plan *plan, const vkg_moe_mlp_args *a)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    VKG_TRY(plan_check(ctx, plan, "moe_mlp"));
    VKG_TRY(need(a->gates, "gates", "moe_mlp"));
    VKG_TRY(need(a->y, "y", "moe_mlp"));
    if (!vkg_moe_mlp_supported(ctx, plan, a))
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "moe_mlp: the fused expert MLP does not take D=%u F=%u (activation %d) "
                        "here; use the grouped matmuls", a->D, a->F, (int)a->act);
    if (plan->P == 0) return VKG_SUCCESS;
    uint64_t E = plan->E, D = a->D, F = a->F, T = plan->T;
    if (E * F * D > UINT32_MAX || (uint64_t)plan->P * D > UINT32_MAX)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "moe_mlp: an operand exceeds 2^32 elements");
    mlp_push pc = {a->D, a->F, plan->k, (a->b1.buf ? 1u : 0u) | (a->b2.buf ? 2u : 0u) | ((uint32_t)a->act << 2)};
    vkg_pipeline_desc pd = {.shader = "moe_mlp", .nbindings = 9, .push_size = sizeof pc, .nspec = 4,
                            .spec = {8, (a->D + 7) / 8, 2, 4},
                            .bindings = {VKG_BIND_UNIFORM_TEXEL, VKG_BIND_UNIFORM_TEXEL, VKG_BIND_UNIFORM_TEXEL}};
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    VkDeviceSize s1 = a->w1_dtype == VKG_DTYPE_F16 ? 2 : 4, s2 = a->w2_dtype == VKG_DTYPE_F16 ? 2 : 4;
    vkg_tref dummy = plan->perm;
    vkg_binding b[9] = {{a->x.buf, a->x.offset, T * D * 4, VK_FORMAT_R32G32B32A32_SFLOAT, false},
                        {a->w1.buf, a->w1.offset, E * F * D * s1, texel4(a->w1_dtype), false},
                        {a->w2.buf, a->w2.offset, E * D * F * s2, texel4(a->w2_dtype), false},
                        opt(a->b1, E * F * 4, dummy),
                        opt(a->b2, E * D * 4, dummy),
                        {a->y.buf, a->y.offset, (VkDeviceSize)plan->P * D * 4, 0, true},
                        {plan->perm.buf, plan->perm.offset, (VkDeviceSize)plan->P * 4, 0, false},
                        {a->gates.buf, a->gates.offset, (VkDeviceSize)plan->P * 4, 0, false},
                        {plan->tiles.buf, plan->tiles.offset, (VkDeviceSize)plan->max_tiles * 16, 0, false}};
    return vkg_cmd_dispatch_indirect(cmd, p, b, &pc, plan->args.buf, plan->args.offset, "moe_mlp");
}

vkg_status vkg_moe_combine(vkg_cmd *cmd, const vkg_moe_plan *plan, const vkg_moe_combine_args *a)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    VKG_TRY(plan_check(ctx, plan, "moe_combine"));
    VKG_TRY(need(a->ids, "ids", "moe_combine"));
    VKG_TRY(need(a->rows, "rows", "moe_combine"));
    VKG_TRY(need(a->y, "y", "moe_combine"));
    if ((a->gate_rows || a->bias.buf) && !a->gates.buf)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "moe_combine: gate-weighted rows or a gate-sum bias need gates");
    uint64_t n = (uint64_t)plan->T * a->D;
    if (n > UINT32_MAX) return vkg_fail(VKG_ERROR_UNSUPPORTED, "moe_combine: %llu outputs", (unsigned long long)n);
    if (n == 0) return VKG_SUCCESS;
    dispatch_push pc = {.P = plan->P, .E = plan->E, .k = plan->k, .nblocks = plan->nblocks, .tile_m = plan->tile_m,
                        .D = a->D, .T = plan->T,
                        .flags = (a->residual.buf ? 1u : 0u) | (a->gate_rows ? 2u : 0u) | (a->bias.buf ? 4u : 0u) |
                                 (a->scale.buf ? 8u : 0u)};
    uint32_t gy;
    vkg_grid_1d(ctx, plan->T, &pc.gx, &gy);
    vkg_pipeline_desc pd = {.shader = "moe_combine", .nbindings = 8, .push_size = sizeof pc, .nspec = 2,
                            .spec = {DISPATCH_WG, VKG_MOE_BLOCK}, .bindings = {[2] = VKG_BIND_UNIFORM_TEXEL}};
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    VkDeviceSize pk = (VkDeviceSize)plan->P * 4;
    vkg_binding b[8] = {{a->ids.buf, a->ids.offset, pk, 0, false},
                        {plan->inv.buf, plan->inv.offset, pk, 0, false},
                        {a->rows.buf, a->rows.offset, (VkDeviceSize)plan->P * a->D * 4, VK_FORMAT_R32_SFLOAT, false},
                        opt(a->gates, pk, a->ids),
                        opt(a->residual, n * 4, a->ids),
                        {a->y.buf, a->y.offset, n * 4, 0, true},
                        opt(a->bias, (VkDeviceSize)a->D * 4, a->ids),
                        opt(a->scale, (VkDeviceSize)a->D * 4, a->ids)};
    return vkg_cmd_dispatch(cmd, p, b, &pc, pc.gx, gy, 1, "moe_combine");
}

/* ---- fused MoE-LoRA mix ---- */

static VkFormat texel4(vkg_dtype dt)
{
    return dt == VKG_DTYPE_F16 ? VK_FORMAT_R16G16B16A16_SFLOAT : VK_FORMAT_R32G32B32A32_SFLOAT;
}

bool vkg_moe_lora_fused_shapes(const vkg_context *ctx, uint32_t H, uint32_t D, uint32_t r, uint32_t k)
{
    /* Tuned for lavapipe (one subgroup of 8 per token); GPUs take the grouped matmuls. */
    if (vkg_matmul_default_variant(ctx) != VKG_MM_TEXEL) return false;
    if (r % 4 || H % 4 || D % 4 || k * r > 256 || k > VKG_MOE_MAX_K) return false;
    return ctx->max_storage_per_stage >= 7 && ctx->max_texel_per_stage >= 5;
}

bool vkg_moe_lora_fused_supported(const vkg_context *ctx, const vkg_moe_lora_args *a)
{
    if (!vkg_moe_lora_fused_shapes(ctx, a->H, a->D, a->r, a->k)) return false;
    const vkg_tref *t[5] = {&a->u, &a->a1, &a->b1, &a->a2, &a->b2};
    for (int i = 0; i < 5; i++)
        if (!t[i]->buf || t[i]->offset % 16) return false;
    return true;
}

typedef struct lora_push {
    uint32_t T, H, E, D, flags;
    float s;
    uint32_t gx, pad;
} lora_push;

vkg_status vkg_moe_lora_fused(vkg_cmd *cmd, const vkg_moe_lora_args *a)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    if (!vkg_moe_lora_fused_supported(ctx, a))
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "moe_lora_mix: the fused kernel does not take H=%u D=%u r=%u k=%u here",
                        a->H, a->D, a->r, a->k);
    const vkg_tref *req[6] = {&a->ids, &a->gates, &a->hbar, &a->c, &a->u, &a->a1};
    for (int i = 0; i < 6; i++) VKG_TRY(need(*req[i], "an operand", "moe_lora_mix"));
    if (a->T == 0) return VKG_SUCCESS;
    lora_push pc = {a->T, a->H, a->E, a->D,
                    (uint32_t)a->act | (a->bias.buf ? 4u : 0u) | (a->scale.buf ? 8u : 0u) | (a->residual.buf ? 16u : 0u),
                    a->s, 0, 0};
    uint32_t gy;
    vkg_grid_1d(ctx, a->T, &pc.gx, &gy);
    vkg_pipeline_desc pd = {.shader = "moe_lora_mix", .nbindings = 12, .push_size = sizeof pc, .nspec = 3,
                            .spec = {8, a->k, a->r}};
    for (int i = 0; i < 5; i++) pd.bindings[i] = VKG_BIND_UNIFORM_TEXEL;
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    VkDeviceSize T = a->T, H = a->H, E = a->E, r = a->r, D = a->D, k = a->k;
    VkDeviceSize b1s = a->b1_dtype == VKG_DTYPE_F16 ? 2 : 4, a2s = a->a2_dtype == VKG_DTYPE_F16 ? 2 : 4,
                 b2s = a->b2_dtype == VKG_DTYPE_F16 ? 2 : 4;
    vkg_tref dummy = a->gates;
    vkg_binding b[12] = {{a->u.buf, a->u.offset, T * H * 4, VK_FORMAT_R32G32B32A32_SFLOAT, false},
                         {a->a1.buf, a->a1.offset, T * E * r * 4, VK_FORMAT_R32G32B32A32_SFLOAT, false},
                         {a->b1.buf, a->b1.offset, E * H * r * b1s, texel4(a->b1_dtype), false},
                         {a->a2.buf, a->a2.offset, E * r * H * a2s, texel4(a->a2_dtype), false},
                         {a->b2.buf, a->b2.offset, E * D * r * b2s, texel4(a->b2_dtype), false},
                         {a->ids.buf, a->ids.offset, T * k * 4, 0, false},
                         {a->gates.buf, a->gates.offset, T * k * 4, 0, false},
                         opt(a->bias, D * 4, dummy),
                         opt(a->scale, D * 4, dummy),
                         opt(a->residual, T * D * 4, dummy),
                         {a->hbar.buf, a->hbar.offset, T * H * 4, 0, true},
                         {a->c.buf, a->c.offset, T * D * 4, 0, true}};
    return vkg_cmd_dispatch(cmd, p, b, &pc, pc.gx, gy, 1, "moe_lora_mix");
}
