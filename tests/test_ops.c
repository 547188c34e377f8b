/* One driver for every kernel, ggml-style: `test_ops OP [--variant V] [--inject-fault]` runs OP on
 * ragged shapes (sizes 1, odd, primes, not multiples of any tile, empty) against the CPU reference in
 * ref.c, under the validation layer. ctest runs each op as its own process, so a driver crash is
 * contained to one test. */
#include <float.h>

#include "harness.h"
#include "runtime/kernels/attention.h"
#include "ref.h"

/* ---- matmul ---- */

typedef struct mm_shape {
    uint32_t batch, m, k, n;
    int w_shared;
} mm_shape;

/* epi: bit 0 a per-column scale, bit 1 a residual added last (y = res + scale * act(x W^T + b)). */
static int run_matmul_case(vkg_context *ctx, vkg_mm_variant variant, mm_shape s, vkg_dtype wdt, int act, int bias,
                           int epi, uint32_t seed)
{
    size_t nx = (size_t)s.batch * s.m * s.k, nw = (size_t)(s.w_shared ? 1 : s.batch) * s.n * s.k;
    size_t ny = (size_t)s.batch * s.m * s.n;
    float *x = malloc((nx + 1) * 4), *w = malloc((nw + 1) * 4), *b = malloc((s.n + 1) * 4);
    float *want = malloc((ny + 1) * 4);
    double *mag = malloc((ny + 1) * sizeof(double));
    uint16_t *wh = malloc((nw + 1) * 2);
    h_fill(x, nx, seed, -1.0f, 1.0f);
    h_fill(w, nw, seed + 1, -1.0f, 1.0f);
    h_fill(b, s.n, seed + 2, -0.5f, 0.5f);
    if (wdt == VKG_DTYPE_F16) /* the reference sees exactly the weights the GPU decodes */
        for (size_t i = 0; i < nw; i++) {
            wh[i] = ref_f32_to_f16(w[i]);
            w[i] = ref_f16_to_f32(wh[i]);
        }
    ref_matmul(x, w, bias ? b : NULL, want, mag, s.batch, s.m, s.n, s.k, s.w_shared, act);
    float *sc = malloc((s.n + 1) * 4), *res = malloc((ny + 1) * 4);
    h_fill(sc, s.n, seed + 3, 0.1f, 2.0f);
    h_fill(res, ny, seed + 4, -3.0f, 3.0f);
    for (size_t i = 0; i < ny; i++) {
        double v = want[i];
        if (epi & 1) {
            v *= sc[i % (s.n ? s.n : 1)];
            mag[i] *= sc[i % (s.n ? s.n : 1)];
        }
        if (epi & 2) {
            v += res[i];
            mag[i] += fabs(res[i]) / sqrt((double)s.k + 1.0); /* one more rounding, of the sum */
        }
        want[i] = (float)v;
    }
    /* fp32 accumulation error grows ~sqrt(k) in the sum of |x w|; GELU's erf adds ~1e-7 absolute. */
    for (size_t i = 0; i < ny; i++) mag[i] *= 2.0 * sqrt((double)s.k + 1.0) * FLT_EPSILON;

    vkg_buf *bx = h_upload(ctx, x, nx * 4);
    vkg_buf *bw = wdt == VKG_DTYPE_F16 ? h_upload(ctx, wh, nw * 2) : h_upload(ctx, w, nw * 4);
    vkg_buf *bb = h_upload(ctx, b, (size_t)s.n * 4);
    vkg_buf *bsc = h_upload(ctx, sc, (size_t)s.n * 4), *bres = h_upload(ctx, res, ny * 4);
    vkg_buf *by = NULL;
    OK(vkg_buf_create(ctx, ny * 4, &by));
    vkg_cmd *cmd = NULL;
    OK(vkg_cmd_begin(ctx, false, &cmd));
    vkg_matmul_args a = {.x = {bx, 0}, .w = {bw, 0}, .bias = {bias ? bb : NULL, 0}, .y = {by, 0},
                         .scale = {epi & 1 ? bsc : NULL, 0}, .residual = {epi & 2 ? bres : NULL, 0},
                         .batch = s.batch, .m = s.m, .n = s.n, .k = s.k, .w_shared = s.w_shared != 0,
                         .w_dtype = wdt, .act = (vkg_act)act, .variant = variant};
    OK(vkg_matmul(cmd, &a));
    OK(vkg_cmd_submit_wait(cmd));
    float *got = h_download(by, ny);
    h_maybe_fault(got, ny);
    char what[160];
    snprintf(what, sizeof what, "matmul %s b=%u m=%u k=%u n=%u w=%s%s act=%d bias=%d scale=%d residual=%d",
             variant == VKG_MM_TEXEL ? "texel" : "tiled", s.batch, s.m, s.k, s.n,
             wdt == VKG_DTYPE_F16 ? "f16" : "f32", s.w_shared ? "(shared)" : "", act, bias, epi & 1, epi >> 1);
    h_compare(what, got, want, mag, ny, 2e-6, 2e-7);
    h_check_deterministic(cmd, by, ny, what);
    free(got);
    free(sc);
    free(res);
    vkg_buf_destroy(bsc);
    vkg_buf_destroy(bres);
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(bx);
    vkg_buf_destroy(bw);
    vkg_buf_destroy(bb);
    vkg_buf_destroy(by);
    free(x);
    free(w);
    free(b);
    free(want);
    free(mag);
    free(wh);
    return 0;
}

