/* The MoE ops: moe_router, moe_experts, moe_lora_mix (docs/graph-format.md, docs/moe.md). Each
 * expands into several dispatches with scratch memory the session plans like any intermediate. */
#include <stdlib.h>
#include <string.h>

#include "graph/ops_moe.h"
#include "runtime/kernels/moe.h"

#define gfail vkg_node_fail

static const vkg_ir_tensor *tin(const vkg_graph *g, const vkg_ir_node *n, uint32_t i)
{
    return i < n->n_inputs && n->inputs[i] != VKG_IR_NONE ? &g->tensors[n->inputs[i]] : NULL;
}

static int64_t lastd(const vkg_ir_tensor *t) { return t->rank && !t->sym[t->rank - 1] ? t->dims[t->rank - 1] : -1; }

static int64_t attr_i(const vkg_ir_node *n, const char *name, int64_t dflt)
{
    const vkg_ir_attr *a = vkg_ir_attr_find(n, name);
    return a ? a->i : dflt;
}

static double attr_f(const vkg_ir_node *n, const char *name, double dflt)
{
    const vkg_ir_attr *a = vkg_ir_attr_find(n, name);
    return a ? a->f : dflt;
}

static const char *attr_s(const vkg_ir_node *n, const char *name, const char *dflt)
{
    const vkg_ir_attr *a = vkg_ir_attr_find(n, name);
    return a ? a->s : dflt;
}

/* A constant of the given rank whose dims match want[] where want[i] >= 0. */
static vkg_status want_const(const vkg_graph *g, const vkg_ir_node *n, const vkg_ir_tensor *t, const char *what,
                             uint32_t rank, const int64_t *want)
{
    if (!t) return gfail(g, n, "input %s is required", what);
    if (t->role != VKG_ROLE_CONSTANT || t->rank != rank)
        return gfail(g, n, "%s \"%s\" must be a rank-%u constant", what, t->name, rank);
    for (uint32_t i = 0; i < rank; i++)
        if (want[i] >= 0 && t->dims[i] != want[i])
            return gfail(g, n, "%s \"%s\" has dim %u = %lld, expected %lld", what, t->name, i, (long long)t->dims[i],
                         (long long)want[i]);
    return VKG_SUCCESS;
}

/* Rows of a (..., d) shape. */
static uint64_t rows_of(const vkg_shape *s)
{
    int64_t d = s->dims[s->rank - 1];
    return d ? vkg_shape_numel(s) / (uint64_t)d : 0;
}

static bool same_lead(const vkg_shape *a, const vkg_shape *b)
{
    if (a->rank != b->rank) return false;
    for (uint32_t i = 0; i + 1 < a->rank; i++)
        if (a->dims[i] != b->dims[i]) return false;
    return true;
}

/* ---- moe_router ---- */

const vkg_attr_spec vkg_moe_router_attrs[] = {
    {"k", VKG_ATTR_INT, true},         {"first", VKG_ATTR_INT, false},   {"score", VKG_ATTR_STRING, false},
    {"gates", VKG_ATTR_STRING, false}, {"renorm", VKG_ATTR_INT, false},  {"scale", VKG_ATTR_FLOAT, false},
    {"temperature", VKG_ATTR_FLOAT, false}, {NULL, 0, false}};

vkg_status vkg_moe_router_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x = tin(g, n, 0), *w = tin(g, n, 1), *b = tin(g, n, 2);
    if (x->rank < 1) return gfail(g, n, "x \"%s\" must have rank >= 1", x->name);
    int64_t wd[2] = {-1, lastd(x)};
    VKG_TRY(want_const(g, n, w, "weight", 2, wd));
    int64_t C = w->dims[0], k = attr_i(n, "k", 0), first = attr_i(n, "first", 0);
    if (b) {
        int64_t bd[1] = {C};
        VKG_TRY(want_const(g, n, b, "bias", 1, bd));
    }
    if (C < 1 || C > VKG_MOE_MAX_COLUMNS) return gfail(g, n, "%lld router columns; 1 to %d are supported", (long long)C, VKG_MOE_MAX_COLUMNS);
    if (first < 0 || first >= C) return gfail(g, n, "first = %lld outside [0, %lld)", (long long)first, (long long)C);
    if (k < 1 || k > C - first || k > VKG_MOE_MAX_K)
        return gfail(g, n, "k = %lld: expected 1 <= k <= %lld selectable experts (at most %d)", (long long)k,
                     (long long)(C - first), VKG_MOE_MAX_K);
    const char *score = attr_s(n, "score", "softmax"), *gates = attr_s(n, "gates", "softmax_topk");
    if (strcmp(score, "softmax") && strcmp(score, "sigmoid"))
        return gfail(g, n, "score \"%s\": expected \"softmax\" or \"sigmoid\"", score);
    if (strcmp(gates, "softmax_topk") && strcmp(gates, "score"))
        return gfail(g, n, "gates \"%s\": expected \"softmax_topk\" or \"score\"", gates);
    int64_t renorm = attr_i(n, "renorm", 0);
    if (renorm != 0 && renorm != 1) return gfail(g, n, "renorm = %lld: expected 0 or 1", (long long)renorm);
    double t = attr_f(n, "temperature", 1.0), sc = attr_f(n, "scale", 1.0);
    if (!(t > 0.0) || !(t < 1e30)) return gfail(g, n, "temperature %g must be a positive number", t);
    if (!(sc == sc) || sc > 1e30 || sc < -1e30) return gfail(g, n, "scale %g must be finite", sc);
    return VKG_SUCCESS;
}

