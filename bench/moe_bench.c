/* MoE rows of `vkg bench --kernels`: the three MoE FFN kinds as graphs built with the C writer and run
 * as sessions (every dispatch of the layer, as a model runs it), against their baselines in the same
 * run with repetitions interleaved. A profiled run of each splits the layer into routing + dispatch +
 * combine and the expert matmuls. Weights are random: speed does not depend on their values. */
#include "moe_bench.h"

#include "bench_util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "graph/exec.h"


/* ---- a small graph builder over vkg_writer ---- */

typedef struct gb {
    vkg_writer *w;
    uint32_t seed;
    vkg_status st;
} gb;

static uint32_t add(gb *b, const char *name, vkg_dtype dt, vkg_tensor_role role, uint32_t rank, const int64_t *dims,
                    const void *data)
{
    vkg_writer_tensor t = {.name = name, .dtype = dt, .role = role, .rank = rank, .data = data};
    uint64_t n = 1;
    for (uint32_t i = 0; i < rank; i++) n *= (uint64_t)(t.dims[i] = dims[i]);
    if (data) t.data_size = n * 4;
    uint32_t id = 0;
    if (b->st == VKG_SUCCESS) b->st = vkg_writer_add_tensor(b->w, &t, &id);
    if (b->st == VKG_SUCCESS && role == VKG_ROLE_INPUT) b->st = vkg_writer_add_input(b->w, id);
    if (b->st == VKG_SUCCESS && role == VKG_ROLE_OUTPUT) b->st = vkg_writer_add_output(b->w, id);
    return id;
}

/* A random fp32 constant, uniform in [-a, a). */
static uint32_t rnd(gb *b, const char *name, uint32_t rank, const int64_t *dims, float a)
{
    uint64_t n = 1;
    for (uint32_t i = 0; i < rank; i++) n *= (uint64_t)dims[i];
    float *p = malloc(n * 4 + 4);
    if (!p) {
        b->st = vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        return 0;
    }
    uint32_t s = b->seed++ * 2654435761u + 1;
    for (uint64_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        p[i] = a * ((float)(s >> 8) / 8388608.0f - 1.0f);
    }
    uint32_t id = add(b, name, VKG_DTYPE_F32, VKG_ROLE_CONSTANT, rank, dims, p);
    free(p);
    return id;
}

static uint32_t act2(gb *b, const char *name, uint32_t rows, uint32_t cols, vkg_tensor_role role, vkg_dtype dt)
{
    int64_t d[2] = {rows, cols};
    return add(b, name, dt, role, 2, d, NULL);
}

static void node(gb *b, const char *op, const char *name, const uint32_t *in, uint32_t nin, const uint32_t *out,
                 uint32_t nout, const vkg_writer_attr *at, uint32_t nat)
{
    if (b->st == VKG_SUCCESS) b->st = vkg_writer_add_node(b->w, op, name, in, nin, out, nout, at, nat);
}

static vkg_status load(vkg_context *ctx, gb *b, vkg_model **m)
{
    void *data = NULL;
    size_t size = 0;
    vkg_status st = b->st;
    if (st == VKG_SUCCESS) st = vkg_writer_to_memory(b->w, &data, &size);
    if (st == VKG_SUCCESS) st = vkg_model_load_memory(ctx, data, size, m);
    free(data);
    vkg_writer_destroy(b->w);
    return st;
}

enum { NONE = 0xFFFFFFFFu };

/* The router node: ids and gates out. */
static void router(gb *b, uint32_t x, uint32_t T, uint32_t D, uint32_t C, uint32_t first, uint32_t k, int scores,
                   int bias, uint32_t *ids, uint32_t *gates)
{
    int64_t wd[2] = {C, D}, bd[1] = {C};
    uint32_t in[3] = {x, rnd(b, "router.weight", 2, wd, 0.5f), bias ? rnd(b, "router.bias", 1, bd, 0.1f) : NONE};
    *ids = act2(b, "ids", T, k, VKG_ROLE_INTERMEDIATE, VKG_DTYPE_I32);
    *gates = act2(b, "gates", T, k, VKG_ROLE_INTERMEDIATE, VKG_DTYPE_F32);
    uint32_t out[2] = {*ids, *gates};
    vkg_writer_attr at[3] = {{.name = "k", .type = VKG_ATTR_INT, .i = k},
                             {.name = "first", .type = VKG_ATTR_INT, .i = first},
                             {.name = "gates", .type = VKG_ATTR_STRING, .s = scores ? "score" : "softmax_topk"}};
    node(b, "moe_router", "router", in, bias ? 3 : 2, out, 2, at, 3);
}

