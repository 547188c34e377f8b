/* CPU references of the MoE ops (see ref_moe.h). */
#include "ref_moe.h"

#include <math.h>
#include <stdlib.h>

#include "ref.h"

static double act_of(double v, int act)
{
    if (act == 1) return v > 0 ? v : 0;
    if (act == 2) return ref_gelu(v);
    if (act == 3) return v / (1.0 + exp(-v));
    return v;
}

void ref_moe_router(const float *x, const float *w, const float *b, uint32_t T, uint32_t D, uint32_t C, uint32_t first,
                    uint32_t k, int sigmoid, int gates_are_scores, int renorm, double scale, double temperature,
                    int32_t *ids, float *gates, float *counts, float *fraction, float *mean_score, float *load_balance,
                    float *z_loss, double *gap)
{
    uint32_t E = C - first;
    double *z = malloc(C * sizeof *z), *mean = calloc(C, sizeof *mean), zsum = 0;
    char *chosen = malloc(C);
    for (uint32_t e = 0; e < E; e++) counts[e] = 0;
    for (uint32_t t = 0; t < T; t++) {
        double m = -INFINITY;
        for (uint32_t c = 0; c < C; c++) {
            double acc = b ? b[c] : 0;
            for (uint32_t d = 0; d < D; d++) acc += (double)x[t * D + d] * w[c * D + d];
            z[c] = acc / temperature;
            if (z[c] > m) m = z[c];
            chosen[c] = 0;
        }
        double s = 0;
        for (uint32_t c = 0; c < C; c++) s += exp(z[c] - m);
        double lse = m + log(s);
        zsum += lse * lse;
        for (uint32_t c = 0; c < C; c++) mean[c] += sigmoid ? 1.0 / (1.0 + exp(-z[c])) : exp(z[c] - lse);
        double g[64], gs = 0, top = 0;
        for (uint32_t j = 0; j < k; j++) {
            int best = -1;
            for (uint32_t c = first; c < C; c++)
                if (!chosen[c] && (best < 0 || z[c] > z[best])) best = (int)c;
            chosen[best] = 1;
            ids[t * k + j] = best - (int)first;
            counts[best - first] += 1;
            if (!gates_are_scores) {
                if (j == 0) top = z[best];
                g[j] = exp(z[best] - top);
            } else {
                g[j] = sigmoid ? 1.0 / (1.0 + exp(-z[best])) : exp(z[best] - lse);
            }
            gs += g[j];
        }
        for (uint32_t j = 0; j < k; j++)
            gates[t * k + j] = (float)((!gates_are_scores || renorm ? g[j] / gs : g[j]) * scale);
        if (gap) {
            double lowest = INFINITY, best_out = -INFINITY;
            for (uint32_t c = first; c < C; c++) {
                if (chosen[c] && z[c] < lowest) lowest = z[c];
                if (!chosen[c] && z[c] > best_out) best_out = z[c];
            }
            /* also ties inside the selection change the order of ids */
            double inner = INFINITY;
            for (uint32_t j = 0; j + 1 < k; j++) {
                double dz = z[ids[t * k + j] + first] - z[ids[t * k + j + 1] + first];
                if (dz < inner) inner = dz;
            }
            double gp = lowest - best_out;
            gap[t] = inner < gp ? inner : gp;
        }
    }
    double sq = 0;
    for (uint32_t c = 0; c < C; c++) {
        double mc = T ? mean[c] / T : 0;
        mean_score[c] = (float)mc;
        sq += mc * mc;
    }
    for (uint32_t e = 0; e < E; e++) fraction[e] = T ? (float)(counts[e] / ((double)T * k)) : 0.0f;
    *load_balance = (float)(C * sq);
    *z_loss = T ? (float)(zsum / T) : 0.0f;
    free(z);
    free(mean);
    free(chosen);
}