vkg_status vkg_moe_router_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    const vkg_shape *x = in[0], *w = in[1];
    if (x->dims[x->rank - 1] != w->dims[1])
        return gfail(g, n, "x has %lld features; the router weight expects %lld", (long long)x->dims[x->rank - 1],
                     (long long)w->dims[1]);
    int64_t C = w->dims[0], first = attr_i(n, "first", 0), k = attr_i(n, "k", 1);
    out[0] = *x;
    out[0].dims[x->rank - 1] = k;
    out[1] = out[0];
    vkg_shape v = {.rank = 1, .dims = {C - first}};
    out[2] = out[3] = v;
    out[4] = (vkg_shape){.rank = 1, .dims = {C}};
    out[5] = out[6] = (vkg_shape){.rank = 1, .dims = {1}};
    return VKG_SUCCESS;
}

typedef struct router_scratch {
    uint64_t logits, lse, dump, total;
} router_scratch;

static router_scratch router_layout(uint64_t T, uint64_t C, uint64_t E)
{
    router_scratch r;
    r.logits = 0;
    r.lse = (T * C * 4 + 255) / 256 * 256;
    r.dump = r.lse + (T * 4 + 255) / 256 * 256;
    r.total = r.dump + (2 * E + C + 2) * 4 * 4; /* 4 x: each dummy statistic starts 16-aligned */
    return r;
}

uint64_t vkg_moe_router_scratch(const vkg_context *ctx, const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out)
{
    (void)ctx;
    (void)out;
    uint64_t C = (uint64_t)in[1]->dims[0];
    return router_layout(rows_of(in[0]), C, C - (uint64_t)attr_i(n, "first", 0)).total;
}

double vkg_moe_router_flops(const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out)
{
    (void)n;
    (void)out;
    return 2.0 * (double)rows_of(in[0]) * (double)in[1]->dims[0] * (double)in[1]->dims[1];
}

static vkg_status experts_plan(const vkg_op_call *c, vkg_moe_plan *plan, uint32_t grids[4]);

