/* conv2d and conv_transpose2d against the CPU reference in ref_conv.c, on ragged shapes, under the
 * validation layer: `test_conv conv|transposed|graph [--variant tiled|texel] [--part N]
 * [--inject-fault]`. conv and transposed call the kernel directly (each case twice, bit for bit);
 * graph loads malformed graphs (each refused naming the node and what was expected) and runs a
 * valid one through a session. */
#include <float.h>

#include "harness.h"
#include "ref.h"
#include "ref_conv.h"
#include "runtime/kernels/conv.h"

typedef struct conv_case {
    ref_conv_shape s;
    int f16, bias, act, res;
    int part; /* the ctest process that runs it (--part) */
} conv_case;


static vkg_conv_args kernel_args(const ref_conv_shape *s)
{
    vkg_conv_args a = {.transposed = s->transposed != 0, .n = s->n, .c = s->c, .h = s->h, .w = s->w, .o = s->o,
                       .kh = s->kh, .kw = s->kw, .groups = s->groups};
    for (int i = 0; i < 2; i++) {
        a.stride[i] = s->stride[i];
        a.pad[i] = s->pad[i];
        a.dilation[i] = s->dilation[i];
        a.out_pad[i] = s->out_pad[i];
    }
    return a;
}

/* Terms summed into one output: the fp32 rounding bound grows with their square root. */
static double conv_terms(const ref_conv_shape *s)
{
    return (double)(s->c / s->groups) * s->kh * s->kw;
}

static int run_case(vkg_context *ctx, vkg_mm_variant variant, const conv_case *cc, uint32_t seed)
{
    const ref_conv_shape *s = &cc->s;
    int64_t ho, wo;
    ref_conv_out_size(s, &ho, &wo);
    size_t nx = (size_t)s->n * s->c * s->h * s->w, nw = (size_t)s->o * (s->c / s->groups) * s->kh * s->kw;
    size_t ny = (size_t)s->n * s->o * (size_t)ho * (size_t)wo;
    float *x = malloc((nx + 1) * 4), *w = malloc((nw + 1) * 4), *b = malloc((s->o + 1) * 4);
    float *res = malloc((ny + 1) * 4), *want = malloc((ny + 1) * 4), *nan = malloc((ny + 1) * 4);
    double *mag = malloc((ny + 1) * sizeof(double));
    uint16_t *wh = malloc((nw + 1) * 2);
    h_fill(x, nx, seed, -1.0f, 1.0f);
    h_fill(w, nw, seed + 1, -1.0f, 1.0f);
    h_fill(b, s->o, seed + 2, -0.5f, 0.5f);
    h_fill(res, ny, seed + 3, -3.0f, 3.0f);
    for (size_t i = 0; i < ny; i++) nan[i] = NAN; /* every output must be written */
    if (cc->f16) /* the reference sees exactly the weights the GPU decodes */
        for (size_t i = 0; i < nw; i++) {
            wh[i] = ref_f32_to_f16(w[i]);
            w[i] = ref_f16_to_f32(wh[i]);
        }
    ref_conv(s, x, w, cc->bias ? b : NULL, cc->res ? res : NULL, cc->act, want, mag);
    /* As run_matmul_case: fp32 accumulation error ~sqrt(K) ulp of sum |x w|, one more rounding for
     * the residual sum. */
    double k = conv_terms(s);
    for (size_t i = 0; i < ny; i++) {
        if (cc->res) mag[i] += fabs(res[i]) / sqrt(k + 1.0);
        mag[i] *= 2.0 * sqrt(k + 1.0) * FLT_EPSILON;
    }

    vkg_buf *bx = h_upload(ctx, x, nx * 4), *bw = cc->f16 ? h_upload(ctx, wh, nw * 2) : h_upload(ctx, w, nw * 4);
    vkg_buf *bb = h_upload(ctx, b, (size_t)s->o * 4), *bres = h_upload(ctx, res, ny * 4);
    vkg_buf *by = h_upload(ctx, nan, ny * 4), *bs = NULL;
    vkg_conv_args a = kernel_args(s);
    a.x = (vkg_tref){bx, 0};
    a.weight = (vkg_tref){bw, 0};
    a.bias = (vkg_tref){cc->bias ? bb : NULL, 0};
    a.residual = (vkg_tref){cc->res ? bres : NULL, 0};
    a.y = (vkg_tref){by, 0};
    a.w_dtype = cc->f16 ? VKG_DTYPE_F16 : VKG_DTYPE_F32;
    a.act = cc->act ? VKG_ACT_RELU : VKG_ACT_NONE;
    a.variant = variant;
    VkDeviceSize sb = vkg_conv_scratch_bytes(ctx, &a);
    CHECK((sb == 0) == (variant == VKG_MM_TILED), "scratch of %llu bytes for the %s variant", (unsigned long long)sb,
          variant == VKG_MM_TILED ? "tiled" : "texel");
    OK(vkg_buf_create(ctx, sb ? sb : 4, &bs));
    a.scratch = (vkg_tref){bs, 0};
    vkg_cmd *cmd = NULL;
    OK(vkg_cmd_begin(ctx, false, &cmd));
    OK(vkg_conv2d(cmd, &a));
    OK(vkg_cmd_submit_wait(cmd));
    float *got = h_download(by, ny);
    h_maybe_fault(got, ny);
    char what[256];
    snprintf(what, sizeof what, "%s %s n=%u c=%u %ux%u o=%u k=%ux%u s=%u,%u p=%u,%u d=%u,%u%s g=%u w=%s bias=%d "
             "relu=%d res=%d", s->transposed ? "conv_transpose2d" : "conv2d", variant == VKG_MM_TEXEL ? "texel" : "tiled",
             s->n, s->c, s->h, s->w, s->o, s->kh, s->kw, s->stride[0], s->stride[1], s->pad[0], s->pad[1],
             s->dilation[0], s->dilation[1], s->transposed && (s->out_pad[0] || s->out_pad[1]) ? " op" : "",
             s->groups, cc->f16 ? "f16" : "f32", cc->bias, cc->act, cc->res);
    h_compare(what, got, want, mag, ny, 2e-6, 2e-7);
    h_check_deterministic(cmd, by, ny, what);
    free(got);
    vkg_cmd_destroy(cmd);
    vkg_buf *bufs[] = {bx, bw, bb, bres, by, bs};
    for (size_t i = 0; i < VKG_ARRAY_LEN(bufs); i++) vkg_buf_destroy(bufs[i]);
    void *mem[] = {x, w, b, res, want, nan, mag, wh};
    for (size_t i = 0; i < VKG_ARRAY_LEN(mem); i++) free(mem[i]);
    return 0;
}