static int test_matmul(vkg_context *ctx, vkg_mm_variant variant)
{
    static const mm_shape shapes[] = {
        {1, 1, 1, 1, 1},     {1, 1, 4, 1, 1},      {1, 1, 7, 3, 1},      {1, 7, 12, 5, 1},    {1, 3, 5, 7, 1},
        {1, 33, 388, 97, 1}, {1, 17, 13, 64, 1},   {1, 64, 64, 64, 1},   {1, 65, 68, 129, 1}, {1, 31, 96, 67, 1},
        {3, 2, 8, 3, 0},     {4, 5, 20, 9, 1},     {2, 9, 11, 13, 0},    {1, 0, 16, 8, 1},    {1, 4, 0, 6, 1},
        {1, 5, 16, 0, 1},    {1, 257, 384, 131, 1}, {1, 1, 1536, 37, 1}, {2, 70, 36, 70, 0}};
    uint32_t seed = 100;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int d = 0; d < 2; d++) {
            int act = (int)((i + (size_t)d) % 3);
            int bias = (i + (size_t)d) % 4 != 3;
            int epi = (int)((i + 2 * (size_t)d) % 4);
            if (run_matmul_case(ctx, variant, shapes[i], d ? VKG_DTYPE_F16 : VKG_DTYPE_F32, act, bias, epi, seed++))
                return 1;
        }
    /* Out-of-range operands are refused with a message naming the operand. */
    vkg_buf *small = NULL;
    vkg_cmd *cmd = NULL;
    OK(vkg_buf_create(ctx, 16, &small));
    OK(vkg_cmd_begin(ctx, false, &cmd));
    vkg_matmul_args bad = {.x = {small, 0}, .w = {small, 0}, .y = {small, 0}, .m = 4, .n = 4, .k = 4,
                           .w_shared = true, .variant = variant};
    vkg_status s = vkg_matmul(cmd, &bad);
    CHECK(s == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "x needs 64 bytes"),
          "oversized x: got %s: %s", vkg_status_name(s), vkg_last_error());
    bad.w_dtype = VKG_DTYPE_I32;
    s = vkg_matmul(cmd, &bad);
    CHECK(s == VKG_ERROR_UNSUPPORTED && strstr(vkg_last_error(), "dtype"), "i32 weights: got %s: %s",
          vkg_status_name(s), vkg_last_error());
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(small);
    return 0;
}

/* ---- matmul with LoRA: the fused linear ---- */

typedef struct lora_case {
    uint32_t m, k, n;
    uint32_t nad, ranks[VKG_LORA_MAX_ADAPTERS];
    float scales[VKG_LORA_MAX_ADAPTERS];
    vkg_dtype wdt, ldt; /* W, and lora_a/lora_b */
    int act, bias, epi; /* epi as in run_matmul_case */
    int group;          /* see test_lora */
} lora_case;

/* Rounds to fp16 in place and returns the halves: the reference sees exactly what the GPU decodes. */
static uint16_t *to_f16(float *v, size_t n)
{
    uint16_t *h = malloc((n + 1) * 2);
    for (size_t i = 0; i < n; i++) {
        h[i] = ref_f32_to_f16(v[i]);
        v[i] = ref_f16_to_f32(h[i]);
    }
    return h;
}

static vkg_buf *upload_as(vkg_context *ctx, float *v, size_t n, vkg_dtype dt)
{
    if (dt != VKG_DTYPE_F16) return h_upload(ctx, v, n * 4);
    uint16_t *h = to_f16(v, n);
    vkg_buf *b = h_upload(ctx, h, n * 2);
    free(h);
    return b;
}

static int run_lora_case(vkg_context *ctx, vkg_mm_variant variant, const lora_case *c, uint32_t seed)
{
    uint32_t r = 0;
    for (uint32_t i = 0; i < c->nad; i++) r += c->ranks[i];
    size_t nx = (size_t)c->m * c->k, nw = (size_t)c->n * c->k, na = (size_t)r * c->k, nb = (size_t)c->n * r;
    size_t ny = (size_t)c->m * c->n, nt = (size_t)c->m * r;
    float *x = malloc((nx + 1) * 4), *w = malloc((nw + 1) * 4), *b = malloc((c->n + 1) * 4);
    float *la = malloc((na + 1) * 4), *lb = malloc((nb + 1) * 4), *sc = malloc((c->n + 1) * 4);
    float *res = malloc((ny + 1) * 4), *want = malloc((ny + 1) * 4), *twant = malloc((nt + 1) * 4);
    float *nan = malloc((VKG_MAX(ny, nt) + 1) * 4);
    double *mag = malloc((ny + 1) * sizeof(double)), *magl = malloc((ny + 1) * sizeof(double));
    double *tmag = malloc((nt + 1) * sizeof(double));
    h_fill(x, nx, seed, -1.0f, 1.0f);
    h_fill(w, nw, seed + 1, -1.0f, 1.0f);
    h_fill(b, c->n, seed + 2, -0.5f, 0.5f);
    h_fill(la, na, seed + 3, -1.0f, 1.0f);
    h_fill(lb, nb, seed + 4, -1.0f, 1.0f);
    h_fill(sc, c->n, seed + 5, 0.1f, 2.0f);
    h_fill(res, ny, seed + 6, -3.0f, 3.0f);
    for (size_t i = 0; i < VKG_MAX(ny, nt); i++) nan[i] = NAN; /* every output must be written */
    /* Uploading first rounds the fp16 operands in place, so the reference below sees them decoded. */
    vkg_buf *bx = h_upload(ctx, x, nx * 4), *bw = upload_as(ctx, w, nw, c->wdt), *bb = h_upload(ctx, b, c->n * 4);
    vkg_buf *bla = upload_as(ctx, la, na, c->ldt), *blb = upload_as(ctx, lb, nb, c->ldt);
    vkg_buf *bsc = h_upload(ctx, sc, c->n * 4), *bres = h_upload(ctx, res, ny * 4), *by = h_upload(ctx, nan, ny * 4);
    ref_linear_lora(x, w, c->bias ? b : NULL, la, lb, c->nad, c->ranks, c->scales, want, mag, magl, twant, c->m,
                    c->n, c->k, r, c->act);
    /* Rounding, with ref_linear_lora's bounds: the base segment ~sqrt(k) ulp of sum |x w| (as in
     * run_matmul_case), the LoRA term magl ulp. */
    double f = 2.0 * FLT_EPSILON, rk = sqrt((double)c->k + 1.0);
    for (size_t i = 0; i < ny; i++) {
        double v = want[i], m = rk * mag[i] + magl[i];
        if (c->epi & 1) {
            v *= sc[i % c->n];
            m *= sc[i % c->n];
        }
        want[i] = (float)v;
        mag[i] = m * f;
        if (c->epi & 2) {
            want[i] = (float)(v + res[i]);
            mag[i] += 2.0 * FLT_EPSILON * fabs(res[i]); /* one more rounding, of the sum */
        }
    }
    for (uint32_t i = 0; i < c->m; i++)
        for (uint32_t a = 0, o = 0; a < c->nad; o += c->ranks[a], a++)
            for (uint32_t j = o; j < o + c->ranks[a]; j++) {
                double s = 0;
                for (uint32_t kk = 0; kk < c->k; kk++)
                    s += fabs((double)x[(size_t)i * c->k + kk] * la[(size_t)j * c->k + kk]);
                tmag[(size_t)i * r + j] = fabs(c->scales[a]) * s * 2.0 * sqrt((double)c->k + 1.0) * FLT_EPSILON;
            }

    vkg_matmul_args a = {.x = {bx, 0}, .w = {bw, 0}, .bias = {c->bias ? bb : NULL, 0}, .y = {by, 0},
                         .scale = {c->epi & 1 ? bsc : NULL, 0}, .residual = {c->epi & 2 ? bres : NULL, 0},
                         .m = c->m, .n = c->n, .k = c->k, .w_shared = true, .w_dtype = c->wdt, .act = (vkg_act)c->act,
                         .variant = variant, .lora_a = {bla, 0}, .lora_b = {blb, 0}, .lora_dtype = c->ldt,
                         .lora_r = r, .lora_n_adapters = c->nad};
    memcpy(a.lora_ranks, c->ranks, sizeof a.lora_ranks);
    memcpy(a.lora_scales, c->scales, sizeof a.lora_scales);
    CHECK(vkg_matmul_lora_scratch_bytes(&a) == nt * 4, "scratch bytes %llu, want %zu",
          (unsigned long long)vkg_matmul_lora_scratch_bytes(&a), nt * 4);
    vkg_buf *bt = h_upload(ctx, nan, nt * 4);
    a.lora_t = (vkg_tref){bt, 0};
    vkg_cmd *cmd = NULL;
    OK(vkg_cmd_begin(ctx, false, &cmd));
    OK(vkg_matmul(cmd, &a));
    CHECK(vkg_cmd_dispatch_count(cmd) == (c->m ? 2u : 0u), "%u dispatches recorded", vkg_cmd_dispatch_count(cmd));
    OK(vkg_cmd_submit_wait(cmd));
    float *got = h_download(by, ny), *tgot = h_download(bt, nt);
    h_maybe_fault(got, ny);
    char what[384], ranks[160] = "";
    for (uint32_t i = 0, o = 0; i < c->nad && o < sizeof ranks; i++)
        o += (uint32_t)snprintf(ranks + o, sizeof ranks - o, "%s%u*%g", i ? "," : "", c->ranks[i],
                                (double)c->scales[i]);
    snprintf(what, sizeof what, "matmul+lora %s m=%u k=%u n=%u adapters=[%s] w=%s lora=%s act=%d bias=%d scale=%d "
             "residual=%d", variant == VKG_MM_TEXEL ? "texel" : "tiled", c->m, c->k, c->n, ranks,
             c->wdt == VKG_DTYPE_F16 ? "f16" : "f32", c->ldt == VKG_DTYPE_F16 ? "f16" : "f32", c->act, c->bias,
             c->epi & 1, c->epi >> 1);
    h_compare(what, got, want, mag, ny, 2e-6, 2e-7);
    if (!h_inject_fault) { /* the LoRA kernel's own output, t = s_a x A_a^T */
        char twhat[400];
        snprintf(twhat, sizeof twhat, "%s: t", what);
        h_compare(twhat, tgot, twant, tmag, nt, 2e-6, 2e-7);
    }
    h_check_deterministic(cmd, by, ny, what);
    free(got);
    free(tgot);
    vkg_cmd_destroy(cmd);
    vkg_buf *bufs[] = {bx, bw, bb, bla, blb, bsc, bres, by, bt};
    for (size_t i = 0; i < VKG_ARRAY_LEN(bufs); i++) vkg_buf_destroy(bufs[i]);
    void *mem[] = {x, w, b, la, lb, sc, res, want, twant, nan, mag, magl, tmag};
    for (size_t i = 0; i < VKG_ARRAY_LEN(mem); i++) free(mem[i]);
    return 0;
}

