/* `vkg bench --kernels`: measures the device (FMA peak, shader read bandwidth, dispatch and submit
 * cost), then matmul GFLOP/s on the ViT-S shapes. Repetitions are interleaved across configurations
 * and medians reported, so a noisy shared machine disturbs every figure alike. */
#include "kernels_bench.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moe_bench.h"
#include "bench_util.h"
#include "runtime/kernels/attention.h"
#include "runtime/kernels/kernels.h"


/* Wall time of one submit + wait of cmd. */
static vkg_status time_submit(vkg_cmd *cmd, double *sec)
{
    double t0 = vkg_bench_now_s();
    VKG_TRY(vkg_cmd_submit_wait(cmd));
    *sec = vkg_bench_now_s() - t0;
    return VKG_SUCCESS;
}

typedef struct result {
    char name[32], dtype[8], variant[8];
    uint32_t m, k, n;
    double value; /* gflops, gbps or us */
    const char *unit;
    double pct_peak;
    uint32_t tokens, heads, head_dim; /* attention */
    uint32_t lora_r;                  /* lora_linear: tokens, n, k, r (heads = 0) */
    double ms, rel_err;               /* lora_linear: time per op; max error vs a float64 reference */
} result;

typedef struct mm_case {
    uint32_t m, k, n;
    vkg_dtype wdt;
    vkg_mm_variant variant;
    vkg_buf *x, *w, *b, *y;
    vkg_cmd *cmd;
    double *samples;
} mm_case;

enum { MM_INNER = 3 }; /* dispatches per submit: amortises the submit cost the way a graph does */

static void fill_random(float *p, size_t n, uint32_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        p[i] = (float)((seed >> 8) & 0xffff) / 65536.0f - 0.5f;
    }
}

static uint16_t f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, mant = x & 0x7fffffu;
    int exp = (int)((x >> 23) & 0xff) - 127 + 15;
    if (exp <= 0) return (uint16_t)sign; /* bench data is never tiny */
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    uint32_t h = sign | ((uint32_t)exp << 10) | (mant >> 13);
    if ((mant & 0x1fffu) > 0x1000u || ((mant & 0x1fffu) == 0x1000u && (h & 1u))) h++;
    return (uint16_t)h;
}

static vkg_status mm_setup(vkg_context *ctx, mm_case *c, int reps)
{
    size_t xs = (size_t)c->m * c->k, ws = (size_t)c->n * c->k;
    VkDeviceSize wbytes = ws * (c->wdt == VKG_DTYPE_F16 ? 2 : 4);
    VKG_TRY(vkg_buf_create(ctx, xs * 4, &c->x));
    VKG_TRY(vkg_buf_create(ctx, wbytes, &c->w));
    VKG_TRY(vkg_buf_create(ctx, (VkDeviceSize)c->n * 4, &c->b));
    VKG_TRY(vkg_buf_create(ctx, (VkDeviceSize)c->m * c->n * 4, &c->y));
    float *h = malloc(VKG_MAX(xs, ws) * 4);
    if (!h) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    fill_random(h, xs, 1);
    vkg_status st = vkg_buf_upload(c->x, 0, h, xs * 4);
    fill_random(h, ws, 2);
    if (st == VKG_SUCCESS && c->wdt == VKG_DTYPE_F16) {
        uint16_t *hh = (uint16_t *)h; /* in place: element i is written after it was read */
        for (size_t i = 0; i < ws; i++) hh[i] = f32_to_f16(h[i]);
    }
    if (st == VKG_SUCCESS) st = vkg_buf_upload(c->w, 0, h, wbytes);
    fill_random(h, c->n, 3);
    if (st == VKG_SUCCESS) st = vkg_buf_upload(c->b, 0, h, (VkDeviceSize)c->n * 4);
    free(h);
    VKG_TRY(st);
    VKG_TRY(vkg_cmd_begin(ctx, false, &c->cmd));
    vkg_matmul_args a = {.x = {c->x, 0}, .w = {c->w, 0}, .bias = {c->b, 0}, .y = {c->y, 0}, .m = c->m, .n = c->n,
                         .k = c->k, .w_shared = true, .w_dtype = c->wdt, .variant = c->variant};
    for (int i = 0; i < MM_INNER; i++) VKG_TRY(vkg_matmul(c->cmd, &a));
    VKG_TRY(vkg_cmd_end(c->cmd));
    c->samples = calloc((size_t)reps, sizeof(double));
    if (!c->samples) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    return vkg_cmd_submit_wait(c->cmd); /* warm-up: pipeline creation, first touch of memory */
}

