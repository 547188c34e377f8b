/* CPU references of conv2d and conv_transpose2d (NCHW, PyTorch semantics), in double. */
#ifndef VKG_TEST_REF_CONV_H
#define VKG_TEST_REF_CONV_H
#include <stdint.h>

typedef struct ref_conv_shape {
    int transposed;
    uint32_t n, c, h, w, o, kh, kw, groups;
    uint32_t stride[2], pad[2], dilation[2], out_pad[2]; /* (y, x) */
} ref_conv_shape;

/* Output height and width by PyTorch's formulas (<= 0 when the input is too small). */
void ref_conv_out_size(const ref_conv_shape *s, int64_t *ho, int64_t *wo);
/* y (n, o, ho, wo) = act(conv(x, w) + bias) + res, with w (o, c/g, kh, kw), or for transposed convs
 * (c, o/g, kh, kw) accumulated by scattering each input pixel (the GPU gathers: an independent
 * order). bias, res optional; act 0 none, 1 relu. mag (optional) gets sum |x w| + |bias| per output. */
void ref_conv(const ref_conv_shape *s, const float *x, const float *w, const float *bias, const float *res, int act,
              float *y, double *mag);
#endif
