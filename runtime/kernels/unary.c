/* Elementwise activations. */
#include "kernels.h"

enum { UNARY_WG = 256 };

vkg_status vkg_unary(vkg_cmd *cmd, vkg_act act, vkg_tref x, vkg_tref y, uint64_t n)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    static const char *names[6] = {NULL, "relu", "gelu", "silu", "tanh", "sigmoid"};
    if ((int)act < 1 || (int)act > 5)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "unary: activation %d is not relu, gelu, silu, tanh or sigmoid",
                        (int)act);
    if (n > UINT32_MAX) return vkg_fail(VKG_ERROR_UNSUPPORTED, "unary: %llu elements exceed 2^32", (unsigned long long)n);
    if (!x.buf || !y.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "unary: x or y has no buffer");
    if (n == 0) return VKG_SUCCESS;
    struct { uint32_t n, gx; } pc = {(uint32_t)n, 0};
    uint32_t gy;
    vkg_grid_1d(ctx, (n + UNARY_WG - 1) / UNARY_WG, &pc.gx, &gy);
    vkg_pipeline_desc pd = {.shader = "unary", .nbindings = 2, .push_size = sizeof pc, .nspec = 2,
                            .spec = {UNARY_WG, (uint32_t)act}};
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    vkg_binding b[2] = {{x.buf, x.offset, n * 4, 0, false}, {y.buf, y.offset, n * 4, 0, true}};
    return vkg_cmd_dispatch(cmd, p, b, &pc, pc.gx, gy, 1, names[act]);
}