vkg_status vkg_moe_router_record(const vkg_op_call *c)
{
    const vkg_ir_node *n = c->node;
    const vkg_rt_tensor *x = c->in[0], *w = c->in[1], *b = c->in[2];
    uint64_t T = rows_of(&x->shape);
    uint32_t C = (uint32_t)w->shape.dims[0], D = (uint32_t)w->shape.dims[1];
    uint32_t first = (uint32_t)attr_i(n, "first", 0), k = (uint32_t)attr_i(n, "k", 1), E = C - first;
    if (T > UINT32_MAX / VKG_MOE_MAX_COLUMNS)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "moe_router: %llu tokens", (unsigned long long)T);
    router_scratch L = router_layout(T, C, E);
    vkg_tref s = c->scratch;
    vkg_tref logits = {s.buf, s.offset + L.logits}, lse = {s.buf, s.offset + L.lse};
    vkg_matmul_args m = {.x = x->ref, .w = w->ref, .bias = b ? b->ref : (vkg_tref){0}, .y = logits, .batch = 1,
                         .m = (uint32_t)T, .n = C, .k = D, .w_shared = true, .w_dtype = w->dtype};
    VKG_TRY(vkg_matmul(c->cmd, &m));
    bool sigmoid = strcmp(attr_s(n, "score", "softmax"), "sigmoid") == 0;
    float temp = (float)attr_f(n, "temperature", 1.0);
    vkg_moe_select_args sa = {.logits = logits, .ids = c->out[0]->ref, .gates = c->out[1]->ref, .lse = lse,
                              .T = (uint32_t)T, .C = C, .first = first, .k = k, .sigmoid = sigmoid,
                              .gates_are_scores = strcmp(attr_s(n, "gates", "softmax_topk"), "score") == 0,
                              .renorm = attr_i(n, "renorm", 0) != 0, .temperature = temp,
                              .scale = (float)attr_f(n, "scale", 1.0)};
    if (c->node->n_outputs <= 2) {
        /* The session does not fuse these (selection spans many workgroups); record the plan after. */
        VKG_TRY(vkg_moe_select(c->cmd, &sa));
        if (!c->plan_for) return VKG_SUCCESS;
        vkg_moe_plan plan;
        uint32_t grids[4];
        VKG_TRY(experts_plan(c->plan_for, &plan, grids));
        return vkg_moe_dispatch(c->cmd, sa.ids, &plan, grids);
    }
    /* Statistics the graph does not ask for land in the dump area. */
    vkg_tref st[5];
    uint64_t dump = s.offset + L.dump, sizes[5] = {E, E, C, 1, 1};
    for (uint32_t i = 0; i < 5; i++) {
        if (2 + i < c->node->n_outputs) st[i] = c->out[2 + i]->ref;
        else st[i] = (vkg_tref){s.buf, dump};
        dump += (sizes[i] * 4 + 15) / 16 * 16;
    }
    if (c->plan_for) {
        vkg_moe_plan plan;
        uint32_t grids[4];
        VKG_TRY(experts_plan(c->plan_for, &plan, grids));
        return vkg_moe_route_plan(c->cmd, &sa, st, &plan, grids);
    }
    return vkg_moe_route(c->cmd, &sa, st);
}

/* ---- moe_experts ---- */

const vkg_attr_spec vkg_moe_experts_attrs[] = {{"activation", VKG_ATTR_INT, true}, {NULL, 0, false}};

enum { EX_X, EX_IDS, EX_GATES, EX_W1, EX_B1, EX_W2, EX_B2, EX_W3, EX_RES };

vkg_status vkg_moe_experts_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x = tin(g, n, EX_X), *ids = tin(g, n, EX_IDS), *gt = tin(g, n, EX_GATES);
    const vkg_ir_tensor *w1 = tin(g, n, EX_W1), *b1 = tin(g, n, EX_B1), *w2 = tin(g, n, EX_W2), *b2 = tin(g, n, EX_B2);
    const vkg_ir_tensor *w3 = tin(g, n, EX_W3), *res = tin(g, n, EX_RES);
    int64_t act = attr_i(n, "activation", 0);
    if (act < 1 || act > 3) return gfail(g, n, "activation %lld: expected 1 (relu), 2 (gelu) or 3 (swiglu)", (long long)act);
    if (x->rank < 1 || ids->rank != x->rank || gt->rank != x->rank)
        return gfail(g, n, "x, ids and gates must have the same rank >= 1 ((..., D), (..., k), (..., k))");
    int64_t D = lastd(x);
    int64_t w1d[3] = {-1, -1, D};
    VKG_TRY(want_const(g, n, w1, "w1", 3, w1d));
    int64_t E = w1->dims[0], h = w1->dims[1];
    if (E < 1 || E > VKG_MOE_MAX_COLUMNS) return gfail(g, n, "%lld experts; 1 to %d are supported", (long long)E, VKG_MOE_MAX_COLUMNS);
    int64_t w2d[3] = {E, w1->dims[2], h}, bd1[2] = {E, h}, bd2[2] = {E, w1->dims[2]};
    VKG_TRY(want_const(g, n, w2, "w2", 3, w2d));
    if (b1) VKG_TRY(want_const(g, n, b1, "b1", 2, bd1));
    if (b2) VKG_TRY(want_const(g, n, b2, "b2", 2, bd2));
    if (w3) VKG_TRY(want_const(g, n, w3, "w3", 3, w1->dims));
    if ((act == 3) != (w3 != NULL))
        return gfail(g, n, act == 3 ? "swiglu (activation 3) needs w3" : "w3 is given but the activation is not swiglu (3)");
    if (lastd(ids) >= 0 && lastd(gt) >= 0 && lastd(ids) != lastd(gt))
        return gfail(g, n, "ids have %lld slots and gates %lld", (long long)lastd(ids), (long long)lastd(gt));
    if (res && res->rank != x->rank) return gfail(g, n, "residual \"%s\" must have x's shape", res->name);
    return VKG_SUCCESS;
}

