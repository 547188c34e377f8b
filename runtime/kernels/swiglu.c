/* SwiGLU gate over rows of width 2h. */
#include "kernels.h"

enum { SWIGLU_WG = 256 };

vkg_status vkg_swiglu(vkg_cmd *cmd, vkg_tref x, vkg_tref y, uint32_t rows, uint32_t h)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    if (!x.buf || !y.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "swiglu: x or y has no buffer");
    uint64_t n = (uint64_t)rows * h;
    if (2 * n > UINT32_MAX) return vkg_fail(VKG_ERROR_UNSUPPORTED, "swiglu: tensor exceeds 2^32 elements");
    if (n == 0) return VKG_SUCCESS;
    struct { uint32_t n, gx, h; } pc = {(uint32_t)n, 0, h};
    uint32_t gy;
    vkg_grid_1d(ctx, (n + SWIGLU_WG - 1) / SWIGLU_WG, &pc.gx, &gy);
    vkg_pipeline_desc pd = {.shader = "swiglu", .nbindings = 2, .push_size = sizeof pc, .nspec = 1, .spec = {SWIGLU_WG}};
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    vkg_binding b[2] = {{x.buf, x.offset, 2 * n * 4, 0, false}, {y.buf, y.offset, n * 4, 0, true}};
    return vkg_cmd_dispatch(cmd, p, b, &pc, pc.gx, gy, 1, "swiglu");
}
