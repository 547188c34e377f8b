/* Models and sessions end to end in C: graphs built with the C writer, loaded from memory and from a
 * file, run at several batch sizes, checked against the CPU references. `test_session NAME`. */
#include <float.h>
#include <unistd.h>

#include "harness.h"
#include "ref.h"

static uint32_t add_const(vkg_writer *w, const char *name, vkg_dtype dt, uint32_t rank, const int64_t *dims,
                          const void *data)
{
    vkg_writer_tensor t = {.name = name, .dtype = dt, .role = VKG_ROLE_CONSTANT, .rank = rank, .data = data};
    uint64_t n = 1;
    for (uint32_t i = 0; i < rank; i++) n *= (uint64_t)(t.dims[i] = dims[i]);
    t.data_size = n * (dt == VKG_DTYPE_F16 ? 2 : 4);
    uint32_t id = 0;
    if (vkg_writer_add_tensor(w, &t, &id) != VKG_SUCCESS) {
        fprintf(stderr, "FAIL: add constant %s: %s\n", name, vkg_last_error());
        exit(1);
    }
    return id;
}

/* An intermediate or output whose dims are all "inferred" except the last (fixed). */
static uint32_t add_act(vkg_writer *w, const char *name, vkg_tensor_role role, uint32_t rank, int64_t last)
{
    vkg_writer_tensor t = {.name = name, .role = role, .rank = rank};
    for (uint32_t i = 0; i + 1 < rank; i++) {
        t.dims[i] = -1;
        t.sym[i] = "";
    }
    t.dims[rank - 1] = last;
    uint32_t id = 0;
    if (vkg_writer_add_tensor(w, &t, &id) != VKG_SUCCESS) {
        fprintf(stderr, "FAIL: add tensor %s: %s\n", name, vkg_last_error());
        exit(1);
    }
    return id;
}

enum { T = 4, D = 6, H = 10 };

typedef struct block_params {
    float lnw[D], lnb[D], w1[H * D], b1[H], w2[D * H], b2[D], gamma[D];
    uint16_t w2h[D * H];
} block_params;

/* x (batch, T, D) -> LayerNorm -> Linear(D->H, GELU epilogue) -> Linear(H->D, fp16 weights)
 * -> + x -> * gamma -> ReLU -> GELU -> softmax -> reshape (batch, T*D) = "output"; also "hidden". */