/* Each invalid LoRA configuration is refused with a message naming the problem, and nothing is
 * recorded (no half-recorded LoRA dispatch). */
static int test_lora_invalid(vkg_context *ctx, vkg_mm_variant variant)
{
    vkg_buf *buf = NULL, *small = NULL;
    vkg_cmd *cmd = NULL;
    OK(vkg_buf_create(ctx, 1 << 20, &buf));
    OK(vkg_buf_create(ctx, 64, &small));
    OK(vkg_cmd_begin(ctx, false, &cmd));
    /* x (4, 8) at 0, w (6, 8) at 4096, y (4, 6) at 8192, lora_a (R, 8) at 16384, lora_b (6, R) at
     * 65536, t (4, R) at 131072: room for R up to 600. */
    vkg_matmul_args ok = {.x = {buf, 0}, .w = {buf, 4096}, .y = {buf, 8192}, .m = 4, .n = 6, .k = 8,
                          .w_shared = true, .variant = variant, .lora_a = {buf, 16384}, .lora_b = {buf, 65536},
                          .lora_t = {buf, 131072}, .lora_r = 5, .lora_n_adapters = 2, .lora_ranks = {2, 3},
                          .lora_scales = {1.0f, 0.5f}};
    OK(vkg_matmul(cmd, &ok));
    CHECK(vkg_cmd_dispatch_count(cmd) == 2, "valid LoRA: %u dispatches", vkg_cmd_dispatch_count(cmd));
    enum { NBAD = 14 };
    struct lbad { vkg_matmul_args a; vkg_status st; const char *msg; } bad[NBAD];
    for (int i = 0; i < NBAD; i++) bad[i] = (struct lbad){ok, VKG_ERROR_INVALID_ARGUMENT, NULL};
    bad[0].a.lora_n_adapters = 9, bad[0].a.lora_r = 9, bad[0].msg = "9 LoRA adapters; 1 to 8 are supported";
    bad[1].a.lora_r = 6, bad[1].msg = "ranks sum to 5, but lora_a has R = 6 rows";
    bad[2].a.lora_r = 513, bad[2].msg = "rank sum R = 513; 1 to 512 are supported";
    bad[3].a.lora_n_adapters = 0, bad[3].msg = "0 LoRA adapters";
    bad[4].a.lora_ranks[1] = 0, bad[4].msg = "adapter 1 has rank 0; 1 to 64";
    bad[5].a.lora_ranks[0] = 65, bad[5].a.lora_r = 68, bad[5].msg = "adapter 0 has rank 65; 1 to 64";
    bad[6].a.lora_b.buf = NULL, bad[6].msg = "lora_a without lora_b";
    bad[7].a.lora_a.buf = NULL, bad[7].msg = "lora_b without lora_a";
    bad[8].a.batch = 2, bad[8].a.w_shared = true, bad[8].st = VKG_ERROR_UNSUPPORTED, bad[8].msg = "LoRA needs batch 1";
    bad[9].a.lora_t = (vkg_tref){small, 0}, bad[9].msg = "lora_t needs 80 bytes at offset 0; its buffer has 64";
    bad[10].a.lora_t = (vkg_tref){buf, 8192}, bad[10].msg = "lora_t overlaps y";
    bad[11].a.lora_scales[1] = NAN, bad[11].msg = "adapter 1 has a scale that is not finite";
    bad[12].a.lora_dtype = VKG_DTYPE_I32, bad[12].st = VKG_ERROR_UNSUPPORTED, bad[12].msg = "LoRA dtype 3";
    bad[13].a.lora_t = (vkg_tref){buf, 16384}, bad[13].msg = "lora_t overlaps lora_a";
    for (int i = 0; i < NBAD; i++) {
        vkg_status s = vkg_matmul(cmd, &bad[i].a);
        CHECK(s == bad[i].st && strstr(vkg_last_error(), bad[i].msg), "bad LoRA case %d: got %s: %s (want \"%s\")", i,
              vkg_status_name(s), vkg_last_error(), bad[i].msg);
        CHECK(vkg_cmd_dispatch_count(cmd) == 2, "bad LoRA case %d recorded a dispatch", i);
    }
    printf("ok   matmul+lora %s: %d invalid configurations refused\n", variant == VKG_MM_TEXEL ? "texel" : "tiled",
           NBAD);
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(buf);
    vkg_buf_destroy(small);
    return 0;
}