static void mm_free(mm_case *c)
{
    vkg_cmd_destroy(c->cmd);
    vkg_buf_destroy(c->x);
    vkg_buf_destroy(c->w);
    vkg_buf_destroy(c->b);
    vkg_buf_destroy(c->y);
    free(c->samples);
}

static vkg_status bench_fma(vkg_context *ctx, int reps, double *gflops)
{
    const uint32_t wg = 64, groups = 256, iters = 4000;
    vkg_buf *y;
    VKG_TRY(vkg_buf_create(ctx, (VkDeviceSize)wg * groups * 4, &y));
    vkg_pipeline_desc pd = {.shader = "bench_fma", .nbindings = 1, .push_size = 8, .nspec = 1, .spec = {wg}};
    const vkg_pipeline *p;
    vkg_cmd *cmd = NULL;
    struct { uint32_t iters; float seed; } pc = {iters, 0.5f};
    vkg_binding b = {y, 0, 0, 0, true};
    double *t = calloc((size_t)reps, sizeof *t);
    vkg_status st = t ? vkg_pipeline_get(ctx, &pd, &p) : vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    if (st == VKG_SUCCESS) st = vkg_cmd_begin(ctx, false, &cmd);
    if (st == VKG_SUCCESS) st = vkg_cmd_dispatch(cmd, p, &b, &pc, groups, 1, 1, "fma");
    if (st == VKG_SUCCESS) st = vkg_cmd_submit_wait(cmd);
    for (int r = 0; r < reps && st == VKG_SUCCESS; r++) st = time_submit(cmd, &t[r]);
    if (st == VKG_SUCCESS) *gflops = (double)wg * groups * iters * 8 * 4 * 2 / vkg_bench_median(t, reps) * 1e-9;
    free(t);
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(y);
    return st;
}

static vkg_status bench_read(vkg_context *ctx, bool texel, int reps, double *gbps)
{
    const uint32_t wg = 64, groups = 512;
    const uint64_t vec4s = 4u << 20; /* 64 MiB: well past any cache */
    uint32_t per = (uint32_t)(vec4s / (wg * groups));
    vkg_buf *src, *y;
    VKG_TRY(vkg_buf_create(ctx, vec4s * 16, &src));
    vkg_status st = vkg_buf_create(ctx, (VkDeviceSize)wg * groups * 4, &y);
    if (st != VKG_SUCCESS) {
        vkg_buf_destroy(src);
        return st;
    }
    if (src->mapped) memset(src->mapped, 0, vec4s * 16);
    vkg_pipeline_desc pd = {.shader = texel ? "bench_read_texel" : "bench_read_ssbo", .nbindings = 2, .push_size = 4,
                            .nspec = 1, .spec = {wg},
                            .bindings = {texel ? VKG_BIND_UNIFORM_TEXEL : VKG_BIND_STORAGE, VKG_BIND_STORAGE}};
    const vkg_pipeline *p;
    vkg_cmd *cmd = NULL;
    struct { uint32_t per; } pc = {per}; /* vec4s is a multiple of 2 * wg * groups */
    vkg_binding b[2] = {{src, 0, 0, VK_FORMAT_R32G32B32A32_SFLOAT, false}, {y, 0, 0, 0, true}};
    double *t = calloc((size_t)reps, sizeof *t);
    if (!t) st = vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    if (st == VKG_SUCCESS) st = vkg_pipeline_get(ctx, &pd, &p);
    if (st == VKG_SUCCESS) st = vkg_cmd_begin(ctx, false, &cmd);
    if (st == VKG_SUCCESS) st = vkg_cmd_dispatch(cmd, p, b, &pc, groups, 1, 1, "read");
    if (st == VKG_SUCCESS) st = vkg_cmd_submit_wait(cmd);
    for (int r = 0; r < reps && st == VKG_SUCCESS; r++) st = time_submit(cmd, &t[r]);
    if (st == VKG_SUCCESS) *gbps = (double)vec4s * 16 / vkg_bench_median(t, reps) * 1e-9;
    free(t);
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(src);
    vkg_buf_destroy(y);
    return st;
}