static void *build_block(block_params *p, size_t *size)
{
    h_fill(p->lnw, D, 1, 0.5f, 1.5f);
    h_fill(p->lnb, D, 2, -0.2f, 0.2f);
    h_fill(p->w1, H * D, 3, -0.5f, 0.5f);
    h_fill(p->b1, H, 4, -0.1f, 0.1f);
    h_fill(p->w2, D * H, 5, -0.5f, 0.5f);
    h_fill(p->b2, D, 6, -0.1f, 0.1f);
    h_fill(p->gamma, D, 7, 0.5f, 2.0f);
    for (int i = 0; i < D * H; i++) {
        p->w2h[i] = ref_f32_to_f16(p->w2[i]);
        p->w2[i] = ref_f16_to_f32(p->w2h[i]);
    }
    vkg_writer *w;
    if (vkg_writer_create(&w) != VKG_SUCCESS) exit(1);
    vkg_writer_tensor xt = {.name = "x", .role = VKG_ROLE_INPUT, .rank = 3, .dims = {-1, T, D}, .sym = {"batch"}};
    uint32_t x, id[32];
    vkg_writer_add_tensor(w, &xt, &x);
    int64_t dD[1] = {D}, dH[1] = {H}, dW1[2] = {H, D}, dW2[2] = {D, H};
    uint32_t lnw = add_const(w, "norm.weight", VKG_DTYPE_F32, 1, dD, p->lnw);
    uint32_t lnb = add_const(w, "norm.bias", VKG_DTYPE_F32, 1, dD, p->lnb);
    uint32_t w1 = add_const(w, "fc1.weight", VKG_DTYPE_F32, 2, dW1, p->w1);
    uint32_t b1 = add_const(w, "fc1.bias", VKG_DTYPE_F32, 1, dH, p->b1);
    uint32_t w2 = add_const(w, "fc2.weight", VKG_DTYPE_F16, 2, dW2, p->w2h);
    uint32_t b2 = add_const(w, "fc2.bias", VKG_DTYPE_F32, 1, dD, p->b2);
    uint32_t gm = add_const(w, "ls.gamma", VKG_DTYPE_F32, 1, dD, p->gamma);
    id[0] = add_act(w, "ln", VKG_ROLE_INTERMEDIATE, 3, D);
    id[1] = add_act(w, "hidden", VKG_ROLE_OUTPUT, 3, H);
    id[2] = add_act(w, "h2", VKG_ROLE_INTERMEDIATE, 3, D);
    id[3] = add_act(w, "res", VKG_ROLE_INTERMEDIATE, 3, D);
    id[4] = add_act(w, "scaled", VKG_ROLE_INTERMEDIATE, 3, D);
    id[5] = add_act(w, "r", VKG_ROLE_INTERMEDIATE, 3, D);
    id[6] = add_act(w, "g", VKG_ROLE_INTERMEDIATE, 3, D);
    id[7] = add_act(w, "sm", VKG_ROLE_INTERMEDIATE, 3, D);
    id[8] = add_act(w, "output", VKG_ROLE_OUTPUT, 2, T * D);
    vkg_writer_attr eps = {.name = "eps", .type = VKG_ATTR_FLOAT, .f = 1e-5};
    vkg_writer_attr gelu_act = {.name = "activation", .type = VKG_ATTR_INT, .i = 2};
    vkg_writer_attr axis = {.name = "axis", .type = VKG_ATTR_INT, .i = -1};
    int64_t shp[2] = {0, -1};
    vkg_writer_attr shape = {.name = "shape", .type = VKG_ATTR_INTS, .count = 2, .ints = shp};
    uint32_t in[3];
    /* Listed out of order on purpose: the loader sorts nodes topologically. */
    in[0] = id[7];
    vkg_writer_add_node(w, "reshape", "flat", in, 1, &id[8], 1, &shape, 1);
    in[0] = x, in[1] = lnw, in[2] = lnb;
    vkg_writer_add_node(w, "layernorm", "norm", in, 3, &id[0], 1, &eps, 1);
    in[0] = id[0], in[1] = w1, in[2] = b1;
    vkg_writer_add_node(w, "linear", "fc1", in, 3, &id[1], 1, &gelu_act, 1);
    in[0] = id[1], in[1] = w2, in[2] = b2;
    vkg_writer_add_node(w, "linear", "fc2", in, 3, &id[2], 1, NULL, 0);
    in[0] = x, in[1] = id[2];
    vkg_writer_add_node(w, "add", "residual", in, 2, &id[3], 1, NULL, 0);
    in[0] = id[3], in[1] = gm;
    vkg_writer_add_node(w, "mul", "ls", in, 2, &id[4], 1, NULL, 0);
    vkg_writer_add_node(w, "relu", "act1", &id[4], 1, &id[5], 1, NULL, 0);
    vkg_writer_add_node(w, "gelu", "act2", &id[5], 1, &id[6], 1, NULL, 0);
    vkg_writer_add_node(w, "softmax", "soft", &id[6], 1, &id[7], 1, &axis, 1);
    vkg_writer_add_input(w, x);
    vkg_writer_add_output(w, id[8]);
    vkg_writer_add_output(w, id[1]);
    vkg_writer_add_metadata(w, "producer", "tests/test_session.c");
    void *data = NULL;
    if (vkg_writer_to_memory(w, &data, size) != VKG_SUCCESS) {
        fprintf(stderr, "FAIL: serialize: %s\n", vkg_last_error());
        exit(1);
    }
    vkg_writer_destroy(w);
    return data;
}

