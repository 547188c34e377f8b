/* LayerNorm over the last dimension. */
#include "kernels.h"

bool vkg_layernorm_subgroup_supported(const vkg_context *ctx)
{
    const vkg_device_info *di = &ctx->info;
    return di->subgroup_size == 8 && (di->subgroup_ops & VK_SUBGROUP_FEATURE_ARITHMETIC_BIT) && di->texel_rgba32f;
}

vkg_status vkg_layernorm_variant(vkg_cmd *cmd, vkg_tref x, vkg_tref gamma, vkg_tref beta, vkg_tref y, uint32_t rows,
                                 uint32_t d, float eps, int variant)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    if (!x.buf || !y.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "layernorm: x or y has no buffer");
    if (!gamma.buf != !beta.buf)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "layernorm: give both weight and bias, or neither");
    if (!(eps >= 0.0f)) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "layernorm: eps must be >= 0 (got %g)", (double)eps);
    if ((uint64_t)rows * d > UINT32_MAX) return vkg_fail(VKG_ERROR_UNSUPPORTED, "layernorm: tensor exceeds 2^32 elements");
    if (rows == 0 || d == 0) return VKG_SUCCESS;
    uint32_t wg = d <= 32 ? 32 : d <= 64 ? 64 : 128;
    struct { uint32_t rows, d, gx, affine; float eps; } pc = {rows, d, 0, gamma.buf ? 1u : 0u, eps};
    uint32_t gy;
    vkg_grid_1d(ctx, rows, &pc.gx, &gy);
    vkg_pipeline_desc pd = {.shader = "layernorm", .nbindings = 4, .push_size = sizeof pc, .nspec = 1, .spec = {wg}};
    if (variant == 0) variant = ctx->info.is_cpu && vkg_layernorm_subgroup_supported(ctx) ? 2 : 1;
    bool vec4 = d % 4 == 0 && x.offset % 16 == 0 && (!gamma.buf || (gamma.offset % 16 == 0 && beta.offset % 16 == 0));
    VkFormat fmt = vec4 ? VK_FORMAT_R32G32B32A32_SFLOAT : VK_FORMAT_R32_SFLOAT;
    if (variant == 2) {
        if (!vkg_layernorm_subgroup_supported(ctx))
            return vkg_fail(VKG_ERROR_UNSUPPORTED, "layernorm: the subgroup variant needs subgroup size 8 with "
                            "arithmetic operations; this device has %d", ctx->info.subgroup_size);
        pd.shader = vec4 ? "layernorm_sg" : "layernorm_sg1";
        pd.spec[0] = 8;
        pd.bindings[0] = pd.bindings[1] = pd.bindings[2] = VKG_BIND_UNIFORM_TEXEL;
    }
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    VkDeviceSize bytes = (VkDeviceSize)rows * d * 4, pb = (VkDeviceSize)d * 4;
    /* Without affine parameters the shader never reads bindings 1-2; bind x there to stay valid. */
    vkg_binding b[4] = {{x.buf, x.offset, bytes, fmt, false},
                        {gamma.buf ? gamma.buf : x.buf, gamma.buf ? gamma.offset : x.offset, pb, fmt, false},
                        {beta.buf ? beta.buf : x.buf, beta.buf ? beta.offset : x.offset, pb, fmt, false},
                        {y.buf, y.offset, bytes, 0, true}};
    return vkg_cmd_dispatch(cmd, p, b, &pc, pc.gx, gy, 1, "layernorm");
}

vkg_status vkg_layernorm(vkg_cmd *cmd, vkg_tref x, vkg_tref gamma, vkg_tref beta, vkg_tref y, uint32_t rows,
                         uint32_t d, float eps)
{
    return vkg_layernorm_variant(cmd, x, gamma, beta, y, rows, d, eps, 0);
}
