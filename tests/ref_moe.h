/* CPU references of the MoE ops, in double precision, written for obviousness. */
#ifndef VKG_TEST_REF_MOE_H
#define VKG_TEST_REF_MOE_H
#include <stdint.h>

/* moe_router (docs/graph-format.md). gap (T, optional) gets, per token, the smallest distance between
 * a selected logit and the best unselected one (near ties may round either way on the device). */
void ref_moe_router(const float *x, const float *w, const float *b, uint32_t T, uint32_t D, uint32_t C, uint32_t first,
                    uint32_t k, int sigmoid, int gates_are_scores, int renorm, double scale, double temperature,
                    int32_t *ids, float *gates, float *counts, float *fraction, float *mean_score, float *load_balance,
                    float *z_loss, double *gap);
/* moe_experts: act 1 relu, 2 gelu, 3 swiglu (w3). Optional pointers may be NULL. */
void ref_moe_experts(const float *x, const int32_t *ids, const float *gates, const float *w1, const float *b1,
                     const float *w2, const float *b2, const float *w3, const float *res, float *y, uint32_t T,
                     uint32_t D, uint32_t k, uint32_t E, uint32_t h, int act);
/* moe_lora_mix: hbar (T, H), c (T, D). */
void ref_moe_lora_mix(const float *u, const float *a1, const int32_t *ids, const float *gates, const float *b1l,
                      const float *a2l, const float *b2l, const float *bias, const float *scale, const float *res,
                      float *hbar, float *c, uint32_t T, uint32_t H, uint32_t E, uint32_t r, uint32_t D, uint32_t k,
                      double s, int act);
#endif