/* Cost of one dispatch inside a command buffer, and of a submit + fence wait for one dispatch. */
static vkg_status bench_overheads(vkg_context *ctx, int reps, double *dispatch_us, double *submit_us)
{
    const uint32_t many = 500;
    vkg_buf *y;
    VKG_TRY(vkg_buf_create(ctx, 64, &y));
    vkg_pipeline_desc pd = {.shader = "bench_empty", .nbindings = 1};
    const vkg_pipeline *p;
    vkg_cmd *one = NULL, *lots = NULL;
    vkg_binding b = {y, 0, 0, 0, false};
    double *t1 = calloc((size_t)reps, sizeof *t1), *tn = calloc((size_t)reps, sizeof *tn);
    vkg_status st = t1 && tn ? vkg_pipeline_get(ctx, &pd, &p) : vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    if (st == VKG_SUCCESS) st = vkg_cmd_begin(ctx, false, &one);
    if (st == VKG_SUCCESS) st = vkg_cmd_dispatch(one, p, &b, NULL, 1, 1, 1, "empty");
    if (st == VKG_SUCCESS) st = vkg_cmd_begin(ctx, false, &lots);
    for (uint32_t i = 0; i < many && st == VKG_SUCCESS; i++) st = vkg_cmd_dispatch(lots, p, &b, NULL, 1, 1, 1, "empty");
    if (st == VKG_SUCCESS) st = vkg_cmd_submit_wait(one);
    if (st == VKG_SUCCESS) st = vkg_cmd_submit_wait(lots);
    for (int r = 0; r < reps && st == VKG_SUCCESS; r++) {
        st = time_submit(one, &t1[r]);
        if (st == VKG_SUCCESS) st = time_submit(lots, &tn[r]);
    }
    if (st == VKG_SUCCESS) {
        double s1 = vkg_bench_median(t1, reps), sn = vkg_bench_median(tn, reps);
        *submit_us = s1 * 1e6;
        *dispatch_us = (sn - s1) / (many - 1) * 1e6;
    }
    free(t1);
    free(tn);
    vkg_cmd_destroy(one);
    vkg_cmd_destroy(lots);
    vkg_buf_destroy(y);
    return st;
}

static const char *variant_name(vkg_mm_variant v) { return v == VKG_MM_TEXEL ? "texel" : "tiled"; }

static void print_and_store(FILE *json, bool *first, const result *r)
{
    if (!json) return;
    fprintf(json, "%s\n  {\"name\": \"%s\"", *first ? "" : ",", r->name);
    *first = false;
    if (r->m) fprintf(json, ", \"m\": %u, \"k\": %u, \"n\": %u", r->m, r->k, r->n);
    if (r->tokens && r->lora_r)
        fprintf(json, ", \"tokens\": %u, \"n\": %u, \"k\": %u, \"r\": %u", r->tokens, r->n, r->k, r->lora_r);
    else if (r->tokens)
        fprintf(json, ", \"tokens\": %u, \"heads\": %u, \"head_dim\": %u", r->tokens, r->heads, r->head_dim);
    if (r->dtype[0]) fprintf(json, ", \"dtype\": \"%s\"", r->dtype);
    if (r->variant[0]) fprintf(json, ", \"variant\": \"%s\"", r->variant);
    fprintf(json, ", \"%s\": %.3f", r->unit, r->value);
    if (r->pct_peak > 0) fprintf(json, ", \"pct_fma_peak\": %.2f", r->pct_peak);
    if (r->ms > 0) fprintf(json, ", \"ms\": %.3f, \"max_rel_err\": %.3g", r->ms, r->rel_err);
    fprintf(json, "}");
}

/* Self-attention on a packed (1, tokens, 3 * heads * head_dim) qkv tensor, one dispatch per submit. */
typedef struct att_case {
    uint32_t tokens, heads, head_dim;
    vkg_mm_variant variant;
    vkg_buf *qkv, *o;
    vkg_cmd *cmd;
    double *samples;
} att_case;

static vkg_status att_setup(vkg_context *ctx, att_case *c, int reps)
{
    size_t hd = (size_t)c->heads * c->head_dim, n = (size_t)c->tokens * 3 * hd;
    VKG_TRY(vkg_buf_create(ctx, n * 4, &c->qkv));
    VKG_TRY(vkg_buf_create(ctx, (VkDeviceSize)c->tokens * hd * 4, &c->o));
    float *h = malloc(n * 4);
    if (!h) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    fill_random(h, n, 4);
    vkg_status st = vkg_buf_upload(c->qkv, 0, h, n * 4);
    free(h);
    VKG_TRY(st);
    VKG_TRY(vkg_cmd_begin(ctx, false, &c->cmd));
    vkg_attention_args a = {.q = {c->qkv, 0}, .k = {c->qkv, 0}, .v = {c->qkv, 0}, .q_stride = (uint32_t)(3 * hd),
                            .kv_stride = (uint32_t)(3 * hd), .k_col = (uint32_t)hd, .v_col = (uint32_t)(2 * hd),
                            .out = {c->o, 0}, .batch = 1, .heads = c->heads, .tq = c->tokens, .tk = c->tokens,
                            .head_dim = c->head_dim, .variant = c->variant};
    VKG_TRY(vkg_attention(c->cmd, &a));
    VKG_TRY(vkg_cmd_end(c->cmd));
    c->samples = calloc((size_t)reps, sizeof(double));
    if (!c->samples) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    return vkg_cmd_submit_wait(c->cmd);
}

