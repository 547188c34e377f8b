/* The dense-head ops: resize_bilinear, adaptive_avg_pool2d, batchnorm, argmax (their kernels against
 * tests/ref_dense.c), and concat, permute (through the graph, on the strided copy). Ragged shapes,
 * size 1 in and out, both align_corners modes, non-integer scales, empty tensors, batch > 1, argmax
 * ties and NaN, windows split to fit a binding limit; each case runs twice and must repeat bit for
 * bit. `test_dense resize|pool|batchnorm|argmax|concat|permute|graph|invalid|fault
 * [--variant texel|storage] [--inject-fault]`; ctest runs one op per process. */
#include <float.h>

#include "harness.h"
#include "ref_dense.h"
#include "runtime/kernels/dense.h"

static vkg_dense_read g_read = VKG_DENSE_AUTO;

static const char *read_name(void) { return g_read == VKG_DENSE_TEXEL ? "texel" : g_read == VKG_DENSE_STORAGE ? "storage" : "auto"; }

/* Submits the recorded command again: the output must repeat bit for bit. */
static void check_repeat(vkg_cmd *cmd, vkg_buf *y, VkDeviceSize off, size_t bytes, const char *what)
{
    void *a = malloc(bytes + 4), *b = malloc(bytes + 4);
    vkg_status s = vkg_buf_download(y, off, a, bytes);
    if (s == VKG_SUCCESS) s = vkg_cmd_submit_wait(cmd);
    if (s == VKG_SUCCESS) s = vkg_buf_download(y, off, b, bytes);
    CHECK(s == VKG_SUCCESS, "%s: resubmit: %s", what, vkg_last_error());
    CHECK(s != VKG_SUCCESS || !bytes || memcmp(a, b, bytes) == 0, "%s: second run differs from the first", what);
    free(a);
    free(b);
}

/* Exact comparison of i32 outputs; with --inject-fault, one element is off by one and must be caught. */
static int compare_i32(const char *what, int32_t *got, const int32_t *want, size_t n)
{
    if (h_inject_fault && n) got[n / 2] += 1;
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i] && !bad++) first = i;
    h_checks++;
    if (h_inject_fault && n) {
        if (bad) {
            printf("ok   %s: injected fault detected\n", what);
            return 0;
        }
        h_failures++;
        fprintf(stderr, "FAIL %s: injected fault NOT detected\n", what);
        return 1;
    }
    if (bad) {
        h_failures++;
        fprintf(stderr, "FAIL %s: %zu of %zu differ; first [%zu] got %d want %d\n", what, bad, n, first, got[first],
                want[first]);
        return 1;
    }
    printf("ok   %s (n=%zu, exact)\n", what, n);
    return 0;
}

/* A buffer of `bytes` at a 256-byte offset into a larger one, so no window starts at 0; pre-filled. */
static vkg_buf *upload_at(vkg_context *ctx, const void *data, size_t bytes, VkDeviceSize off)
{
    vkg_buf *b = NULL;
    if (vkg_buf_create(ctx, off + bytes + 4, &b) != VKG_SUCCESS || (bytes && vkg_buf_upload(b, off, data, bytes) != VKG_SUCCESS)) {
        fprintf(stderr, "FAIL: upload of %zu bytes: %s\n", bytes, vkg_last_error());
        exit(1);
    }
    return b;
}

static float *nan_filled(size_t n)
{
    float *p = malloc(n * 4 + 4);
    for (size_t i = 0; i < n; i++) p[i] = NAN; /* every output must be written */
    return p;
}

enum { OFF = 256 };

/* ---- resize_bilinear and pool_area ---- */

typedef struct rs_case {
    uint64_t planes;
    uint32_t h, w, ho, wo; /* ho = wo = 0: from the scales */
    int ac;
    double sh, sw;
    uint64_t max_window;
} rs_case;

static int run_resample(vkg_context *ctx, int area, rs_case c, uint32_t seed)
{
    if (!c.ho) c.ho = (uint32_t)floor(c.h * c.sh), c.wo = (uint32_t)floor(c.w * c.sw);
    size_t nx = (size_t)(c.planes * c.h * c.w), ny = (size_t)(c.planes * c.ho * c.wo);
    float *x = malloc(nx * 4 + 4), *want = malloc(ny * 4 + 4), *nan = nan_filled(ny);
    double *bound = malloc(ny * sizeof(double) + 8);
    uint32_t *count = malloc(ny * 4 + 4);
    h_fill(x, nx, seed, -2.0f, 2.0f);
    if (area) {
        ref_pool_area(x, want, bound, count, c.planes, c.h, c.w, c.ho, c.wo);
        /* a sequential fp32 sum of k terms, then two divisions */
        for (size_t i = 0; i < ny; i++) bound[i] *= (count[i] + 2) * (double)FLT_EPSILON;
    } else {
        ref_resize_bilinear(x, want, bound, c.planes, c.h, c.w, c.ho, c.wo, c.ac, c.sh, c.sw);
        /* weights bit-equal to ATen's; two products and a sum per level, two levels */
        for (size_t i = 0; i < ny; i++) bound[i] *= 4.0 * FLT_EPSILON;
    }
    vkg_buf *bx = upload_at(ctx, x, nx * 4, OFF), *by = upload_at(ctx, nan, ny * 4, OFF);
    vkg_resize_args a = {.x = {bx, OFF}, .y = {by, OFF}, .planes = c.planes, .h = c.h, .w = c.w, .ho = c.ho,
                         .wo = c.wo, .align_corners = c.ac, .scale_h = c.sh, .scale_w = c.sw, .read = g_read,
                         .max_window = c.max_window};
    vkg_cmd *cmd;
    OK(vkg_cmd_begin(ctx, false, &cmd));
    OK(area ? vkg_pool_area(cmd, &a) : vkg_resize_bilinear(cmd, &a));
    uint32_t nd = vkg_cmd_dispatch_count(cmd);
    OK(vkg_cmd_submit_wait(cmd));
    float *got = malloc(ny * 4 + 4);
    OK(vkg_buf_download(by, OFF, got, ny * 4));
    char what[200];
    snprintf(what, sizeof what, "%s %s planes=%llu %ux%u -> %ux%u%s scale=(%g, %g)%s (%u dispatch%s)",
             area ? "pool_area" : "resize_bilinear", read_name(), (unsigned long long)c.planes, c.h, c.w, c.ho, c.wo,
             area ? "" : c.ac ? " align_corners" : "", c.sh, c.sw, c.max_window ? " split" : "", nd, nd == 1 ? "" : "es");
    if (!area && c.h == c.ho && c.w == c.wo && !h_inject_fault)
        CHECK(ny == 0 || memcmp(got, x, ny * 4) == 0, "%s: same size is not an exact copy", what);
    h_maybe_fault(got, ny);
    h_compare(what, got, want, bound, ny, 0.0, 0.0);
    check_repeat(cmd, by, OFF, ny * 4, what);
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(bx);
    vkg_buf_destroy(by);
    free(x), free(want), free(nan), free(bound), free(count), free(got);
    return 0;
}