vkg_status vkg_moe_experts_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    const vkg_shape *x = in[EX_X], *ids = in[EX_IDS], *gt = in[EX_GATES], *res = in[EX_RES];
    if (!same_lead(x, ids) || !same_lead(x, gt) || ids->dims[ids->rank - 1] != gt->dims[gt->rank - 1])
        return gfail(g, n, "ids and gates must be (..., k) with x's leading dims");
    int64_t k = ids->dims[ids->rank - 1];
    if (k < 1 || k > VKG_MOE_MAX_K) return gfail(g, n, "%lld slots per token; 1 to %d are supported", (long long)k, VKG_MOE_MAX_K);
    if (x->dims[x->rank - 1] != in[EX_W1]->dims[2])
        return gfail(g, n, "x has %lld features; w1 expects %lld", (long long)x->dims[x->rank - 1], (long long)in[EX_W1]->dims[2]);
    if (res) {
        bool same = res->rank == x->rank;
        for (uint32_t i = 0; same && i < x->rank; i++) same = res->dims[i] == x->dims[i];
        if (!same) return gfail(g, n, "residual must have x's shape");
    }
    *out = *x;
    return VKG_SUCCESS;
}

/* Scratch is sized before a variant is chosen: the texel variant's smaller tiles give the longer
 * tile list, so that layout bounds both. */
static uint64_t plan_bytes_bound(uint64_t T, uint64_t k, uint64_t E)
{
    vkg_moe_plan tmp;
    return vkg_moe_plan_layout(NULL, (uint32_t)T, (uint32_t)k, (uint32_t)E, VKG_MM_TEXEL, (vkg_tref){0}, &tmp);
}

typedef struct experts_scratch {
    uint64_t plan, hidden, pair_out, total;
} experts_scratch;

static experts_scratch experts_layout(const vkg_context *ctx, uint64_t T, uint64_t k, uint64_t E, uint64_t h, uint64_t D,
                                      vkg_moe_plan *plan, vkg_tref base)
{
    experts_scratch s;
    s.plan = 0;
    uint64_t pb = plan_bytes_bound(T, k, E);
    if (ctx) vkg_moe_plan_layout(ctx, (uint32_t)T, (uint32_t)k, (uint32_t)E, VKG_MM_AUTO, base, plan);
    s.hidden = (pb + 255) / 256 * 256;
    s.pair_out = s.hidden + (T * k * h * 4 + 255) / 256 * 256;
    s.total = s.pair_out + (T * k * D * 4 + 255) / 256 * 256;
    return s;
}

uint64_t vkg_moe_experts_scratch(const vkg_context *ctx, const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out)
{
    (void)ctx;
    (void)n;
    (void)out;
    uint64_t T = rows_of(in[EX_X]), k = (uint64_t)in[EX_IDS]->dims[in[EX_IDS]->rank - 1];
    uint64_t E = (uint64_t)in[EX_W1]->dims[0], h = (uint64_t)in[EX_W1]->dims[1], D = (uint64_t)in[EX_W1]->dims[2];
    vkg_moe_plan tmp;
    return experts_layout(NULL, T, k, E, h, D, &tmp, (vkg_tref){0}).total;
}

double vkg_moe_experts_flops(const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out)
{
    (void)out;
    double P = (double)rows_of(in[EX_X]) * (double)in[EX_IDS]->dims[in[EX_IDS]->rank - 1];
    double hD = (double)in[EX_W1]->dims[1] * (double)in[EX_W1]->dims[2];
    return 2.0 * P * hD * (attr_i(n, "activation", 0) == 3 ? 3.0 : 2.0);
}

/* VKG_MOE_FUSED_MLP=1 runs the expert MLP as one dispatch (moe_mlp) where it fits. It is off by
 * default: on lavapipe it measured slower than the two grouped matmuls (bench/RESULTS.md, Transfuser
 * section), which spread a small batch over more workgroups. */
static bool fused_mlp_allowed(void)
{
    const char *e = getenv("VKG_MOE_FUSED_MLP");
    return e && strcmp(e, "1") == 0;
}

/* What moe_experts records for call c, decided once for the node and for a router that records its
 * plan (vkg_op_call.plan_for): the plan in its scratch, the fused MLP or not, the grids. */
typedef struct experts_prep {
    uint64_t T, k;
    uint32_t E, h, D;
    int64_t act;
    bool empty, mlp;
    experts_scratch L;
    vkg_moe_plan plan;
    vkg_moe_mlp_args ma;
    uint32_t grids[4];
} experts_prep;