/* The same computation with the CPU references. */
static void block_ref(const block_params *p, const float *x, uint32_t batch, float *out, float *hidden)
{
    uint32_t rows = batch * T;
    float *ln = malloc(rows * D * 4), *h2 = malloc(rows * D * 4), *t = malloc(rows * D * 4);
    ref_layernorm(x, p->lnw, p->lnb, ln, NULL, rows, D, 1e-5f);
    ref_matmul(ln, p->w1, p->b1, hidden, NULL, 1, rows, H, D, 1, 2);
    ref_matmul(hidden, p->w2, p->b2, h2, NULL, 1, rows, D, H, 1, 0);
    for (uint32_t i = 0; i < rows * D; i++) {
        float v = (x[i] + h2[i]) * p->gamma[i % D];
        v = v > 0 ? v : 0;
        t[i] = (float)ref_gelu(v);
    }
    ref_softmax(t, out, rows, D);
    free(ln);
    free(h2);
    free(t);
}

static int run_block(vkg_model *m, const block_params *p, uint32_t batch, int profile)
{
    vkg_dim_binding b = {"batch", batch};
    vkg_session_desc sd = {.dims = &b, .n_dims = 1, .profile = profile};
    vkg_session *s;
    OK(vkg_session_create(m, &sd, &s));
    size_t nx = (size_t)batch * T * D;
    float *x = malloc(nx * 4 + 4), *want = malloc(nx * 4 + 4), *got = malloc(nx * 4 + 4);
    float *hw = malloc(nx / D * H * 4 + 4), *hg = malloc(nx / D * H * 4 + 4);
    h_fill(x, nx, 40 + batch, -2.0f, 2.0f);
    block_ref(p, x, batch, want, hw);
    OK(vkg_session_set_input(s, "x", x, nx * 4));
    OK(vkg_session_run(s));
    OK(vkg_session_get_output(s, "output", got, nx * 4));
    OK(vkg_session_get_output(s, "hidden", hg, nx / D * H * 4));
    vkg_tensor_info ti;
    OK(vkg_session_tensor(s, "output", &ti));
    CHECK(ti.rank == 2 && ti.dims[0] == batch && ti.dims[1] == T * D, "output shape (%lld, %lld)", (long long)ti.dims[0],
          (long long)ti.dims[1]);
    char what[64];
    snprintf(what, sizeof what, "block output, batch %u", batch);
    h_compare(what, got, want, NULL, nx, 2e-6, 1e-5);
    snprintf(what, sizeof what, "block hidden (second output), batch %u", batch);
    h_compare(what, hg, hw, NULL, nx / D * H, 2e-6, 1e-5);
    /* A second run gives the same bits; a view is not a dispatch. */
    float *again = malloc(nx * 4 + 4);
    OK(vkg_session_run(s));
    OK(vkg_session_get_output(s, "output", again, nx * 4));
    CHECK(memcmp(again, got, nx * 4) == 0, "rerun is bit-identical");
    CHECK(vkg_session_dispatch_count(s) == 8, "8 dispatches for 9 nodes (reshape is a view): %u",
          vkg_session_dispatch_count(s));
    if (profile) {
        for (uint32_t i = 0; i < vkg_session_dispatch_count(s); i++) {
            const char *node, *op;
            double ns;
            OK(vkg_session_profile(s, i, &node, &op, &ns));
            CHECK(ns > 0, "dispatch %u (%s) has a time", i, node);
        }
    }
    free(again);
    free(x);
    free(want);
    free(got);
    free(hw);
    free(hg);
    vkg_session_destroy(s);
    return 0;
}

