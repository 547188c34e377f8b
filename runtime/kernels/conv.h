/* Conv2d and ConvTranspose2d, NCHW, fp32 activations, fp32 or fp16 weights (shaders/conv.comp). */
#ifndef VKG_KERNEL_CONV_H
#define VKG_KERNEL_CONV_H

#include "kernels.h"

typedef struct vkg_conv_args {
    vkg_tref x;        /* (n, c, h, w) fp32 */
    vkg_tref weight;   /* conv (o, c/groups, kh, kw); transposed (c, o/groups, kh, kw); fp32 or fp16 */
    vkg_tref bias;     /* (o) fp32, optional (buf NULL) */
    vkg_tref residual; /* (n, o, ho, wo) fp32, optional: added after the activation */
    vkg_tref y;        /* (n, o, ho, wo) fp32 */
    vkg_tref scratch;  /* vkg_conv_scratch_bytes(); overlaps no operand */
    bool transposed;
    uint32_t n, c, h, w, o, kh, kw, groups;
    uint32_t stride[2], pad[2], dilation[2], out_pad[2]; /* (y, x); out_pad: transposed only */
    vkg_dtype w_dtype;
    vkg_act act;       /* NONE or RELU */
    vkg_mm_variant variant; /* AUTO: as vkg_conv_default_variant */
} vkg_conv_args;

/* Output height and width by PyTorch's formulas (conv: (h + 2p - d (k - 1) - 1) / s + 1; transposed:
 * (h - 1) s - 2p + d (k - 1) + out_pad + 1); either may be <= 0 for a bad configuration. */
void vkg_conv_out_size(const vkg_conv_args *a, int64_t *ho, int64_t *wo);
/* The texel variant needs subgroups of 8 with ballot and RGBA32F/R32F uniform texel buffers. */
bool vkg_conv_texel_supported(const vkg_context *ctx);
/* The variant AUTO picks: texel where vkg_matmul_default_variant picks texel (and VKG_MATMUL_VARIANT
 * steers both), tiled elsewhere. */
vkg_mm_variant vkg_conv_default_variant(const vkg_context *ctx);
/* Scratch bytes the chosen variant needs (the texel variant's packed input and weights; 0 for tiled). */
VkDeviceSize vkg_conv_scratch_bytes(const vkg_context *ctx, const vkg_conv_args *a);
/* Checks every shape, range and device limit, then records the dispatches (texel: 3, tiled: 1). */
vkg_status vkg_conv2d(vkg_cmd *cmd, const vkg_conv_args *a);

#endif