static int test_resize(vkg_context *ctx)
{
    static const rs_case cases[] = {
        {1, 1, 1, 5, 5, 0, 0, 0, 0},        {1, 1, 1, 5, 5, 1, 0, 0, 0},       {2, 5, 5, 1, 1, 0, 0, 0, 0},
        {2, 5, 5, 1, 1, 1, 0, 0, 0},        {3, 37, 37, 0, 0, 0, 0.5, 0.5, 0}, {3, 37, 37, 0, 0, 1, 0.5, 0.5, 0},
        {2, 10, 13, 0, 0, 0, 1.7, 1.7, 0},  {2, 10, 13, 0, 0, 1, 1.7, 1.7, 0}, {6, 7, 9, 16, 20, 0, 0, 0, 0},
        {6, 7, 9, 16, 20, 1, 0, 0, 0},      {4, 31, 29, 8, 11, 0, 0, 0, 0},    {4, 31, 29, 8, 11, 1, 0, 0, 0},
        {3, 6, 7, 6, 7, 0, 0, 0, 0},        {3, 6, 7, 6, 7, 1, 0, 0, 0},       {2, 6, 7, 6, 13, 1, 0, 0, 0},
        {2, 9, 4, 3, 4, 0, 0, 0, 0},        {0, 4, 4, 8, 8, 0, 0, 0, 0},       {1, 37, 37, 0, 0, 0, 4.0, 4.0, 0},
        {2, 16, 16, 0, 0, 1, 2.0, 2.0, 0},  {2, 20, 20, 0, 0, 0, 0.3, 0.3, 0}, {1, 19, 19, 37, 37, 1, 0, 0, 0},
        {1, 1, 7, 5, 1, 0, 0, 0, 0},        {2, 10, 10, 0, 0, 0, 1.05, 1.05, 0}, {2, 3, 11, 0, 0, 0, 2.5, 0.75, 0},
        {7, 10, 12, 17, 22, 0, 0, 0, 2048}, {5, 9, 9, 4, 4, 1, 0, 0, 512},
    };
    for (size_t i = 0; i < VKG_ARRAY_LEN(cases); i++)
        if (run_resample(ctx, 0, cases[i], 700 + (uint32_t)i)) return 1;
    if (h_inject_fault) return 0;
    /* Same size copies inf and NaN as they are (ATen's 0-weight taps would make NaN of an inf). */
    float x[6] = {1.0f, INFINITY, -INFINITY, NAN, -0.0f, 3.0f}, got[6];
    vkg_buf *bx = h_upload(ctx, x, sizeof x), *by = h_upload(ctx, x, sizeof x);
    vkg_cmd *cmd;
    OK(vkg_cmd_begin(ctx, false, &cmd));
    vkg_resize_args a = {.x = {bx, 0}, .y = {by, 0}, .planes = 1, .h = 2, .w = 3, .ho = 2, .wo = 3, .read = g_read};
    OK(vkg_buf_upload(by, 0, (float[6]){0}, sizeof got));
    OK(vkg_resize_bilinear(cmd, &a));
    OK(vkg_cmd_submit_wait(cmd));
    OK(vkg_buf_download(by, 0, got, sizeof got));
    CHECK(memcmp(got, x, sizeof x) == 0, "same-size resize of inf/NaN/-0 is not a bit copy");
    /* One plane over the window limit is refused with a message, nothing recorded. */
    a.h = a.w = 64, a.ho = a.wo = 2, a.max_window = 1024;
    vkg_buf_destroy(bx);
    OK(vkg_buf_create(ctx, 64 * 64 * 4, &bx));
    a.x.buf = bx;
    vkg_status s = vkg_resize_bilinear(cmd, &a);
    CHECK(s == VKG_ERROR_UNSUPPORTED && strstr(vkg_last_error(), "one unit of x (one input plane) (16384 bytes) exceeds"),
          "oversized plane: %s: %s", vkg_status_name(s), vkg_last_error());
    a.max_window = 0, a.y.offset = 12;
    s = vkg_resize_bilinear(cmd, &a);
    CHECK(s == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "y needs 16 bytes at offset 12"),
          "y out of range: %s: %s", vkg_status_name(s), vkg_last_error());
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(bx);
    vkg_buf_destroy(by);
    return 0;
}

static int test_pool(vkg_context *ctx)
{
    static const rs_case cases[] = {
        {1, 37, 37, 18, 18, 0, 0, 0, 0}, {2, 5, 5, 1, 1, 0, 0, 0, 0},  {2, 1, 1, 5, 5, 0, 0, 0, 0},
        {3, 7, 9, 4, 4, 0, 0, 0, 0},     {2, 16, 16, 8, 8, 0, 0, 0, 0}, {1, 148, 148, 74, 74, 0, 0, 0, 0},
        {0, 4, 4, 2, 2, 0, 0, 0, 0},     {5, 13, 11, 3, 7, 0, 0, 0, 0}, {2, 6, 6, 6, 6, 0, 0, 0, 0},
        {1, 1, 9, 1, 4, 0, 0, 0, 0},     {3, 5, 7, 9, 11, 0, 0, 0, 0}, {6, 10, 12, 4, 5, 0, 0, 0, 1024},
    };
    for (size_t i = 0; i < VKG_ARRAY_LEN(cases); i++)
        if (run_resample(ctx, 1, cases[i], 800 + (uint32_t)i)) return 1;
    return 0;
}

/* ---- batchnorm ---- */

typedef struct bn_case {
    uint64_t outer;
    uint32_t c;
    uint64_t inner;
    int w, b;
    float eps;
    uint64_t max_window;
} bn_case;

