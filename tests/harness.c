#include "harness.h"

int h_failures = 0;
int h_checks = 0;
int h_inject_fault = 0;

vkg_context *h_context(void)
{
    vkg_context_desc d = {.validation = 1};
    vkg_context *ctx = NULL;
    vkg_status s = vkg_context_create(&d, &ctx);
    if (s != VKG_SUCCESS) {
        fprintf(stderr, "FAIL: vkg_context_create: %s: %s\n", vkg_status_name(s), vkg_last_error());
        exit(1);
    }
    return ctx;
}

int h_finish(vkg_context *ctx, const char *name)
{
    if (ctx) {
        vkg_status s = vkg_context_check_validation(ctx);
        CHECK(s == VKG_SUCCESS, "validation messages: %s", vkg_last_error());
        CHECK(vkg_context_validation_count(ctx) == 0, "%llu validation message(s) over the run",
              (unsigned long long)vkg_context_validation_count(ctx));
        vkg_context_destroy(ctx);
    }
    printf("%s: %d checks, %d failed\n", name, h_checks, h_failures);
    return h_failures ? 1 : 0;
}

void *h_writer_finish(vkg_writer *w, vkg_status st, size_t *size)
{
    void *data = NULL;
    if (st == VKG_SUCCESS) st = vkg_writer_to_memory(w, &data, size);
    vkg_writer_destroy(w);
    if (st != VKG_SUCCESS) {
        fprintf(stderr, "FAIL: building the test graph: %s: %s\n", vkg_status_name(st), vkg_last_error());
        exit(1);
    }
    return data;
}

void h_fill(float *p, size_t n, uint32_t seed, float lo, float hi)
{
    uint64_t s = 0x9e3779b97f4a7c15ull ^ seed;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        p[i] = lo + (hi - lo) * (float)((s >> 40) & 0xffffff) / 16777216.0f;
    }
}

vkg_buf *h_upload(vkg_context *ctx, const void *data, size_t bytes)
{
    vkg_buf *b = NULL;
    if (vkg_buf_create(ctx, bytes, &b) != VKG_SUCCESS || (bytes && vkg_buf_upload(b, 0, data, bytes) != VKG_SUCCESS)) {
        fprintf(stderr, "FAIL: upload of %zu bytes: %s\n", bytes, vkg_last_error());
        exit(1);
    }
    return b;
}

float *h_download(vkg_buf *b, size_t n)
{
    float *p = malloc(n ? n * sizeof(float) : 1);
    if (!p || (n && vkg_buf_download(b, 0, p, n * sizeof(float)) != VKG_SUCCESS)) {
        fprintf(stderr, "FAIL: download of %zu floats: %s\n", n, vkg_last_error());
        exit(1);
    }
    return p;
}

int h_check_deterministic(vkg_cmd *cmd, vkg_buf *y, size_t n, const char *what)
{
    float *a = h_download(y, n);
    vkg_status s = vkg_cmd_submit_wait(cmd);
    float *b = h_download(y, n);
    CHECK(s == VKG_SUCCESS, "%s: resubmit: %s", what, vkg_last_error());
    CHECK(n == 0 || memcmp(a, b, n * sizeof(float)) == 0, "%s: second run differs from the first", what);
    free(a);
    free(b);
    return 0;
}

void h_maybe_fault(float *got, size_t n)
{
    if (h_inject_fault && n) got[n / 2] += 1e-2f * (fabsf(got[n / 2]) + 1.0f);
}

int h_compare(const char *what, const float *got, const float *want, const double *bound, size_t n, double atol,
              double rtol)
{
    size_t worst = 0, bad = 0;
    double worst_ratio = 0;
    for (size_t i = 0; i < n; i++) {
        double tol = atol + rtol * fabs(want[i]) + (bound ? bound[i] : 0);
        double err = fabs((double)got[i] - want[i]);
        double ratio = err == 0 ? 0 : err / tol;
        if (isnan(got[i]) != isnan(want[i]) || !(ratio <= 1.0)) {
            if (isnan(got[i]) != isnan(want[i])) ratio = INFINITY;
            bad++;
        }
        if (!(ratio <= worst_ratio)) {
            worst_ratio = ratio;
            worst = i;
        }
    }
    h_checks++;
    if (h_inject_fault && n) { /* the perturbed element must be caught */
        if (bad) {
            printf("ok   %s: injected fault detected\n", what);
            return 0;
        }
        h_failures++;
        fprintf(stderr, "FAIL %s: injected fault NOT detected (worst %.3g of tolerance)\n", what, worst_ratio);
        return 1;
    }
    if (bad) {
        h_failures++;
        fprintf(stderr, "FAIL %s: %zu of %zu elements out of tolerance; worst [%zu] got %.9g want %.9g (%.3gx tol)\n",
                what, bad, n, worst, n ? got[worst] : 0.0, n ? want[worst] : 0.0, worst_ratio);
        return 1;
    }
    printf("ok   %s (n=%zu, worst %.3g of tolerance)\n", what, n, worst_ratio);
    return 0;
}