static int test_block(void)
{
    vkg_context *ctx = h_context();
    block_params p;
    size_t size;
    void *bytes = build_block(&p, &size);
    vkg_model *m;
    OK(vkg_model_load_memory(ctx, bytes, size, &m));
    CHECK(vkg_model_metadata(m, "producer") && !strcmp(vkg_model_metadata(m, "producer"), "tests/test_session.c"),
          "metadata");
    CHECK(vkg_model_input_count(m) == 1 && vkg_model_output_count(m) == 2, "io counts");
    vkg_tensor_info ti;
    OK(vkg_model_input(m, 0, &ti));
    CHECK(!strcmp(ti.name, "x") && ti.dims[0] == -1 && ti.sym[0] && !strcmp(ti.sym[0], "batch"), "symbolic input");
    for (uint32_t batch = 1; batch <= 3; batch++)
        if (run_block(m, &p, batch, batch == 2)) return 1;
    vkg_model_destroy(m);

    /* The same bytes through a file. */
    char path[] = "/tmp/vkg_block_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0 && write(fd, bytes, size) == (ssize_t)size, "temp file");
    close(fd);
    OK(vkg_model_load(ctx, path, &m));
    if (run_block(m, &p, 5, 0)) return 1;

    /* Misuse gets messages naming what is wrong. */
    vkg_session *s = NULL;
    vkg_status st = vkg_session_create(m, NULL, &s);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "\"batch\""), "unbound symbol: %s", vkg_last_error());
    vkg_dim_binding wrong = {"tokens", 2};
    vkg_session_desc sd = {.dims = &wrong, .n_dims = 1};
    st = vkg_session_create(m, &sd, &s);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "\"tokens\""), "unknown symbol: %s", vkg_last_error());
    vkg_dim_binding b = {"batch", 2};
    sd = (vkg_session_desc){.dims = &b, .n_dims = 1};
    OK(vkg_session_create(m, &sd, &s));
    float tmp[4];
    st = vkg_session_set_input(s, "x", tmp, sizeof tmp);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "holds 192 bytes"), "wrong size: %s", vkg_last_error());
    st = vkg_session_set_input(s, "y", tmp, sizeof tmp);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "no graph input named \"y\""), "unknown input: %s",
          vkg_last_error());
    st = vkg_session_get_output(s, "ln", tmp, sizeof tmp);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT, "intermediates are not outputs");
    vkg_session_destroy(s);
    vkg_model_destroy(m);
    unlink(path);
    st = vkg_model_load(ctx, "/nonexistent/model.vkg", &m);
    CHECK(st == VKG_ERROR_IO && strstr(vkg_last_error(), "/nonexistent/model.vkg"), "missing file: %s", vkg_last_error());
    free(bytes);
    return h_finish(ctx, "block");
}