static int run_batchnorm(vkg_context *ctx, bn_case c, uint32_t seed)
{
    size_t n = (size_t)(c.outer * c.c * c.inner);
    float *x = malloc(n * 4 + 4), *want = malloc(n * 4 + 4), *nan = nan_filled(n);
    float *p = malloc(4 * (size_t)c.c * 4 + 16); /* mean, var, weight, bias */
    double *bound = malloc(n * sizeof(double) + 8);
    h_fill(x, n, seed, -3.0f, 3.0f);
    h_fill(p, c.c, seed + 1, -1.0f, 1.0f);
    h_fill(p + c.c, c.c, seed + 2, 0.0f, 2.0f);
    h_fill(p + 2 * c.c, 2 * c.c, seed + 3, -1.5f, 1.5f);
    if (c.c && c.eps > 0.0f) p[c.c] = 0.0f; /* a zero variance: eps alone */
    const float *mean = p, *var = p + c.c, *w = c.w ? p + 2 * c.c : NULL, *b = c.b ? p + 3 * c.c : NULL;
    ref_batchnorm(x, mean, var, w, b, want, bound, c.outer, c.c, c.inner, c.eps);
    /* alpha, beta in fp32 with the device's sqrt and division (a few ulp each), then x alpha + beta */
    for (size_t i = 0; i < n; i++) bound[i] *= 8.0 * FLT_EPSILON;
    vkg_buf *bx = upload_at(ctx, x, n * 4, OFF), *by = upload_at(ctx, nan, n * 4, OFF);
    vkg_buf *bp = h_upload(ctx, p, 4 * (size_t)c.c * 4);
    VkDeviceSize cb = (VkDeviceSize)c.c * 4;
    /* Each vector at a 64-byte aligned offset of one buffer, as constants are laid out. */
    vkg_buf *bq = NULL;
    OK(vkg_buf_create(ctx, 4 * ((cb + 63) / 64 * 64) + 64, &bq));
    VkDeviceSize st = (cb + 63) / 64 * 64;
    for (int i = 0; i < 4; i++) OK(vkg_buf_upload(bq, i * st, p + (size_t)i * c.c, cb));
    vkg_batchnorm_args a = {.x = {bx, OFF}, .mean = {bq, 0}, .var = {bq, st}, .weight = {c.w ? bq : NULL, 2 * st},
                            .bias = {c.b ? bq : NULL, 3 * st}, .y = {by, OFF}, .outer = c.outer, .channels = c.c,
                            .inner = c.inner, .eps = c.eps, .read = g_read, .max_window = c.max_window};
    vkg_cmd *cmd;
    OK(vkg_cmd_begin(ctx, false, &cmd));
    OK(vkg_batchnorm(cmd, &a));
    uint32_t nd = vkg_cmd_dispatch_count(cmd);
    OK(vkg_cmd_submit_wait(cmd));
    float *got = malloc(n * 4 + 4);
    OK(vkg_buf_download(by, OFF, got, n * 4));
    char what[160];
    snprintf(what, sizeof what, "batchnorm %s (%llu, %u, %llu) weight=%d bias=%d eps=%g (%u dispatch%s)", read_name(),
             (unsigned long long)c.outer, c.c, (unsigned long long)c.inner, c.w, c.b, (double)c.eps, nd,
             nd == 1 ? "" : "es");
    h_maybe_fault(got, n);
    h_compare(what, got, want, bound, n, 0.0, 0.0);
    check_repeat(cmd, by, OFF, n * 4, what);
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(bx), vkg_buf_destroy(by), vkg_buf_destroy(bp), vkg_buf_destroy(bq);
    free(x), free(want), free(nan), free(p), free(bound), free(got);
    return 0;
}

static int test_batchnorm(vkg_context *ctx)
{
    static const bn_case cases[] = {
        {1, 1, 1, 1, 1, 1e-5f, 0},        {2, 3, 35, 1, 1, 1e-5f, 0},  {3, 16, 1, 1, 1, 1e-5f, 0},
        {1, 150, 37 * 37, 1, 1, 1e-5f, 0}, {0, 4, 9, 1, 1, 1e-5f, 0},  {2, 0, 4, 1, 1, 1e-5f, 0},
        {4, 7, 3, 1, 0, 1e-3f, 0},        {4, 7, 3, 0, 1, 0.0f, 0},    {5, 7, 13, 0, 0, 0.1f, 0},
        {2, 5, 1000, 1, 1, 1e-5f, 1024},  {1, 1536, 17, 1, 1, 1e-5f, 0}, {3, 2, 257, 1, 1, 1e-5f, 300},
    };
    for (size_t i = 0; i < VKG_ARRAY_LEN(cases); i++)
        if (run_batchnorm(ctx, cases[i], 900 + (uint32_t)i)) return 1;
    return 0;
}

/* ---- argmax ---- */

typedef struct am_case {
    uint64_t outer;
    uint32_t k;
    uint64_t inner;
    int special; /* 1: quantized values (ties), NaNs, -inf, signed zeros, denormals */
    uint64_t max_window;
} am_case;

static int run_argmax(vkg_context *ctx, am_case c, uint32_t seed)
{
    size_t nx = (size_t)(c.outer * c.k * c.inner), ny = (size_t)(c.outer * c.inner);
    float *x = malloc(nx * 4 + 4);
    int32_t *want = malloc(ny * 4 + 4), *got = malloc(ny * 4 + 4), *init = malloc(ny * 4 + 4);
    h_fill(x, nx, seed, -4.0f, 4.0f);
    if (c.special) {
        for (size_t i = 0; i < nx; i++) {
            x[i] = floorf(x[i] * 2.0f) / 2.0f; /* 16 levels: many ties */
            uint32_t r = (uint32_t)(i * 2654435761u >> 7) % 97;
            if (r == 0) x[i] = NAN;
            else if (r == 1) x[i] = -INFINITY;
            else if (r == 2) x[i] = -0.0f;
            else if (r == 3) x[i] = 1e-40f; /* denormal: larger than both zeros */
            else if (r == 4) x[i] = -1e-40f;
        }
        /* every slot of the first output column tied at -0 / +0 / denormal, and one all -inf column */
        for (uint32_t kk = 0; kk < c.k && c.outer; kk++) {
            x[(size_t)kk * c.inner] = kk % 2 ? 0.0f : -0.0f;
            if (c.inner > 1) x[(size_t)kk * c.inner + 1] = -INFINITY;
        }
        if (c.k > 2 && c.outer) x[2 * c.inner] = 1e-40f;
    }
    ref_argmax(x, want, c.outer, c.k, c.inner);
    for (size_t i = 0; i < ny; i++) init[i] = -7;
    vkg_buf *bx = upload_at(ctx, x, nx * 4, OFF), *by = upload_at(ctx, init, ny * 4, OFF);
    vkg_argmax_args a = {.x = {bx, OFF}, .y = {by, OFF}, .outer = c.outer, .k = c.k, .inner = c.inner, .read = g_read,
                         .max_window = c.max_window};
    vkg_cmd *cmd;
    OK(vkg_cmd_begin(ctx, false, &cmd));
    OK(vkg_argmax(cmd, &a));
    uint32_t nd = vkg_cmd_dispatch_count(cmd);
    OK(vkg_cmd_submit_wait(cmd));
    OK(vkg_buf_download(by, OFF, got, ny * 4));
    char what[160];
    snprintf(what, sizeof what, "argmax %s (%llu, %u, %llu)%s (%u dispatch%s)", read_name(), (unsigned long long)c.outer,
             c.k, (unsigned long long)c.inner, c.special ? " ties/NaN/-inf/zeros/denormals" : "", nd, nd == 1 ? "" : "es");
    compare_i32(what, got, want, ny);
    check_repeat(cmd, by, OFF, ny * 4, what);
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(bx), vkg_buf_destroy(by);
    free(x), free(want), free(got), free(init);
    return 0;
}