static uint32_t linear(gb *b, const char *name, uint32_t x, uint32_t T, uint32_t K, uint32_t N, int act, uint32_t res,
                       vkg_tensor_role role)
{
    char wn[64], bn[64];
    snprintf(wn, sizeof wn, "%s.weight", name);
    snprintf(bn, sizeof bn, "%s.bias", name);
    int64_t wd[2] = {N, K}, bd[1] = {N};
    uint32_t in[5] = {x, rnd(b, wn, 2, wd, 1.0f / sqrtf((float)K)), rnd(b, bn, 1, bd, 0.1f), NONE, res};
    uint32_t y = act2(b, name, T, N, role, VKG_DTYPE_F32);
    vkg_writer_attr at = {.name = "activation", .type = VKG_ATTR_INT, .i = act};
    node(b, "linear", name, in, res != NONE ? 5 : 3, &y, 1, &at, act ? 1 : 0);
    return y;
}

static uint32_t experts(gb *b, uint32_t x, uint32_t ids, uint32_t gates, uint32_t T, uint32_t D, uint32_t E, uint32_t h,
                        int act, int biases, uint32_t res)
{
    int64_t w1d[3] = {E, h, D}, w2d[3] = {E, D, h}, b1d[2] = {E, h}, b2d[2] = {E, D};
    float a1 = 1.0f / sqrtf((float)D), a2 = 1.0f / sqrtf((float)h);
    uint32_t in[9] = {x, ids, gates, rnd(b, "experts.w1", 3, w1d, a1), biases ? rnd(b, "experts.b1", 2, b1d, 0.1f) : NONE,
                      rnd(b, "experts.w2", 3, w2d, a2), biases ? rnd(b, "experts.b2", 2, b2d, 0.1f) : NONE, NONE, res};
    uint32_t y = act2(b, "output", T, D, VKG_ROLE_OUTPUT, VKG_DTYPE_F32);
    vkg_writer_attr at = {.name = "activation", .type = VKG_ATTR_INT, .i = act};
    node(b, "moe_experts", "experts", in, res != NONE ? 9 : 7, &y, 1, &at, 1);
    return y;
}

/* ---- the layers ---- */

typedef enum layer_kind {
    MOE_LORA_SHARED, MOE_LORA_NAIVE, DEEPSEEK, DENSE_FFN, MOE_FFN
} layer_kind;

typedef struct layer {
    layer_kind kind;
    uint32_t T, D, H, E, k, r, S, w; /* H: dense hidden; w: fine-grained expert width */
} layer;

static vkg_status build(vkg_context *ctx, const layer *L, vkg_model **m)
{
    gb b = {.seed = 7};
    VKG_TRY(vkg_writer_create(&b.w));
    uint32_t T = L->T, D = L->D;
    uint32_t x = act2(&b, "x", T, D, VKG_ROLE_INPUT, VKG_DTYPE_F32), ids, gates;
    switch (L->kind) {
    case MOE_LORA_SHARED: {
        /* fc1 once per token, each expert's LoRA and GELU per routed pair, fc2 once on the mixture */
        uint32_t E = L->E, H = L->H, r = L->r;
        router(&b, x, T, D, E, 0, L->k, 0, 1, &ids, &gates);
        uint32_t u = linear(&b, "fc1", x, T, D, H, 0, NONE, VKG_ROLE_INTERMEDIATE);
        int64_t a1d[2] = {E * r, D}, b1d[3] = {E, H, r}, a2d[3] = {E, r, H}, b2d[3] = {E, D, r}, dd[1] = {D};
        uint32_t ain[2] = {x, rnd(&b, "lora_a1", 2, a1d, 0.05f)};
        uint32_t a1 = act2(&b, "a1", T, E * r, VKG_ROLE_INTERMEDIATE, VKG_DTYPE_F32);
        node(&b, "linear", "lora_down1", ain, 2, &a1, 1, NULL, 0);
        uint32_t bias2 = rnd(&b, "fc2.bias", 1, dd, 0.1f);
        uint32_t min[8] = {u, a1, ids, gates, rnd(&b, "lora_b1", 3, b1d, 0.05f), rnd(&b, "lora_a2", 3, a2d, 0.05f),
                           rnd(&b, "lora_b2", 3, b2d, 0.05f), bias2};
        uint32_t mo[2] = {act2(&b, "hbar", T, H, VKG_ROLE_INTERMEDIATE, VKG_DTYPE_F32),
                          act2(&b, "c", T, D, VKG_ROLE_INTERMEDIATE, VKG_DTYPE_F32)};
        vkg_writer_attr at = {.name = "lora_scale", .type = VKG_ATTR_FLOAT, .f = 1.0};
        node(&b, "moe_lora_mix", "mix", min, 8, mo, 2, &at, 1);
        int64_t w2d[2] = {D, H};
        uint32_t fin[5] = {mo[0], rnd(&b, "fc2.weight", 2, w2d, 1.0f / sqrtf((float)H)), NONE, NONE, mo[1]};
        uint32_t y = act2(&b, "output", T, D, VKG_ROLE_OUTPUT, VKG_DTYPE_F32);
        node(&b, "linear", "fc2", fin, 5, &y, 1, NULL, 0);
        break;
    }
    case MOE_LORA_NAIVE:
        /* k full expert FFNs per token: each expert's frozen copy with its LoRA merged in */
        router(&b, x, T, D, L->E, 0, L->k, 0, 1, &ids, &gates);
        experts(&b, x, ids, gates, T, D, L->E, L->H, 2, 1, NONE);
        break;
    case DEEPSEEK: {
        /* shared experts as one dense MLP of width S*w; routed experts over columns S..E-1 */
        uint32_t sw = L->S * L->w;
        router(&b, x, T, D, L->E, L->S, L->k, 1, 0, &ids, &gates);
        uint32_t sh = linear(&b, "shared.fc1", x, T, D, sw, 2, NONE, VKG_ROLE_INTERMEDIATE);
        uint32_t so = linear(&b, "shared.fc2", sh, T, sw, D, 0, NONE, VKG_ROLE_INTERMEDIATE);
        experts(&b, x, ids, gates, T, D, L->E - L->S, L->w, 2, 0, so);
        break;
    }
    case DENSE_FFN: {
        uint32_t h = linear(&b, "fc1", x, T, D, L->H, 2, NONE, VKG_ROLE_INTERMEDIATE);
        linear(&b, "output", h, T, L->H, D, 0, NONE, VKG_ROLE_OUTPUT);
        break;
    }
    case MOE_FFN:
        router(&b, x, T, D, L->E, 0, L->k, 0, 1, &ids, &gates);
        experts(&b, x, ids, gates, T, D, L->E, L->H, 1, 1, NONE);
        break;
    }
    return load(ctx, &b, m);
}

