/* CPU references of the dense-head ops (runtime/kernels/dense.h, graph/ops_dense.c), written for
 * obviousness: coordinates as ATen computes them (fp32), values in double. */
#ifndef VKG_TEST_REF_DENSE_H
#define VKG_TEST_REF_DENSE_H
#include <stdint.h>

/* PyTorch bilinear resize of `planes` (h, w) planes to (ho, wo); scale_* > 0: the scale factor
 * given (align_corners = 0 steps by 1/scale). bound (optional) gets each output's largest |tap| of
 * the taps it blends: fp32 blending is within a few ulp of it. */
void ref_resize_bilinear(const float *x, float *y, double *bound, uint64_t planes, uint32_t h, uint32_t w,
                         uint32_t ho, uint32_t wo, int align_corners, double scale_h, double scale_w);
/* adaptive_avg_pool2d; bound (optional) gets the mean |x| of each window and its element count
 * (count * mean|x| * FLT_EPSILON bounds a sequential fp32 sum). */
void ref_pool_area(const float *x, float *y, double *mean_abs, uint32_t *count, uint64_t planes, uint32_t h,
                   uint32_t w, uint32_t ho, uint32_t wo);
/* y = (x - mean) / sqrt(var + eps) * weight + bias over dim 1 of (outer, c, inner); weight, bias
 * may be NULL. scale (optional) gets |x alpha| + |mean alpha| + |bias| with alpha = weight / std:
 * the magnitudes that the fp32 form x * alpha + (bias - mean * alpha) rounds. */
void ref_batchnorm(const float *x, const float *mean, const float *var, const float *weight, const float *bias,
                   float *y, double *scale, uint64_t outer, uint32_t c, uint64_t inner, float eps);
/* argmax over k of (outer, k, inner): the first NaN, else the first maximum. */
void ref_argmax(const float *x, int32_t *y, uint64_t outer, uint32_t k, uint64_t inner);
/* y = x.permute(perm) for x of `rank` dims. */
void ref_permute(const float *x, float *y, const int64_t *dims, uint32_t rank, const int64_t *perm);
/* y = cat(xs, axis) where input i is (outer, mids[i], inner). */
void ref_concat(const float *const *xs, const uint64_t *mids, uint32_t n, uint64_t outer, uint64_t inner, float *y);
#endif
