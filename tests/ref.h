/* Plain CPU references for every op, in double precision where it matters. The GPU kernels are
 * checked against these; they are written for obviousness, not speed. */
#ifndef VKG_TEST_REF_H
#define VKG_TEST_REF_H
#include <stdint.h>

/* y[b,m,n] = act(sum_k x[b,m,k] w[b?,n,k] + bias[n]); also returns sum_k |x w| per output in mag
 * (for error bounds) when mag is not NULL. act: 0 none, 1 relu, 2 gelu(erf). */
void ref_matmul(const float *x, const float *w, const float *bias, float *y, double *mag, uint32_t batch,
                uint32_t m, uint32_t n, uint32_t k, int w_shared, int act);
/* The LoRA linear before its epilogue, unfused: y[m,c] = act(sum_k x w[c] + bias[c] + sum_a s_a (x A_a^T)
 * B_a^T), A = la (r, k) and B = lb (n, r) with adapter a on ranks [o_a, o_a + ranks[a]). Optional:
 * mag gets sum_k |x w| + |bias| per output, as ref_matmul; mag_lora the LoRA term's fp32 error in ulps:
 * each t_j = s_a x A_j is off by ~sqrt(k) ulp of |s_a| sum_k |x A_j|, independently per rank, so through
 * B they add as sqrt(k+1) * sqrt(sum_j (|s_a| sum_k |x A_j| |B_cj|)^2), plus sqrt(r+1) * sum_j |t_j B_cj|
 * for the rank-long second segment; t (m, r) gets s_a x A_a^T (the LoRA kernel's output). */
void ref_linear_lora(const float *x, const float *w, const float *bias, const float *la, const float *lb,
                     uint32_t n_adapters, const uint32_t *ranks, const float *scales, float *y, double *mag,
                     double *mag_lora, float *t, uint32_t m, uint32_t n, uint32_t k, uint32_t r, int act);
/* mag (optional) gets each output's conditioning scale, max|x_row| * rstd * |gamma|: fp32 rounding of
 * the inputs moves the output by about FLT_EPSILON times this. */
void ref_layernorm(const float *x, const float *gamma, const float *beta, float *y, double *mag, uint32_t rows,
                   uint32_t d, float eps);
void ref_unary(const float *x, float *y, uint64_t n, int act);
/* y (rows, h) = silu(x[:, :h]) * x[:, h:] for x (rows, 2h). */
void ref_swiglu(const float *x, float *y, uint32_t rows, uint32_t h);
void ref_softmax(const float *x, float *y, uint32_t rows, uint32_t d);
/* NumPy-broadcast add (op 0) or multiply (op 1); shapes right-aligned; y has `out` shape. */
void ref_binary(int op, const float *a, const uint32_t *as, uint32_t ar, const float *b, const uint32_t *bs,
                uint32_t br, float *y, const uint32_t *out, uint32_t orank);
double ref_gelu(double x);
/* Multi-head attention (layout of runtime/kernels/attention.h, strides and columns in floats):
 * out[b,i,h,:] = softmax_j(scale * q.k + mask[(b,)i,j] + kp[b,j]) v, in double. A row whose scores
 * are all -inf (or below -FLT_MAX/2) gives 0. mag (optional) gets, per output, the fp32 error scale
 * (1 + max_j |scale * sum|q k|| + |mask| + |kp|) * max_j |v| over the unmasked keys. */
void ref_attention(const float *q, const float *k, const float *v, const float *mask, int mask_batched,
                   const float *kp, float *out, double *mag, uint32_t batch, uint32_t heads, uint32_t tq, uint32_t tk,
                   uint32_t d, uint32_t q_stride, uint32_t kv_stride, uint32_t q_col, uint32_t k_col, uint32_t v_col,
                   double scale);

/* IEEE half conversions, round to nearest even, with subnormals. */
uint16_t ref_f32_to_f16(float f);
float ref_f16_to_f32(uint16_t h);
#endif
