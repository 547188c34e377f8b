/* The MoE ops through graphs built with the C writer and run in sessions, checked against the CPU
 * references in ref_moe.c: routing with its statistics, token dispatch to experts (skewed, empty
 * experts, dropped ids, many blocks), the fused expert MLP against the grouped matmuls, the MoE-LoRA
 * mixing step, the router recording its experts' dispatch plan (route_plan). Every case runs twice
 * and must be bit-identical; also linear with LoRA adapters as a graph op.
 * `test_moe router|experts|mlp|lora_mix|large|lora_linear|route_plan [--inject-fault]`;
 * VKG_MATMUL_VARIANT picks the grouped matmul's variant. Shaders covered: moe_route (select, stats,
 * route1, route_plan1), moe_dispatch (hist, scan, scatter, plan1, combine), moe_matmul (tiled, texel,
 * texel_k1, skinny), moe_mlp, moe_lora. */
#include <float.h>

#include "harness.h"
#include "ref.h"
#include "ref_moe.h"
#include "runtime/kernels/moe.h"

typedef struct gb {
    vkg_writer *w;
} gb;

static uint32_t tensor(gb *b, const char *name, vkg_dtype dt, vkg_tensor_role role, uint32_t rank, const int64_t *dims,
                       const void *data)
{
    vkg_writer_tensor t = {.name = name, .dtype = dt, .role = role, .rank = rank, .data = data};
    uint64_t n = 1;
    for (uint32_t i = 0; i < rank; i++) n *= (uint64_t)(t.dims[i] = dims[i]);
    if (data) t.data_size = n * (dt == VKG_DTYPE_F16 ? 2 : 4);
    uint32_t id = 0;
    if (vkg_writer_add_tensor(b->w, &t, &id) != VKG_SUCCESS) {
        fprintf(stderr, "FAIL: add tensor %s: %s\n", name, vkg_last_error());
        exit(1);
    }
    if (role == VKG_ROLE_INPUT) vkg_writer_add_input(b->w, id);
    if (role == VKG_ROLE_OUTPUT) vkg_writer_add_output(b->w, id);
    return id;
}

/* A weight constant: fp32, or fp16 (then `f` is rounded in place so references see what the device does). */
static uint32_t weight(gb *b, const char *name, int f16, uint32_t rank, const int64_t *dims, float *f)
{
    uint64_t n = 1;
    for (uint32_t i = 0; i < rank; i++) n *= (uint64_t)dims[i];
    if (!f16) return tensor(b, name, VKG_DTYPE_F32, VKG_ROLE_CONSTANT, rank, dims, f);
    uint16_t *h = malloc(n * 2 + 2);
    for (uint64_t i = 0; i < n; i++) {
        h[i] = ref_f32_to_f16(f[i]);
        f[i] = ref_f16_to_f32(h[i]);
    }
    uint32_t id = tensor(b, name, VKG_DTYPE_F16, VKG_ROLE_CONSTANT, rank, dims, h);
    free(h);
    return id;
}

static vkg_model *finish(vkg_context *ctx, gb *b)
{
    void *data = NULL;
    size_t size = 0;
    vkg_model *m = NULL;
    if (vkg_writer_to_memory(b->w, &data, &size) != VKG_SUCCESS || vkg_model_load_memory(ctx, data, size, &m) != VKG_SUCCESS)
        fprintf(stderr, "FAIL: build graph: %s\n", vkg_last_error());
    free(data);
    vkg_writer_destroy(b->w);
    return m;
}

/* Runs the session twice; the second run's outputs must equal the first's bit for bit. */
static int run_twice(vkg_session *s, const char **names, void **outs, const size_t *bytes, int n)
{
    OK(vkg_session_run(s));
    for (int i = 0; i < n; i++) OK(vkg_session_get_output(s, names[i], outs[i], bytes[i]));
    OK(vkg_session_run(s));
    for (int i = 0; i < n; i++) {
        void *again = malloc(bytes[i] + 1);
        OK(vkg_session_get_output(s, names[i], again, bytes[i]));
        CHECK(memcmp(again, outs[i], bytes[i]) == 0, "%s differs between two runs", names[i]);
        free(again);
    }
    return 0;
}

/* ---- router ---- */

typedef struct router_case {
    uint32_t T, D, C, first, k;
    int sigmoid, scores, renorm, bias, f16, ties;
    double scale, temp;
} router_case;