#define S2(a, b) {a, b}
/* {transposed, n, c, h, w, o, kh, kw, groups, stride, pad, dilation, out_pad}, f16, bias, act, res, part.
 * Part 0 holds the small cases, part 1 the DPT-sized ones and the fp16 weights: llvmpipe compiles each
 * texel pipeline (one per column-block width) at its first dispatch, so each process keeps to a few. */
static const conv_case conv_cases[] = {
    {{0, 1, 1, 1, 1, 1, 1, 1, 1, S2(1, 1), S2(0, 0), S2(1, 1), S2(0, 0)}, 0, 1, 0, 0, 0},    /* size 1 */
    {{0, 2, 7, 5, 9, 13, 1, 1, 1, S2(1, 1), S2(0, 0), S2(1, 1), S2(0, 0)}, 0, 1, 1, 0, 0},   /* 1x1, batch 2 */
    {{0, 1, 5, 17, 23, 11, 3, 3, 1, S2(1, 1), S2(1, 1), S2(1, 1), S2(0, 0)}, 0, 0, 0, 1, 0}, /* 3x3 s1 p1 */
    {{0, 1, 6, 15, 10, 9, 3, 3, 1, S2(2, 2), S2(1, 1), S2(1, 1), S2(0, 0)}, 0, 1, 1, 1, 0},  /* 3x3 s2 p1 */
    {{0, 2, 6, 9, 8, 4, 3, 3, 2, S2(1, 1), S2(1, 1), S2(1, 1), S2(0, 0)}, 0, 1, 0, 0, 0},    /* groups 2 */
    {{0, 1, 3, 7, 11, 6, 2, 3, 3, S2(1, 2), S2(0, 1), S2(1, 1), S2(0, 0)}, 0, 1, 0, 0, 0},   /* depthwise-ish */
    {{0, 1, 4, 12, 9, 5, 3, 3, 1, S2(1, 1), S2(2, 2), S2(2, 2), S2(0, 0)}, 0, 0, 1, 0, 0},   /* dilation 2 */
    {{0, 1, 3, 5, 6, 4, 3, 3, 1, S2(1, 1), S2(3, 2), S2(1, 1), S2(0, 0)}, 0, 1, 0, 0, 0},    /* padding > k/2 */
    {{0, 1, 2, 20, 7, 3, 5, 5, 1, S2(3, 3), S2(1, 1), S2(1, 1), S2(0, 0)}, 0, 1, 0, 1, 0},   /* k5 s3 */
    {{0, 1, 3, 2, 3, 2, 3, 3, 1, S2(1, 1), S2(1, 1), S2(1, 1), S2(0, 0)}, 0, 1, 1, 0, 0},    /* input under k */
    {{0, 1, 3, 28, 42, 20, 14, 14, 1, S2(14, 14), S2(0, 0), S2(1, 1), S2(0, 0)}, 1, 1, 0, 0, 1}, /* patch embed */
    {{0, 1, 64, 24, 20, 64, 3, 3, 1, S2(1, 1), S2(1, 1), S2(1, 1), S2(0, 0)}, 0, 1, 1, 1, 1},    /* DPT RCU */
    {{0, 1, 33, 9, 9, 70, 3, 3, 1, S2(1, 1), S2(1, 1), S2(1, 1), S2(0, 0)}, 1, 1, 0, 1, 1},      /* ragged columns */
    {{0, 3, 40, 7, 5, 37, 1, 1, 1, S2(1, 1), S2(0, 0), S2(1, 1), S2(0, 0)}, 1, 0, 1, 0, 1},      /* 1x1, batch 3 */
    {{0, 1, 8, 11, 13, 40, 3, 3, 2, S2(2, 2), S2(1, 1), S2(1, 1), S2(0, 0)}, 0, 1, 0, 0, 1},     /* groups, s2 */
    {{0, 2, 96, 10, 11, 48, 1, 1, 1, S2(1, 1), S2(0, 0), S2(1, 1), S2(0, 0)}, 0, 1, 0, 0, 1},    /* projection */
};