static int test_argmax(vkg_context *ctx)
{
    static const am_case cases[] = {
        {1, 1, 1, 0, 0},  {2, 5, 7, 0, 0},   {1, 150, 37 * 37, 0, 0}, {3, 4, 1, 1, 0},  {0, 3, 4, 0, 0},
        {5, 17, 13, 1, 0}, {2, 3, 0, 0, 0},  {1, 150, 37 * 37, 1, 0}, {6, 9, 31, 1, 2048}, {4, 2, 3, 1, 0},
    };
    for (size_t i = 0; i < VKG_ARRAY_LEN(cases); i++)
        if (run_argmax(ctx, cases[i], 1000 + (uint32_t)i)) return 1;
    return 0;
}

/* ---- graphs: one node (or a chain) through the loader and a session ---- */

typedef struct g_tensor {
    const char *name;
    uint32_t rank;
    int64_t dims[8];
    vkg_dtype dtype;
} g_tensor;

static size_t numel(const g_tensor *t)
{
    size_t n = 1;
    for (uint32_t i = 0; i < t->rank; i++) n *= (size_t)t->dims[i];
    return n;
}

/* Builds a graph of one node `op` over graph inputs `ins` with output `out`, loads it and returns
 * the status; with data, runs a session on it twice and compares the output with want (exactly,
 * or within bound). */
static vkg_status one_node(vkg_context *ctx, const char *op, const g_tensor *ins, uint32_t nin, const g_tensor *out,
                           const vkg_writer_attr *attrs, uint32_t nattr, float *const *data, const void *want,
                           const double *bound, const char *what)
{
    vkg_writer *w;
    vkg_status st = vkg_writer_create(&w);
    if (st) return st;
    uint32_t ids[9];
    for (uint32_t i = 0; i <= nin; i++) {
        const g_tensor *t = i < nin ? &ins[i] : out;
        vkg_writer_tensor wt = {.name = t->name, .dtype = t->dtype, .role = i < nin ? VKG_ROLE_INPUT : VKG_ROLE_OUTPUT,
                                .rank = t->rank};
        memcpy(wt.dims, t->dims, sizeof t->dims);
        if (!st) st = vkg_writer_add_tensor(w, &wt, &ids[i]);
        if (!st && i < nin) st = vkg_writer_add_input(w, ids[i]);
    }
    if (!st) st = vkg_writer_add_node(w, op, "node", ids, nin, &ids[nin], 1, attrs, nattr);
    if (!st) st = vkg_writer_add_output(w, ids[nin]);
    void *bytes = NULL;
    size_t size = 0;
    if (!st) st = vkg_writer_to_memory(w, &bytes, &size);
    vkg_writer_destroy(w);
    vkg_model *m = NULL;
    if (!st) st = vkg_model_load_memory(ctx, bytes, size, &m);
    free(bytes);
    if (st || !data) {
        vkg_model_destroy(m);
        return st;
    }
    vkg_session *s = NULL;
    st = vkg_session_create(m, NULL, &s);
    for (uint32_t i = 0; !st && i < nin; i++) st = vkg_session_set_input(s, ins[i].name, data[i], numel(&ins[i]) * 4);
    size_t n = numel(out);
    float *got = malloc(n * 4 + 4), *again = malloc(n * 4 + 4);
    if (!st) st = vkg_session_run(s);
    if (!st) st = vkg_session_get_output(s, out->name, got, n * 4);
    if (!st) st = vkg_session_run(s);
    if (!st) st = vkg_session_get_output(s, out->name, again, n * 4);
    if (!st) {
        CHECK(n == 0 || memcmp(got, again, n * 4) == 0, "%s: second run differs from the first", what);
        if (out->dtype == VKG_DTYPE_I32) compare_i32(what, (int32_t *)got, want, n);
        else {
            h_maybe_fault(got, n);
            h_compare(what, got, want, bound, n, 0.0, 0.0);
        }
    }
    free(got);
    free(again);
    vkg_session_destroy(s);
    vkg_model_destroy(m);
    return st;
}