/* A chain of n same-sized ops needs two buffers' worth of activations, not n-1. */
static int test_planning(void)
{
    vkg_context *ctx = h_context();
    vkg_writer *w;
    OK(vkg_writer_create(&w));
    vkg_writer_tensor xt = {.name = "x", .role = VKG_ROLE_INPUT, .rank = 2, .dims = {3, 1000}};
    uint32_t prev, ids[8];
    OK(vkg_writer_add_tensor(w, &xt, &prev));
    OK(vkg_writer_add_input(w, prev));
    uint32_t first = prev;
    for (int i = 0; i < 7; i++) {
        char name[16], node[16];
        snprintf(name, sizeof name, "t%d", i);
        snprintf(node, sizeof node, "n%d", i);
        vkg_writer_tensor t = {.name = name, .role = i == 6 ? VKG_ROLE_OUTPUT : VKG_ROLE_INTERMEDIATE, .rank = 2,
                               .dims = {3, 1000}};
        OK(vkg_writer_add_tensor(w, &t, &ids[i]));
        uint32_t in[2] = {prev, first};
        /* Every other node also reads the input: it stays alive in its own buffer throughout. */
        OK(vkg_writer_add_node(w, i % 2 ? "relu" : "add", node, in, i % 2 ? 1 : 2, &ids[i], 1, NULL, 0));
        prev = ids[i];
    }
    OK(vkg_writer_add_output(w, prev));
    void *bytes;
    size_t size;
    OK(vkg_writer_to_memory(w, &bytes, &size));
    vkg_writer_destroy(w);
    vkg_model *m;
    OK(vkg_model_load_memory(ctx, bytes, size, &m));
    vkg_session *s;
    OK(vkg_session_create(m, NULL, &s));
    CHECK(vkg_session_unshared_bytes(s) == 6 * 12000, "6 intermediates of 12000 bytes: %llu",
          (unsigned long long)vkg_session_unshared_bytes(s));
    CHECK(vkg_session_planned_bytes(s) <= 2 * 12032, "planned %llu bytes: two live at a time",
          (unsigned long long)vkg_session_planned_bytes(s));
    float *x = malloc(12000), *got = malloc(12000), *want = malloc(12000);
    h_fill(x, 3000, 77, -1, 1);
    for (int i = 0; i < 3000; i++) { /* t0 = x + x, t1 = relu, t2 = t1 + x, ... */
        float v = x[i];
        for (int k = 0; k < 7; k++) v = k % 2 ? (v > 0 ? v : 0) : v + x[i];
        want[i] = v;
    }
    OK(vkg_session_set_input(s, "x", x, 12000));
    OK(vkg_session_run(s));
    OK(vkg_session_get_output(s, "t6", got, 12000));
    h_compare("chain through the shared arena", got, want, NULL, 3000, 0, 0);
    free(x);
    free(got);
    free(want);
    free(bytes);
    vkg_session_destroy(s);
    vkg_model_destroy(m);
    return h_finish(ctx, "planning");
}


/* ---- the q / packed qkv projection fused into the attention (fuse_attention_proj) ---- */

typedef struct ap_case {
    uint32_t batch, heads, tq, tk, d, k; /* tk: cross-attention keys (0: packed self-attention) */
    int f16, bias;
    int residual; /* the linear also adds a residual: must stay two dispatches */
    float scale;  /* 0: 1/sqrt(d) */
} ap_case;

/* x (batch, tq, k) -> linear (W (N, k) [+ bias] [+ x residual when N = k]) -> attention; packed:
 * N = 3 heads d; cross: N = heads d, k and v column windows 1 and heads d + 2 of an input kv
 * (batch, tk, 2 heads d + 3). Runs the session with the fusion off and on. */