static const conv_case transposed_cases[] = {
    {{1, 1, 5, 6, 5, 7, 2, 2, 1, S2(2, 2), S2(0, 0), S2(1, 1), S2(0, 0)}, 0, 1, 0, 0, 0},    /* k = s = 2 */
    {{1, 2, 12, 3, 4, 8, 4, 4, 1, S2(4, 4), S2(0, 0), S2(1, 1), S2(0, 0)}, 0, 0, 0, 0, 0},   /* k = s = 4 */
    {{1, 1, 6, 4, 6, 4, 2, 2, 2, S2(2, 2), S2(0, 0), S2(1, 1), S2(0, 0)}, 0, 1, 0, 0, 0},    /* k = s, groups */
    {{1, 1, 3, 5, 4, 2, 2, 3, 1, S2(2, 3), S2(0, 0), S2(1, 1), S2(0, 0)}, 0, 1, 0, 0, 0},    /* k = s, 2x3 */
    {{1, 1, 6, 7, 5, 5, 3, 3, 1, S2(2, 2), S2(1, 1), S2(1, 1), S2(1, 1)}, 0, 1, 0, 0, 0},    /* s2 k3 p1 op1 */
    {{1, 2, 4, 5, 3, 6, 3, 3, 2, S2(2, 2), S2(0, 0), S2(1, 1), S2(0, 0)}, 0, 0, 0, 0, 0},    /* general, groups */
    {{1, 1, 3, 4, 5, 4, 2, 2, 1, S2(3, 3), S2(2, 1), S2(2, 2), S2(1, 2)}, 0, 1, 0, 0, 0},    /* dilation, op */
    {{1, 1, 3, 5, 5, 4, 3, 3, 1, S2(1, 1), S2(1, 1), S2(1, 1), S2(0, 0)}, 0, 1, 0, 0, 0},    /* stride 1 */
    {{1, 1, 2, 9, 9, 3, 2, 2, 1, S2(1, 1), S2(3, 3), S2(1, 1), S2(0, 0)}, 0, 1, 0, 0, 0},    /* padding > k */
    {{1, 1, 1, 1, 1, 1, 1, 1, 1, S2(1, 1), S2(0, 0), S2(1, 1), S2(0, 0)}, 0, 1, 0, 0, 0},    /* size 1 */
    {{1, 1, 48, 7, 6, 48, 4, 4, 1, S2(4, 4), S2(0, 0), S2(1, 1), S2(0, 0)}, 1, 1, 0, 0, 1},  /* DPT resize 0 */
    {{1, 2, 96, 5, 5, 96, 2, 2, 1, S2(2, 2), S2(0, 0), S2(1, 1), S2(0, 0)}, 1, 1, 0, 0, 1},  /* DPT resize 1 */
    {{1, 1, 10, 6, 7, 21, 3, 3, 1, S2(2, 2), S2(1, 1), S2(1, 1), S2(1, 1)}, 1, 1, 0, 0, 1},  /* general, f16 */
};