static int run_router(vkg_context *ctx, const router_case *rc, uint32_t seed)
{
    uint32_t T = rc->T, D = rc->D, C = rc->C, k = rc->k, E = C - rc->first;
    float *x = malloc((T * D + 1) * 4), *w = malloc(C * D * 4), *bias = malloc(C * 4);
    h_fill(x, T * D, seed, -1, 1);
    h_fill(w, C * D, seed + 1, -1, 1);
    h_fill(bias, C, seed + 2, -0.5f, 0.5f);
    if (rc->ties) {
        memset(w, 0, C * D * 4);
        memset(bias, 0, C * 4);
    }
    gb b;
    vkg_writer_create(&b.w);
    int64_t xd[2] = {T, D}, wd[2] = {C, D}, bd[1] = {C}, kd[2] = {T, k}, ed[1] = {E}, cd[1] = {C}, one[1] = {1};
    uint32_t in[3] = {tensor(&b, "x", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, xd, NULL), weight(&b, "w", rc->f16, 2, wd, w),
                      rc->bias ? tensor(&b, "b", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 1, bd, bias) : 0};
    uint32_t out[7] = {tensor(&b, "ids", VKG_DTYPE_I32, VKG_ROLE_OUTPUT, 2, kd, NULL),
                       tensor(&b, "gates", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, kd, NULL),
                       tensor(&b, "counts", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 1, ed, NULL),
                       tensor(&b, "fraction", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 1, ed, NULL),
                       tensor(&b, "mean_score", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 1, cd, NULL),
                       tensor(&b, "load_balance", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 1, one, NULL),
                       tensor(&b, "z_loss", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 1, one, NULL)};
    vkg_writer_attr at[7] = {{.name = "k", .type = VKG_ATTR_INT, .i = k},
                             {.name = "first", .type = VKG_ATTR_INT, .i = rc->first},
                             {.name = "score", .type = VKG_ATTR_STRING, .s = rc->sigmoid ? "sigmoid" : "softmax"},
                             {.name = "gates", .type = VKG_ATTR_STRING, .s = rc->scores ? "score" : "softmax_topk"},
                             {.name = "renorm", .type = VKG_ATTR_INT, .i = rc->renorm},
                             {.name = "scale", .type = VKG_ATTR_FLOAT, .f = rc->scale},
                             {.name = "temperature", .type = VKG_ATTR_FLOAT, .f = rc->temp}};
    if (vkg_writer_add_node(b.w, "moe_router", "router", in, rc->bias ? 3 : 2, out, 7, at, 7) != VKG_SUCCESS) return 1;
    vkg_model *m = finish(ctx, &b);
    if (!m) return 1;
    vkg_session *s;
    OK(vkg_session_create(m, NULL, &s));
    OK(vkg_session_set_input(s, "x", x, (size_t)T * D * 4));
    int32_t *ids = malloc((T * k + 1) * 4), *rids = malloc((T * k + 1) * 4);
    float *g = malloc((T * k + 1) * 4), *rg = malloc((T * k + 1) * 4), st[4 * 1024 + 4], rst[4 * 1024 + 4];
    double *gap = malloc((T + 1) * sizeof *gap);
    const char *names[7] = {"ids", "gates", "counts", "fraction", "mean_score", "load_balance", "z_loss"};
    void *outs[7] = {ids, g, st, st + E, st + 2 * E, st + 2 * E + C, st + 2 * E + C + 1};
    size_t bytes[7] = {(size_t)T * k * 4, (size_t)T * k * 4, E * 4, E * 4, C * 4, 4, 4};
    if (run_twice(s, names, outs, bytes, 7)) return 1;
    ref_moe_router(x, w, rc->bias ? bias : NULL, T, D, C, rc->first, k, rc->sigmoid, rc->scores, rc->renorm, rc->scale,
                   rc->temp, rids, rg, rst, rst + E, rst + 2 * E, rst + 2 * E + C, rst + 2 * E + C + 1, gap);
    char what[160];
    snprintf(what, sizeof what, "router T=%u D=%u C=%u first=%u k=%u%s%s%s%s", T, D, C, rc->first, k,
             rc->sigmoid ? " sigmoid" : "", rc->scores ? " scores" : "", rc->renorm ? " renorm" : "", rc->f16 ? " f16" : "");
    /* ids must match exactly, except where the reference itself sees a near tie (none expected with
     * these seeds: the count is printed, and a tie-free input must have zero). */
    uint32_t near = 0, wrong = 0, wrong_far = 0;
    for (uint32_t t = 0; t < T; t++) {
        int same = !memcmp(ids + t * k, rids + t * k, k * 4);
        if (gap[t] < 1e-5 && !rc->ties) near++;
        if (!same) {
            wrong++;
            if (gap[t] >= 1e-5 || rc->ties) wrong_far++;
        }
    }
    CHECK(wrong_far == 0, "%s: %u of %u tokens route differently (%u near ties)", what, wrong_far, T, near);
    h_maybe_fault(g, T * k);
    h_maybe_fault(st, 2 * E + C + 2);
    int bad = wrong ? 0 : h_compare(what, g, rg, NULL, T * k, 1e-6, 1e-5);
    bad |= h_compare("statistics", st, rst, NULL, 2 * E + C + 2, 1e-6, 1e-5);
    CHECK(!bad, "%s", what);
    vkg_session_destroy(s);
    vkg_model_destroy(m);
    free(x), free(w), free(bias), free(ids), free(rids), free(g), free(rg), free(gap);
    return 0;
}