static int run_attn_proj(vkg_context *ctx, ap_case c, uint32_t seed)
{
    bool packed = c.tk == 0;
    uint32_t hd = c.heads * c.d, N = (packed ? 3 : 1) * hd, tk = packed ? c.tq : c.tk, kw = 2 * hd + 3;
    size_t nw = (size_t)N * c.k, nx = (size_t)c.batch * c.tq * c.k, nkv = (size_t)c.batch * tk * kw;
    size_t nq = (size_t)c.batch * c.tq * N, no = (size_t)c.batch * c.tq * hd;
    float *w = malloc(nw * 4), *b = malloc(N * 4), *x = malloc(nx * 4), *kv = malloc(nkv * 4 + 4);
    float *q = malloc(nq * 4), *want = malloc(no * 4), *got[3];
    uint16_t *wh = malloc(nw * 2);
    h_fill(w, nw, seed, -0.5f, 0.5f);
    h_fill(b, N, seed + 1, -0.2f, 0.2f);
    h_fill(x, nx, seed + 2, -1.0f, 1.0f);
    h_fill(kv, nkv, seed + 3, -1.0f, 1.0f);
    if (c.f16)
        for (size_t i = 0; i < nw; i++) w[i] = ref_f16_to_f32(wh[i] = ref_f32_to_f16(w[i]));

    vkg_writer *wr;
    if (vkg_writer_create(&wr) != VKG_SUCCESS) exit(1);
    vkg_writer_tensor xt = {.name = "x", .role = VKG_ROLE_INPUT, .rank = 3, .dims = {-1, c.tq, c.k}, .sym = {"batch"}};
    vkg_writer_tensor kt = {.name = "kv", .role = VKG_ROLE_INPUT, .rank = 3, .dims = {-1, tk, kw}, .sym = {"batch"}};
    uint32_t xi, ki = 0, in[5] = {0, 0, VKG_NO_TENSOR, VKG_NO_TENSOR, VKG_NO_TENSOR}, qi, oi;
    vkg_writer_add_tensor(wr, &xt, &xi);
    if (!packed) vkg_writer_add_tensor(wr, &kt, &ki);
    int64_t dw[2] = {N, c.k}, db[1] = {N};
    in[0] = xi;
    in[1] = add_const(wr, "proj.weight", c.f16 ? VKG_DTYPE_F16 : VKG_DTYPE_F32, 2, dw, c.f16 ? (void *)wh : (void *)w);
    if (c.bias) in[2] = add_const(wr, "proj.bias", VKG_DTYPE_F32, 1, db, b);
    if (c.residual) in[4] = xi;
    qi = add_act(wr, "q", VKG_ROLE_INTERMEDIATE, 3, N);
    oi = add_act(wr, "out", VKG_ROLE_OUTPUT, 3, hd);
    vkg_writer_add_node(wr, "linear", "proj", in, 5, &qi, 1, NULL, 0);
    vkg_writer_attr at[4] = {{.name = "heads", .type = VKG_ATTR_INT, .i = c.heads}};
    uint32_t na = 1;
    if (packed) at[na++] = (vkg_writer_attr){.name = "packed", .type = VKG_ATTR_INT, .i = 1};
    else {
        at[na++] = (vkg_writer_attr){.name = "k_col", .type = VKG_ATTR_INT, .i = 1};
        at[na++] = (vkg_writer_attr){.name = "v_col", .type = VKG_ATTR_INT, .i = hd + 2};
    }
    if (c.scale != 0.0f) at[na++] = (vkg_writer_attr){.name = "scale", .type = VKG_ATTR_FLOAT, .f = c.scale};
    uint32_t ain[3] = {qi, ki, ki};
    vkg_writer_add_node(wr, "attention", "att", ain, packed ? 1 : 3, &oi, 1, at, na);
    vkg_writer_add_input(wr, xi);
    if (!packed) vkg_writer_add_input(wr, ki);
    vkg_writer_add_output(wr, oi);
    void *bytes = NULL;
    size_t size = 0;
    if (vkg_writer_to_memory(wr, &bytes, &size) != VKG_SUCCESS) exit(1);
    vkg_writer_destroy(wr);
    vkg_model *m;
    OK(vkg_model_load_memory(ctx, bytes, size, &m));

    /* CPU: the linear, then the attention on its output. */
    ref_matmul(x, w, c.bias ? b : NULL, q, NULL, 1, c.batch * c.tq, N, c.k, 1, 0);
    if (c.residual)
        for (size_t i = 0; i < nq; i++) q[i] += x[i];
    double scale = c.scale != 0.0f ? (double)c.scale : 1.0 / sqrt((double)c.d);
    if (packed)
        ref_attention(q, q, q, NULL, 0, NULL, want, NULL, c.batch, c.heads, c.tq, tk, c.d, N, N, 0, hd, 2 * hd, scale);
    else
        ref_attention(q, kv, kv, NULL, 0, NULL, want, NULL, c.batch, c.heads, c.tq, tk, c.d, hd, kw, 0, 1, hd + 2, scale);

    char what[160];
    snprintf(what, sizeof what, "attention + projection %s b=%u h=%u tq=%u tk=%u d=%u k=%u %s%s%s", packed ? "packed" : "cross",
             c.batch, c.heads, c.tq, tk, c.d, c.k, c.f16 ? "f16" : "f32", c.bias ? " bias" : "", c.residual ? " residual" : "");
    uint32_t count[2];
    vkg_dim_binding bd = {"batch", c.batch};
    vkg_session_desc sd = {.dims = &bd, .n_dims = 1};
    for (int fused = 0; fused < 2; fused++) {
        setenv("VKG_ATTENTION_FUSED_PROJ", fused ? "1" : "0", 1);
        vkg_session *s;
        OK(vkg_session_create(m, &sd, &s));
        count[fused] = vkg_session_dispatch_count(s);
        OK(vkg_session_set_input(s, "x", x, nx * 4));
        if (!packed) OK(vkg_session_set_input(s, "kv", kv, nkv * 4));
        got[fused] = malloc(no * 4);
        got[2] = malloc(no * 4);
        OK(vkg_session_run(s));
        OK(vkg_session_get_output(s, "out", got[fused], no * 4));
        OK(vkg_session_run(s));
        OK(vkg_session_get_output(s, "out", got[2], no * 4));
        CHECK(memcmp(got[2], got[fused], no * 4) == 0, "%s: fused=%d rerun is bit-identical", what, fused);
        free(got[2]);
        vkg_session_destroy(s);
        /* fp32 with |x|, |w| <= 1: q is off by ~k ulp of sum |x w| <= k / 2, which the softmax turns
         * into a relative error of the same order in the output; 2e-6 + 2e-5 |y| covers k <= 64. */
        char w2[200];
        snprintf(w2, sizeof w2, "%s, fused=%d vs CPU", what, fused);
        if (h_compare(w2, got[fused], want, NULL, no, 2e-6, 2e-5)) return 1;
    }
    unsetenv("VKG_ATTENTION_FUSED_PROJ");
    if (c.residual) CHECK(count[1] == count[0], "%s: a linear with a residual is not fused (%u, %u dispatches)", what,
                          count[0], count[1]);
    else CHECK(count[1] + 1 == count[0], "%s: fused, one dispatch fewer (%u then %u)", what, count[0], count[1]);
    /* Fused and unfused sum the projection in different orders: close, not bitwise. */
    if (h_compare(what, got[1], got[0], NULL, no, 2e-6, 2e-5)) return 1;
    vkg_model_destroy(m);
    free(bytes);
    free(got[0]);
    free(got[1]);
    free(w);
    free(wh);
    free(b);
    free(x);
    free(kv);
    free(q);
    free(want);
    return 0;
}