static int run_cases(vkg_context *ctx, vkg_mm_variant variant, const conv_case *cases, size_t n, int part,
                     uint32_t seed)
{
    for (size_t i = 0; i < n; i++)
        if (part < 0 || cases[i].part == part)
            if (run_case(ctx, variant, &cases[i], seed + 10 * (uint32_t)i)) return 1;
    return 0;
}

/* Kernel-level refusals name the operand or the limit. */
static int test_kernel_refusals(vkg_context *ctx, vkg_mm_variant variant)
{
    vkg_buf *small = NULL;
    vkg_cmd *cmd = NULL;
    OK(vkg_buf_create(ctx, 256, &small));
    OK(vkg_cmd_begin(ctx, false, &cmd));
    ref_conv_shape s = {0, 1, 4, 4, 4, 2, 3, 3, 1, S2(1, 1), S2(1, 1), S2(1, 1), S2(0, 0)};
    vkg_conv_args ok = kernel_args(&s);
    ok.x = ok.weight = ok.y = ok.scratch = (vkg_tref){small, 0};
    ok.variant = variant;
    struct bad { vkg_conv_args a; vkg_status st; const char *msg; } bad[5];
    for (int i = 0; i < 5; i++) bad[i] = (struct bad){ok, VKG_ERROR_INVALID_ARGUMENT, NULL};
    bad[0].a.c = 5, bad[0].a.groups = 2, bad[0].msg = "do not split into 2 groups";
    bad[1].a.h = 1, bad[1].a.pad[0] = 0, bad[1].msg = "gives an output of 0x4";
    bad[2].a.n = 4, bad[2].msg = "x needs 1024 bytes";
    bad[3].a.w_dtype = VKG_DTYPE_I32, bad[3].st = VKG_ERROR_UNSUPPORTED, bad[3].msg = "weight dtype";
    bad[4].a.act = VKG_ACT_GELU, bad[4].st = VKG_ERROR_UNSUPPORTED, bad[4].msg = "none or relu";
    for (int i = 0; i < 5; i++) {
        vkg_status st = vkg_conv2d(cmd, &bad[i].a);
        CHECK(st == bad[i].st && strstr(vkg_last_error(), bad[i].msg), "bad case %d: got %s: %s (want \"%s\")", i,
              vkg_status_name(st), vkg_last_error(), bad[i].msg);
    }
    CHECK(vkg_cmd_dispatch_count(cmd) == 0, "%u dispatches recorded for refused convs", vkg_cmd_dispatch_count(cmd));
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(small);
    return 0;
}

/* ---- graphs: refusals at load and at session creation, and a valid graph through a session ---- */

static vkg_writer *gw;

static uint32_t tensor(const char *name, vkg_dtype dt, vkg_tensor_role role, uint32_t rank, const int64_t *dims,
                       const char *const *sym, const void *data)
{
    vkg_writer_tensor t = {.name = name, .dtype = dt, .role = role, .rank = rank, .data = data};
    uint64_t n = 1;
    for (uint32_t i = 0; i < rank; i++) {
        t.dims[i] = dims[i];
        t.sym[i] = sym ? sym[i] : NULL;
        n *= (uint64_t)(dims[i] > 0 ? dims[i] : 1);
    }
    if (data) t.data_size = n * (dt == VKG_DTYPE_F16 ? 2 : 4);
    uint32_t id = 0;
    if (vkg_writer_add_tensor(gw, &t, &id) != VKG_SUCCESS) {
        fprintf(stderr, "FAIL: add tensor %s: %s\n", name, vkg_last_error());
        exit(1);
    }
    if (role == VKG_ROLE_INPUT) vkg_writer_add_input(gw, id);
    if (role == VKG_ROLE_OUTPUT) vkg_writer_add_output(gw, id);
    return id;
}