static int test_concat(vkg_context *ctx)
{
    typedef struct { uint32_t rank, n; int64_t dims[8][6]; } cc; /* dims[i]: input i */
    static const cc cases[] = {
        {1, 2, {{3}, {5}}},
        {2, 3, {{2, 3}, {2, 4}, {2, 1}}},
        {3, 8, {{2, 3, 4}, {2, 3, 4}, {2, 3, 4}, {2, 3, 4}, {2, 3, 4}, {2, 3, 4}, {2, 3, 4}, {2, 3, 4}}},
        {4, 4, {{2, 384, 5, 7}, {2, 384, 5, 7}, {2, 384, 5, 7}, {2, 384, 5, 7}}},
        {4, 3, {{1, 3, 1, 1}, {1, 3, 1, 1}, {1, 3, 1, 1}}},
        {5, 2, {{2, 1, 3, 2, 5}, {2, 1, 3, 2, 5}}},
        {6, 3, {{1, 2, 3, 2, 1, 3}, {1, 2, 3, 2, 1, 3}, {1, 2, 3, 2, 1, 3}}},
        {3, 2, {{0, 3, 4}, {0, 3, 4}}},  /* batch 0 */
    };
    uint32_t seed = 1100;
    for (size_t ci = 0; ci < VKG_ARRAY_LEN(cases); ci++)
        for (uint32_t axis = 0; axis < cases[ci].rank; axis++) {
            const cc *c = &cases[ci];
            g_tensor ins[8] = {{0}}, out = {"y", c->rank, {0}, VKG_DTYPE_F32};
            static const char *names[8] = {"a", "b", "c", "d", "e", "f", "g", "h"};
            float *data[8];
            const float *cdata[8];
            uint64_t mids[8], outer = 1, inner = 1;
            for (uint32_t i = 0; i < c->n; i++) {
                ins[i] = (g_tensor){names[i], c->rank, {0}, VKG_DTYPE_F32};
                for (uint32_t d = 0; d < c->rank; d++) ins[i].dims[d] = c->dims[d == axis ? i : 0][d];
                /* the concatenated dim varies per input; with 3 or more inputs, input 1 is empty */
                if (i) ins[i].dims[axis] = i == 1 && c->n > 2 ? 0 : (c->dims[i][axis] + i) % 4 + 1;
                data[i] = malloc(numel(&ins[i]) * 4 + 4);
                cdata[i] = data[i];
                h_fill(data[i], numel(&ins[i]), seed++, -1.0f, 1.0f);
                mids[i] = (uint64_t)ins[i].dims[axis];
            }
            memcpy(out.dims, ins[0].dims, sizeof out.dims);
            out.dims[axis] = 0;
            for (uint32_t i = 0; i < c->n; i++) out.dims[axis] += ins[i].dims[axis];
            for (uint32_t d = 0; d < axis; d++) outer *= (uint64_t)out.dims[d];
            for (uint32_t d = axis + 1; d < c->rank; d++) inner *= (uint64_t)out.dims[d];
            float *want = malloc(numel(&out) * 4 + 4);
            ref_concat(cdata, mids, c->n, outer, inner, want);
            /* a negative axis on every other case */
            vkg_writer_attr at = {.name = "axis", .type = VKG_ATTR_INT, .i = (ci + axis) % 2 ? (int64_t)axis - c->rank : axis};
            char what[96];
            snprintf(what, sizeof what, "concat rank %u of %u inputs, axis %lld -> %zu elements", c->rank, c->n,
                     (long long)at.i, numel(&out));
            OK(one_node(ctx, "concat", ins, c->n, &out, &at, 1, data, want, NULL, what));
            for (uint32_t i = 0; i < c->n; i++) free(data[i]);
            free(want);
        }
    return 0;
}

static int test_permute(vkg_context *ctx)
{
    typedef struct { uint32_t rank; int64_t dims[8], perm[8]; } pc;
    static const pc cases[] = {
        {2, {7, 13}, {1, 0}},
        {2, {1, 5}, {1, 0}},
        {3, {2, 37 * 37, 24}, {0, 2, 1}},
        {4, {2, 5, 7, 24}, {0, 3, 1, 2}}, /* tokens (N, H, W, C) -> NCHW */
        {4, {2, 24, 5, 7}, {0, 2, 3, 1}}, /* and back */
        {4, {3, 1, 4, 1}, {3, 2, 1, 0}},
        {4, {2, 3, 4, 5}, {0, 1, 2, 3}},
        {5, {2, 3, 1, 4, 5}, {4, 2, 0, 3, 1}},
        {5, {3, 2, 2, 3, 2}, {1, 0, 3, 4, 2}},
        {6, {2, 3, 2, 1, 3, 2}, {5, 4, 3, 2, 1, 0}},
        {6, {2, 2, 3, 2, 2, 3}, {0, 2, 4, 1, 3, 5}},
        {8, {2, 1, 2, 3, 1, 2, 2, 1}, {7, 0, 6, 1, 5, 2, 4, 3}},
        {3, {0, 4, 3}, {2, 0, 1}},
        {3, {1, 1, 1}, {2, 1, 0}},
    };
    for (size_t ci = 0; ci < VKG_ARRAY_LEN(cases); ci++) {
        const pc *c = &cases[ci];
        g_tensor in = {"x", c->rank, {0}, VKG_DTYPE_F32}, out = {"y", c->rank, {0}, VKG_DTYPE_F32};
        for (uint32_t d = 0; d < c->rank; d++) in.dims[d] = c->dims[d], out.dims[d] = c->dims[c->perm[d]];
        size_t n = numel(&in);
        float *x = malloc(n * 4 + 4), *want = malloc(n * 4 + 4);
        h_fill(x, n, 1200 + (uint32_t)ci, -1.0f, 1.0f);
        ref_permute(x, want, c->dims, c->rank, c->perm);
        vkg_writer_attr at = {.name = "perm", .type = VKG_ATTR_INTS, .count = c->rank, .ints = c->perm};
        char what[96];
        int o = snprintf(what, sizeof what, "permute rank %u (", c->rank);
        for (uint32_t d = 0; d < c->rank; d++) o += snprintf(what + o, sizeof what - (size_t)o, "%s%lld", d ? "," : "", (long long)c->perm[d]);
        snprintf(what + o, sizeof what - (size_t)o, ") of %zu elements", n);
        OK(one_node(ctx, "permute", &in, 1, &out, &at, 1, &x, want, NULL, what));
        free(x);
        free(want);
    }
    return 0;
}