static int test_attn_proj(void)
{
    vkg_context *ctx = h_context();
    static const ap_case cases[] = {
        /* batch heads tq tk d k f16 bias residual scale */
        {1, 1, 1, 0, 7, 5, 0, 1, 0, 0},     {2, 8, 31, 0, 12, 20, 1, 0, 0, 0},   {3, 3, 9, 0, 20, 33, 0, 1, 0, 0.3f},
        {1, 8, 1, 65, 32, 24, 1, 1, 0, 0},  {2, 1, 31, 7, 12, 17, 0, 0, 0, 0},   {2, 8, 13, 65, 20, 40, 0, 1, 0, 0},
        {1, 8, 31, 65, 32, 64, 1, 1, 0, 0}, {2, 2, 5, 0, 8, 48, 0, 1, 1, 0}, /* residual: N = 3 * 16 = k */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (run_attn_proj(ctx, cases[i], 900 + 10 * (uint32_t)i)) return 1;
    return h_finish(ctx, "attn_proj");
}

int main(int argc, char **argv)
{
    const char *t = argc > 1 ? argv[1] : "";
    if (!strcmp(t, "block")) return test_block();
    if (!strcmp(t, "planning")) return test_planning();
    if (!strcmp(t, "attn_proj")) return test_attn_proj();
    fprintf(stderr, "usage: test_session block|planning|attn_proj\n");
    return 2;
}
