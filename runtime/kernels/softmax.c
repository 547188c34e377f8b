/* Softmax over the last dimension. */
#include "kernels.h"

vkg_status vkg_softmax(vkg_cmd *cmd, vkg_tref x, vkg_tref y, uint32_t rows, uint32_t d)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    if (!x.buf || !y.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "softmax: x or y has no buffer");
    if ((uint64_t)rows * d > UINT32_MAX) return vkg_fail(VKG_ERROR_UNSUPPORTED, "softmax: tensor exceeds 2^32 elements");
    if (rows == 0 || d == 0) return VKG_SUCCESS;
    /* Short rows (attention over few keys) waste most of a wide workgroup: size it to the row. */
    uint32_t wg = d <= 32 ? 32 : d <= 64 ? 64 : 128;
    struct { uint32_t rows, d, gx; } pc = {rows, d, 0};
    uint32_t gy;
    vkg_grid_1d(ctx, rows, &pc.gx, &gy);
    vkg_pipeline_desc pd = {.shader = "softmax", .nbindings = 2, .push_size = sizeof pc, .nspec = 1, .spec = {wg}};
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    VkDeviceSize bytes = (VkDeviceSize)rows * d * 4;
    vkg_binding b[2] = {{x.buf, x.offset, bytes, 0, false}, {y.buf, y.offset, bytes, 0, true}};
    return vkg_cmd_dispatch(cmd, p, b, &pc, pc.gx, gy, 1, "softmax");
}