static int test_router(vkg_context *ctx)
{
    static const router_case cases[] = {
        {.T = 7, .D = 13, .C = 4, .k = 2, .bias = 1, .scale = 1, .temp = 1},
        {.T = 257, .D = 64, .C = 8, .k = 2, .bias = 1, .scale = 1, .temp = 1},
        {.T = 31, .D = 24, .C = 4, .k = 2, .bias = 1, .scale = 1, .temp = 0.7},
        {.T = 1, .D = 5, .C = 4, .k = 1, .bias = 1, .scale = 1, .temp = 1},
        {.T = 9, .D = 16, .C = 6, .k = 6, .bias = 1, .scale = 1, .temp = 1},
        {.T = 65, .D = 40, .C = 132, .first = 4, .k = 4, .scores = 1, .scale = 1, .temp = 1},
        {.T = 65, .D = 40, .C = 128, .first = 4, .k = 4, .scores = 1, .renorm = 1, .scale = 2.5, .temp = 1, .f16 = 1},
        {.T = 33, .D = 12, .C = 16, .k = 3, .sigmoid = 1, .scores = 1, .renorm = 1, .scale = 1.5, .temp = 1},
        {.T = 5, .D = 8, .C = 8, .k = 3, .ties = 1, .scale = 1, .temp = 1},
        {.T = 5, .D = 8, .C = 12, .first = 2, .k = 4, .ties = 1, .scores = 1, .scale = 1, .temp = 1},
        {.T = 0, .D = 8, .C = 4, .k = 2, .bias = 1, .scale = 1, .temp = 1},
        /* Up to 1024 tokens select and reduce in one workgroup (moe_route1); past it, two kernels. */
        {.T = 1024, .D = 8, .C = 5, .k = 2, .bias = 1, .scale = 1, .temp = 1.3},
        {.T = 1025, .D = 8, .C = 5, .k = 2, .sigmoid = 1, .scores = 1, .renorm = 1, .scale = 1, .temp = 1},
        {.T = 3000, .D = 16, .C = 4, .k = 2, .bias = 1, .scale = 1, .temp = 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (run_router(ctx, &cases[i], 100 + 7 * (uint32_t)i)) return 1;
    return 0;
}

/* ---- experts ---- */

typedef struct experts_case {
    uint32_t T, D, E, h, k;
    int act, b1, b2, res, f16;
    int skew;   /* 1: every token to expert 0 (k = 1) or experts 0..k-1; 2: some ids out of range */
} experts_case;

static void make_routing(uint32_t T, uint32_t k, uint32_t E, int skew, uint32_t seed, int32_t *ids, float *g)
{
    float *r = malloc((T * k + 1) * 4);
    h_fill(r, T * k, seed, 0, 1);
    for (uint32_t t = 0; t < T; t++) {
        /* k distinct experts per token, from a token-dependent start and stride */
        uint32_t start = (uint32_t)(r[t * k] * E) % E, used = 0;
        for (uint32_t j = 0; j < k; j++) {
            uint32_t e = (start + j * 3 + used) % E;
            for (uint32_t q = 0; q < j; q++)
                if ((uint32_t)ids[t * k + q] == e) {
                    e = (e + 1) % E;
                    q = (uint32_t)-1;
                }
            ids[t * k + j] = skew == 1 ? (int32_t)j : (int32_t)e;
            g[t * k + j] = 0.1f + r[t * k + j];
        }
        if (skew == 2 && t % 3 == 1) ids[t * k] = (t % 2) ? -1 : (int32_t)E; /* dropped */
    }
    free(r);
}

/* What the last run_experts recorded, and its output when keep_y is set (comparing the two paths). */
static uint32_t last_dispatches;
static float *keep_y;

static int run_experts(vkg_context *ctx, const experts_case *ec, uint32_t seed)
{
    uint32_t T = ec->T, D = ec->D, E = ec->E, h = ec->h, k = ec->k;
    size_t nx = (size_t)T * D, nw = (size_t)E * h * D;
    float *x = malloc((nx + 1) * 4), *res = malloc((nx + 1) * 4), *w1 = malloc(nw * 4), *w2 = malloc(nw * 4),
          *w3 = malloc(nw * 4), *b1 = malloc((size_t)E * h * 4), *b2 = malloc((size_t)E * D * 4);
    float *g = malloc((T * k + 1) * 4), *y = malloc((nx + 1) * 4), *ry = malloc((nx + 1) * 4);
    int32_t *ids = malloc((T * k + 1) * 4);
    h_fill(x, nx, seed, -1, 1);
    h_fill(res, nx, seed + 1, -1, 1);
    h_fill(w1, nw, seed + 2, -0.5f, 0.5f);
    h_fill(w2, nw, seed + 3, -0.5f, 0.5f);
    h_fill(w3, nw, seed + 4, -0.5f, 0.5f);
    h_fill(b1, (size_t)E * h, seed + 5, -0.3f, 0.3f);
    h_fill(b2, (size_t)E * D, seed + 6, -0.3f, 0.3f);
    make_routing(T, k, E, ec->skew, seed + 7, ids, g);
    gb b;
    vkg_writer_create(&b.w);
    int64_t xd[2] = {T, D}, kd[2] = {T, k}, w1d[3] = {E, h, D}, w2d[3] = {E, D, h}, b1d[2] = {E, h}, b2d[2] = {E, D};
    uint32_t none = 0xFFFFFFFFu;
    uint32_t in[9] = {tensor(&b, "x", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, xd, NULL),
                      tensor(&b, "ids", VKG_DTYPE_I32, VKG_ROLE_INPUT, 2, kd, NULL),
                      tensor(&b, "gates", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, kd, NULL),
                      weight(&b, "w1", ec->f16, 3, w1d, w1),
                      ec->b1 ? tensor(&b, "b1", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 2, b1d, b1) : none,
                      weight(&b, "w2", ec->f16, 3, w2d, w2),
                      ec->b2 ? tensor(&b, "b2", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 2, b2d, b2) : none,
                      ec->act == 3 ? weight(&b, "w3", ec->f16, 3, w1d, w3) : none,
                      ec->res ? tensor(&b, "res", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, xd, NULL) : none};
    uint32_t nin = ec->res ? 9 : ec->act == 3 ? 8 : ec->b2 ? 7 : 6;
    uint32_t out = tensor(&b, "y", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, xd, NULL);
    vkg_writer_attr at = {.name = "activation", .type = VKG_ATTR_INT, .i = ec->act};
    if (vkg_writer_add_node(b.w, "moe_experts", "experts", in, nin, &out, 1, &at, 1) != VKG_SUCCESS) return 1;
    vkg_model *m = finish(ctx, &b);
    if (!m) return 1;
    vkg_session *s;
    OK(vkg_session_create(m, NULL, &s));
    OK(vkg_session_set_input(s, "x", x, nx * 4));
    OK(vkg_session_set_input(s, "ids", ids, (size_t)T * k * 4));
    OK(vkg_session_set_input(s, "gates", g, (size_t)T * k * 4));
    if (ec->res) OK(vkg_session_set_input(s, "res", res, nx * 4));
    const char *names[1] = {"y"};
    void *outs[1] = {y};
    size_t bytes[1] = {nx * 4};
    if (run_twice(s, names, outs, bytes, 1)) return 1;
    last_dispatches = vkg_session_dispatch_count(s);
    if (keep_y) memcpy(keep_y, y, nx * 4);
    ref_moe_experts(x, ids, g, w1, ec->b1 ? b1 : NULL, w2, ec->b2 ? b2 : NULL, ec->act == 3 ? w3 : NULL,
                    ec->res ? res : NULL, ry, T, D, k, E, h, ec->act);
    char what[160];
    snprintf(what, sizeof what, "experts T=%u D=%u E=%u h=%u k=%u act=%d%s%s%s%s skew=%d", T, D, E, h, k, ec->act,
             ec->b1 ? " b1" : "", ec->b2 ? " b2" : "", ec->res ? " res" : "", ec->f16 ? " f16" : "", ec->skew);
    h_maybe_fault(y, nx);
    /* fp32 sums over D then h terms of size ~0.25: errors scale with sqrt of the lengths */
    CHECK(!h_compare(what, y, ry, NULL, nx, 2e-5 * (1 + sqrt((double)D * h) / 8), 1e-5), "%s", what);
    vkg_session_destroy(s);
    vkg_model_destroy(m);
    free(x), free(res), free(w1), free(w2), free(w3), free(b1), free(b2), free(g), free(y), free(ry), free(ids);
    return 0;
}

static int test_experts(vkg_context *ctx)
{
    static const experts_case cases[] = {
        {.T = 7, .D = 13, .E = 4, .h = 37, .k = 2, .act = 1, .b1 = 1, .b2 = 1},
        {.T = 1, .D = 8, .E = 4, .h = 16, .k = 1, .act = 2, .b1 = 1, .b2 = 1},
        {.T = 31, .D = 64, .E = 4, .h = 96, .k = 2, .act = 2, .b1 = 1, .b2 = 1, .res = 1},
        {.T = 40, .D = 32, .E = 16, .h = 8, .k = 4, .act = 2, .b1 = 1},
        {.T = 33, .D = 20, .E = 5, .h = 24, .k = 5, .act = 1, .b1 = 1, .b2 = 1},
        {.T = 50, .D = 16, .E = 8, .h = 12, .k = 2, .act = 3, .res = 1},
        {.T = 50, .D = 16, .E = 8, .h = 12, .k = 2, .act = 3, .b1 = 1, .f16 = 1},
        {.T = 45, .D = 24, .E = 6, .h = 20, .k = 1, .act = 2, .b1 = 1, .b2 = 1, .skew = 1},
        {.T = 45, .D = 24, .E = 6, .h = 20, .k = 3, .act = 1, .b1 = 1, .b2 = 1, .skew = 1},
        {.T = 60, .D = 12, .E = 4, .h = 9, .k = 2, .act = 2, .b1 = 1, .b2 = 1, .skew = 2, .res = 1},
        {.T = 300, .D = 20, .E = 3, .h = 28, .k = 2, .act = 2, .b1 = 1, .b2 = 1, .f16 = 1},
        /* Past the one-workgroup plan (moe_plan1: 1024 pairs, 256 experts): the multi-block
         * histogram, scan and scatter, with dropped ids, and many experts over few pairs. */
        {.T = 701, .D = 12, .E = 5, .h = 10, .k = 2, .act = 1, .b1 = 1, .b2 = 1, .skew = 2},
        {.T = 20, .D = 8, .E = 300, .h = 4, .k = 3, .act = 2, .b1 = 1, .b2 = 1},
        {.T = 1, .D = 5, .E = 1, .h = 3, .k = 1, .act = 1, .b1 = 1, .b2 = 1},
        {.T = 0, .D = 8, .E = 4, .h = 8, .k = 2, .act = 2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (run_experts(ctx, &cases[i], 300 + 11 * (uint32_t)i)) return 1;
    return 0;
}

/* The fused expert MLP (moe_mlp.comp, VKG_MOE_FUSED_MLP=1) against the reference and against the two
 * grouped matmuls (the default) on the same device: ragged tiles, one token, empty and overfull experts,
 * dropped ids, F over several chunks and not a multiple of one, fp16 weights, the widest D (256). The
 * dispatch count shows which path ran: moe_plan1, then moe_mlp or the two matmuls, then the
 * combine. Widths the kernel does not take (D or F not multiples of 4, D > 256, swiglu) must take
 * the grouped path. */
static int test_mlp(vkg_context *ctx)
{
    static const experts_case cases[] = {
        {.T = 31, .D = 64, .E = 4, .h = 96, .k = 2, .act = 2, .b1 = 1, .b2 = 1, .res = 1},
        {.T = 1, .D = 8, .E = 4, .h = 16, .k = 1, .act = 1, .b1 = 1, .b2 = 1},
        {.T = 17, .D = 4, .E = 3, .h = 4, .k = 1, .act = 1},
        {.T = 23, .D = 36, .E = 5, .h = 300, .k = 2, .act = 2, .b1 = 1, .b2 = 1, .res = 1},
        {.T = 9, .D = 256, .E = 4, .h = 1024, .k = 2, .act = 1, .b1 = 1, .b2 = 1, .res = 1},
        {.T = 5, .D = 256, .E = 2, .h = 68, .k = 2, .act = 2, .b1 = 1, .b2 = 1, .f16 = 1},
        {.T = 45, .D = 24, .E = 6, .h = 20, .k = 3, .act = 1, .b1 = 1, .b2 = 1, .skew = 1},
        {.T = 60, .D = 12, .E = 4, .h = 8, .k = 2, .act = 2, .b2 = 1, .skew = 2, .res = 1},
        {.T = 40, .D = 32, .E = 16, .h = 8, .k = 4, .act = 2, .b1 = 1},
        {.T = 0, .D = 8, .E = 4, .h = 8, .k = 2, .act = 2},
        /* the grouped path */
        {.T = 7, .D = 13, .E = 4, .h = 37, .k = 2, .act = 1, .b1 = 1, .b2 = 1},
        {.T = 11, .D = 16, .E = 3, .h = 18, .k = 2, .act = 2, .b1 = 1, .b2 = 1},
        {.T = 3, .D = 260, .E = 2, .h = 8, .k = 1, .act = 1, .b1 = 1, .b2 = 1},
        {.T = 50, .D = 16, .E = 8, .h = 12, .k = 2, .act = 3, .res = 1},
    };
    uint32_t n_fused = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const experts_case *c = &cases[i];
        bool fused = vkg_moe_mlp_shapes(ctx, VKG_MM_AUTO, c->D, c->h, (vkg_act)c->act);
        n_fused += fused;
        size_t nx = (size_t)c->T * c->D;
        float *a = malloc(nx * 4 + 4), *b = malloc(nx * 4 + 4);
        uint32_t seed = 700 + 13 * (uint32_t)i;
        keep_y = a;
        setenv("VKG_MOE_FUSED_MLP", "1", 1);
        int r = run_experts(ctx, c, seed);
        uint32_t d_fused = last_dispatches;
        setenv("VKG_MOE_FUSED_MLP", "0", 1);
        keep_y = b;
        r = r || run_experts(ctx, c, seed);
        unsetenv("VKG_MOE_FUSED_MLP");
        keep_y = NULL;
        uint32_t d_grouped = last_dispatches;
        if (r) return 1;
        /* T = 0 records nothing on either path */
        uint32_t want = c->T == 0 ? 0 : fused ? 3 : c->act == 3 ? 5 : 4;
        CHECK(d_fused == want, "mlp case %zu (D=%u F=%u act=%d): %u dispatches, expected %u (%s)", i, c->D, c->h,
              c->act, d_fused, want, fused ? "fused" : "grouped");
        CHECK(d_grouped == (c->T == 0 ? 0 : c->act == 3 ? 5u : 4u), "mlp case %zu: VKG_MOE_FUSED_MLP=0 recorded %u dispatches",
              i, d_grouped);
        /* Both paths add in the same order (one fma per element of K, ascending): equal bit for bit. */
        CHECK(memcmp(a, b, nx * 4) == 0, "mlp case %zu: the fused and grouped paths differ", i);
        free(a), free(b);
    }
    /* Where the texel matmul runs (lavapipe), the first ten cases are the fused kernel's. */
    bool texel = vkg_matmul_default_variant(ctx) == VKG_MM_TEXEL && vkg_matmul_texel_supported(ctx);
    CHECK(n_fused == (texel ? 10u : 0u), "mlp: %u cases took the fused kernel, expected %u", n_fused, texel ? 10u : 0u);
    return 0;
}

/* 100,000 tokens through a small expert layer: 782 dispatch blocks, 12,500 row tiles. */
static int test_large(vkg_context *ctx)
{
    experts_case c = {.T = 100000, .D = 8, .E = 4, .h = 8, .k = 2, .act = 1, .b1 = 1, .b2 = 1};
    return run_experts(ctx, &c, 999);
}

/* ---- lora_mix ---- */

typedef struct mix_case {
    uint32_t T, H, E, r, D, k;
    int act, bias, scale, res, f16, skew;
} mix_case;

static int run_mix(vkg_context *ctx, const mix_case *mc, uint32_t seed)
{
    uint32_t T = mc->T, H = mc->H, E = mc->E, r = mc->r, D = mc->D, k = mc->k;
    size_t nu = (size_t)T * H, na = (size_t)T * E * r, nc = (size_t)T * D;
    float *u = malloc((nu + 1) * 4), *a1 = malloc((na + 1) * 4), *b1 = malloc((size_t)E * H * r * 4),
          *a2 = malloc((size_t)E * r * H * 4), *b2 = malloc((size_t)E * D * r * 4), *bias = malloc(D * 4),
          *sc = malloc(D * 4), *res = malloc((nc + 1) * 4), *g = malloc((T * k + 1) * 4);
    float *hb = malloc((nu + 1) * 4), *c = malloc((nc + 1) * 4), *rhb = malloc((nu + 1) * 4), *rc = malloc((nc + 1) * 4);
    int32_t *ids = malloc((T * k + 1) * 4);
    h_fill(u, nu, seed, -2, 2);
    h_fill(a1, na, seed + 1, -1, 1);
    h_fill(b1, (size_t)E * H * r, seed + 2, -0.5f, 0.5f);
    h_fill(a2, (size_t)E * r * H, seed + 3, -0.2f, 0.2f);
    h_fill(b2, (size_t)E * D * r, seed + 4, -0.5f, 0.5f);
    h_fill(bias, D, seed + 5, -0.5f, 0.5f);
    h_fill(sc, D, seed + 6, 0.5f, 1.5f);
    h_fill(res, nc, seed + 7, -1, 1);
    make_routing(T, k, E, mc->skew, seed + 8, ids, g);
    gb b;
    vkg_writer_create(&b.w);
    int64_t ud[2] = {T, H}, ad[2] = {T, E * r}, kd[2] = {T, k}, b1d[3] = {E, H, r}, a2d[3] = {E, r, H},
            b2d[3] = {E, D, r}, dd[1] = {D}, cd[2] = {T, D};
    uint32_t none = 0xFFFFFFFFu;
    uint32_t in[10] = {tensor(&b, "u", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, ud, NULL),
                       tensor(&b, "a1", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, ad, NULL),
                       tensor(&b, "ids", VKG_DTYPE_I32, VKG_ROLE_INPUT, 2, kd, NULL),
                       tensor(&b, "gates", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, kd, NULL),
                       weight(&b, "b1", mc->f16, 3, b1d, b1),
                       weight(&b, "a2", mc->f16, 3, a2d, a2),
                       weight(&b, "b2", mc->f16, 3, b2d, b2),
                       mc->bias ? tensor(&b, "bias", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 1, dd, bias) : none,
                       mc->scale ? tensor(&b, "scale", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 1, dd, sc) : none,
                       mc->res ? tensor(&b, "res", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, cd, NULL) : none};
    uint32_t nin = mc->res ? 10 : mc->scale ? 9 : mc->bias ? 8 : 7;
    uint32_t out[2] = {tensor(&b, "hbar", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, ud, NULL),
                       tensor(&b, "c", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, cd, NULL)};
    double s = 0.75;
    vkg_writer_attr at[2] = {{.name = "lora_scale", .type = VKG_ATTR_FLOAT, .f = s},
                             {.name = "activation", .type = VKG_ATTR_INT, .i = mc->act}};
    if (vkg_writer_add_node(b.w, "moe_lora_mix", "mix", in, nin, out, 2, at, 2) != VKG_SUCCESS) return 1;
    vkg_model *m = finish(ctx, &b);
    if (!m) return 1;
    vkg_session *ss;
    OK(vkg_session_create(m, NULL, &ss));
    OK(vkg_session_set_input(ss, "u", u, nu * 4));
    OK(vkg_session_set_input(ss, "a1", a1, na * 4));
    OK(vkg_session_set_input(ss, "ids", ids, (size_t)T * k * 4));
    OK(vkg_session_set_input(ss, "gates", g, (size_t)T * k * 4));
    if (mc->res) OK(vkg_session_set_input(ss, "res", res, nc * 4));
    const char *names[2] = {"hbar", "c"};
    void *outs[2] = {hb, c};
    size_t bytes[2] = {nu * 4, nc * 4};
    if (run_twice(ss, names, outs, bytes, 2)) return 1;
    ref_moe_lora_mix(u, a1, ids, g, b1, a2, b2, mc->bias ? bias : NULL, mc->scale ? sc : NULL, mc->res ? res : NULL, rhb,
                     rc, T, H, E, r, D, k, s, mc->act);
    char what[160];
    snprintf(what, sizeof what, "lora_mix T=%u H=%u E=%u r=%u D=%u k=%u act=%d%s%s%s%s skew=%d", T, H, E, r, D, k,
             mc->act, mc->bias ? " bias" : "", mc->scale ? " scale" : "", mc->res ? " res" : "", mc->f16 ? " f16" : "",
             mc->skew);
    h_maybe_fault(c, nc);
    h_maybe_fault(hb, nu);
    int bad = h_compare("hbar", hb, rhb, NULL, nu, 2e-5, 1e-5);
    bad |= h_compare(what, c, rc, NULL, nc, 2e-5 * (1 + sqrt((double)H * r) / 16), 1e-5);
    CHECK(!bad, "%s", what);
    vkg_session_destroy(ss);
    vkg_model_destroy(m);
    free(u), free(a1), free(b1), free(a2), free(b2), free(bias), free(sc), free(res), free(g);
    free(hb), free(c), free(rhb), free(rc), free(ids);
    return 0;
}

static int test_lora_mix(vkg_context *ctx)
{
    static const mix_case cases[] = {
        {.T = 7, .H = 37, .E = 4, .r = 3, .D = 13, .k = 2, .act = 2, .bias = 1},
        {.T = 33, .H = 96, .E = 8, .r = 8, .D = 24, .k = 2, .act = 2, .bias = 1, .scale = 1, .res = 1},
        {.T = 1, .H = 16, .E = 8, .r = 8, .D = 8, .k = 2, .act = 2, .bias = 1},
        {.T = 20, .H = 64, .E = 4, .r = 64, .D = 32, .k = 1, .act = 1, .bias = 1},
        {.T = 25, .H = 48, .E = 3, .r = 4, .D = 16, .k = 3, .act = 2, .bias = 1, .scale = 1, .f16 = 1},
        {.T = 40, .H = 40, .E = 8, .r = 8, .D = 20, .k = 2, .act = 2, .bias = 1, .res = 1, .skew = 1},
        {.T = 30, .H = 24, .E = 4, .r = 1, .D = 10, .k = 2, .act = 2, .skew = 2},
        /* widths that are multiples of 4 take the fused per-token kernel on lavapipe, others the grouped path */
        {.T = 30, .H = 32, .E = 4, .r = 4, .D = 12, .k = 2, .act = 2, .bias = 1, .res = 1, .skew = 2},
        {.T = 257, .H = 192, .E = 8, .r = 8, .D = 48, .k = 2, .act = 2, .bias = 1, .scale = 1, .res = 1},
        /* D not a multiple of 4: the grouped path, whose rank-8 down-projection over H = 96 takes
         * moe_matmul.comp's K-split (skinny) kernel on lavapipe */
        {.T = 40, .H = 96, .E = 4, .r = 8, .D = 13, .k = 2, .act = 2, .bias = 1, .res = 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (run_mix(ctx, &cases[i], 500 + 13 * (uint32_t)i)) return 1;
    return 0;
}

/* ---- linear with LoRA adapters, through the graph op (the kernel has its own tests in test_ops) ---- */

static int test_lora_linear(vkg_context *ctx)
{
    enum { M = 37, K = 48, N = 40, R = 11 };
    static float x[M * K], w[N * K], bias[N], la[R * K], lb[N * R], res[M * N], y[M * N], want[M * N];
    const uint32_t ranks[3] = {3, 7, 1};
    const float scales[3] = {0.5f, 2.0f, -1.25f};
    h_fill(x, M * K, 41, -1, 1);
    h_fill(w, N * K, 42, -0.3f, 0.3f);
    h_fill(bias, N, 43, -0.2f, 0.2f);
    h_fill(la, R * K, 44, -0.3f, 0.3f);
    h_fill(lb, N * R, 45, -0.3f, 0.3f);
    h_fill(res, M * N, 46, -1, 1);
    for (int f16 = 0; f16 < 2; f16++) {
        gb b;
        vkg_writer_create(&b.w);
        int64_t xd[2] = {M, K}, wd[2] = {N, K}, bd[1] = {N}, lad[2] = {R, K}, lbd[2] = {N, R}, yd[2] = {M, N};
        uint32_t in[7] = {tensor(&b, "x", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, xd, NULL), weight(&b, "w", f16, 2, wd, w),
                          tensor(&b, "b", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 1, bd, bias), 0xFFFFFFFFu,
                          tensor(&b, "res", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, yd, NULL), weight(&b, "la", f16, 2, lad, la),
                          weight(&b, "lb", f16, 2, lbd, lb)};
        uint32_t out = tensor(&b, "y", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, yd, NULL);
        double sc[3] = {scales[0], scales[1], scales[2]};
        int64_t rk[3] = {ranks[0], ranks[1], ranks[2]};
        vkg_writer_attr at[3] = {{.name = "activation", .type = VKG_ATTR_INT, .i = 2},
                                 {.name = "lora_scale", .type = VKG_ATTR_FLOATS, .count = 3, .floats = sc},
                                 {.name = "lora_ranks", .type = VKG_ATTR_INTS, .count = 3, .ints = rk}};
        if (vkg_writer_add_node(b.w, "linear", "fc", in, 7, &out, 1, at, 3) != VKG_SUCCESS) return 1;
        vkg_model *m = finish(ctx, &b);
        if (!m) return 1;
        vkg_session *s;
        OK(vkg_session_create(m, NULL, &s));
        OK(vkg_session_set_input(s, "x", x, sizeof x));
        OK(vkg_session_set_input(s, "res", res, sizeof res));
        const char *names[1] = {"y"};
        void *outs[1] = {y};
        size_t bytes[1] = {sizeof y};
        if (run_twice(s, names, outs, bytes, 1)) return 1;
        ref_linear_lora(x, w, bias, la, lb, 3, ranks, scales, want, NULL, NULL, NULL, M, N, K, R, 2);
        for (int i = 0; i < M * N; i++) want[i] += res[i];
        h_maybe_fault(y, M * N);
        CHECK(!h_compare(f16 ? "linear + 3 LoRA adapters, f16" : "linear + 3 LoRA adapters", y, want, NULL, M * N, 2e-5,
                         1e-5), "lora linear");
        vkg_session_destroy(s);
        vkg_model_destroy(m);
    }
    return 0;
}

/* ---- malformed graphs: each refused at load time with a message naming the node and the fault ---- */

typedef struct bad_case {
    const char *what, *msg;
    int kind; /* 0 router, 1 experts, 2 lora_mix, 3 linear LoRA */
    int k, first, act, drop_w3, ids_f32, a1_cols, ranks_sum, nscales, router_cols, f16_x;
} bad_case;

static int try_bad(vkg_context *ctx, const bad_case *c)
{
    static float wbuf[64 * 64 * 16];
    gb b;
    vkg_writer_create(&b.w);
    uint32_t none = 0xFFFFFFFFu, T = 5, D = 8, E = 4, h = 6, r = 4;
    int64_t xd[2] = {T, D}, kd[2] = {T, 2};
    uint32_t x = tensor(&b, "x", c->f16_x ? VKG_DTYPE_F16 : VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, xd, NULL);
    if (c->kind == 0) {
        int64_t wd[2] = {c->router_cols ? (int64_t)c->router_cols : (int64_t)E, D}, od[2] = {T, c->k};
        uint32_t in[2] = {x, tensor(&b, "w", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 2, wd, wbuf)};
        uint32_t out[2] = {tensor(&b, "ids", VKG_DTYPE_I32, VKG_ROLE_OUTPUT, 2, od, NULL),
                           tensor(&b, "g", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, od, NULL)};
        vkg_writer_attr at[2] = {{.name = "k", .type = VKG_ATTR_INT, .i = c->k},
                                 {.name = "first", .type = VKG_ATTR_INT, .i = c->first}};
        vkg_writer_add_node(b.w, "moe_router", "bad_router", in, 2, out, 2, at, 2);
    } else if (c->kind == 1) {
        int64_t w1d[3] = {E, h, D}, w2d[3] = {E, D, h};
        uint32_t in[8] = {x, tensor(&b, "ids", c->ids_f32 ? VKG_DTYPE_F32 : VKG_DTYPE_I32, VKG_ROLE_INPUT, 2, kd, NULL),
                          tensor(&b, "gates", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, kd, NULL),
                          tensor(&b, "w1", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 3, w1d, wbuf), none,
                          tensor(&b, "w2", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 3, w2d, wbuf), none,
                          c->drop_w3 ? none : tensor(&b, "w3", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 3, w1d, wbuf)};
        uint32_t out = tensor(&b, "y", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, xd, NULL);
        vkg_writer_attr at = {.name = "activation", .type = VKG_ATTR_INT, .i = c->act};
        vkg_writer_add_node(b.w, "moe_experts", "bad_experts", in, c->drop_w3 ? 6 : 8, &out, 1, &at, 1);
    } else if (c->kind == 2) {
        int64_t ud[2] = {T, h}, ad[2] = {T, c->a1_cols}, b1d[3] = {E, h, r}, a2d[3] = {E, r, h}, b2d[3] = {E, D, r};
        uint32_t in[7] = {tensor(&b, "u", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, ud, NULL),
                          tensor(&b, "a1", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, ad, NULL),
                          tensor(&b, "ids", VKG_DTYPE_I32, VKG_ROLE_INPUT, 2, kd, NULL),
                          tensor(&b, "gates", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, kd, NULL),
                          tensor(&b, "b1", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 3, b1d, wbuf),
                          tensor(&b, "a2", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 3, a2d, wbuf),
                          tensor(&b, "b2", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 3, b2d, wbuf)};
        uint32_t out[2] = {tensor(&b, "hbar", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, ud, NULL),
                           tensor(&b, "c", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, xd, NULL)};
        vkg_writer_attr at = {.name = "lora_scale", .type = VKG_ATTR_FLOAT, .f = 1.0};
        vkg_writer_add_node(b.w, "moe_lora_mix", "bad_mix", in, 7, out, 2, &at, 1);
    } else {
        int64_t wd[2] = {h, D}, lad[2] = {c->ranks_sum, D}, lbd[2] = {h, c->ranks_sum}, yd[2] = {T, h};
        uint32_t in[7] = {x, tensor(&b, "w", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 2, wd, wbuf), none, none, none,
                          tensor(&b, "la", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 2, lad, wbuf),
                          tensor(&b, "lb", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 2, lbd, wbuf)};
        uint32_t out = tensor(&b, "y", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, yd, NULL);
        double sc[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
        int64_t rk[9] = {2, 2, 2, 2, 2, 2, 2, 2, 2};
        vkg_writer_attr at[2] = {{.name = "lora_scale", .type = VKG_ATTR_FLOATS, .count = (uint32_t)c->nscales, .floats = sc},
                                 {.name = "lora_ranks", .type = VKG_ATTR_INTS, .count = 2, .ints = rk}};
        vkg_writer_add_node(b.w, "linear", "bad_lora", in, 7, &out, 1, at, 2);
    }
    void *data = NULL;
    size_t size = 0;
    vkg_model *m = NULL;
    OK(vkg_writer_to_memory(b.w, &data, &size));
    vkg_writer_destroy(b.w);
    vkg_status st = vkg_model_load_memory(ctx, data, size, &m);
    free(data);
    const char *err = vkg_last_error();
    CHECK(st == VKG_ERROR_INVALID_GRAPH && strstr(err, c->msg), "%s: got %s: %s (want \"%s\")", c->what,
          vkg_status_name(st), st ? err : "", c->msg);
    if (st == VKG_ERROR_INVALID_GRAPH) printf("ok   %s: %s\n", c->what, err);
    vkg_model_destroy(m);
    return 0;
}

static int test_invalid(vkg_context *ctx)
{
    static const bad_case cases[] = {
        {"router k above the selectable columns", "k = 4: expected 1 <= k <= 3", 0, .k = 4, .first = 1},
        {"router first past the columns", "first = 4 outside [0, 4)", 0, .k = 1, .first = 4},
        {"router with too many columns", "2000 router columns", 0, .k = 2, .router_cols = 2000},
        {"router on f16 activations", "expected f32", 0, .k = 2, .f16_x = 1},
        {"experts swiglu without w3", "swiglu (activation 3) needs w3", 1, .act = 3, .drop_w3 = 1},
        {"experts w3 without swiglu", "w3 is given but the activation is not swiglu", 1, .act = 2},
        {"experts unknown activation", "activation 7", 1, .act = 7},
        {"experts ids as f32", "expected i32", 1, .act = 3, .ids_f32 = 1},
        {"lora_mix a1 of the wrong width", "expected E * r = 16", 2, .a1_cols = 12},
        {"LoRA ranks that do not sum to R", "lora_ranks sum to 4; lora_a has 5 rows", 3, .ranks_sum = 5, .nscales = 2},
        {"LoRA scales and ranks disagree", "lora_ranks has 2 entries and lora_scale 3", 3, .ranks_sum = 4, .nscales = 3},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (try_bad(ctx, &cases[i])) return 1;
    return 0;
}

/* ---- router and plan in one dispatch ---- */

typedef struct route_plan_case {
    uint32_t T, D, C, first, k, h;
    int sigmoid, shared; /* shared: a second moe_experts reads the ids too, so the plan cannot fuse */
    int nostats;         /* a router without statistics outputs: its selection spans many workgroups */
    int fused;           /* expected: the router records the experts' plan (moe_route_plan1) */
} route_plan_case;

/* Builds x -> moe_router -> moe_experts (and a second experts node on the same ids when shared),
 * with every routing output a graph output. */
static vkg_model *route_plan_graph(vkg_context *ctx, const route_plan_case *rc, float *w, float *bias, float *w1,
                                   float *b1, float *w2, float *b2)
{
    uint32_t T = rc->T, D = rc->D, C = rc->C, k = rc->k, E = C - rc->first, h = rc->h;
    gb b;
    vkg_writer_create(&b.w);
    int64_t xd[2] = {T, D}, wd[2] = {C, D}, bd[1] = {C}, kd[2] = {T, k}, ed[1] = {E}, cd[1] = {C}, one[1] = {1},
            w1d[3] = {E, h, D}, w2d[3] = {E, D, h}, b1d[2] = {E, h}, b2d[2] = {E, D};
    uint32_t x = tensor(&b, "x", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, xd, NULL);
    uint32_t in[3] = {x, tensor(&b, "w", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 2, wd, w),
                      tensor(&b, "b", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 1, bd, bias)};
    uint32_t out[7] = {tensor(&b, "ids", VKG_DTYPE_I32, VKG_ROLE_OUTPUT, 2, kd, NULL),
                       tensor(&b, "gates", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, kd, NULL)};
    if (!rc->nostats) {
        out[2] = tensor(&b, "counts", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 1, ed, NULL);
        out[3] = tensor(&b, "fraction", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 1, ed, NULL);
        out[4] = tensor(&b, "mean_score", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 1, cd, NULL);
        out[5] = tensor(&b, "load_balance", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 1, one, NULL);
        out[6] = tensor(&b, "z_loss", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 1, one, NULL);
    }
    vkg_writer_attr at[3] = {{.name = "k", .type = VKG_ATTR_INT, .i = k},
                             {.name = "first", .type = VKG_ATTR_INT, .i = rc->first},
                             {.name = "score", .type = VKG_ATTR_STRING, .s = rc->sigmoid ? "sigmoid" : "softmax"}};
    if (vkg_writer_add_node(b.w, "moe_router", "router", in, 3, out, rc->nostats ? 2 : 7, at, 3) != VKG_SUCCESS)
        return NULL;
    uint32_t ein[7] = {x, out[0], out[1], tensor(&b, "w1", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 3, w1d, w1),
                       tensor(&b, "b1", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 2, b1d, b1),
                       tensor(&b, "w2", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 3, w2d, w2),
                       tensor(&b, "b2", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 2, b2d, b2)};
    uint32_t y = tensor(&b, "y", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, xd, NULL);
    vkg_writer_attr act = {.name = "activation", .type = VKG_ATTR_INT, .i = 2};
    if (vkg_writer_add_node(b.w, "moe_experts", "experts", ein, 7, &y, 1, &act, 1) != VKG_SUCCESS) return NULL;
    if (rc->shared) {
        uint32_t y2 = tensor(&b, "y2", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, xd, NULL);
        vkg_writer_attr relu = {.name = "activation", .type = VKG_ATTR_INT, .i = 1};
        if (vkg_writer_add_node(b.w, "moe_experts", "experts2", ein, 7, &y2, 1, &relu, 1) != VKG_SUCCESS) return NULL;
    }
    return finish(ctx, &b);
}

static int run_route_plan(vkg_context *ctx, const route_plan_case *rc, uint32_t seed)
{
    uint32_t T = rc->T, D = rc->D, C = rc->C, k = rc->k, E = C - rc->first, h = rc->h;
    size_t nx = (size_t)T * D, nw = (size_t)E * h * D, P = (size_t)T * k, ns = 2 * (size_t)E + C + 2;
    float *x = malloc(nx * 4), *w = malloc((size_t)C * D * 4), *bias = malloc(C * 4), *w1 = malloc(nw * 4),
          *w2 = malloc(nw * 4), *b1 = malloc((size_t)E * h * 4), *b2 = malloc((size_t)E * D * 4);
    h_fill(x, nx, seed, -1, 1);
    h_fill(w, (size_t)C * D, seed + 1, -1, 1);
    h_fill(bias, C, seed + 2, -0.5f, 0.5f);
    h_fill(w1, nw, seed + 3, -0.5f, 0.5f);
    h_fill(w2, nw, seed + 4, -0.5f, 0.5f);
    h_fill(b1, (size_t)E * h, seed + 5, -0.3f, 0.3f);
    h_fill(b2, (size_t)E * D, seed + 6, -0.3f, 0.3f);
    vkg_model *m = route_plan_graph(ctx, rc, w, bias, w1, b1, w2, b2);
    if (!m) return 1;
    const char *names[8] = {"y", "ids", "gates", "counts", "fraction", "mean_score", "load_balance", "z_loss"};
    size_t bytes[8] = {nx * 4, P * 4, P * 4, E * 4, E * 4, C * 4, 4, 4};
    void *res[2][8];
    int nout = rc->nostats ? 3 : 8;
    uint32_t disp[2], barriers[2];
    char what[160];
    snprintf(what, sizeof what, "route+plan T=%u D=%u C=%u first=%u k=%u h=%u%s%s%s", T, D, C, rc->first, k, h,
             rc->sigmoid ? " sigmoid" : "", rc->shared ? " shared ids" : "", rc->nostats ? " no statistics" : "");
    /* Pass 0 as sessions are made by default, pass 1 with the fusion turned off: the same kernels
     * otherwise, so every output must agree bit for bit. */
    for (int pass = 0; pass < 2; pass++) {
        if (pass) setenv("VKG_MOE_FUSED_ROUTE_PLAN", "0", 1);
        vkg_session *s;
        vkg_status st = vkg_session_create(m, NULL, &s);
        unsetenv("VKG_MOE_FUSED_ROUTE_PLAN");
        OK(st);
        OK(vkg_session_set_input(s, "x", x, nx * 4));
        for (int i = 0; i < 8; i++) res[pass][i] = calloc(1, bytes[i] + 4);
        if (run_twice(s, names, res[pass], bytes, nout)) return 1;
        disp[pass] = vkg_session_dispatch_count(s);
        barriers[pass] = vkg_session_barrier_count(s);
        vkg_session_destroy(s);
    }
    CHECK(disp[1] - disp[0] == (rc->fused ? 1u : 0u) && barriers[1] - barriers[0] == (rc->fused ? 1u : 0u),
          "%s: %u dispatches / %u barriers fused, %u / %u apart; expected %s", what, disp[0], barriers[0], disp[1],
          barriers[1], rc->fused ? "one of each fewer" : "the same");
    for (int i = 0; i < nout; i++)
        CHECK(memcmp(res[0][i], res[1][i], bytes[i]) == 0, "%s: %s differs with and without the fusion", what, names[i]);
    /* Against the references: the routing (ids exact away from near ties), and the experts on the
     * device's routing (which a wrong plan would scatter to the wrong rows or drop). */
    int32_t *ids = res[0][1], *rids = malloc(P * 4 + 4);
    float *g = res[0][2], *rg = malloc(P * 4 + 4), *rst = malloc(ns * 4), *ry = malloc(nx * 4 + 4), *y = res[0][0];
    double *gap = malloc((T + 1) * sizeof *gap);
    ref_moe_router(x, w, bias, T, D, C, rc->first, k, rc->sigmoid, 0, 0, 1.0, 1.0, rids, rg, rst, rst + E, rst + 2 * E,
                   rst + 2 * E + C, rst + 2 * E + C + 1, gap);
    uint32_t wrong = 0;
    for (uint32_t t = 0; t < T; t++)
        if (memcmp(ids + t * k, rids + t * k, k * 4) && gap[t] >= 1e-5) wrong++;
    CHECK(wrong == 0, "%s: %u of %u tokens route differently", what, wrong, T);
    float *st = malloc(ns * 4);
    memcpy(st, res[0][3], E * 4);
    memcpy(st + E, res[0][4], E * 4);
    memcpy(st + 2 * E, res[0][5], C * 4);
    memcpy(st + 2 * E + C, res[0][6], 4);
    memcpy(st + 2 * E + C + 1, res[0][7], 4);
    ref_moe_experts(x, ids, g, w1, b1, w2, b2, NULL, NULL, ry, T, D, k, E, h, 2);
    h_maybe_fault(y, nx);
    if (!rc->nostats) h_maybe_fault(st, ns);
    int bad = rc->nostats ? 0 : h_compare("statistics", st, rst, NULL, ns, 1e-6, 1e-5);
    bad |= h_compare(what, y, ry, NULL, nx, 2e-5 * (1 + sqrt((double)D * h) / 8), 1e-5);
    CHECK(!bad, "%s", what);
    for (int p = 0; p < 2; p++)
        for (int i = 0; i < 8; i++) free(res[p][i]);
    vkg_model_destroy(m);
    free(x), free(w), free(bias), free(w1), free(w2), free(b1), free(b2), free(rids), free(rg), free(rst), free(ry);
    free(gap), free(st);
    return 0;
}

/* A moe_router whose ids feed one moe_experts node records that node's dispatch plan in its own
 * dispatch (moe_route_plan1) up to 1024 tokens, 1024 pairs and 256 experts; checked against the
 * references and bit for bit against the two dispatches, at the limits, past them, and where a
 * second reader of the ids keeps them apart. */
static int test_route_plan(vkg_context *ctx)
{
    static const route_plan_case cases[] = {
        {.T = 1, .D = 8, .C = 4, .k = 1, .h = 12, .fused = 1},
        {.T = 7, .D = 13, .C = 6, .k = 2, .h = 20, .fused = 1},
        {.T = 3, .D = 16, .C = 12, .k = 1, .h = 8, .fused = 1}, /* most experts empty */
        {.T = 33, .D = 12, .C = 10, .first = 3, .k = 2, .h = 9, .sigmoid = 1, .fused = 1},
        {.T = 512, .D = 8, .C = 5, .k = 2, .h = 8, .fused = 1},  /* 1024 pairs: the plan's limit */
        {.T = 1024, .D = 8, .C = 3, .k = 1, .h = 8, .fused = 1}, /* the router's limit */
        {.T = 256, .D = 8, .C = 258, .first = 2, .k = 2, .h = 4, .fused = 1}, /* 256 experts */
        {.T = 513, .D = 8, .C = 5, .k = 2, .h = 8},              /* 1026 pairs: apart */
        {.T = 1025, .D = 8, .C = 3, .k = 1, .h = 8},             /* over the router's limit */
        {.T = 20, .D = 8, .C = 300, .k = 3, .h = 4},             /* 300 experts */
        {.T = 9, .D = 12, .C = 6, .k = 2, .h = 10, .shared = 1}, /* two readers of the ids */
        {.T = 9, .D = 12, .C = 6, .k = 2, .h = 10, .nostats = 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (run_route_plan(ctx, &cases[i], 700 + 13 * (uint32_t)i)) return 1;
    return 0;
}

int main(int argc, char **argv)
{
    const char *op = argc > 1 ? argv[1] : "";
    for (int i = 2; i < argc; i++)
        if (!strcmp(argv[i], "--inject-fault")) h_inject_fault = 1;
    vkg_context *ctx = h_context();
    if (!ctx) return 1;
    int r;
    if (!strcmp(op, "router")) r = test_router(ctx);
    else if (!strcmp(op, "experts")) r = test_experts(ctx);
    else if (!strcmp(op, "large")) r = test_large(ctx);
    else if (!strcmp(op, "mlp")) r = test_mlp(ctx);
    else if (!strcmp(op, "lora_mix")) r = test_lora_mix(ctx);
    else if (!strcmp(op, "lora_linear")) r = test_lora_linear(ctx);
    else if (!strcmp(op, "invalid")) r = test_invalid(ctx);
    else if (!strcmp(op, "route_plan")) r = test_route_plan(ctx);
    else {
        fprintf(stderr,
                "usage: test_moe router|experts|mlp|large|lora_mix|lora_linear|invalid|route_plan [--inject-fault]\n");
        return 2;
    }
    int f = h_finish(ctx, op);
    return r || f;
}
