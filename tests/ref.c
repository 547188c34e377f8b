#include "ref.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

double ref_gelu(double x) { return 0.5 * x * (1.0 + erf(x / sqrt(2.0))); }

static double act_d(double v, int act)
{
    if (act == 1) return v > 0 ? v : 0;
    if (act == 2) return ref_gelu(v);
    if (act == 3) return v / (1.0 + exp(-v));
    if (act == 4) return tanh(v);
    if (act == 5) return 1.0 / (1.0 + exp(-v));
    return v;
}

void ref_matmul(const float *x, const float *w, const float *bias, float *y, double *mag, uint32_t batch,
                uint32_t m, uint32_t n, uint32_t k, int w_shared, int act)
{
    for (uint32_t b = 0; b < batch; b++) {
        const float *xb = x + (size_t)b * m * k;
        const float *wb = w + (w_shared ? 0 : (size_t)b * n * k);
        for (uint32_t i = 0; i < m; i++)
            for (uint32_t j = 0; j < n; j++) {
                double s = bias ? bias[j] : 0.0, a = bias ? fabs(bias[j]) : 0.0;
                for (uint32_t kk = 0; kk < k; kk++) {
                    double p = (double)xb[(size_t)i * k + kk] * wb[(size_t)j * k + kk];
                    s += p;
                    a += fabs(p);
                }
                size_t o = (size_t)b * m * n + (size_t)i * n + j;
                y[o] = (float)act_d(s, act);
                if (mag) mag[o] = a;
            }
    }
}

void ref_linear_lora(const float *x, const float *w, const float *bias, const float *la, const float *lb,
                     uint32_t n_adapters, const uint32_t *ranks, const float *scales, float *y, double *mag,
                     double *mag_lora, float *t, uint32_t m, uint32_t n, uint32_t k, uint32_t r, int act)
{
    /* Unfused on purpose: (x A_a^T) first, then B_a, adapter by adapter, as PyTorch's LoRA does. */
    double *xa = malloc(((size_t)r + 1) * sizeof(double)), *xam = malloc(((size_t)r + 1) * sizeof(double));
    double *sc = malloc(((size_t)r + 1) * sizeof(double));
    for (uint32_t a = 0, o = 0; a < n_adapters; o += ranks[a], a++)
        for (uint32_t j = o; j < o + ranks[a]; j++) sc[j] = scales[a];
    for (uint32_t i = 0; i < m; i++) {
        const float *xr = x + (size_t)i * k;
        for (uint32_t j = 0; j < r; j++) {
            double s = 0, a = 0;
            for (uint32_t kk = 0; kk < k; kk++) {
                double p = (double)xr[kk] * la[(size_t)j * k + kk];
                s += p;
                a += fabs(p);
            }
            xa[j] = s;
            xam[j] = a;
            if (t) t[(size_t)i * r + j] = (float)(sc[j] * s);
        }
        for (uint32_t c = 0; c < n; c++) {
            double s = bias ? bias[c] : 0.0, a = bias ? fabs(bias[c]) : 0.0, l = 0.0, lm;
            for (uint32_t kk = 0; kk < k; kk++) {
                double p = (double)xr[kk] * w[(size_t)c * k + kk];
                s += p;
                a += fabs(p);
            }
            double prod = 0, t2 = 0; /* sum_j |t_j B_cj|, sum_j (|s| sum_k |x A_j| |B_cj|)^2 */
            for (uint32_t aa = 0, o = 0; aa < n_adapters; o += ranks[aa], aa++) {
                double d = 0;
                for (uint32_t j = o; j < o + ranks[aa]; j++) {
                    double bj = lb[(size_t)c * r + j], e = fabs(scales[aa]) * xam[j] * fabs(bj);
                    d += xa[j] * bj;
                    prod += fabs(scales[aa] * xa[j] * bj);
                    t2 += e * e;
                }
                l += scales[aa] * d;
            }
            lm = sqrt((double)k + 1.0) * sqrt(t2) + sqrt((double)r + 1.0) * prod;
            size_t o = (size_t)i * n + c;
            y[o] = (float)act_d(s + l, act);
            if (mag) mag[o] = a;
            if (mag_lora) mag_lora[o] = lm;
        }
    }
    free(xa);
    free(xam);
    free(sc);
}

void ref_layernorm(const float *x, const float *gamma, const float *beta, float *y, double *mag, uint32_t rows,
                   uint32_t d, float eps)
{
    for (uint32_t r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * d;
        double mean = 0, var = 0;
        for (uint32_t i = 0; i < d; i++) mean += xr[i];
        mean /= d;
        for (uint32_t i = 0; i < d; i++) var += (xr[i] - mean) * (xr[i] - mean);
        var /= d;
        double rstd = 1.0 / sqrt(var + eps), xmax = 0;
        for (uint32_t i = 0; i < d; i++) xmax = fabs(xr[i]) > xmax ? fabs(xr[i]) : xmax;
        for (uint32_t i = 0; i < d; i++) {
            double o = (xr[i] - mean) * rstd;
            if (gamma) o = o * gamma[i] + beta[i];
            y[(size_t)r * d + i] = (float)o;
            if (mag) mag[(size_t)r * d + i] = xmax * rstd * (gamma ? fabs(gamma[i]) : 1.0);
        }
    }
}

void ref_unary(const float *x, float *y, uint64_t n, int act)
{
    for (uint64_t i = 0; i < n; i++) y[i] = (float)act_d(x[i], act);
}