/* part: the group of cases to run (-1 all). */
static int test_lora(vkg_context *ctx, vkg_mm_variant variant, int part)
{
    if (variant == VKG_MM_AUTO) variant = vkg_matmul_default_variant(ctx); /* so each case names what ran */
    /* m, k, n; adapters, ranks, scales; W and LoRA dtypes; act, bias, epilogue. Ragged k, n and R
     * (k % 4 != 0 takes the one-float path; R % 4 != 0 the one-rank LoRA segment). */
    /* m, k, n; adapters, ranks, scales; W and LoRA dtypes; act, bias, epilogue; group. Ragged k, n and
     * R (k % 4 != 0 takes the one-float path, R % 4 != 0 the one-rank LoRA segment). Cases are grouped
     * by the texel kernel they compile (rows per block, k and R paths, view formats): llvmpipe compiles
     * each at its first dispatch, tens of seconds apiece, so ctest runs one process per group. */
    static const lora_case cases[] = {
        /* group 0: 16-row blocks, 4-wide k and R, fp32; the invalid configurations run here too */
        {257, 96, 131, 1, {8}, {2.0f}, VKG_DTYPE_F32, VKG_DTYPE_F32, 1, 0, 2, 0},
        {33, 388, 97, 1, {64}, {0.125f}, VKG_DTYPE_F32, VKG_DTYPE_F32, 2, 1, 3, 0},
        {31, 40, 50, 8, {1, 2, 3, 4, 5, 6, 7, 8}, {1, -1, 0.5f, 2, -0.25f, 0.125f, 1.5f, -3}, VKG_DTYPE_F32,
         VKG_DTYPE_F32, 0, 1, 1, 0},
        {9, 24, 33, 8, {64, 64, 64, 64, 64, 64, 64, 64}, {1, 0.5f, 0.25f, 2, -1, -0.5f, 0.75f, 0.125f},
         VKG_DTYPE_F32, VKG_DTYPE_F32, 0, 0, 3, 0},
        {0, 16, 8, 1, {4}, {1.0f}, VKG_DTYPE_F32, VKG_DTYPE_F32, 0, 1, 0, 0},
        {5, 0, 6, 1, {4}, {1.0f}, VKG_DTYPE_F32, VKG_DTYPE_F32, 0, 1, 2, 0}, /* k = 0: t = 0, y = bias + res */
        /* group 1: R % 4 != 0 (one rank per fetch), 16-row and 8-row blocks */
        {257, 52, 67, 3, {8, 64, 1}, {0.25f, 1.0f, -2.0f}, VKG_DTYPE_F32, VKG_DTYPE_F32, 2, 1, 2, 1},
        {7, 20, 9, 1, {1}, {1.0f}, VKG_DTYPE_F32, VKG_DTYPE_F32, 0, 1, 0, 1},
        {7, 36, 70, 2, {3, 6}, {1.5f, -0.5f}, VKG_DTYPE_F32, VKG_DTYPE_F32, 0, 1, 3, 1},
        /* group 2: k % 4 != 0 (one float per fetch), fp32 and fp16 LoRA */
        {1, 13, 37, 1, {3}, {0.75f}, VKG_DTYPE_F32, VKG_DTYPE_F32, 2, 1, 1, 2},
        {7, 5, 3, 1, {2}, {0.0f}, VKG_DTYPE_F32, VKG_DTYPE_F32, 1, 1, 0, 2},
        {17, 13, 64, 2, {2, 3}, {0.5f, 3.0f}, VKG_DTYPE_F32, VKG_DTYPE_F16, 0, 0, 0, 2},
        /* group 3: fp16 weights, with fp16 and fp32 LoRA; ViT-S K */
        {65, 68, 129, 1, {8}, {1.0f}, VKG_DTYPE_F16, VKG_DTYPE_F16, 1, 1, 1, 3},
        {257, 384, 131, 3, {64, 8, 4}, {0.125f, 1.0f, -0.75f}, VKG_DTYPE_F16, VKG_DTYPE_F16, 2, 1, 3, 3},
        {1, 1536, 37, 2, {64, 64}, {0.5f, 0.25f}, VKG_DTYPE_F16, VKG_DTYPE_F32, 2, 1, 2, 3},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if ((part < 0 || cases[i].group == part) && run_lora_case(ctx, variant, &cases[i], 700 + 10 * (uint32_t)i))
            return 1;
    if (part > 0) return 0;
    return h_inject_fault ? 0 : test_lora_invalid(ctx, variant);
}

/* ---- layernorm ---- */

/* variant: 0 device default, 1 shared-memory tree, 2 subgroup + texel (see vkg_layernorm_variant). */
static int test_layernorm(vkg_context *ctx, int variant)
{
    static const uint32_t shapes[][2] = {{1, 1}, {1, 2}, {3, 7}, {5, 384}, {17, 1000}, {2, 129}, {0, 5}, {70001, 3}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int affine = 0; affine < 2; affine++) {
            uint32_t rows = shapes[i][0], d = shapes[i][1];
            size_t n = (size_t)rows * d;
            float eps = affine ? 1e-6f : 1e-5f;
            float *x = malloc(n * 4 + 4), *g = malloc(d * 4 + 4), *b = malloc(d * 4 + 4), *want = malloc(n * 4 + 4);
            double *mag = malloc(n * sizeof(double) + 8);
            h_fill(x, n, (uint32_t)i * 7 + 1, -2.0f, 3.0f);
            h_fill(g, d, (uint32_t)i * 7 + 2, 0.5f, 1.5f);
            h_fill(b, d, (uint32_t)i * 7 + 3, -0.5f, 0.5f);
            ref_layernorm(x, affine ? g : NULL, b, want, mag, rows, d, eps);
            for (size_t e = 0; e < n; e++) mag[e] *= 16.0 * FLT_EPSILON;
            vkg_buf *bx = h_upload(ctx, x, n * 4), *bg = h_upload(ctx, g, d * 4), *bb = h_upload(ctx, b, d * 4), *by;
            OK(vkg_buf_create(ctx, n * 4, &by));
            vkg_cmd *cmd;
            OK(vkg_cmd_begin(ctx, false, &cmd));
            OK(vkg_layernorm_variant(cmd, (vkg_tref){bx, 0}, (vkg_tref){affine ? bg : NULL, 0},
                                     (vkg_tref){affine ? bb : NULL, 0}, (vkg_tref){by, 0}, rows, d, eps, variant));
            OK(vkg_cmd_submit_wait(cmd));
            float *got = h_download(by, n);
            h_maybe_fault(got, n);
            char what[96];
            snprintf(what, sizeof what, "layernorm%s rows=%u d=%u affine=%d eps=%g",
                     variant == 2 ? " subgroup" : variant == 1 ? " tree" : "", rows, d, affine, (double)eps);
            h_compare(what, got, want, mag, n, 1e-6, 1e-6);
            h_check_deterministic(cmd, by, n, what);
            free(got);
            vkg_cmd_destroy(cmd);
            vkg_buf_destroy(bx);
            vkg_buf_destroy(bg);
            vkg_buf_destroy(bb);
            vkg_buf_destroy(by);
            free(x);
            free(g);
            free(b);
            free(want);
            free(mag);
        }
    return 0;
}

/* ---- unary (relu, gelu) ---- */

static int test_unary(vkg_context *ctx)
{
    /* The largest size needs more than 65535 workgroups in x: it exercises the 2D grid split. */
    static const uint64_t sizes[] = {1, 7, 256, 257, 1000, 65537, 16777216 + 300};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        for (int act = 1; act <= 5; act++) {
            uint64_t n = sizes[i];
            if (act >= 2 && n > 1000000) continue; /* one huge case is enough; relu's reference is cheap */
            float *x = malloc(n * 4), *want = malloc(n * 4);
            /* wide enough to reach tanh's and sigmoid's saturation, where naive formulas overflow */
            h_fill(x, n, (uint32_t)i + 11, act >= 4 ? -60.0f : -6.0f, act >= 4 ? 60.0f : 6.0f);
            ref_unary(x, want, n, act);
            vkg_buf *bx = h_upload(ctx, x, n * 4), *by;
            OK(vkg_buf_create(ctx, n * 4, &by));
            vkg_cmd *cmd;
            OK(vkg_cmd_begin(ctx, false, &cmd));
            OK(vkg_unary(cmd, (vkg_act)act, (vkg_tref){bx, 0}, (vkg_tref){by, 0}, n));
            OK(vkg_cmd_submit_wait(cmd));
            float *got = h_download(by, n);
            h_maybe_fault(got, n);
            char what[64];
            static const char *an[6] = {"", "relu", "gelu", "silu", "tanh", "sigmoid"};
            snprintf(what, sizeof what, "%s n=%llu", an[act], (unsigned long long)n);
            /* ReLU is exact; the others within 1e-6 (absolute and relative) of the double reference. */
            h_compare(what, got, want, NULL, n, act == 1 ? 0.0 : 1e-6, act == 1 ? 0.0 : 1e-6);
            free(got);
            vkg_cmd_destroy(cmd);
            vkg_buf_destroy(bx);
            vkg_buf_destroy(by);
            free(x);
            free(want);
        }
    return 0;
}

/* ---- row ops: swiglu, softmax ---- */

typedef vkg_status (*row_op)(vkg_cmd *cmd, vkg_tref x, vkg_tref y, uint32_t rows, uint32_t d);

/* Runs op on x (nx floats) and compares its (rows x d_out) output with want. */
static int run_row_op(vkg_context *ctx, row_op op, const char *what, const float *x, size_t nx, const float *want,
                      size_t ny, uint32_t rows, uint32_t d, double atol, double rtol)
{
    vkg_buf *bx = h_upload(ctx, x, nx * 4), *by;
    OK(vkg_buf_create(ctx, ny * 4, &by));
    vkg_cmd *cmd;
    OK(vkg_cmd_begin(ctx, false, &cmd));
    OK(op(cmd, (vkg_tref){bx, 0}, (vkg_tref){by, 0}, rows, d));
    OK(vkg_cmd_submit_wait(cmd));
    float *got = h_download(by, ny);
    h_maybe_fault(got, ny);
    h_compare(what, got, want, NULL, ny, atol, rtol);
    h_check_deterministic(cmd, by, ny, what);
    free(got);
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(bx);
    vkg_buf_destroy(by);
    return 0;
}

static int test_swiglu(vkg_context *ctx)
{
    static const uint32_t shapes[][2] = {{1, 1}, {3, 7}, {257, 4096}, {0, 5}, {70001, 3}, {5, 1}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        uint32_t rows = shapes[i][0], h = shapes[i][1];
        size_t n = (size_t)rows * h;
        float *x = malloc(2 * n * 4 + 4), *want = malloc(n * 4 + 4);
        h_fill(x, 2 * n, (uint32_t)i + 51, -8.0f, 8.0f);
        ref_swiglu(x, want, rows, h);
        char what[64];
        snprintf(what, sizeof what, "swiglu rows=%u h=%u", rows, h);
        /* exp() of the GPU is within a few ulp: 2e-6 relative, 1e-6 absolute near 0. */
        int r = run_row_op(ctx, vkg_swiglu, what, x, 2 * n, want, n, rows, h, 1e-6, 2e-6);
        free(x);
        free(want);
        if (r) return r;
    }
    return 0;
}

static int test_softmax(vkg_context *ctx)
{
    static const uint32_t shapes[][2] = {{1, 1}, {3, 7}, {2, 1000}, {5, 65}, {4, 1370}, {0, 3}, {6, 31}, {1, 257}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        uint32_t rows = shapes[i][0], d = shapes[i][1];
        size_t n = (size_t)rows * d;
        float *x = malloc(n * 4 + 4), *want = malloc(n * 4 + 4);
        h_fill(x, n, (uint32_t)i + 21, -10.0f, 10.0f);
        ref_softmax(x, want, rows, d);
        char what[64];
        snprintf(what, sizeof what, "softmax rows=%u d=%u", rows, d);
        int r = run_row_op(ctx, vkg_softmax, what, x, n, want, n, rows, d, 1e-8, 2e-6);
        free(x);
        free(want);
        if (r) return r;
    }
    return 0;
}

/* ---- add_n ---- */

static int test_add_n(vkg_context *ctx)
{
    static const struct { uint32_t count; uint64_t n; float scale; } cases[] = {
        {2, 1, 1.0f}, {3, 7, 0.01f}, {8, 257, 1.0f}, {5, 65537, -0.5f}, {4, 0, 1.0f}, {7, 1000, 3.0f}, {3, 4, 0.001f}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        uint32_t cnt = cases[c].count;
        uint64_t n = cases[c].n;
        float *x[VKG_ADD_N_MAX], *want = malloc(n * 4 + 4);
        double *mag = malloc(n * sizeof(double) + 8);
        vkg_buf *bx[VKG_ADD_N_MAX], *by;
        vkg_tref tx[VKG_ADD_N_MAX];
        for (uint32_t i = 0; i < cnt; i++) {
            x[i] = malloc(n * 4 + 4);
            h_fill(x[i], n, (uint32_t)(c * 16 + i + 3), -4.0f, 4.0f);
            bx[i] = h_upload(ctx, x[i], n * 4);
            tx[i] = (vkg_tref){bx[i], 0};
        }
        /* Left-to-right fp32 sums, then the scale: each rounding is within half an ulp of the
         * running magnitude, so count + 1 roundings of sum |x| * |scale| bound the error. */
        for (uint64_t e = 0; e < n; e++) {
            double sum = 0, m = 0;
            for (uint32_t i = 0; i < cnt; i++) {
                sum += x[i][e];
                m += fabs(x[i][e]);
            }
            want[e] = (float)(sum * cases[c].scale);
            mag[e] = (cnt + 1) * FLT_EPSILON * m * fabs(cases[c].scale);
        }
        OK(vkg_buf_create(ctx, n * 4 + 4, &by));
        vkg_cmd *cmd;
        OK(vkg_cmd_begin(ctx, false, &cmd));
        OK(vkg_add_n(cmd, tx, cnt, (vkg_tref){by, 0}, n, cases[c].scale));
        OK(vkg_cmd_submit_wait(cmd));
        float *got = h_download(by, n);
        h_maybe_fault(got, n);
        char what[64];
        snprintf(what, sizeof what, "add_n count=%u n=%llu scale=%g", cnt, (unsigned long long)n, cases[c].scale);
        h_compare(what, got, want, mag, n, 0.0, 0.0);
        h_check_deterministic(cmd, by, n, what);
        free(got);
        vkg_cmd_destroy(cmd);
        vkg_buf_destroy(by);
        for (uint32_t i = 0; i < cnt; i++) {
            vkg_buf_destroy(bx[i]);
            free(x[i]);
        }
        free(want);
        free(mag);
    }
    return 0;
}

/* ---- binary (add, mul with broadcasting) ---- */

typedef struct bin_case {
    uint32_t ar, as[8], br, bs[8];
} bin_case;

static int test_binary(vkg_context *ctx)
{
    static const bin_case cases[] = {
        {1, {1}, 1, {1}},
        {1, {7}, 1, {7}},
        {3, {2, 3, 4}, 1, {4}},
        {3, {2, 1, 4}, 2, {3, 1}},
        {1, {1}, 1, {5}},
        {1, {6}, 1, {1}},
        {2, {257, 384}, 1, {384}},       /* LayerScale */
        {3, {2, 257, 384}, 3, {2, 257, 384}}, /* residual add */
        {8, {2, 1, 3, 1, 2, 1, 3, 2}, 8, {1, 2, 1, 3, 1, 2, 3, 1}},
        {2, {0, 4}, 1, {4}},
        {4, {3, 1, 5, 1}, 4, {1, 4, 1, 6}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        for (int op = 0; op < 2; op++) {
            const bin_case *c = &cases[i];
            uint32_t out[8], orank;
            OK(vkg_broadcast_shape(c->as, c->ar, c->bs, c->br, out, &orank));
            size_t na = 1, nb = 1, ny = 1;
            for (uint32_t d = 0; d < c->ar; d++) na *= c->as[d];
            for (uint32_t d = 0; d < c->br; d++) nb *= c->bs[d];
            for (uint32_t d = 0; d < orank; d++) ny *= out[d];
            float *a = malloc(na * 4 + 4), *b = malloc(nb * 4 + 4), *want = malloc(ny * 4 + 4);
            h_fill(a, na, (uint32_t)i + 31, -2.0f, 2.0f);
            h_fill(b, nb, (uint32_t)i + 41, -2.0f, 2.0f);
            ref_binary(op, a, c->as, c->ar, b, c->bs, c->br, want, out, orank);
            vkg_buf *ba = h_upload(ctx, a, na * 4), *bb = h_upload(ctx, b, nb * 4), *by;
            OK(vkg_buf_create(ctx, ny * 4, &by));
            vkg_cmd *cmd;
            OK(vkg_cmd_begin(ctx, false, &cmd));
            OK(vkg_binary(cmd, (vkg_binop)op, (vkg_tref){ba, 0}, c->as, c->ar, (vkg_tref){bb, 0}, c->bs, c->br,
                          (vkg_tref){by, 0}));
            OK(vkg_cmd_submit_wait(cmd));
            float *got = h_download(by, ny);
            h_maybe_fault(got, ny);
            char what[64];
            snprintf(what, sizeof what, "%s case %zu (rank %u, n=%zu)", op ? "mul" : "add", i, orank, ny);
            h_compare(what, got, want, NULL, ny, 0.0, 0.0); /* one IEEE op per element: exact */
            free(got);
            vkg_cmd_destroy(cmd);
            vkg_buf_destroy(ba);
            vkg_buf_destroy(bb);
            vkg_buf_destroy(by);
            free(a);
            free(b);
            free(want);
        }
    uint32_t s1[2] = {3, 4}, s2[1] = {5}, out[8], r;
    vkg_status s = vkg_broadcast_shape(s1, 2, s2, 1, out, &r);
    CHECK(s == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "is 4 in a and 5 in b"),
          "incompatible shapes: %s: %s", vkg_status_name(s), vkg_last_error());
    return 0;
}

/* ---- attention ---- */

typedef struct att_case {
    uint32_t batch, heads, tq, tk, d;
    int mask;    /* 0 none, 1 (tq, tk), 2 (batch, tq, tk); both with -inf entries and one fully masked row */
    int kp;      /* key padding: 0 none, 1 random with -inf keys, the last batch element entirely -inf */
    int layout;  /* 0 plain, 1 packed qkv (tq == tk), 2 strided with column offsets and byte offsets */
    float scale; /* 0: 1/sqrt(d) */
} att_case;

static int run_attention_case(vkg_context *ctx, vkg_mm_variant variant, att_case c, uint32_t seed)
{
    uint32_t hd = c.heads * c.d, qs, ks, qc, kc, vc;
    size_t qoff = 0, koff = 0, voff = 0; /* floats */
    if (c.layout == 1) qs = ks = 3 * hd, qc = 0, kc = hd, vc = 2 * hd;
    else if (c.layout == 2) qs = hd + 5, ks = 2 * hd + 3, qc = 5, kc = 1, vc = hd + 2, qoff = 4, koff = 1, voff = 3;
    else qs = ks = hd, qc = kc = vc = 0;
    size_t nq = (size_t)c.batch * c.tq * qs + qoff, nk = (size_t)c.batch * c.tk * ks + koff;
    size_t nv = (size_t)c.batch * c.tk * ks + voff, no = (size_t)c.batch * c.tq * hd;
    size_t nm = (size_t)(c.mask == 2 ? c.batch : 1) * c.tq * c.tk, nkp = (size_t)c.batch * c.tk;
    float *q = malloc(nq * 4 + 4), *k = malloc(nk * 4 + 4), *v = malloc(nv * 4 + 4), *m = malloc(nm * 4 + 4);
    float *kp = malloc(nkp * 4 + 4), *want = malloc(no * 4 + 4), *nan = malloc(no * 4 + 4);
    double *mag = malloc(no * sizeof(double) + 8);
    h_fill(q, nq, seed, -1.0f, 1.0f);
    h_fill(k, nk, seed + 1, -1.0f, 1.0f);
    h_fill(v, nv, seed + 2, -1.0f, 1.0f);
    h_fill(m, nm, seed + 3, -2.0f, 2.0f);
    h_fill(kp, nkp, seed + 4, -1.0f, 1.0f);
    for (size_t i = 0; i < nm; i += 5) m[i] = -INFINITY;
    if (c.tq > 1) /* row 1 (of every batch element when batched): every key masked -> 0 */
        for (size_t b = 0; b < (c.mask == 2 ? c.batch : 1); b++)
            for (uint32_t j = 0; j < c.tk; j++) m[(b * c.tq + 1) * c.tk + j] = -INFINITY;
    for (size_t i = 0; i < nkp; i += 3) kp[i] = -INFINITY;
    if (c.batch > 1)
        for (uint32_t j = 0; j < c.tk; j++) kp[(size_t)(c.batch - 1) * c.tk + j] = -INFINITY;
    for (size_t i = 0; i < no; i++) nan[i] = NAN; /* every output must be written */
    const float *qd = q, *kd = k, *vd = v; /* the reference sees each operand from its first row */
    if (c.layout == 1) kd = vd = q;
    ref_attention(qd + qoff, (c.layout == 1 ? q : kd + koff), (c.layout == 1 ? q : vd + voff), c.mask ? m : NULL,
                  c.mask == 2, c.kp ? kp : NULL, want, mag, c.batch, c.heads, c.tq, c.tk, c.d, qs, ks, qc, kc, vc,
                  c.scale != 0.0f ? (double)c.scale : 1.0 / sqrt((double)c.d));
    /* fp32: each score is off by a few ulp of its magnitude sum (the dot product, mask, padding), which
     * moves the output by that times the spread of v; the weighted sums add ~sqrt(tk) ulp of max|v|. */
    for (size_t i = 0; i < no; i++) mag[i] *= (4.0 + 0.1 * sqrt((double)c.tk)) * FLT_EPSILON;

    vkg_buf *bq = h_upload(ctx, q, nq * 4), *bk = c.layout == 1 ? bq : h_upload(ctx, k, nk * 4);
    vkg_buf *bv = c.layout == 1 ? bq : h_upload(ctx, v, nv * 4);
    vkg_buf *bm = h_upload(ctx, m, nm * 4), *bkp = h_upload(ctx, kp, nkp * 4), *bo = h_upload(ctx, nan, no * 4);
    vkg_cmd *cmd = NULL;
    OK(vkg_cmd_begin(ctx, false, &cmd));
    vkg_attention_args a = {.q = {bq, qoff * 4}, .k = {bk, koff * 4}, .v = {bv, voff * 4}, .q_stride = qs,
                            .kv_stride = ks, .q_col = qc, .k_col = kc, .v_col = vc, .mask = {c.mask ? bm : NULL, 0},
                            .mask_batched = c.mask == 2, .key_padding = {c.kp ? bkp : NULL, 0}, .out = {bo, 0},
                            .batch = c.batch, .heads = c.heads, .tq = c.tq, .tk = c.tk, .head_dim = c.d,
                            .scale = c.scale, .variant = variant};
    if (c.layout == 0) a.q_stride = a.kv_stride = 0; /* 0 = plain */
    OK(vkg_attention(cmd, &a));
    OK(vkg_cmd_submit_wait(cmd));
    float *got = h_download(bo, no);
    h_maybe_fault(got, no);
    char what[160];
    snprintf(what, sizeof what, "attention %s b=%u h=%u tq=%u tk=%u d=%u mask=%d kp=%d layout=%s scale=%g",
             variant == VKG_MM_TEXEL ? "texel" : "tiled", c.batch, c.heads, c.tq, c.tk, c.d, c.mask, c.kp,
             c.layout == 1 ? "packed" : c.layout == 2 ? "strided" : "plain", (double)c.scale);
    h_compare(what, got, want, mag, no, 2e-7, 1e-6);
    h_check_deterministic(cmd, bo, no, what);
    free(got);
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(bq);
    if (bk != bq) vkg_buf_destroy(bk);
    if (bv != bq) vkg_buf_destroy(bv);
    vkg_buf_destroy(bm);
    vkg_buf_destroy(bkp);
    vkg_buf_destroy(bo);
    free(q);
    free(k);
    free(v);
    free(m);
    free(kp);
    free(want);
    free(nan);
    free(mag);
    return 0;
}

static int test_attention(vkg_context *ctx, vkg_mm_variant variant)
{
    static const att_case cases[] = {
        {1, 1, 1, 1, 32, 0, 0, 0, 0},        {2, 3, 7, 31, 64, 1, 0, 0, 0},     {1, 2, 31, 65, 128, 0, 1, 2, 0},
        {3, 2, 65, 7, 80, 2, 1, 0, 0},       {1, 6, 257, 257, 64, 0, 0, 1, 0},  {1, 1, 1370, 1370, 64, 1, 0, 1, 0},
        {2, 5, 31, 1, 7, 0, 1, 0, 0},        {1, 4, 7, 257, 1, 1, 0, 0, 0},     {2, 1, 257, 65, 24, 0, 1, 2, 0.3f},
        {1, 2, 65, 1370, 32, 2, 1, 2, 0},    {1, 1, 1370, 7, 128, 0, 0, 0, 0},  {2, 2, 31, 31, 80, 2, 0, 1, 0},
        {1, 3, 65, 65, 7, 1, 1, 1, 0},       {4, 2, 1, 257, 64, 0, 1, 0, 2.0f}, {1, 1, 7, 7, 256, 1, 0, 0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (run_attention_case(ctx, variant, cases[i], 500 + 10 * (uint32_t)i)) return 1;
    /* Bad arguments are refused with a message naming what is wrong. */
    vkg_buf *small = NULL;
    vkg_cmd *cmd = NULL;
    OK(vkg_buf_create(ctx, 256, &small));
    OK(vkg_cmd_begin(ctx, false, &cmd));
    vkg_attention_args ok = {.q = {small, 0}, .k = {small, 0}, .v = {small, 0}, .out = {small, 0}, .batch = 1,
                             .heads = 1, .tq = 2, .tk = 2, .head_dim = 4, .variant = variant};
    OK(vkg_attention(cmd, &ok));
    struct att_bad { vkg_attention_args a; vkg_status st; const char *msg; } bad[8];
    for (int i = 0; i < 8; i++) bad[i] = (struct att_bad){ok, VKG_ERROR_INVALID_ARGUMENT, NULL};
    bad[0].a.tq = 100, bad[0].msg = "q needs 1600 bytes";
    bad[1].a.out.offset = 240, bad[1].msg = "out needs 32 bytes at offset 240";
    bad[2].a.head_dim = 0, bad[2].st = VKG_ERROR_UNSUPPORTED, bad[2].msg = "head_dim 0";
    bad[3].a.head_dim = 300, bad[3].st = VKG_ERROR_UNSUPPORTED, bad[3].msg = "head_dim 300";
    bad[4].a.q_stride = 8, bad[4].a.q_col = 6, bad[4].msg = "q columns [6, 10)";
    bad[5].a.kv_stride = 8, bad[5].a.v_col = 5, bad[5].msg = "v columns [5, 9)";
    bad[6].a.k.buf = NULL, bad[6].msg = "k has no buffer";
    bad[7].a.mask = (vkg_tref){small, 240}, bad[7].a.mask_batched = true, bad[7].a.batch = 9, bad[7].a.tq = 1,
    bad[7].a.tk = 1, bad[7].msg = "mask needs 36 bytes at offset 240";
    for (int i = 0; i < 8; i++) {
        vkg_status s = vkg_attention(cmd, &bad[i].a);
        CHECK(s == bad[i].st && strstr(vkg_last_error(), bad[i].msg), "bad case %d: got %s: %s (want \"%s\")", i,
              vkg_status_name(s), vkg_last_error(), bad[i].msg);
    }
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(small);
    return 0;
}

int main(int argc, char **argv)
{
    const char *op = argc > 1 ? argv[1] : "";
    vkg_mm_variant variant = VKG_MM_AUTO;
    int ln_variant = 0; /* layernorm: tree (1) or subgroup (2) */
    int part = -1;      /* lora: one group of cases (--part N), or all */
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--inject-fault")) h_inject_fault = 1;
        else if (!strcmp(argv[i], "--variant") && i + 1 < argc) {
            i++;
            variant = !strcmp(argv[i], "texel") ? VKG_MM_TEXEL : !strcmp(argv[i], "tiled") ? VKG_MM_TILED : VKG_MM_AUTO;
            ln_variant = !strcmp(argv[i], "tree") ? 1 : !strcmp(argv[i], "subgroup") ? 2 : 0;
        } else if (!strcmp(argv[i], "--part") && i + 1 < argc)
            part = atoi(argv[++i]);
    }
    vkg_context *ctx = h_context();
    int r;
    if (!strcmp(op, "matmul")) {
        if (variant == VKG_MM_TEXEL && !vkg_matmul_texel_supported(ctx)) {
            /* Such a device never selects this variant (vkg_matmul_default_variant). */
            printf("matmul texel: device lacks subgroup size 8 or RGBA texel buffers; variant unavailable\n");
            vkg_context_destroy(ctx);
            return 77;
        }
        r = test_matmul(ctx, variant);
    } else if (!strcmp(op, "lora")) {
        if (variant == VKG_MM_TEXEL && !vkg_matmul_texel_supported(ctx)) {
            printf("matmul+lora texel: device lacks subgroup size 8 or RGBA texel buffers; variant unavailable\n");
            vkg_context_destroy(ctx);
            return 77;
        }
        r = test_lora(ctx, variant, part);
    } else if (!strcmp(op, "layernorm")) {
        if (ln_variant == 2 && !vkg_layernorm_subgroup_supported(ctx)) {
            printf("layernorm subgroup: device lacks subgroup size 8 with arithmetic ops; variant unavailable\n");
            vkg_context_destroy(ctx);
            return 77;
        }
        r = test_layernorm(ctx, ln_variant);
    }
    else if (!strcmp(op, "unary")) r = test_unary(ctx);
    else if (!strcmp(op, "softmax")) r = test_softmax(ctx);
    else if (!strcmp(op, "swiglu")) r = test_swiglu(ctx);
    else if (!strcmp(op, "binary")) r = test_binary(ctx);
    else if (!strcmp(op, "add_n")) r = test_add_n(ctx);
    else if (!strcmp(op, "attention")) {
        if (variant == VKG_MM_TEXEL && !vkg_attention_texel_supported(ctx)) {
            printf("attention texel: device lacks subgroup size 8 or RGBA texel buffers; variant unavailable\n");
            vkg_context_destroy(ctx);
            return 77;
        }
        r = test_attention(ctx, variant);
    }
    else {
        fprintf(stderr, "usage: test_ops matmul|lora|layernorm|unary|softmax|binary|add_n|attention|swiglu [--variant tiled|texel|tree|subgroup] [--part N] [--inject-fault]\n");
        vkg_context_destroy(ctx);
        return 2;
    }
    if (r) h_failures++;
    return h_finish(ctx, op);
}