/* Each op once through the loader and a session (their graph recorders), on ragged shapes. */
static int test_graph(vkg_context *ctx)
{
    enum { N = 2, C = 3, H = 7, W = 9 };
    size_t n = N * C * H * W;
    float *x = malloc(n * 4), *want = malloc(4 * n * 4 * 4);
    double *bound = malloc(4 * n * 4 * sizeof(double));
    h_fill(x, n, 1300, -2.0f, 2.0f);
    g_tensor in = {"x", 4, {N, C, H, W}, VKG_DTYPE_F32};
    double sc[2] = {1.7, 0.5};
    int64_t sz[2] = {4, 5};
    vkg_writer_attr ra[2] = {{.name = "scale", .type = VKG_ATTR_FLOATS, .count = 2, .floats = sc},
                             {.name = "align_corners", .type = VKG_ATTR_INT, .i = 0}};
    g_tensor ro = {"y", 4, {N, C, 11, 4}, VKG_DTYPE_F32};
    ref_resize_bilinear(x, want, bound, N * C, H, W, 11, 4, 0, 1.7, 0.5);
    for (size_t i = 0; i < N * C * 44; i++) bound[i] *= 4.0 * FLT_EPSILON;
    OK(one_node(ctx, "resize_bilinear", &in, 1, &ro, ra, 2, &x, want, bound, "graph resize_bilinear scale (1.7, 0.5)"));
    vkg_writer_attr pa = {.name = "size", .type = VKG_ATTR_INTS, .count = 2, .ints = sz};
    g_tensor po = {"y", 4, {N, C, 4, 5}, VKG_DTYPE_F32};
    uint32_t *count = malloc(N * C * 20 * 4);
    ref_pool_area(x, want, bound, count, N * C, H, W, 4, 5);
    for (size_t i = 0; i < N * C * 20; i++) bound[i] *= (count[i] + 2) * (double)FLT_EPSILON;
    OK(one_node(ctx, "adaptive_avg_pool2d", &in, 1, &po, &pa, 1, &x, want, bound, "graph adaptive_avg_pool2d (4, 5)"));
    /* batchnorm with graph-input statistics and no weight */
    float stats[3 * C] = {0.5f, -0.25f, 1.0f, 0.5f, 2.0f, 0.0f, 0.1f, 0.2f, 0.3f};
    g_tensor bin[5] = {in, {"mean", 1, {C}, VKG_DTYPE_F32}, {"var", 1, {C}, VKG_DTYPE_F32}, {"bias", 1, {C}, VKG_DTYPE_F32}};
    float *bdata[4] = {x, stats, stats + C, stats + 2 * C};
    ref_batchnorm(x, stats, stats + C, NULL, stats + 2 * C, want, bound, N, C, H * W, 1e-5f);
    for (size_t i = 0; i < n; i++) bound[i] *= 8.0 * FLT_EPSILON;
    vkg_writer_attr eps = {.name = "eps", .type = VKG_ATTR_FLOAT, .f = 1e-5};
    /* inputs x, mean, var, (no weight), bias: written through the raw writer with an absent slot */
    vkg_writer *w;
    OK(vkg_writer_create(&w));
    uint32_t ids[5], y;
    for (int i = 0; i < 4; i++) {
        vkg_writer_tensor t = {.name = bin[i].name, .role = VKG_ROLE_INPUT, .rank = bin[i].rank};
        memcpy(t.dims, bin[i].dims, sizeof t.dims);
        OK(vkg_writer_add_tensor(w, &t, &ids[i]));
        OK(vkg_writer_add_input(w, ids[i]));
    }
    vkg_writer_tensor ty = {.name = "y", .role = VKG_ROLE_OUTPUT, .rank = 4, .dims = {N, C, H, W}};
    OK(vkg_writer_add_tensor(w, &ty, &y));
    uint32_t nin[5] = {ids[0], ids[1], ids[2], VKG_NO_TENSOR, ids[3]};
    OK(vkg_writer_add_node(w, "batchnorm", "bn", nin, 5, &y, 1, &eps, 1));
    OK(vkg_writer_add_output(w, y));
    void *bytes;
    size_t size;
    OK(vkg_writer_to_memory(w, &bytes, &size));
    vkg_writer_destroy(w);
    vkg_model *m;
    OK(vkg_model_load_memory(ctx, bytes, size, &m));
    free(bytes);
    vkg_session *s;
    OK(vkg_session_create(m, NULL, &s));
    for (int i = 0; i < 4; i++) OK(vkg_session_set_input(s, bin[i].name, bdata[i], numel(&bin[i]) * 4));
    OK(vkg_session_run(s));
    float *got = malloc(n * 4);
    OK(vkg_session_get_output(s, "y", got, n * 4));
    h_maybe_fault(got, n);
    h_compare("graph batchnorm without weight", got, want, bound, n, 0.0, 0.0);
    free(got);
    vkg_session_destroy(s);
    vkg_model_destroy(m);
    /* argmax over channels (default axis) and over the last axis */
    int32_t *iw = malloc(n * 4);
    vkg_writer_attr ax = {.name = "axis", .type = VKG_ATTR_INT, .i = -1};
    g_tensor ao = {"labels", 3, {N, H, W}, VKG_DTYPE_I32};
    ref_argmax(x, iw, N, C, H * W);
    OK(one_node(ctx, "argmax", &in, 1, &ao, NULL, 0, &x, iw, NULL, "graph argmax (default axis 1)"));
    g_tensor ao2 = {"labels", 3, {N, C, H}, VKG_DTYPE_I32};
    ref_argmax(x, iw, N * C * H, W, 1);
    OK(one_node(ctx, "argmax", &in, 1, &ao2, &ax, 1, &x, iw, NULL, "graph argmax (axis -1)"));
    free(iw);
    free(count);
    free(x);
    free(want);
    free(bound);
    return 0;
}

/* Malformed nodes are refused when the graph loads, or when a session binds the sizes that make
 * them wrong, with the node and what was expected named. */