void ref_softmax(const float *x, float *y, uint32_t rows, uint32_t d)
{
    for (uint32_t r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * d;
        double m = -INFINITY, s = 0;
        for (uint32_t i = 0; i < d; i++) m = xr[i] > m ? xr[i] : m;
        for (uint32_t i = 0; i < d; i++) s += exp(xr[i] - m);
        for (uint32_t i = 0; i < d; i++) y[(size_t)r * d + i] = (float)(exp(xr[i] - m) / s);
    }
}

void ref_binary(int op, const float *a, const uint32_t *as, uint32_t ar, const float *b, const uint32_t *bs,
                uint32_t br, float *y, const uint32_t *out, uint32_t orank)
{
    uint64_t n = 1;
    for (uint32_t i = 0; i < orank; i++) n *= out[i];
    for (uint64_t e = 0; e < n; e++) {
        /* Multi-index of e in `out`, then each operand's own flat index (size-1 dims read index 0). */
        uint64_t rem = e, ia = 0, ib = 0, sa = 1, sb = 1;
        for (int d = (int)orank - 1; d >= 0; d--) {
            uint64_t c = rem % out[d];
            rem /= out[d];
            int da = d - (int)(orank - ar), db = d - (int)(orank - br);
            if (da >= 0) {
                if (as[da] != 1) ia += c * sa;
                sa *= as[da];
            }
            if (db >= 0) {
                if (bs[db] != 1) ib += c * sb;
                sb *= bs[db];
            }
        }
        y[e] = op == 0 ? a[ia] + b[ib] : a[ia] * b[ib];
    }
}

uint16_t ref_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0)); /* inf / nan */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                                   /* overflow */
    if (ax < 0x38800000u) {                                                                     /* subnormal */
        float v;
        memcpy(&v, &ax, 4);
        /* value / 2^-24, rounded to nearest even by the FPU's default mode */
        float q = v * 16777216.0f;
        uint32_t r = (uint32_t)nearbyintf(q);
        return (uint16_t)(sign | r);
    }
    uint32_t mant = ax & 0x7fffffu;
    uint32_t e = (ax >> 23) - 127 + 15;
    uint32_t h = (e << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

float ref_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v;
    if (e == 0) v = ldexpf((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexpf((float)(m | 0x400), (int)e - 25);
    uint32_t bits;
    memcpy(&bits, &v, 4);
    bits |= sign;
    memcpy(&v, &bits, 4);
    return v;
}

void ref_attention(const float *q, const float *k, const float *v, const float *mask, int mask_batched,
                   const float *kp, float *out, double *mag, uint32_t batch, uint32_t heads, uint32_t tq, uint32_t tk,
                   uint32_t d, uint32_t q_stride, uint32_t kv_stride, uint32_t q_col, uint32_t k_col, uint32_t v_col,
                   double scale)
{
    double *s = malloc((tk + 1) * sizeof(double)), *sa = malloc((tk + 1) * sizeof(double));
    for (uint32_t b = 0; b < batch; b++)
        for (uint32_t h = 0; h < heads; h++)
            for (uint32_t i = 0; i < tq; i++) {
                const float *qr = q + ((size_t)b * tq + i) * q_stride + q_col + (size_t)h * d;
                double mx = -INFINITY, sabs = 0;
                for (uint32_t j = 0; j < tk; j++) {
                    const float *kr = k + ((size_t)b * tk + j) * kv_stride + k_col + (size_t)h * d;
                    double dot = 0, a = 0;
                    for (uint32_t c = 0; c < d; c++) {
                        dot += (double)qr[c] * kr[c];
                        a += fabs((double)qr[c] * kr[c]);
                    }
                    s[j] = dot * scale;
                    sa[j] = a * fabs(scale);
                    if (mask) {
                        double m = mask[(mask_batched ? (size_t)b * tq * tk : 0) + (size_t)i * tk + j];
                        s[j] += m;
                        sa[j] += fabs(m);
                    }
                    if (kp) {
                        s[j] += kp[(size_t)b * tk + j];
                        sa[j] += fabs(kp[(size_t)b * tk + j]);
                    }
                    if (s[j] > mx) mx = s[j];
                }
                int none = !(mx >= -3.4028234663852886e38 / 2);
                double l = 0;
                for (uint32_t j = 0; j < tk && !none; j++) {
                    s[j] = exp(s[j] - mx);
                    l += s[j];
                }
                double vmax = 0;
                for (uint32_t j = 0; j < tk && !none; j++)
                    if (s[j] > 0) {
                        if (sa[j] > sabs) sabs = sa[j];
                        const float *vr = v + ((size_t)b * tk + j) * kv_stride + v_col + (size_t)h * d;
                        for (uint32_t c = 0; c < d; c++) vmax = fabs(vr[c]) > vmax ? fabs(vr[c]) : vmax;
                    }
                float *orow = out + ((size_t)b * tq + i) * heads * d + (size_t)h * d;
                for (uint32_t c = 0; c < d; c++) {
                    double o = 0;
                    for (uint32_t j = 0; j < tk && !none; j++)
                        o += s[j] * v[((size_t)b * tk + j) * kv_stride + v_col + (size_t)h * d + c];
                    orow[c] = none ? 0.0f : (float)(o / l);
                    if (mag) mag[orow + c - out] = none ? 0.0 : (1.0 + sabs) * vmax;
                }
            }
    free(s);
    free(sa);
}

void ref_swiglu(const float *x, float *y, uint32_t rows, uint32_t h)
{
    for (uint32_t r = 0; r < rows; r++)
        for (uint32_t j = 0; j < h; j++) {
            double a = x[(size_t)r * 2 * h + j], b = x[(size_t)r * 2 * h + h + j];
            y[(size_t)r * h + j] = (float)(a / (1.0 + exp(-a)) * b);
        }
}