static void att_free(att_case *c)
{
    vkg_cmd_destroy(c->cmd);
    vkg_buf_destroy(c->qkv);
    vkg_buf_destroy(c->o);
    free(c->samples);
}

/* The LoRA linear y = x W^T + b + s (x A^T) B^T at one shape and rank, three ways: `fused` (one
 * vkg_matmul with LoRA: the LoRA kernel, then the matmul with its rank segment), `unfused` (what a
 * runtime without the fusion records: the base matmul, t = x A^T with s as a per-column scale, then
 * y = y0 + t B^T through the residual epilogue) and `base` (no LoRA, for context). MM_INNER ops per
 * submit as for matmul; every case's output is checked against a float64 reference. */
typedef enum { LORA_BASE = 0, LORA_FUSED = 1, LORA_UNFUSED = 2 } lora_variant;
static const char *const lora_variant_names[3] = {"base", "fused", "unfused"};

typedef struct lora_shape { /* shared by the cases of one (tokens, k, n, r) */
    uint32_t tokens, k, n, r;
    vkg_buf *x, *w, *b, *a, *bl, *s;
    float *hx, *hw, *hb, *ha, *hbl;
} lora_shape;

typedef struct lora_case {
    lora_shape *sh;
    lora_variant v;
    vkg_mm_variant variant;
    vkg_buf *y, *y0, *t;
    vkg_cmd *cmd;
    double *samples, rel_err;
} lora_case;

static const float LORA_SCALE = 1.0f; /* PEFT's default alpha = r */

static vkg_status upload_random(vkg_context *ctx, size_t n, uint32_t seed, float mul, vkg_buf **b, float **h)
{
    *h = malloc((n + 1) * 4);
    if (!*h) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    fill_random(*h, n, seed);
    for (size_t i = 0; i < n; i++) (*h)[i] *= mul;
    VKG_TRY(vkg_buf_create(ctx, n * 4, b));
    return vkg_buf_upload(*b, 0, *h, n * 4);
}

static vkg_status lora_shape_setup(vkg_context *ctx, lora_shape *sh)
{
    float sv[512];
    for (uint32_t i = 0; i < sh->r; i++) sv[i] = LORA_SCALE;
    /* Weights scaled like a trained layer (~1/sqrt(fan-in)), so the LoRA term is of the same order as
     * the base product and an error in it shows in the comparison. */
    VKG_TRY(upload_random(ctx, (size_t)sh->tokens * sh->k, 11, 2.0f, &sh->x, &sh->hx));
    VKG_TRY(upload_random(ctx, (size_t)sh->n * sh->k, 12, 2.0f / sqrtf((float)sh->k), &sh->w, &sh->hw));
    VKG_TRY(upload_random(ctx, sh->n, 13, 0.2f, &sh->b, &sh->hb));
    VKG_TRY(upload_random(ctx, (size_t)sh->r * sh->k, 14, 2.0f / sqrtf((float)sh->k), &sh->a, &sh->ha));
    VKG_TRY(upload_random(ctx, (size_t)sh->n * sh->r, 15, 2.0f / sqrtf((float)sh->r), &sh->bl, &sh->hbl));
    VKG_TRY(vkg_buf_create(ctx, (VkDeviceSize)sh->r * 4, &sh->s));
    return vkg_buf_upload(sh->s, 0, sv, (VkDeviceSize)sh->r * 4);
}

static void lora_shape_free(lora_shape *sh)
{
    vkg_buf *b[] = {sh->x, sh->w, sh->b, sh->a, sh->bl, sh->s};
    for (size_t i = 0; i < VKG_ARRAY_LEN(b); i++) vkg_buf_destroy(b[i]);
    free(sh->hx);
    free(sh->hw);
    free(sh->hb);
    free(sh->ha);
    free(sh->hbl);
}