static vkg_status experts_prepare(const vkg_op_call *c, experts_prep *p)
{
    vkg_context *ctx = vkg_cmd_context(c->cmd);
    const vkg_rt_tensor *const *in = c->in;
    memset(p, 0, sizeof *p);
    p->T = rows_of(&in[EX_X]->shape);
    p->k = (uint64_t)in[EX_IDS]->shape.dims[in[EX_IDS]->shape.rank - 1];
    p->E = (uint32_t)in[EX_W1]->shape.dims[0];
    p->h = (uint32_t)in[EX_W1]->shape.dims[1];
    p->D = (uint32_t)in[EX_W1]->shape.dims[2];
    p->act = attr_i(c->node, "activation", 2);
    if (p->T * p->k > UINT32_MAX / 2)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "moe_experts: %llu pairs", (unsigned long long)(p->T * p->k));
    p->empty = p->T == 0 || p->D == 0;
    if (p->empty) return VKG_SUCCESS;
    p->L = experts_layout(ctx, p->T, p->k, p->E, p->h, p->D, &p->plan, c->scratch);
    if (p->L.total > c->scratch_bytes)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "moe_experts: scratch of %llu bytes, %llu needed",
                        (unsigned long long)c->scratch_bytes, (unsigned long long)p->L.total);
    vkg_tref pair_out = {c->scratch.buf, c->scratch.offset + p->L.pair_out};
    p->ma = (vkg_moe_mlp_args){.x = in[EX_X]->ref, .w1 = in[EX_W1]->ref, .w1_dtype = in[EX_W1]->dtype,
                               .b1 = in[EX_B1] ? in[EX_B1]->ref : (vkg_tref){0}, .w2 = in[EX_W2]->ref,
                               .w2_dtype = in[EX_W2]->dtype, .b2 = in[EX_B2] ? in[EX_B2]->ref : (vkg_tref){0},
                               .gates = in[EX_GATES]->ref, .y = pair_out, .D = p->D, .F = p->h, .act = (vkg_act)p->act};
    p->mlp = fused_mlp_allowed() && vkg_moe_mlp_supported(ctx, &p->plan, &p->ma);
    if (p->mlp) {
        p->grids[0] = VKG_MOE_MLP_GRID_X;
    } else {
        p->grids[0] = vkg_moe_gemm_grid_x(ctx, p->plan.variant, p->h, p->D);
        p->grids[1] = vkg_moe_gemm_grid_x(ctx, p->plan.variant, p->D, p->h);
    }
    return VKG_SUCCESS;
}

/* The plan of experts call c and its grids, for the router that records it. */
static vkg_status experts_plan(const vkg_op_call *c, vkg_moe_plan *plan, uint32_t grids[4])
{
    experts_prep ep;
    VKG_TRY(experts_prepare(c, &ep));
    /* The session fuses only where the experts have work: the pairs fit one plan1 workgroup. */
    if (ep.empty) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "moe_router: its experts node has no work to plan");
    *plan = ep.plan;
    memcpy(grids, ep.grids, sizeof ep.grids);
    return VKG_SUCCESS;
}

vkg_status vkg_moe_experts_record(const vkg_op_call *c)
{
    const vkg_rt_tensor *const *in = c->in;
    experts_prep ep;
    VKG_TRY(experts_prepare(c, &ep));
    if (ep.empty) return VKG_SUCCESS;
    const vkg_moe_plan *plan = &ep.plan;
    uint32_t h = ep.h, D = ep.D;
    int64_t act = ep.act;
    vkg_tref hidden = {c->scratch.buf, c->scratch.offset + ep.L.hidden}, pair_out = ep.ma.y;
    vkg_moe_combine_args cb = {.ids = in[EX_IDS]->ref, .rows = pair_out, .residual = in[EX_RES] ? in[EX_RES]->ref : (vkg_tref){0},
                               .y = c->out[0]->ref, .D = D};
    if (!c->plan_recorded) VKG_TRY(vkg_moe_dispatch(c->cmd, in[EX_IDS]->ref, plan, ep.grids));
    if (ep.mlp) {
        VKG_TRY(vkg_moe_mlp(c->cmd, plan, &ep.ma));
        return vkg_moe_combine(c->cmd, plan, &cb);
    }
    vkg_moe_gemm_args f1 = {.x = in[EX_X]->ref, .ldx = D, .gather = true, .w = in[EX_W1]->ref, .w_dtype = in[EX_W1]->dtype,
                            .bias = in[EX_B1] ? in[EX_B1]->ref : (vkg_tref){0}, .y = hidden, .n = h, .k = D,
                            .act = act == 3 ? VKG_ACT_SILU : (vkg_act)act, .grid = 0, .x_rows = (uint32_t)ep.T};
    VKG_TRY(vkg_moe_gemm(c->cmd, plan, &f1));
    if (act == 3) {
        vkg_moe_gemm_args f3 = f1;
        f3.w = in[EX_W3]->ref;
        f3.w_dtype = in[EX_W3]->dtype;
        f3.bias = (vkg_tref){0};
        f3.act = VKG_ACT_NONE;
        f3.mul_into_y = true;
        VKG_TRY(vkg_moe_gemm(c->cmd, plan, &f3));
    }
    vkg_moe_gemm_args f2 = {.x = hidden, .ldx = h, .w = in[EX_W2]->ref, .w_dtype = in[EX_W2]->dtype,
                            .bias = in[EX_B2] ? in[EX_B2]->ref : (vkg_tref){0}, .gates = in[EX_GATES]->ref,
                            .y = pair_out, .n = D, .k = h, .grid = 1, .x_rows = plan->P};
    VKG_TRY(vkg_moe_gemm(c->cmd, plan, &f2));
    return vkg_moe_combine(c->cmd, plan, &cb);
}

