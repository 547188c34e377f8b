/* Kernels of the dense-prediction heads (DPT depth, BN segmentation): bilinear resize, area pooling
 * (adaptive_avg_pool2d), inference batch norm, argmax. All NCHW f32 in, f32 (argmax: i32) out.
 *
 * Each kernel splits its work into as many dispatches as the device's per-binding limits need
 * (128 MiB storage bindings on lavapipe; a (1, 150, 518, 518) logit map is 161 MB): a dispatch binds
 * only the window of each tensor it touches, from the nearest aligned offset below it. A unit of
 * splitting (a plane, an outer slice) that alone exceeds a limit is refused with
 * VKG_ERROR_UNSUPPORTED naming the op, the binding and the limit. */
#ifndef VKG_KERNEL_DENSE_H
#define VKG_KERNEL_DENSE_H

#include "kernels.h"

/* How a kernel reads its big input: texel fetches (cheap on lavapipe, a cached path on GPUs) or
 * storage-buffer loads. AUTO takes texel reads where the device allows them for this binding (its
 * window within maxTexelBufferElements, texel descriptors within maxPerStageDescriptorSampledImages)
 * and storage loads otherwise. */
typedef enum vkg_dense_read { VKG_DENSE_AUTO = 0, VKG_DENSE_TEXEL = 1, VKG_DENSE_STORAGE = 2 } vkg_dense_read;

/* Bilinear resize and area pooling of `planes` (= N * C) contiguous (h, w) planes of x into
 * (ho, wo) planes of y. */
typedef struct vkg_resize_args {
    vkg_tref x, y;
    uint64_t planes;
    uint32_t h, w, ho, wo;    /* all >= 1 when planes > 0 */
    int align_corners;        /* bilinear only */
    double scale_h, scale_w;  /* bilinear only: the scale factor the graph gave, or 0 (sizes given) */
    vkg_dense_read read;
    uint64_t max_window;      /* tests: caps each binding's window in bytes (0: the device's limits) */
} vkg_resize_args;

/* PyTorch's upsample_bilinear2d (ATen UpSampleKernel.cpp) per axis, in fp32 as ATen computes it:
 * same size is the identity; otherwise src = ratio * o (align_corners) or max(ratio * (o + 0.5) - 0.5, 0)
 * with ratio = (n-1)/(m-1) (0 when m = 1), 1/scale (a scale given) or n/m; i0 = min(floor(src), n-1),
 * i1 = min(i0+1, n-1), lambda = clamp(src - i0, 0, 1). The output is
 * h0 (w0 x00 + w1 x01) + h1 (w0 x10 + w1 x11) with w0 = 1 - w1; a zero weight drops its term (so
 * integral source coordinates copy exactly, even next to inf or NaN). */
vkg_status vkg_resize_bilinear(vkg_cmd *cmd, const vkg_resize_args *a);
/* The ratio above (what the shader gets), for references that mirror it; identity axes give 1. */
float vkg_resize_ratio(uint32_t n_in, uint32_t n_out, int align_corners, double scale);

/* adaptive_avg_pool2d = interpolate(mode='area'): y[i, j] = mean of x over rows
 * [floor(i h / ho), ceil((i+1) h / ho)) and columns [floor(j w / wo), ceil((j+1) w / wo)), summed
 * row-major in fp32 and divided by the row count, then the column count (ATen's order). */
vkg_status vkg_pool_area(vkg_cmd *cmd, const vkg_resize_args *a);

/* Inference batch norm over dim 1 of x (outer, channels, inner):
 * y = x * alpha[c] + beta[c], alpha = weight / sqrt(var + eps), beta = bias - mean * alpha, in fp32
 * (ATen's batch_norm_cpu_collect_linear_and_constant_terms). weight and bias are optional (buf NULL:
 * 1 and 0). */
typedef struct vkg_batchnorm_args {
    vkg_tref x, mean, var, weight, bias, y;
    uint64_t outer, inner;
    uint32_t channels;
    float eps;
    vkg_dense_read read;
    uint64_t max_window;
} vkg_batchnorm_args;
vkg_status vkg_batchnorm(vkg_cmd *cmd, const vkg_batchnorm_args *a);

/* y (outer, inner) i32 = argmax over k of x (outer, k, inner), k >= 1: the first NaN if there is
 * one (PyTorch treats NaN as the maximum), else the first maximum (ties to the lowest index). */
typedef struct vkg_argmax_args {
    vkg_tref x, y;
    uint64_t outer, inner;
    uint32_t k;
    vkg_dense_read read;
    uint64_t max_window;
} vkg_argmax_args;
vkg_status vkg_argmax(vkg_cmd *cmd, const vkg_argmax_args *a);

#endif
