#include "ref_conv.h"

#include <math.h>
#include <stdlib.h>

void ref_conv_out_size(const ref_conv_shape *s, int64_t *ho, int64_t *wo)
{
    int64_t in[2] = {s->h, s->w}, k[2] = {s->kh, s->kw}, out[2];
    for (int i = 0; i < 2; i++) {
        int64_t st = s->stride[i], p = s->pad[i], d = s->dilation[i];
        if (s->transposed) {
            out[i] = (in[i] - 1) * st - 2 * p + d * (k[i] - 1) + s->out_pad[i] + 1;
        } else {
            int64_t num = in[i] + 2 * p - d * (k[i] - 1) - 1;
            out[i] = num < 0 ? 0 : num / st + 1;
        }
    }
    *ho = out[0];
    *wo = out[1];
}

void ref_conv(const ref_conv_shape *s, const float *x, const float *w, const float *bias, const float *res, int act,
              float *y, double *mag)
{
    int64_t ho, wo;
    ref_conv_out_size(s, &ho, &wo);
    size_t ny = (size_t)s->n * s->o * (size_t)ho * (size_t)wo;
    double *acc = calloc(ny + 1, sizeof(double)), *am = calloc(ny + 1, sizeof(double));
    uint32_t cg = s->c / s->groups, og = s->o / s->groups;
    for (uint32_t n = 0; n < s->n; n++)
        for (uint32_t o = 0; o < s->o; o++)
            for (int64_t i = 0; i < ho * wo; i++) {
                size_t at = ((size_t)n * s->o + o) * (size_t)(ho * wo) + (size_t)i;
                acc[at] = bias ? bias[o] : 0.0;
                am[at] = bias ? fabs(bias[o]) : 0.0;
            }
    if (!s->transposed) {
        for (uint32_t n = 0; n < s->n; n++)
            for (uint32_t o = 0; o < s->o; o++) {
                uint32_t g = o / og;
                for (int64_t oy = 0; oy < ho; oy++)
                    for (int64_t ox = 0; ox < wo; ox++) {
                        size_t at = (((size_t)n * s->o + o) * (size_t)ho + (size_t)oy) * (size_t)wo + (size_t)ox;
                        for (uint32_t ci = 0; ci < cg; ci++)
                            for (uint32_t ky = 0; ky < s->kh; ky++)
                                for (uint32_t kx = 0; kx < s->kw; kx++) {
                                    int64_t iy = oy * s->stride[0] - s->pad[0] + (int64_t)ky * s->dilation[0];
                                    int64_t ix = ox * s->stride[1] - s->pad[1] + (int64_t)kx * s->dilation[1];
                                    if (iy < 0 || ix < 0 || iy >= s->h || ix >= s->w) continue;
                                    double p = (double)x[(((size_t)n * s->c + g * cg + ci) * s->h + (size_t)iy) * s->w +
                                                         (size_t)ix] *
                                               w[(((size_t)o * cg + ci) * s->kh + ky) * s->kw + kx];
                                    acc[at] += p;
                                    am[at] += fabs(p);
                                }
                    }
            }
    } else {
        for (uint32_t n = 0; n < s->n; n++)
            for (uint32_t c = 0; c < s->c; c++) {
                uint32_t g = c / cg;
                for (int64_t iy = 0; iy < s->h; iy++)
                    for (int64_t ix = 0; ix < s->w; ix++) {
                        double xv = x[(((size_t)n * s->c + c) * s->h + (size_t)iy) * s->w + (size_t)ix];
                        for (uint32_t co = 0; co < og; co++)
                            for (uint32_t ky = 0; ky < s->kh; ky++)
                                for (uint32_t kx = 0; kx < s->kw; kx++) {
                                    int64_t oy = iy * s->stride[0] - s->pad[0] + (int64_t)ky * s->dilation[0];
                                    int64_t ox = ix * s->stride[1] - s->pad[1] + (int64_t)kx * s->dilation[1];
                                    if (oy < 0 || ox < 0 || oy >= ho || ox >= wo) continue;
                                    double p = xv * w[(((size_t)c * og + co) * s->kh + ky) * s->kw + kx];
                                    size_t at = (((size_t)n * s->o + g * og + co) * (size_t)ho + (size_t)oy) * (size_t)wo +
                                                (size_t)ox;
                                    acc[at] += p;
                                    am[at] += fabs(p);
                                }
                    }
            }
    }
    for (size_t i = 0; i < ny; i++) {
        double v = acc[i];
        if (act == 1 && v < 0) v = 0;
        if (res) v += res[i];
        y[i] = (float)v;
        if (mag) mag[i] = am[i];
    }
    free(acc);
    free(am);
}