typedef struct bad_graph {
    const char *what, *msg;
    int transposed;
    int64_t x[4], w[4], y[4];
    int64_t bias_n;       /* 0: no bias */
    int64_t stride[3], out_pad[2];
    uint32_t stride_count; /* 0: attribute absent */
    int64_t groups, act;
    vkg_dtype wdt;
    int x_rank3;
} bad_graph;

static int load_bad(vkg_context *ctx, const bad_graph *c)
{
    static float wbuf[4096];
    vkg_writer_create(&gw);
    uint32_t in[3], out;
    in[0] = tensor("x", VKG_DTYPE_F32, VKG_ROLE_INPUT, c->x_rank3 ? 3 : 4, c->x, NULL, NULL);
    in[1] = tensor("w", c->wdt ? c->wdt : VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 4, c->w, NULL, wbuf);
    uint32_t nin = 2;
    if (c->bias_n) {
        int64_t bd[1] = {c->bias_n};
        in[nin++] = tensor("b", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 1, bd, NULL, wbuf);
    }
    out = tensor("y", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 4, c->y, NULL, NULL);
    vkg_writer_attr at[4];
    uint32_t na = 0;
    if (c->stride_count) at[na++] = (vkg_writer_attr){.name = "stride", .type = VKG_ATTR_INTS, .count = c->stride_count,
                                                      .ints = c->stride};
    if (c->groups) at[na++] = (vkg_writer_attr){.name = "groups", .type = VKG_ATTR_INT, .i = c->groups};
    if (c->act) at[na++] = (vkg_writer_attr){.name = "activation", .type = VKG_ATTR_INT, .i = c->act};
    if (c->out_pad[0] || c->out_pad[1])
        at[na++] = (vkg_writer_attr){.name = "output_padding", .type = VKG_ATTR_INTS, .count = 2, .ints = c->out_pad};
    vkg_writer_add_node(gw, c->transposed ? "conv_transpose2d" : "conv2d", "bad_conv", in, nin, &out, 1, at, na);
    void *data = NULL;
    size_t size = 0;
    OK(vkg_writer_to_memory(gw, &data, &size));
    vkg_writer_destroy(gw);
    vkg_model *m = NULL;
    vkg_status st = vkg_model_load_memory(ctx, data, size, &m);
    free(data);
    const char *err = vkg_last_error();
    CHECK(st == VKG_ERROR_INVALID_GRAPH && strstr(err, "node \"bad_conv\"") && strstr(err, c->msg),
          "%s: got %s: %s (want \"%s\")", c->what, vkg_status_name(st), st ? err : "", c->msg);
    if (st == VKG_SUCCESS) vkg_model_destroy(m);
    else printf("ok   refused: %s: %s\n", c->what, err);
    return 0;
}