typedef struct row {
    const char *name, *variant;
    layer L;
    vkg_model *m;
    vkg_session *s, *prof;
    double *t;
    double ms, route_share;
} row;

static vkg_status setup(vkg_context *ctx, row *r, int reps)
{
    VKG_TRY(build(ctx, &r->L, &r->m));
    VKG_TRY(vkg_session_create(r->m, NULL, &r->s));
    vkg_session_desc pd = {.profile = 1};
    VKG_TRY(vkg_session_create(r->m, &pd, &r->prof));
    size_t n = (size_t)r->L.T * r->L.D;
    float *x = malloc(n * 4);
    if (!x) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    for (size_t i = 0; i < n; i++) x[i] = (float)sin(0.37 * (double)i);
    vkg_status st = vkg_session_set_input(r->s, "x", x, n * 4);
    if (st == VKG_SUCCESS) st = vkg_session_set_input(r->prof, "x", x, n * 4);
    free(x);
    r->t = calloc((size_t)reps, sizeof *r->t);
    if (st == VKG_SUCCESS && !r->t) st = vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    if (st == VKG_SUCCESS) st = vkg_session_run(r->s); /* warm-up: pipelines, caches */
    return st;
}

static const char *kind_name(layer_kind k)
{
    switch (k) {
    case MOE_LORA_SHARED:
    case MOE_LORA_NAIVE: return "moe_lora_ffn";
    case DEEPSEEK: return "deepseek_ffn";
    case MOE_FFN: return "moe_ffn";
    default: return "dense_ffn";
    }
}

/* Routing + dispatch + combine: the router node's dispatches and every dispatch/combine kernel. */
static vkg_status route_share(row *r)
{
    VKG_TRY(vkg_session_run(r->prof));
    double route = 0, total = 0;
    for (uint32_t i = 0; i < vkg_session_dispatch_count(r->prof); i++) {
        const char *node, *op;
        double ns;
        VKG_TRY(vkg_session_profile(r->prof, i, &node, &op, &ns));
        const char *label = NULL;
        double ns2;
        VKG_TRY(vkg_cmd_dispatch_time_ns(r->prof->cmd, i, &ns2, &label));
        total += ns;
        if (getenv("VKG_BENCH_PROFILE"))
            fprintf(stderr, "    %-13s %-12s %3u %-16s %-14s %9.1f us\n", kind_name(r->L.kind), r->variant, i, node, label,
                    ns / 1e3);
        if (!strcmp(op, "moe_router") || !strncmp(label, "moe_hist", 8) || !strncmp(label, "moe_scan", 8) ||
            !strncmp(label, "moe_scatter", 11) || !strncmp(label, "moe_combine", 11))
            route += ns;
    }
    r->route_share = total > 0 ? route / total : 0;
    return VKG_SUCCESS;
}