/* The token's slots in ascending (expert id, slot). */
static void slot_order(const int32_t *ids, uint32_t k, uint32_t *order)
{
    for (uint32_t j = 0; j < k; j++) order[j] = j;
    for (uint32_t i = 1; i < k; i++)
        for (uint32_t j = i; j > 0 && ids[order[j]] < ids[order[j - 1]]; j--) {
            uint32_t t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
}

void ref_moe_experts(const float *x, const int32_t *ids, const float *gates, const float *w1, const float *b1,
                     const float *w2, const float *b2, const float *w3, const float *res, float *y, uint32_t T,
                     uint32_t D, uint32_t k, uint32_t E, uint32_t h, int act)
{
    double *a = malloc((h ? h : 1) * sizeof *a), *acc = malloc((D ? D : 1) * sizeof *acc);
    uint32_t order[64];
    for (uint32_t t = 0; t < T; t++) {
        for (uint32_t d = 0; d < D; d++) acc[d] = 0;
        slot_order(ids + t * k, k, order);
        for (uint32_t jj = 0; jj < k; jj++) {
            uint32_t j = order[jj];
            int32_t e = ids[t * k + j];
            if (e < 0 || (uint32_t)e >= E) continue;
            double g = gates[t * k + j];
            for (uint32_t i = 0; i < h; i++) {
                double v = b1 ? b1[(size_t)e * h + i] : 0, v3 = 0;
                for (uint32_t d = 0; d < D; d++) {
                    v += (double)x[t * D + d] * w1[((size_t)e * h + i) * D + d];
                    if (w3) v3 += (double)x[t * D + d] * w3[((size_t)e * h + i) * D + d];
                }
                a[i] = act == 3 ? act_of(v, 3) * v3 : act_of(v, act);
            }
            for (uint32_t d = 0; d < D; d++) {
                double v = b2 ? b2[(size_t)e * D + d] : 0;
                for (uint32_t i = 0; i < h; i++) v += a[i] * w2[((size_t)e * D + d) * h + i];
                acc[d] += g * v;
            }
        }
        for (uint32_t d = 0; d < D; d++) y[t * D + d] = (float)((res ? res[t * D + d] : 0) + acc[d]);
    }
    free(a);
    free(acc);
}

void ref_moe_lora_mix(const float *u, const float *a1, const int32_t *ids, const float *gates, const float *b1l,
                      const float *a2l, const float *b2l, const float *bias, const float *scale, const float *res,
                      float *hbar, float *c, uint32_t T, uint32_t H, uint32_t E, uint32_t r, uint32_t D, uint32_t k,
                      double s, int act)
{
    double *hb = malloc(H * sizeof *hb), *h = malloc(H * sizeof *h), *a2 = malloc(r * sizeof *a2),
           *cc = malloc((D ? D : 1) * sizeof *cc);
    uint32_t order[64];
    for (uint32_t t = 0; t < T; t++) {
        for (uint32_t i = 0; i < H; i++) hb[i] = 0;
        for (uint32_t d = 0; d < D; d++) cc[d] = 0;
        double gs = 0;
        slot_order(ids + t * k, k, order);
        for (uint32_t jj = 0; jj < k; jj++) {
            uint32_t j = order[jj];
            int32_t e = ids[t * k + j];
            if (e < 0 || (uint32_t)e >= E) continue;
            double g = gates[t * k + j];
            gs += g;
            for (uint32_t i = 0; i < H; i++) {
                double v = 0;
                for (uint32_t q = 0; q < r; q++) v += (double)a1[(size_t)t * E * r + e * r + q] * b1l[((size_t)e * H + i) * r + q];
                h[i] = act_of(u[(size_t)t * H + i] + s * v, act);
                hb[i] += g * h[i];
            }
            for (uint32_t q = 0; q < r; q++) {
                double v = 0;
                for (uint32_t i = 0; i < H; i++) v += a2l[((size_t)e * r + q) * H + i] * h[i];
                a2[q] = v;
            }
            for (uint32_t d = 0; d < D; d++) {
                double v = 0;
                for (uint32_t q = 0; q < r; q++) v += b2l[((size_t)e * D + d) * r + q] * a2[q];
                cc[d] += s * g * v;
            }
        }
        for (uint32_t i = 0; i < H; i++) hbar[(size_t)t * H + i] = (float)hb[i];
        for (uint32_t d = 0; d < D; d++) {
            double v = cc[d] + (bias ? gs * bias[d] : 0);
            if (scale) v *= scale[d];
            c[(size_t)t * D + d] = (float)((res ? res[(size_t)t * D + d] : 0) + v);
        }
    }
    free(hb);
    free(h);
    free(a2);
    free(cc);
}