static int test_graph_refusals(vkg_context *ctx)
{
    static const bad_graph cases[] = {
        {"channels differ from the weight", "expected C = 3", 0, {1, 5, 8, 8}, {4, 3, 3, 3}, {1, 4, 6, 6}},
        {"channels not divisible by groups", "3 output channels are not a multiple of groups = 2", 0, {1, 4, 8, 8},
         {3, 2, 3, 3}, {1, 3, 6, 6}, .groups = 2},
        {"output size 0", "gives an output height of 0", 0, {1, 3, 2, 9}, {4, 3, 5, 5}, {1, 4, 1, 5}},
        {"i32 weights", "expected f32 or f16", 0, {1, 3, 8, 8}, {4, 3, 3, 3}, {1, 4, 6, 6}, .wdt = VKG_DTYPE_I32},
        {"x of rank 3", "must be (N, C, H, W)", 0, {3, 8, 8, 0}, {4, 3, 3, 3}, {1, 4, 6, 6}, .x_rank3 = 1},
        {"stride 0", "stride[1] = 0 outside 1..65535", 0, {1, 3, 8, 8}, {4, 3, 3, 3}, {1, 4, 6, 6}, .stride = {1, 0},
         .stride_count = 2},
        {"stride with 3 entries", "stride has 3 entries; expected 2", 0, {1, 3, 8, 8}, {4, 3, 3, 3}, {1, 4, 6, 6},
         .stride = {1, 1, 1}, .stride_count = 3},
        {"gelu activation", "activation 2 is not 0 (none) or 1 (relu)", 0, {1, 3, 8, 8}, {4, 3, 3, 3}, {1, 4, 6, 6},
         .act = 2},
        {"bias of the wrong size", "bias \"b\" must be an f32 constant of shape (4)", 0, {1, 3, 8, 8}, {4, 3, 3, 3},
         {1, 4, 6, 6}, .bias_n = 5},
        {"transposed: channels differ", "expected C = 6", 1, {1, 5, 4, 4}, {6, 2, 2, 2}, {1, 2, 8, 8},
         .stride = {2, 2}, .stride_count = 2},
        {"transposed: output_padding too large", "output_padding[0] = 2 must be smaller than the stride (2)", 1,
         {1, 6, 4, 4}, {6, 2, 2, 2}, {1, 2, 10, 8}, .stride = {2, 2}, .stride_count = 2, .out_pad = {2, 0}},
        {"transposed: groups do not divide C", "not a multiple of groups = 4", 1, {1, 6, 4, 4}, {6, 2, 2, 2},
         {1, 8, 5, 5}, .groups = 4},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (load_bad(ctx, &cases[i])) return 1;
    return 0;
}

/* A transposed conv whose padding eats the whole output: its own graph (the table above sets no padding). */
static int test_graph_pad_refusal(vkg_context *ctx)
{
    static float wbuf[64];
    vkg_writer_create(&gw);
    int64_t xd[4] = {1, 2, 1, 1}, wd[4] = {2, 1, 1, 1}, yd[4] = {1, 1, 1, 1}, pad[2] = {0, 1};
    uint32_t in[2] = {tensor("x", VKG_DTYPE_F32, VKG_ROLE_INPUT, 4, xd, NULL, NULL),
                      tensor("w", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 4, wd, NULL, wbuf)};
    uint32_t out = tensor("y", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 4, yd, NULL, NULL);
    vkg_writer_attr at = {.name = "padding", .type = VKG_ATTR_INTS, .count = 2, .ints = pad};
    vkg_writer_add_node(gw, "conv_transpose2d", "bad_conv", in, 2, &out, 1, &at, 1);
    void *data = NULL;
    size_t size = 0;
    OK(vkg_writer_to_memory(gw, &data, &size));
    vkg_writer_destroy(gw);
    vkg_model *m = NULL;
    vkg_status st = vkg_model_load_memory(ctx, data, size, &m);
    free(data);
    CHECK(st == VKG_ERROR_INVALID_GRAPH && strstr(vkg_last_error(), "gives an output width of -1"),
          "transposed padding past the output: got %s: %s", vkg_status_name(st), vkg_last_error());
    if (st == VKG_SUCCESS) vkg_model_destroy(m);
    return 0;
}

/* x (batch, 6, h, w) -> conv2d (groups 2, 3x3, s2, p1, bias, relu, residual r) -> y1, then
 * conv_transpose2d (k = s = 2, bias) -> y2, on the variant the context picks. Sizes bound at session
 * creation are checked there: a residual that does not match the output is refused naming the node. */
static int test_graph_session(vkg_context *ctx, vkg_mm_variant variant)
{
    enum { N = 2, C = 6, H = 9, W = 7, O = 4, O2 = 3 };
    ref_conv_shape s1 = {0, N, C, H, W, O, 3, 3, 2, S2(2, 2), S2(1, 1), S2(1, 1), S2(0, 0)};
    int64_t ho, wo;
    ref_conv_out_size(&s1, &ho, &wo);
    ref_conv_shape s2 = {1, N, O, (uint32_t)ho, (uint32_t)wo, O2, 2, 2, 1, S2(2, 2), S2(0, 0), S2(1, 1), S2(0, 0)};
    size_t nx = (size_t)N * C * H * W, n1 = (size_t)N * O * (size_t)(ho * wo), n2 = (size_t)N * O2 * (size_t)(4 * ho * wo);
    float w1[O * (C / 2) * 9], b1[O], w2[O * O2 * 4], b2[O2];
    float *x = malloc(nx * 4), *r = malloc(n1 * 4), *want1 = malloc(n1 * 4), *want2 = malloc(n2 * 4);
    float *got1 = malloc(n1 * 4), *got2 = malloc(n2 * 4);
    double *mag1 = malloc(n1 * sizeof(double)), *mag2 = malloc(n2 * sizeof(double));
    h_fill(x, nx, 901, -1, 1);
    h_fill(r, n1, 902, -1, 1);
    h_fill(w1, VKG_ARRAY_LEN(w1), 903, -1, 1);
    h_fill(b1, O, 904, -1, 1);
    h_fill(w2, VKG_ARRAY_LEN(w2), 905, -1, 1);
    h_fill(b2, O2, 906, -1, 1);

    vkg_writer_create(&gw);
    const char *sym[4] = {"batch", NULL, "h", "w"};
    int64_t xd[4] = {-1, C, -1, -1}, rd[4] = {-1, O, -1, -1}, w1d[4] = {O, C / 2, 3, 3}, b1d[1] = {O};
    int64_t w2d[4] = {O, O2, 2, 2}, b2d[1] = {O2}, yd[4] = {-1, O, -1, -1}, y2d[4] = {-1, O2, -1, -1};
    const char *none[4] = {"", NULL, "", ""};
    int64_t two[2] = {2, 2}, one[2] = {1, 1};
    uint32_t in1[4] = {tensor("x", VKG_DTYPE_F32, VKG_ROLE_INPUT, 4, xd, sym, NULL),
                       tensor("w1", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 4, w1d, NULL, w1),
                       tensor("b1", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 1, b1d, NULL, b1),
                       tensor("r", VKG_DTYPE_F32, VKG_ROLE_INPUT, 4, rd, (const char *[]){"batch", NULL, "ho", "wo"},
                              NULL)};
    uint32_t y1 = tensor("y1", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 4, yd, none, NULL);
    vkg_writer_attr a1[4] = {{.name = "stride", .type = VKG_ATTR_INTS, .count = 2, .ints = two},
                             {.name = "padding", .type = VKG_ATTR_INTS, .count = 2, .ints = one},
                             {.name = "groups", .type = VKG_ATTR_INT, .i = 2},
                             {.name = "activation", .type = VKG_ATTR_INT, .i = 1}};
    OK(vkg_writer_add_node(gw, "conv2d", "conv", in1, 4, &y1, 1, a1, 4));
    uint32_t in2[3] = {y1, tensor("w2", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 4, w2d, NULL, w2),
                       tensor("b2", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 1, b2d, NULL, b2)};
    uint32_t y2 = tensor("y2", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 4, y2d, none, NULL);
    vkg_writer_attr a2 = {.name = "stride", .type = VKG_ATTR_INTS, .count = 2, .ints = two};
    OK(vkg_writer_add_node(gw, "conv_transpose2d", "up", in2, 3, &y2, 1, &a2, 1));
    void *data = NULL;
    size_t size = 0;
    OK(vkg_writer_to_memory(gw, &data, &size));
    vkg_writer_destroy(gw);
    vkg_model *m = NULL;
    OK(vkg_model_load_memory(ctx, data, size, &m));
    free(data);

    vkg_session *sess = NULL;
    vkg_dim_binding tiny[5] = {{"batch", N}, {"h", 1}, {"w", 1}, {"ho", 1}, {"wo", 1}};
    vkg_session_desc bad = {.dims = tiny, .n_dims = 5};
    tiny[3].value = 2; /* y1 is 1x1 */
    vkg_status st = vkg_session_create(m, &bad, &sess);
    CHECK(st != VKG_SUCCESS && strstr(vkg_last_error(), "node \"conv\"") && strstr(vkg_last_error(), "residual"),
          "residual of the wrong size: got %s: %s", vkg_status_name(st), vkg_last_error());
    if (st == VKG_SUCCESS) vkg_session_destroy(sess);

    vkg_dim_binding dims[5] = {{"batch", N}, {"h", H}, {"w", W}, {"ho", ho}, {"wo", wo}};
    vkg_session_desc sd = {.dims = dims, .n_dims = 5};
    OK(vkg_session_create(m, &sd, &sess));
    OK(vkg_session_set_input(sess, "x", x, nx * 4));
    OK(vkg_session_set_input(sess, "r", r, n1 * 4));
    OK(vkg_session_run(sess));
    OK(vkg_session_get_output(sess, "y1", got1, n1 * 4));
    OK(vkg_session_get_output(sess, "y2", got2, n2 * 4));
    ref_conv(&s1, x, w1, b1, r, 1, want1, mag1);
    ref_conv(&s2, got1, w2, b2, NULL, 0, want2, mag2); /* from the device's y1: each node on its own */
    double k1 = conv_terms(&s1), k2 = conv_terms(&s2);
    for (size_t i = 0; i < n1; i++) mag1[i] = (mag1[i] + fabs(r[i]) / sqrt(k1 + 1)) * 2.0 * sqrt(k1 + 1) * FLT_EPSILON;
    for (size_t i = 0; i < n2; i++) mag2[i] *= 2.0 * sqrt(k2 + 1) * FLT_EPSILON;
    h_maybe_fault(got1, n1);
    h_maybe_fault(got2, n2);
    char what[96];
    snprintf(what, sizeof what, "session conv2d %s", variant == VKG_MM_TEXEL ? "texel" : "tiled");
    h_compare(what, got1, want1, mag1, n1, 2e-6, 2e-7);
    snprintf(what, sizeof what, "session conv_transpose2d %s", variant == VKG_MM_TEXEL ? "texel" : "tiled");
    h_compare(what, got2, want2, mag2, n2, 2e-6, 2e-7);
    vkg_session_destroy(sess);
    vkg_model_destroy(m);
    void *mem[] = {x, r, want1, want2, got1, got2, mag1, mag2};
    for (size_t i = 0; i < VKG_ARRAY_LEN(mem); i++) free(mem[i]);
    return 0;
}

int main(int argc, char **argv)
{
    const char *op = argc > 1 ? argv[1] : "";
    vkg_mm_variant variant = VKG_MM_AUTO;
    int part = -1;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--inject-fault")) h_inject_fault = 1;
        else if (!strcmp(argv[i], "--variant") && i + 1 < argc) {
            i++;
            variant = !strcmp(argv[i], "texel") ? VKG_MM_TEXEL : !strcmp(argv[i], "tiled") ? VKG_MM_TILED : VKG_MM_AUTO;
        } else if (!strcmp(argv[i], "--part") && i + 1 < argc)
            part = atoi(argv[++i]);
    }
    vkg_context *ctx = h_context();
    if (variant == VKG_MM_AUTO) variant = vkg_conv_default_variant(ctx);
    if (variant == VKG_MM_TEXEL && !vkg_conv_texel_supported(ctx)) {
        printf("conv texel: device lacks subgroup size 8 or RGBA texel buffers; variant unavailable\n");
        vkg_context_destroy(ctx);
        return 77;
    }
    int r;
    if (!strcmp(op, "conv")) {
        r = run_cases(ctx, variant, conv_cases, VKG_ARRAY_LEN(conv_cases), part, 1000);
        if (!r && part <= 0 && !h_inject_fault) r = test_kernel_refusals(ctx, variant);
    } else if (!strcmp(op, "transposed")) {
        r = run_cases(ctx, variant, transposed_cases, VKG_ARRAY_LEN(transposed_cases), part, 2000);
    } else if (!strcmp(op, "graph")) {
        r = h_inject_fault ? 0 : test_graph_refusals(ctx);
        if (!r && !h_inject_fault) r = test_graph_pad_refusal(ctx);
        /* sessions take the context's choice (VKG_MATMUL_VARIANT steers it) */
        if (!r) r = test_graph_session(ctx, vkg_conv_default_variant(ctx));
    } else {
        fprintf(stderr, "usage: test_conv conv|transposed|graph [--variant tiled|texel] [--part N] [--inject-fault]\n");
        vkg_context_destroy(ctx);
        return 2;
    }
    if (r) h_failures++;
    return h_finish(ctx, op);
}