/* ---- moe_lora_mix ---- */

const vkg_attr_spec vkg_moe_lora_mix_attrs[] = {
    {"lora_scale", VKG_ATTR_FLOAT, true}, {"activation", VKG_ATTR_INT, false}, {NULL, 0, false}};

enum { LM_U, LM_A1, LM_IDS, LM_GATES, LM_B1, LM_A2, LM_B2, LM_BIAS, LM_SCALE, LM_RES };

vkg_status vkg_moe_lora_mix_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *u = tin(g, n, LM_U), *a1 = tin(g, n, LM_A1), *ids = tin(g, n, LM_IDS), *gt = tin(g, n, LM_GATES);
    const vkg_ir_tensor *b1 = tin(g, n, LM_B1), *a2 = tin(g, n, LM_A2), *b2 = tin(g, n, LM_B2);
    const vkg_ir_tensor *bias = tin(g, n, LM_BIAS), *sc = tin(g, n, LM_SCALE), *res = tin(g, n, LM_RES);
    int64_t act = attr_i(n, "activation", 2);
    if (act != 1 && act != 2) return gfail(g, n, "activation %lld: expected 1 (relu) or 2 (gelu)", (long long)act);
    if (u->rank < 1 || a1->rank != u->rank || ids->rank != u->rank || gt->rank != u->rank)
        return gfail(g, n, "u, a1, ids and gates must have the same rank >= 1");
    int64_t b1d[3] = {-1, lastd(u), -1};
    VKG_TRY(want_const(g, n, b1, "lora_b1", 3, b1d));
    int64_t E = b1->dims[0], H = b1->dims[1], r = b1->dims[2];
    if (E < 1 || E > VKG_MOE_MAX_COLUMNS) return gfail(g, n, "%lld experts; 1 to %d are supported", (long long)E, VKG_MOE_MAX_COLUMNS);
    if (r < 1) return gfail(g, n, "LoRA rank %lld must be >= 1", (long long)r);
    if (lastd(a1) >= 0 && lastd(a1) != E * r)
        return gfail(g, n, "a1 \"%s\" has %lld columns, expected E * r = %lld", a1->name, (long long)lastd(a1), (long long)(E * r));
    int64_t a2d[3] = {E, r, H}, b2d[3] = {E, -1, r};
    VKG_TRY(want_const(g, n, a2, "lora_a2", 3, a2d));
    VKG_TRY(want_const(g, n, b2, "lora_b2", 3, b2d));
    int64_t D = b2->dims[1], dd[1] = {D};
    if (bias) VKG_TRY(want_const(g, n, bias, "b2", 1, dd));
    if (sc) VKG_TRY(want_const(g, n, sc, "scale", 1, dd));
    if (res && (res->rank != u->rank || (lastd(res) >= 0 && lastd(res) != D)))
        return gfail(g, n, "residual \"%s\" must be (..., %lld)", res->name, (long long)D);
    double s = attr_f(n, "lora_scale", 1.0);
    if (!(s == s) || s > 1e30 || s < -1e30) return gfail(g, n, "lora_scale %g must be finite", s);
    return VKG_SUCCESS;
}