static void teardown(row *r)
{
    vkg_session_destroy(r->s);
    vkg_session_destroy(r->prof);
    vkg_model_destroy(r->m);
    free(r->t);
}

/* Times rows [a, b) interleaved, then prints and stores them. */
static vkg_status run_group(vkg_context *ctx, row *rows, int n, int reps, FILE *out, FILE *json, bool *first)
{
    vkg_status st = VKG_SUCCESS;
    int ready = 0;
    for (; ready < n && st == VKG_SUCCESS; ready++) st = setup(ctx, &rows[ready], reps);
    for (int rep = 0; rep < reps && st == VKG_SUCCESS; rep++)
        for (int i = 0; i < n && st == VKG_SUCCESS; i++) {
            double t0 = vkg_bench_now_s();
            st = vkg_session_run(rows[i].s);
            rows[i].t[rep] = (vkg_bench_now_s() - t0) * 1e3;
        }
    for (int i = 0; i < n && st == VKG_SUCCESS; i++) {
        st = route_share(&rows[i]);
        rows[i].ms = vkg_bench_median(rows[i].t, reps);
    }
    for (int i = 0; i < n && st == VKG_SUCCESS; i++) {
        row *r = &rows[i];
        fprintf(out, "  %-13s %-12s tokens %5u  D %4u  E %3u  k %u  %9.3f ms  (routing+dispatch+combine %4.1f%%)",
                kind_name(r->L.kind), r->variant, r->L.T, r->L.D, r->L.E, r->L.k, r->ms, 100 * r->route_share);
        if (i > 0) fprintf(out, "  %.2fx of %s", r->ms / rows[0].ms, rows[0].variant);
        fprintf(out, "\n");
        if (json) {
            fprintf(json, "%s\n  {\"name\": \"%s\", \"variant\": \"%s\", \"tokens\": %u, \"d\": %u, \"experts\": %u, "
                    "\"k\": %u, \"ms\": %.4f, \"routing_share\": %.4f, \"reps\": %d}",
                    *first ? "" : ",", kind_name(r->L.kind), r->variant, r->L.T, r->L.D, r->L.E, r->L.k, r->ms,
                    r->route_share, reps);
            *first = false;
        }
    }
    for (int i = 0; i < ready; i++) teardown(&rows[i]);
    return st;
}

vkg_status vkg_bench_moe(vkg_context *ctx, int reps, bool quick, FILE *out, FILE *json, bool *first)
{
    fprintf(out, "MoE layers (sessions; medians of %d interleaved runs):\n", reps);
    uint32_t lora_tokens[2] = {257, 1370};
    for (int i = 0; i < (quick ? 1 : 2); i++) {
        layer base = {.T = lora_tokens[i], .D = 384, .H = 1536, .E = 8, .k = 2, .r = 8};
        row rows[3] = {{.variant = "naive", .L = base}, {.variant = "shared_base", .L = base},
                       {.variant = "dense", .L = base}};
        rows[0].L.kind = MOE_LORA_NAIVE;
        rows[1].L.kind = MOE_LORA_SHARED;
        rows[2].L.kind = DENSE_FFN;
        VKG_TRY(run_group(ctx, rows, 3, reps, out, json, first));
        fprintf(out, "  -> shared_base is %.2fx faster than naive\n", rows[0].ms / rows[1].ms);
    }
    if (!quick) {
        layer ds = {.kind = DEEPSEEK, .T = 257, .D = 1280, .E = 128, .k = 4, .S = 4, .w = 40};
        row rows[3] = {{.variant = "deepseek", .L = ds}, {.variant = "dense_active", .L = ds},
                       {.variant = "dense_full", .L = ds}};
        rows[1].L.kind = rows[2].L.kind = DENSE_FFN;
        rows[1].L.H = (ds.S + ds.k) * ds.w;
        rows[2].L.H = ds.E * ds.w;
        VKG_TRY(run_group(ctx, rows, 3, reps, out, json, first));
    }
    uint32_t dec_tokens[2] = {31, 248};
    for (int i = 0; i < 2; i++) {
        layer mf = {.kind = MOE_FFN, .T = dec_tokens[i], .D = 256, .H = 1024, .E = 4, .k = 2};
        row rows[2] = {{.variant = "moe", .L = mf}, {.variant = "dense", .L = mf}};
        rows[1].L.kind = DENSE_FFN;
        VKG_TRY(run_group(ctx, rows, 2, reps, out, json, first));
    }
    return VKG_SUCCESS;
}
