#include "ref_dense.h"

#include <math.h>
#include <stddef.h>

/* One axis of ATen's upsample_bilinear2d: the source pair and the second one's weight. */
static void taps(uint32_t o, uint32_t n, uint32_t m, int ac, double scale, uint32_t *i0, uint32_t *i1, float *l1)
{
    if (n == m) { /* ATen: same size is a copy */
        *i0 = *i1 = o;
        *l1 = 0.0f;
        return;
    }
    /* ATen 1.13 (CPU): a float ratio, the source coordinate in double (exact here: a float times
     * an integer below 2^29), the weight rounded to float from it. */
    float ratio;
    if (ac) ratio = m > 1 ? (float)(n - 1) / (float)(m - 1) : 0.0f;
    else ratio = scale > 0.0 ? (float)(1.0 / scale) : (float)n / (float)m;
    double src = ac ? (double)ratio * o : (double)ratio * (o + 0.5) - 0.5;
    if (src < 0.0) src = 0.0;
    int64_t f = (int64_t)floor(src);
    *i0 = (uint32_t)(f < (int64_t)n - 1 ? f : (int64_t)n - 1);
    float l = (float)(src - (double)*i0);
    *l1 = l < 0.0f ? 0.0f : l > 1.0f ? 1.0f : l;
    *i1 = *i0 < n - 1 ? *i0 + 1 : *i0;
}

void ref_resize_bilinear(const float *x, float *y, double *bound, uint64_t planes, uint32_t h, uint32_t w,
                         uint32_t ho, uint32_t wo, int align_corners, double scale_h, double scale_w)
{
    for (uint64_t p = 0; p < planes; p++)
        for (uint32_t oy = 0; oy < ho; oy++) {
            uint32_t r0, r1;
            float lh;
            taps(oy, h, ho, align_corners, scale_h, &r0, &r1, &lh);
            for (uint32_t ox = 0; ox < wo; ox++) {
                uint32_t c0, c1;
                float lw;
                taps(ox, w, wo, align_corners, scale_w, &c0, &c1, &lw);
                const float *xp = x + p * h * w;
                double t[4] = {xp[r0 * w + c0], xp[r0 * w + c1], xp[r1 * w + c0], xp[r1 * w + c1]};
                double wh[2] = {1.0f - lh, lh}, ww[2] = {1.0f - lw, lw}, v = 0, mx = 0;
                for (int i = 0; i < 4; i++) {
                    double wt = wh[i >> 1] * ww[i & 1];
                    if (wt == 0.0) continue; /* a zero weight drops its tap */
                    v += wt * t[i];
                    if (fabs(t[i]) > mx || isnan(t[i])) mx = fabs(t[i]);
                }
                size_t o = (size_t)(p * ho + oy) * wo + ox;
                y[o] = (float)v;
                if (bound) bound[o] = mx;
            }
        }
}

void ref_pool_area(const float *x, float *y, double *mean_abs, uint32_t *count, uint64_t planes, uint32_t h,
                   uint32_t w, uint32_t ho, uint32_t wo)
{
    for (uint64_t p = 0; p < planes; p++)
        for (uint32_t i = 0; i < ho; i++)
            for (uint32_t j = 0; j < wo; j++) {
                uint64_t y0 = (uint64_t)i * h / ho, y1 = ((uint64_t)(i + 1) * h + ho - 1) / ho;
                uint64_t x0 = (uint64_t)j * w / wo, x1 = ((uint64_t)(j + 1) * w + wo - 1) / wo;
                double s = 0, a = 0;
                for (uint64_t r = y0; r < y1; r++)
                    for (uint64_t c = x0; c < x1; c++) {
                        s += x[(p * h + r) * w + c];
                        a += fabs(x[(p * h + r) * w + c]);
                    }
                double k = (double)((y1 - y0) * (x1 - x0));
                size_t o = (size_t)(p * ho + i) * wo + j;
                y[o] = (float)(s / k);
                if (mean_abs) mean_abs[o] = a / k;
                if (count) count[o] = (uint32_t)k;
            }
}

void ref_batchnorm(const float *x, const float *mean, const float *var, const float *weight, const float *bias,
                   float *y, double *scale, uint64_t outer, uint32_t c, uint64_t inner, float eps)
{
    for (uint64_t o = 0; o < outer; o++)
        for (uint32_t ch = 0; ch < c; ch++) {
            double wt = weight ? weight[ch] : 1.0, b = bias ? bias[ch] : 0.0;
            double alpha = wt / sqrt((double)var[ch] + (double)eps);
            for (uint64_t i = 0; i < inner; i++) {
                size_t e = (size_t)((o * c + ch) * inner + i);
                y[e] = (float)(((double)x[e] - mean[ch]) * alpha + b);
                if (scale) scale[e] = fabs(x[e] * alpha) + fabs(mean[ch] * alpha) + fabs(b);
            }
        }
}

void ref_argmax(const float *x, int32_t *y, uint64_t outer, uint32_t k, uint64_t inner)
{
    for (uint64_t o = 0; o < outer; o++)
        for (uint64_t i = 0; i < inner; i++) {
            const float *p = x + o * k * inner + i;
            int32_t best = 0;
            for (uint32_t c = 0; c < k; c++) {
                if (isnan(p[(size_t)c * inner])) {
                    best = (int32_t)c;
                    break;
                }
                if (p[(size_t)c * inner] > p[(size_t)best * inner]) best = (int32_t)c;
            }
            y[o * inner + i] = best;
        }
}

void ref_permute(const float *x, float *y, const int64_t *dims, uint32_t rank, const int64_t *perm)
{
    uint64_t n = 1, xs[8], acc = 1;
    for (uint32_t d = 0; d < rank; d++) n *= (uint64_t)dims[d];
    for (int d = (int)rank - 1; d >= 0; d--) {
        xs[d] = acc;
        acc *= (uint64_t)dims[d];
    }
    for (uint64_t e = 0; e < n; e++) { /* e walks y in row-major order */
        uint64_t rem = e, src = 0;
        for (int d = (int)rank - 1; d >= 0; d--) {
            uint64_t size = (uint64_t)dims[perm[d]];
            src += rem % size * xs[perm[d]];
            rem /= size;
        }
        y[e] = x[src];
    }
}

void ref_concat(const float *const *xs, const uint64_t *mids, uint32_t n, uint64_t outer, uint64_t inner, float *y)
{
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++) total += mids[i];
    for (uint64_t o = 0; o < outer; o++)
        for (uint32_t i = 0, at = 0; i < n; at += (uint32_t)mids[i], i++)
            for (uint64_t m = 0; m < mids[i]; m++)
                for (uint64_t k = 0; k < inner; k++)
                    y[(o * total + at + m) * inner + k] = xs[i][(o * mids[i] + m) * inner + k];
}