vkg_status vkg_moe_lora_mix_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    const vkg_shape *u = in[LM_U], *a1 = in[LM_A1], *ids = in[LM_IDS], *gt = in[LM_GATES], *res = in[LM_RES];
    int64_t E = in[LM_B1]->dims[0], H = in[LM_B1]->dims[1], r = in[LM_B1]->dims[2], D = in[LM_B2]->dims[1];
    if (!same_lead(u, a1) || !same_lead(u, ids) || !same_lead(u, gt))
        return gfail(g, n, "u, a1, ids and gates must share their leading dims");
    if (u->dims[u->rank - 1] != H || a1->dims[a1->rank - 1] != E * r)
        return gfail(g, n, "u must be (..., %lld) and a1 (..., %lld)", (long long)H, (long long)(E * r));
    int64_t k = ids->dims[ids->rank - 1];
    if (k != gt->dims[gt->rank - 1] || k < 1 || k > VKG_MOE_MAX_K)
        return gfail(g, n, "ids and gates must have the same number of slots, 1 to %d", VKG_MOE_MAX_K);
    out[0] = *u;
    out[1] = *u;
    out[1].dims[u->rank - 1] = D;
    if (res) {
        bool same = res->rank == out[1].rank;
        for (uint32_t i = 0; same && i < res->rank; i++) same = res->dims[i] == out[1].dims[i];
        if (!same) return gfail(g, n, "residual must be (..., %lld) with u's leading dims", (long long)D);
    }
    return VKG_SUCCESS;
}

static uint64_t lora_mix_bytes(uint64_t T, uint64_t k, uint64_t H, uint64_t r, uint64_t D, uint64_t E, uint64_t *h_off,
                               uint64_t *a2_off, uint64_t *o2_off)
{
    uint64_t P = T * k, pb = (plan_bytes_bound(T, k, E) + 255) / 256 * 256;
    *h_off = pb;
    *a2_off = *h_off + (P * H * 4 + 255) / 256 * 256;
    *o2_off = *a2_off + (P * r * 4 + 255) / 256 * 256;
    return *o2_off + (P * D * 4 + 255) / 256 * 256;
}

uint64_t vkg_moe_lora_mix_scratch(const vkg_context *ctx, const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out)
{
    (void)n;
    (void)out;
    uint64_t k = (uint64_t)in[LM_IDS]->dims[in[LM_IDS]->rank - 1], H = (uint64_t)in[LM_B1]->dims[1],
             r = (uint64_t)in[LM_B1]->dims[2], D = (uint64_t)in[LM_B2]->dims[1], a, b, c;
    /* The fused kernel keeps everything per pair in registers; only the grouped path needs memory. */
    if (k <= UINT32_MAX && vkg_moe_lora_fused_shapes(ctx, (uint32_t)H, (uint32_t)D, (uint32_t)r, (uint32_t)k)) return 0;
    return lora_mix_bytes(rows_of(in[LM_U]), k, H, r, D, (uint64_t)in[LM_B1]->dims[0], &a, &b, &c);
}

double vkg_moe_lora_mix_flops(const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out)
{
    (void)n;
    (void)out;
    double P = (double)rows_of(in[LM_U]) * (double)in[LM_IDS]->dims[in[LM_IDS]->rank - 1];
    double H = (double)in[LM_B1]->dims[1], r = (double)in[LM_B1]->dims[2], D = (double)in[LM_B2]->dims[1];
    return 2.0 * P * r * (2.0 * H + D);
}