/* Max |y - ref| / max |ref| over 16 rows spread across the tokens (float64 reference). */
static vkg_status lora_check(lora_case *c)
{
    const lora_shape *sh = c->sh;
    float *y = malloc((size_t)sh->tokens * sh->n * 4);
    if (!y) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    vkg_status st = vkg_buf_download(c->y, 0, y, (VkDeviceSize)sh->tokens * sh->n * 4);
    double err = 0, big = 0, t[512];
    for (uint32_t q = 0; q < 16 && st == VKG_SUCCESS; q++) {
        uint32_t i = (uint32_t)((uint64_t)q * (sh->tokens - 1) / 15);
        const float *xr = sh->hx + (size_t)i * sh->k;
        for (uint32_t j = 0; j < sh->r; j++) {
            t[j] = 0;
            for (uint32_t k = 0; k < sh->k; k++) t[j] += (double)xr[k] * sh->ha[(size_t)j * sh->k + k];
        }
        for (uint32_t n = 0; n < sh->n; n++) {
            double v = sh->hb[n];
            for (uint32_t k = 0; k < sh->k; k++) v += (double)xr[k] * sh->hw[(size_t)n * sh->k + k];
            if (c->v != LORA_BASE)
                for (uint32_t j = 0; j < sh->r; j++) v += LORA_SCALE * t[j] * sh->hbl[(size_t)n * sh->r + j];
            err = fmax(err, fabs(v - y[(size_t)i * sh->n + n]));
            big = fmax(big, fabs(v));
        }
    }
    free(y);
    c->rel_err = err / (big > 0 ? big : 1);
    if (st == VKG_SUCCESS && !(c->rel_err < 1e-4))
        st = vkg_fail(VKG_ERROR_DEVICE_LOST, "lora_linear %s T=%u K=%u N=%u r=%u: max error %.3g of max |y|, over 1e-4",
                      lora_variant_names[c->v], sh->tokens, sh->k, sh->n, sh->r, c->rel_err);
    return st;
}

static vkg_status lora_setup(vkg_context *ctx, lora_case *c, int reps)
{
    const lora_shape *sh = c->sh;
    VkDeviceSize yb = (VkDeviceSize)sh->tokens * sh->n * 4, tb = (VkDeviceSize)sh->tokens * sh->r * 4;
    VKG_TRY(vkg_buf_create(ctx, yb, &c->y));
    if (c->v != LORA_BASE) VKG_TRY(vkg_buf_create(ctx, tb, &c->t));
    if (c->v == LORA_UNFUSED) VKG_TRY(vkg_buf_create(ctx, yb, &c->y0));
    VKG_TRY(vkg_cmd_begin(ctx, false, &c->cmd));
    vkg_matmul_args base = {.x = {sh->x, 0}, .w = {sh->w, 0}, .bias = {sh->b, 0}, .y = {c->y, 0}, .m = sh->tokens,
                            .n = sh->n, .k = sh->k, .w_shared = true, .variant = c->variant};
    vkg_matmul_args fused = base;
    fused.lora_a = (vkg_tref){sh->a, 0};
    fused.lora_b = (vkg_tref){sh->bl, 0};
    fused.lora_t = (vkg_tref){c->t, 0};
    fused.lora_r = sh->r;
    fused.lora_n_adapters = 1;
    fused.lora_ranks[0] = sh->r;
    fused.lora_scales[0] = LORA_SCALE;
    vkg_matmul_args u0 = base;
    u0.y = (vkg_tref){c->y0, 0};
    vkg_matmul_args u1 = {.x = {sh->x, 0}, .w = {sh->a, 0}, .y = {c->t, 0}, .scale = {sh->s, 0}, .m = sh->tokens,
                           .n = sh->r, .k = sh->k, .w_shared = true, .variant = c->variant};
    vkg_matmul_args u2 = {.x = {c->t, 0}, .w = {sh->bl, 0}, .y = {c->y, 0}, .residual = {c->y0, 0},
                           .m = sh->tokens, .n = sh->n, .k = sh->r, .w_shared = true, .variant = c->variant};
    for (int i = 0; i < MM_INNER; i++) {
        if (c->v == LORA_BASE) VKG_TRY(vkg_matmul(c->cmd, &base));
        else if (c->v == LORA_FUSED) VKG_TRY(vkg_matmul(c->cmd, &fused));
        else {
            VKG_TRY(vkg_matmul(c->cmd, &u0));
            VKG_TRY(vkg_matmul(c->cmd, &u1));
            VKG_TRY(vkg_matmul(c->cmd, &u2));
        }
    }
    VKG_TRY(vkg_cmd_end(c->cmd));
    c->samples = calloc((size_t)reps, sizeof(double));
    if (!c->samples) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    VKG_TRY(vkg_cmd_submit_wait(c->cmd)); /* warm-up, and the output to check */
    return lora_check(c);
}