static int test_invalid(vkg_context *ctx)
{
    g_tensor x4 = {"x", 4, {2, 3, 37, 8}, VKG_DTYPE_F32}, x3 = {"x", 3, {2, 3, 37}, VKG_DTYPE_F32};
    g_tensor y4 = {"y", 4, {2, 3, 5, 5}, VKG_DTYPE_F32};
    int64_t s55[2] = {5, 5}, s05[2] = {0, 5}, s3[3] = {1, 2, 3};
    double f11[2] = {1.0, 1.0}, f01[2] = {0.01, 1.0}, fneg[2] = {-1.0, 1.0};
    vkg_writer_attr size55 = {.name = "size", .type = VKG_ATTR_INTS, .count = 2, .ints = s55};
    vkg_writer_attr size05 = {.name = "size", .type = VKG_ATTR_INTS, .count = 2, .ints = s05};
    vkg_writer_attr size3 = {.name = "size", .type = VKG_ATTR_INTS, .count = 3, .ints = s3};
    vkg_writer_attr sc11 = {.name = "scale", .type = VKG_ATTR_FLOATS, .count = 2, .floats = f11};
    vkg_writer_attr sc01 = {.name = "scale", .type = VKG_ATTR_FLOATS, .count = 2, .floats = f01};
    vkg_writer_attr scneg = {.name = "scale", .type = VKG_ATTR_FLOATS, .count = 2, .floats = fneg};
    vkg_writer_attr ac2 = {.name = "align_corners", .type = VKG_ATTR_INT, .i = 2};
    vkg_writer_attr both[2] = {size55, sc11}, acbad[2] = {size55, ac2};
    struct bad {
        const char *what, *op, *msg;
        g_tensor in[3];
        uint32_t nin;
        g_tensor out;
        vkg_writer_attr attrs[2];
        uint32_t nattr;
    } cases[] = {
        {"resize of a rank-3 tensor", "resize_bilinear", "input \"x\" must be (N, C, H, W), has rank 3", {x3}, 1, y4, {size55}, 1},
        {"resize with size and scale", "resize_bilinear", "both size and scale are given", {x4}, 1, y4, {both[0], both[1]}, 2},
        {"resize with neither", "resize_bilinear", "neither size nor scale is given", {x4}, 1, y4, {{0}}, 0},
        {"resize to size 0", "resize_bilinear", "size[0] = 0: expected 1..", {x4}, 1, y4, {size05}, 1},
        {"resize scaled to 0", "resize_bilinear", "scale[0] = 0.01 takes H = 37 to 0", {x4}, 1, y4, {sc01}, 1},
        {"resize negative scale", "resize_bilinear", "scale[0] = -1: expected a finite number > 0", {x4}, 1, y4, {scneg}, 1},
        {"resize align_corners 2", "resize_bilinear", "align_corners = 2: expected 0 or 1", {x4}, 1, y4, {acbad[0], acbad[1]}, 2},
        {"pool with 3 sizes", "adaptive_avg_pool2d", "size has 3 entries; expected [Ho, Wo]", {x4}, 1, y4, {size3}, 1},
        {"pool without size", "adaptive_avg_pool2d", "required attribute \"size\"", {x4}, 1, y4, {{0}}, 0},
        {"pool of an empty plane", "adaptive_avg_pool2d", "has W = 0; resampling needs >= 1",
         {{"x", 4, {1, 2, 3, 0}, VKG_DTYPE_F32}}, 1, y4, {size55}, 1},
        {"batchnorm statistics of the wrong size", "batchnorm", "mean \"m\" has 4 elements; expected 3 (dim 1 of \"x\")",
         {x4, {"m", 1, {4}, VKG_DTYPE_F32}, {"v", 1, {3}, VKG_DTYPE_F32}}, 3, {"y", 4, {2, 3, 37, 8}, VKG_DTYPE_F32},
         {{.name = "eps", .type = VKG_ATTR_FLOAT, .f = 1e-5}}, 1},
        {"batchnorm without eps", "batchnorm", "required attribute \"eps\"",
         {x4, {"m", 1, {3}, VKG_DTYPE_F32}, {"v", 1, {3}, VKG_DTYPE_F32}}, 3, {"y", 4, {2, 3, 37, 8}, VKG_DTYPE_F32},
         {{0}}, 0},
        {"batchnorm of a vector", "batchnorm", "must be (N, C, ...), has rank 1",
         {{"x", 1, {3}, VKG_DTYPE_F32}, {"m", 1, {3}, VKG_DTYPE_F32}, {"v", 1, {3}, VKG_DTYPE_F32}}, 3,
         {"y", 1, {3}, VKG_DTYPE_F32}, {{.name = "eps", .type = VKG_ATTR_FLOAT, .f = 1e-5}}, 1},
        {"concat of mismatched dims", "concat", "input 1 \"b\" has dim 2 = 5; input 0 \"a\" has 6",
         {{"a", 3, {2, 3, 6}, VKG_DTYPE_F32}, {"b", 3, {2, 4, 5}, VKG_DTYPE_F32}}, 2, {"y", 3, {2, 7, 6}, VKG_DTYPE_F32},
         {{.name = "axis", .type = VKG_ATTR_INT, .i = 1}}, 1},
        {"concat of mismatched ranks", "concat", "input 1 \"b\" has rank 2; input 0 \"a\" has rank 3",
         {{"a", 3, {2, 3, 6}, VKG_DTYPE_F32}, {"b", 2, {2, 3}, VKG_DTYPE_F32}}, 2, {"y", 3, {2, 3, 6}, VKG_DTYPE_F32},
         {{.name = "axis", .type = VKG_ATTR_INT, .i = 1}}, 1},
        {"concat axis out of range", "concat", "axis -4 outside the 3 dims of \"a\"",
         {{"a", 3, {2, 3, 6}, VKG_DTYPE_F32}, {"b", 3, {2, 3, 6}, VKG_DTYPE_F32}}, 2, {"y", 3, {2, 3, 6}, VKG_DTYPE_F32},
         {{.name = "axis", .type = VKG_ATTR_INT, .i = -4}}, 1},
        {"permute with a repeated dim", "permute", "perm[1] = 0: expected a permutation of 0..2",
         {{"x", 3, {2, 3, 6}, VKG_DTYPE_F32}}, 1, {"y", 3, {2, 3, 6}, VKG_DTYPE_F32},
         {{.name = "perm", .type = VKG_ATTR_INTS, .count = 3, .ints = (const int64_t[3]){0, 0, 1}}}, 1},
        {"permute of the wrong length", "permute", "perm has 2 entries; input \"x\" has rank 3",
         {{"x", 3, {2, 3, 6}, VKG_DTYPE_F32}}, 1, {"y", 3, {2, 3, 6}, VKG_DTYPE_F32},
         {{.name = "perm", .type = VKG_ATTR_INTS, .count = 2, .ints = (const int64_t[2]){1, 0}}}, 1},
        {"argmax axis out of range", "argmax", "axis 3 outside the 3 dims of \"x\"",
         {{"x", 3, {2, 3, 6}, VKG_DTYPE_F32}}, 1, {"y", 2, {2, 3}, VKG_DTYPE_I32},
         {{.name = "axis", .type = VKG_ATTR_INT, .i = 3}}, 1},
        {"argmax to f32", "argmax", "output \"y\" has dtype f32, expected i32",
         {{"x", 3, {2, 3, 6}, VKG_DTYPE_F32}}, 1, {"y", 2, {2, 6}, VKG_DTYPE_F32}, {{0}}, 0},
        {"argmax over an empty dim", "argmax", "argmax over dim 1 of \"x\", which has size 0",
         {{"x", 3, {2, 0, 6}, VKG_DTYPE_F32}}, 1, {"y", 2, {2, 6}, VKG_DTYPE_I32}, {{0}}, 0},
    };
    for (size_t i = 0; i < VKG_ARRAY_LEN(cases); i++) {
        struct bad *c = &cases[i];
        vkg_status st = one_node(ctx, c->op, c->in, c->nin, &c->out, c->attrs, c->nattr, NULL, NULL, NULL, c->what);
        const char *err = vkg_last_error();
        CHECK(st == VKG_ERROR_INVALID_GRAPH && strstr(err, "node \"node\"") && strstr(err, c->msg),
              "%s: got %s: %s (want \"%s\")", c->what, vkg_status_name(st), st ? err : "", c->msg);
        if (st == VKG_ERROR_INVALID_GRAPH) printf("ok   %s: %s\n", c->what, err);
    }
    /* Refused at session creation: the sizes that make it wrong are only known then. */
    struct late {
        const char *what, *op, *msg;
        g_tensor in[2];
        uint32_t nin;
        g_tensor out;
        vkg_writer_attr attr;
        int64_t value;
    } late[] = {
        {"resize scaling a bound dim to 0", "resize_bilinear", "scale[0] = 0.1 takes H = 5 to 0",
         {{"x", 4, {1, 2, -1, 8}, VKG_DTYPE_F32}}, 1, {"y", 4, {1, 2, -1, -1}, VKG_DTYPE_F32},
         {.name = "scale", .type = VKG_ATTR_FLOATS, .count = 2, .floats = (const double[2]){0.1, 1.0}}, 5},
        {"concat of mismatched bound dims", "concat", "input 1 has dim 1 = 3; input 0 has 4",
         {{"a", 2, {2, -1}, VKG_DTYPE_F32}, {"b", 2, {2, 3}, VKG_DTYPE_F32}}, 2, {"y", 2, {4, -1}, VKG_DTYPE_F32},
         {.name = "axis", .type = VKG_ATTR_INT, .i = 0}, 4},
        {"argmax over a bound empty dim", "argmax", "argmax over dim 1, which has size 0",
         {{"x", 3, {2, -1, 3}, VKG_DTYPE_F32}}, 1, {"y", 2, {2, 3}, VKG_DTYPE_I32},
         {.name = "axis", .type = VKG_ATTR_INT, .i = 1}, 0},
    };
    for (size_t i = 0; i < VKG_ARRAY_LEN(late); i++) {
        struct late *c = &late[i];
        vkg_writer *w;
        OK(vkg_writer_create(&w));
        uint32_t ids[3];
        for (uint32_t k = 0; k <= c->nin; k++) {
            const g_tensor *t = k < c->nin ? &c->in[k] : &c->out;
            vkg_writer_tensor wt = {.name = t->name, .dtype = t->dtype, .role = k < c->nin ? VKG_ROLE_INPUT : VKG_ROLE_OUTPUT,
                                    .rank = t->rank};
            for (uint32_t d = 0; d < t->rank; d++) {
                wt.dims[d] = t->dims[d];
                wt.sym[d] = t->dims[d] < 0 ? (k < c->nin ? "s" : "") : NULL;
            }
            OK(vkg_writer_add_tensor(w, &wt, &ids[k]));
            if (k < c->nin) OK(vkg_writer_add_input(w, ids[k]));
        }
        OK(vkg_writer_add_node(w, c->op, "node", ids, c->nin, &ids[c->nin], 1, &c->attr, 1));
        OK(vkg_writer_add_output(w, ids[c->nin]));
        void *bytes;
        size_t size;
        OK(vkg_writer_to_memory(w, &bytes, &size));
        vkg_writer_destroy(w);
        vkg_model *m;
        OK(vkg_model_load_memory(ctx, bytes, size, &m));
        free(bytes);
        vkg_dim_binding dim = {"s", c->value};
        vkg_session_desc sd = {.dims = &dim, .n_dims = 1};
        vkg_session *s = NULL;
        vkg_status st = vkg_session_create(m, &sd, &s);
        const char *err = vkg_last_error();
        CHECK(st != VKG_SUCCESS && strstr(err, "node \"node\"") && strstr(err, c->msg), "%s: got %s: %s (want \"%s\")",
              c->what, vkg_status_name(st), st ? err : "", c->msg);
        if (st != VKG_SUCCESS) printf("ok   %s: %s\n", c->what, err);
        vkg_session_destroy(s);
        vkg_model_destroy(m);
    }
    return 0;
}