vkg_status vkg_moe_lora_mix_record(const vkg_op_call *c)
{
    vkg_context *ctx = vkg_cmd_context(c->cmd);
    const vkg_rt_tensor *const *in = c->in;
    uint64_t T = rows_of(&in[LM_U]->shape), k = (uint64_t)in[LM_IDS]->shape.dims[in[LM_IDS]->shape.rank - 1];
    uint32_t E = (uint32_t)in[LM_B1]->shape.dims[0], H = (uint32_t)in[LM_B1]->shape.dims[1],
             r = (uint32_t)in[LM_B1]->shape.dims[2], D = (uint32_t)in[LM_B2]->shape.dims[1];
    if (T * k > UINT32_MAX / 2) return vkg_fail(VKG_ERROR_UNSUPPORTED, "moe_lora_mix: %llu pairs", (unsigned long long)(T * k));
    if (T == 0) return VKG_SUCCESS;
    vkg_moe_lora_args fa = {.u = in[LM_U]->ref, .a1 = in[LM_A1]->ref, .ids = in[LM_IDS]->ref, .gates = in[LM_GATES]->ref,
                            .b1 = in[LM_B1]->ref, .a2 = in[LM_A2]->ref, .b2 = in[LM_B2]->ref,
                            .b1_dtype = in[LM_B1]->dtype, .a2_dtype = in[LM_A2]->dtype, .b2_dtype = in[LM_B2]->dtype,
                            .bias = in[LM_BIAS] ? in[LM_BIAS]->ref : (vkg_tref){0},
                            .scale = in[LM_SCALE] ? in[LM_SCALE]->ref : (vkg_tref){0},
                            .residual = in[LM_RES] ? in[LM_RES]->ref : (vkg_tref){0}, .hbar = c->out[0]->ref,
                            .c = c->out[1]->ref, .T = (uint32_t)T, .H = H, .E = E, .r = r, .D = D, .k = (uint32_t)k,
                            .s = (float)attr_f(c->node, "lora_scale", 1.0),
                            .act = (vkg_act)attr_i(c->node, "activation", 2)};
    if (vkg_moe_lora_fused_supported(ctx, &fa)) return vkg_moe_lora_fused(c->cmd, &fa);
    uint64_t h_off, a2_off, o2_off;
    uint64_t need_bytes = lora_mix_bytes(T, k, H, r, D, E, &h_off, &a2_off, &o2_off);
    if (need_bytes > c->scratch_bytes)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "moe_lora_mix: scratch of %llu bytes, %llu needed",
                        (unsigned long long)c->scratch_bytes, (unsigned long long)need_bytes);
    /* Elsewhere (GPUs, ragged widths): dispatch the pairs by expert and run the LoRA products as
     * grouped matmuls, then combine in ascending expert order. */
    vkg_moe_plan plan;
    vkg_moe_plan_layout(ctx, (uint32_t)T, (uint32_t)k, E, VKG_MM_AUTO, c->scratch, &plan);
    vkg_tref s = c->scratch, h = {s.buf, s.offset + h_off}, a2 = {s.buf, s.offset + a2_off}, o2 = {s.buf, s.offset + o2_off};
    float ls = (float)attr_f(c->node, "lora_scale", 1.0);
    uint32_t grids[4] = {vkg_moe_gemm_grid_x(ctx, plan.variant, H, r), vkg_moe_gemm_grid_x(ctx, plan.variant, r, H),
                         vkg_moe_gemm_grid_x(ctx, plan.variant, D, r), 0};
    VKG_TRY(vkg_moe_dispatch(c->cmd, in[LM_IDS]->ref, &plan, grids));
    /* h = act(u + s * B1_e (A1_e f)) per pair: the rank-r product is a grouped matmul with K = r that
     * reads the pair's expert slice of a1 and adds the token's shared fc1 row before the activation. */
    vkg_moe_gemm_args up1 = {.x = in[LM_A1]->ref, .ldx = E * r, .xe = r, .gather = true, .w = in[LM_B1]->ref,
                             .w_dtype = in[LM_B1]->dtype, .urow = in[LM_U]->ref, .y = h, .n = H, .k = r, .alpha = ls,
                             .act = (vkg_act)attr_i(c->node, "activation", 2), .grid = 0, .x_rows = (uint32_t)T};
    VKG_TRY(vkg_moe_gemm(c->cmd, &plan, &up1));
    vkg_moe_gemm_args down2 = {.x = h, .ldx = H, .w = in[LM_A2]->ref, .w_dtype = in[LM_A2]->dtype, .y = a2, .n = r,
                               .k = H, .grid = 1, .x_rows = plan.P};
    VKG_TRY(vkg_moe_gemm(c->cmd, &plan, &down2));
    vkg_moe_gemm_args up2 = {.x = a2, .ldx = r, .w = in[LM_B2]->ref, .w_dtype = in[LM_B2]->dtype,
                             .gates = in[LM_GATES]->ref, .y = o2, .n = D, .k = r, .alpha = ls, .grid = 2,
                             .x_rows = plan.P};
    VKG_TRY(vkg_moe_gemm(c->cmd, &plan, &up2));
    vkg_moe_combine_args hb = {.ids = in[LM_IDS]->ref, .rows = h, .gates = in[LM_GATES]->ref, .gate_rows = true,
                               .y = c->out[0]->ref, .D = H};
    VKG_TRY(vkg_moe_combine(c->cmd, &plan, &hb));
    vkg_moe_combine_args cc = {.ids = in[LM_IDS]->ref, .rows = o2, .gates = in[LM_GATES]->ref,
                               .bias = in[LM_BIAS] ? in[LM_BIAS]->ref : (vkg_tref){0},
                               .scale = in[LM_SCALE] ? in[LM_SCALE]->ref : (vkg_tref){0},
                               .residual = in[LM_RES] ? in[LM_RES]->ref : (vkg_tref){0}, .y = c->out[1]->ref, .D = D};
    return vkg_moe_combine(c->cmd, &plan, &cc);
}