static void lora_free(lora_case *c)
{
    vkg_cmd_destroy(c->cmd);
    vkg_buf_destroy(c->y);
    vkg_buf_destroy(c->y0);
    vkg_buf_destroy(c->t);
    free(c->samples);
}

vkg_status vkg_bench_kernels(vkg_context *ctx, const vkg_bench_opts *o, FILE *out)
{
    int reps = o->reps > 0 ? o->reps : (o->quick ? 5 : 11);
    const vkg_device_info *di = vkg_context_device_info(ctx);
    FILE *json = NULL;
    if (o->json_path) {
        json = fopen(o->json_path, "w");
        if (!json) return vkg_fail(VKG_ERROR_IO, "cannot write %s", o->json_path);
        fprintf(json, "[");
    }
    bool first = true;
    char drv[520];
    snprintf(drv, sizeof drv, "%s %s", di->driver_name, di->driver_info);
    fprintf(out, "device: %s (%s), %d repetitions, medians\n\n", di->name, drv, reps);
    if (json) {
        fprintf(json, "\n  {\"name\": \"device\", \"device\": \"%s\", \"driver\": \"%s\"}", di->name, drv);
        first = false;
    }

    vkg_status st = VKG_SUCCESS;
    double peak = 0, rs = 0, rt = 0, dus = 0, sus = 0;
    if (o->moe_only) goto moe;
    if (!o->matmul_only) {
        st = bench_fma(ctx, reps, &peak);
        if (st == VKG_SUCCESS) st = bench_read(ctx, false, reps, &rs);
        if (st == VKG_SUCCESS && di->texel_rgba32f) st = bench_read(ctx, true, reps, &rt);
        if (st == VKG_SUCCESS) st = bench_overheads(ctx, reps, &dus, &sus);
        if (st != VKG_SUCCESS) goto done;
        fprintf(out, "%-28s %10.1f GFLOP/s\n", "fp32 FMA peak", peak);
        fprintf(out, "%-28s %10.2f GB/s\n", "read, storage buffer", rs);
        fprintf(out, "%-28s %10.2f GB/s\n", "read, uniform texel buffer", rt);
        fprintf(out, "%-28s %10.1f us\n", "dispatch (in a cmd buffer)", dus);
        fprintf(out, "%-28s %10.1f us\n\n", "submit + wait, 1 dispatch", sus);
        result r1 = {.name = "fma_peak", .unit = "gflops", .value = peak};
        result r2 = {.name = "read_storage", .unit = "gbps", .value = rs};
        result r3 = {.name = "read_texel", .unit = "gbps", .value = rt};
        result r4 = {.name = "dispatch", .unit = "us", .value = dus};
        result r5 = {.name = "submit", .unit = "us", .value = sus};
        print_and_store(json, &first, &r1);
        print_and_store(json, &first, &r2);
        if (di->texel_rgba32f) print_and_store(json, &first, &r3);
        print_and_store(json, &first, &r4);
        print_and_store(json, &first, &r5);
    }

    {
        static const uint32_t full[][3] = {{257, 384, 1536}, {257, 1536, 384}, {1370, 384, 1536},
                                           {1370, 1536, 384}, {1024, 1024, 1024}};
        static const uint32_t quick[][3] = {{257, 384, 1536}, {257, 1536, 384}};
        const uint32_t(*shapes)[3] = o->quick ? quick : full;
        int nshapes = o->quick ? 2 : 5;
        vkg_mm_variant variants[2] = {o->variant ? o->variant : vkg_matmul_default_variant(ctx), 0};
        int nvar = 1;
        if (o->all_variants) {
            variants[0] = VKG_MM_TEXEL;
            variants[1] = VKG_MM_TILED;
            nvar = di->texel_rgba32f && di->texel_rgba16f ? 2 : 1;
            if (nvar == 1) variants[0] = VKG_MM_TILED;
        }
        int ncase = nshapes * 2 * nvar;
        mm_case *cs = calloc((size_t)ncase, sizeof *cs);
        /* Attention, ViT-S self-attention (6 heads of 64) at 257 and 1370 tokens (257 only with quick),
         * for the same variants; timed in the same interleaved loop. */
        vkg_mm_variant avars[2] = {o->variant ? o->variant : vkg_attention_default_variant(ctx), 0};
        int navar = 1;
        if (o->all_variants) {
            avars[0] = VKG_MM_TEXEL;
            avars[1] = VKG_MM_TILED;
            navar = vkg_attention_texel_supported(ctx) ? 2 : 1;
            if (navar == 1) avars[0] = VKG_MM_TILED;
        }
        static const uint32_t att_tokens[2] = {257, 1370};
        int natok = o->quick ? 1 : 2, nacase = natok * navar;
        att_case *as = calloc((size_t)nacase, sizeof *as);
        for (int v = 0, ai = 0; as && v < navar; v++)
            for (int t = 0; t < natok; t++) as[ai++] = (att_case){att_tokens[t], 6, 64, avars[v]};
        /* LoRA linear at the ViT-S fc1 and fc2 shapes, ranks 8 and 64, on the matmul's variant (the
         * device default unless one was named): fused, unfused and base interleaved like the rest. */
        static const uint32_t lora_tokens[2] = {257, 1370}, lora_kn[2][2] = {{384, 1536}, {1536, 384}};
        static const uint32_t lora_ranks[2] = {8, 64};
        int nltok = o->quick ? 1 : 2, nlr = o->quick ? 1 : 2, nlsh = nltok * 2 * nlr, nlcase = nlsh * 3;
        vkg_mm_variant lvar = o->variant ? o->variant : vkg_matmul_default_variant(ctx);
        lora_shape *lsh = calloc((size_t)nlsh, sizeof *lsh);
        lora_case *ls = calloc((size_t)nlcase, sizeof *ls);
        for (int t = 0, si = 0; lsh && ls && t < nltok; t++)
            for (int kn = 0; kn < 2; kn++)
                for (int ri = 0; ri < nlr; ri++, si++) {
                    lsh[si] = (lora_shape){lora_tokens[t], lora_kn[kn][0], lora_kn[kn][1], lora_ranks[ri]};
                    for (int v = 0; v < 3; v++) ls[si * 3 + v] = (lora_case){&lsh[si], (lora_variant)v, lvar};
                }
        if (!cs || !as || !lsh || !ls) {
            free(as);
            free(cs);
            free(lsh);
            free(ls);
            st = vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
            goto done;
        }
        int ci = 0;
        for (int v = 0; v < nvar; v++)
            for (int s = 0; s < nshapes; s++)
                for (int d = 0; d < 2; d++)
                    cs[ci++] = (mm_case){shapes[s][0], shapes[s][1], shapes[s][2],
                                         d ? VKG_DTYPE_F16 : VKG_DTYPE_F32, variants[v]};
        for (int i = 0; i < ncase && st == VKG_SUCCESS; i++) st = mm_setup(ctx, &cs[i], reps);
        for (int i = 0; i < nacase && st == VKG_SUCCESS; i++) st = att_setup(ctx, &as[i], reps);
        for (int i = 0; i < nlsh && st == VKG_SUCCESS; i++) st = lora_shape_setup(ctx, &lsh[i]);
        for (int i = 0; i < nlcase && st == VKG_SUCCESS; i++) st = lora_setup(ctx, &ls[i], reps);
        /* Interleaved: repetition r of every case before repetition r+1 of any. */
        for (int r = 0; r < reps && st == VKG_SUCCESS; r++) {
            for (int i = 0; i < ncase && st == VKG_SUCCESS; i++) st = time_submit(cs[i].cmd, &cs[i].samples[r]);
            for (int i = 0; i < nacase && st == VKG_SUCCESS; i++) st = time_submit(as[i].cmd, &as[i].samples[r]);
            for (int i = 0; i < nlcase && st == VKG_SUCCESS; i++) st = time_submit(ls[i].cmd, &ls[i].samples[r]);
        }
        if (st == VKG_SUCCESS) {
            fprintf(out, "%-7s %6s %6s %6s  %-5s %-5s %9s %8s %8s\n", "op", "M", "K", "N", "W", "var", "GFLOP/s",
                    "ms", peak > 0 ? "% peak" : "");
            for (int i = 0; i < ncase; i++) {
                mm_case *c = &cs[i];
                double t = vkg_bench_median(c->samples, reps) / MM_INNER;
                double gf = 2.0 * c->m * c->n * c->k / t * 1e-9;
                result r = {.name = "matmul", .m = c->m, .k = c->k, .n = c->n, .unit = "gflops", .value = gf,
                            .pct_peak = peak > 0 ? 100.0 * gf / peak : 0};
                snprintf(r.dtype, sizeof r.dtype, "%s", c->wdt == VKG_DTYPE_F16 ? "f16" : "f32");
                snprintf(r.variant, sizeof r.variant, "%s", variant_name(c->variant));
                fprintf(out, "%-7s %6u %6u %6u  %-5s %-5s %9.2f %8.3f", "matmul", c->m, c->k, c->n, r.dtype, r.variant,
                        gf, t * 1e3);
                if (peak > 0) fprintf(out, " %7.1f%%", r.pct_peak);
                fprintf(out, "\n");
                print_and_store(json, &first, &r);
            }
        }
        if (st == VKG_SUCCESS)
            for (int i = 0; i < nacase; i++) {
                att_case *c = &as[i];
                double t = vkg_bench_median(c->samples, reps);
                double gf = 4.0 * c->heads * c->tokens * c->tokens * c->head_dim / t * 1e-9;
                result r = {.name = "attention", .unit = "gflops", .value = gf, .tokens = c->tokens, .heads = c->heads,
                            .head_dim = c->head_dim, .pct_peak = peak > 0 ? 100.0 * gf / peak : 0};
                snprintf(r.variant, sizeof r.variant, "%s", variant_name(c->variant));
                fprintf(out, "%-9s T=%-5u H=%-2u d=%-4u %-5s %9.2f %8.3f", "attention", c->tokens, c->heads,
                        c->head_dim, r.variant, gf, t * 1e3);
                if (peak > 0) fprintf(out, " %7.1f%%", r.pct_peak);
                fprintf(out, "\n");
                print_and_store(json, &first, &r);
            }
        if (st == VKG_SUCCESS && nlcase) {
            fprintf(out, "\n%-11s %5s %5s %5s %3s  %-7s %9s %8s %9s %10s\n", "op", "T", "K", "N", "r", "var",
                    "GFLOP/s", "ms", "vs fused", "max err");
            for (int i = 0; i < nlcase; i++) {
                lora_case *c = &ls[i];
                const lora_shape *sh = c->sh;
                double t = vkg_bench_median(c->samples, reps) / MM_INNER;
                double fused = vkg_bench_median(ls[i - (int)c->v + LORA_FUSED].samples, reps) / MM_INNER;
                /* FLOPs of the LoRA linear (the base row: of its plain matmul) */
                double lfl = c->v == LORA_BASE ? 0.0 : (double)sh->r * (sh->k + sh->n);
                double fl = 2.0 * sh->tokens * ((double)sh->n * sh->k + lfl);
                result r = {.name = "lora_linear", .tokens = sh->tokens, .k = sh->k, .n = sh->n, .lora_r = sh->r,
                            .unit = "gflops", .value = fl / t * 1e-9, .ms = t * 1e3, .rel_err = c->rel_err,
                            .pct_peak = peak > 0 ? 100.0 * fl / t * 1e-9 / peak : 0};
                snprintf(r.dtype, sizeof r.dtype, "f32");
                snprintf(r.variant, sizeof r.variant, "%s", lora_variant_names[c->v]);
                fprintf(out, "%-11s %5u %5u %5u %3u  %-7s %9.2f %8.3f %8.2fx %10.2g\n", "lora_linear", sh->tokens,
                        sh->k, sh->n, sh->r, r.variant, r.value, r.ms, t / fused, c->rel_err);
                print_and_store(json, &first, &r);
            }
        }
        for (int i = 0; i < ncase; i++) mm_free(&cs[i]);
        for (int i = 0; i < nacase; i++) att_free(&as[i]);
        for (int i = 0; i < nlcase; i++) lora_free(&ls[i]);
        for (int i = 0; i < nlsh; i++) lora_shape_free(&lsh[i]);
        free(cs);
        free(as);
        free(ls);
        free(lsh);
    }
moe:
    if (st == VKG_SUCCESS && !o->matmul_only) {
        fprintf(out, "\n");
        st = vkg_bench_moe(ctx, reps, o->quick, out, json, &first);
    }
done:
    if (json) {
        fprintf(json, "\n]\n");
        if (fclose(json) != 0 && st == VKG_SUCCESS) st = vkg_fail(VKG_ERROR_IO, "cannot write %s", o->json_path);
    }
    return st;
}