/* --inject-fault: a case of each kernel, every concat and permute case and the graph cases; each
 * comparison must catch its perturbed element. */
static int test_fault(vkg_context *ctx)
{
    if (run_resample(ctx, 0, (rs_case){2, 10, 13, 0, 0, 0, 1.7, 1.7, 0}, 1) ||
        run_resample(ctx, 1, (rs_case){2, 37, 37, 18, 18, 0, 0, 0, 0}, 2) ||
        run_batchnorm(ctx, (bn_case){2, 3, 35, 1, 1, 1e-5f, 0}, 3) || run_argmax(ctx, (am_case){2, 5, 7, 1, 0}, 4) ||
        test_concat(ctx) || test_permute(ctx))
        return 1;
    return test_graph(ctx);
}

int main(int argc, char **argv)
{
    const char *op = argc > 1 ? argv[1] : "";
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--inject-fault")) h_inject_fault = 1;
        else if (!strcmp(argv[i], "--variant") && i + 1 < argc) {
            i++;
            g_read = !strcmp(argv[i], "texel") ? VKG_DENSE_TEXEL : !strcmp(argv[i], "storage") ? VKG_DENSE_STORAGE
                                                                                                : VKG_DENSE_AUTO;
        }
    }
    static const struct { const char *name; int (*fn)(vkg_context *); } tests[] = {
        {"resize", test_resize},   {"pool", test_pool},   {"batchnorm", test_batchnorm}, {"argmax", test_argmax},
        {"concat", test_concat},   {"permute", test_permute}, {"graph", test_graph},     {"invalid", test_invalid},
        {"fault", test_fault},
    };
    for (size_t i = 0; i < VKG_ARRAY_LEN(tests); i++)
        if (!strcmp(op, tests[i].name)) {
            vkg_context *ctx = h_context();
            if (tests[i].fn(ctx)) h_failures++;
            return h_finish(ctx, op);
        }
    fprintf(stderr, "usage: test_dense resize|pool|batchnorm|argmax|concat|permute|graph|invalid|fault "
                    "[--variant texel|storage] [--inject-fault]\n");
    return 2;
}
