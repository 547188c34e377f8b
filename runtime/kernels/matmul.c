/* Linear / batched matmul dispatch: picks the variant and its preset for the device and shape. */
#include <string.h>

#include "kernels.h"

bool vkg_matmul_texel_supported(const vkg_context *ctx)
{
    /* The texel kernel spells out 8 subgroup lanes and broadcasts across them. */
    const vkg_device_info *d = &ctx->info;
    return d->texel_rgba32f && d->texel_rgba16f && d->subgroup_size == 8 &&
           (d->subgroup_ops & VK_SUBGROUP_FEATURE_BALLOT_BIT) && d->max_texel_buffer_elements >= (1u << 20);
}

vkg_mm_variant vkg_matmul_default_variant(const vkg_context *ctx)
{
    /* CPU implementations turn storage and shared-memory loads into per-lane loops; texel fetches
     * are the cheapest load there (bench/RESULTS.md). GPUs want shared-memory tiles. */
    if (ctx->info.is_cpu && vkg_matmul_texel_supported(ctx)) return VKG_MM_TEXEL;
    return VKG_MM_TILED;
}

typedef struct mm_push {
    uint32_t m, n, k, flags;
    uint32_t sx, sw, sy, pad;
} mm_push;

static vkg_status check_ref(vkg_tref r, VkDeviceSize bytes, const char *what)
{
    if (!r.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "matmul: %s has no buffer", what);
    if (r.offset > r.buf->size || bytes > r.buf->size - r.offset)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "matmul: %s needs %llu bytes at offset %llu; its buffer has %llu",
                        what, (unsigned long long)bytes, (unsigned long long)r.offset, (unsigned long long)r.buf->size);
    return VKG_SUCCESS;
}

vkg_status vkg_matmul(vkg_cmd *cmd, const vkg_matmul_args *a)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    const vkg_device_info *di = &ctx->info;
    uint32_t batch = a->batch ? a->batch : 1;
    if (a->w_dtype != VKG_DTYPE_F32 && a->w_dtype != VKG_DTYPE_F16)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "matmul: weight dtype %d not supported (fp32 or fp16)", (int)a->w_dtype);
    if ((uint64_t)a->m * a->k > UINT32_MAX / batch || (uint64_t)a->n * a->k > UINT32_MAX / batch ||
        (uint64_t)a->m * a->n > UINT32_MAX / batch)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "matmul: %u x (%u,%u,%u) exceeds 2^32 elements per operand", batch,
                        a->m, a->k, a->n);
    if (batch > di->max_workgroup_count[2])
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "matmul: batch %u over the device's z grid limit %u", batch,
                        di->max_workgroup_count[2]);
    VkDeviceSize wsz = a->w_dtype == VKG_DTYPE_F16 ? 2 : 4;
    VkDeviceSize xb = (VkDeviceSize)batch * a->m * a->k * 4;
    VkDeviceSize wb = (VkDeviceSize)(a->w_shared ? 1 : batch) * a->n * a->k * wsz;
    VkDeviceSize yb = (VkDeviceSize)batch * a->m * a->n * 4;
    VKG_TRY(check_ref(a->x, xb, "x"));
    VKG_TRY(check_ref(a->w, wb, "w"));
    VKG_TRY(check_ref(a->y, yb, "y"));
    if (a->bias.buf) VKG_TRY(check_ref(a->bias, (VkDeviceSize)a->n * 4, "bias"));
    if (a->m == 0 || a->n == 0) return VKG_SUCCESS; /* empty output: nothing to write */

    if (a->scale.buf) VKG_TRY(check_ref(a->scale, (VkDeviceSize)a->n * 4, "scale"));
    if (a->residual.buf) VKG_TRY(check_ref(a->residual, yb, "residual"));
    mm_push pc = {a->m, a->n, a->k,
                  (a->bias.buf ? 1u : 0u) | ((uint32_t)a->act << 1) | (a->scale.buf ? 8u : 0u) | (a->residual.buf ? 16u : 0u),
                  a->m * a->k, a->w_shared ? 0 : a->n * a->k, a->m * a->n, 0};
    vkg_mm_variant v = a->variant ? a->variant : vkg_matmul_default_variant(ctx);
    vkg_pipeline_desc pd = {.nbindings = 6, .push_size = sizeof pc, .nspec = 6};
    uint32_t gx, gy;
    /* Absent optional operands (bias, scale, residual) bind x, which the shader then never reads. */
    vkg_binding b[6] = {
        {a->x.buf, a->x.offset, xb, 0, false},
        {a->w.buf, a->w.offset, wb, 0, false},
        {a->bias.buf ? a->bias.buf : a->x.buf, a->bias.buf ? a->bias.offset : a->x.offset, 0, 0, false},
        {a->y.buf, a->y.offset, yb, 0, true},
        {a->scale.buf ? a->scale.buf : a->x.buf, a->scale.buf ? a->scale.offset : a->x.offset, 0, 0, false},
        {a->residual.buf ? a->residual.buf : a->x.buf, a->residual.buf ? a->residual.offset : a->x.offset, 0, 0, false}};
    if (a->scale.buf) b[4].range = (VkDeviceSize)a->n * 4;
    if (a->residual.buf) b[5].range = yb;
    if (a->bias.buf) b[2].range = (VkDeviceSize)a->n * 4;

    if (v == VKG_MM_TEXEL) {
        bool vec4 = a->k % 4 == 0;
        if (!vkg_matmul_texel_supported(ctx))
            return vkg_fail(VKG_ERROR_UNSUPPORTED, "matmul: the texel variant needs subgroup size 8 with ballot "
                            "operations and RGBA32F/RGBA16F uniform texel buffers; this device has subgroup size %d",
                            di->subgroup_size);
        if (a->x.offset % 16 || a->w.offset % 16)
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "matmul: texel variant needs x and w offsets on 16 bytes");
        pd.shader = vec4 ? "matmul_texel" : "matmul_texel_k1";
        pd.bindings[0] = pd.bindings[1] = VKG_BIND_UNIFORM_TEXEL;
        b[0].format = vec4 ? VK_FORMAT_R32G32B32A32_SFLOAT : VK_FORMAT_R32_SFLOAT;
        b[1].format = a->w_dtype == VKG_DTYPE_F16 ? (vec4 ? VK_FORMAT_R16G16B16A16_SFLOAT : VK_FORMAT_R16_SFLOAT)
                                                  : b[0].format;
        /* One subgroup per workgroup, 16 rows x 128 columns: the best of the sweep in bench/RESULTS.md.
         * Rows fewer than 16 would waste most of the block, so thin problems take 8 rows. */
        const uint32_t wg = 8, tm = a->m <= 8 ? 1 : 2, tn = 16;
        uint32_t spec[6] = {wg, 1, 1, 1, tm, tn};
        memcpy(pd.spec, spec, sizeof spec);
        gx = (a->n + wg * tn - 1) / (wg * tn);
        gy = (a->m + 8 * tm - 1) / (8 * tm);
    } else {
        pd.shader = a->w_dtype == VKG_DTYPE_F16 ? "matmul_tiled_f16w" : "matmul_tiled";
        /* 64x64 tiles, 4x4 per invocation, 256 invocations; a 32x32 tile where the device is small. */
        uint32_t bm = 64, bn = 64, bk = 16, tm = 4, tn = 4;
        if (di->max_workgroup_invocations < 256 || di->max_shared_memory < 2 * bk * 64 * 4) bm = bn = 32;
        uint32_t spec[6] = {(bm / tm) * (bn / tn), bm, bn, bk, tm, tn};
        memcpy(pd.spec, spec, sizeof spec);
        gx = (a->n + bn - 1) / bn;
        gy = (a->m + bm - 1) / bm;
    }
    if (gy > di->max_workgroup_count[1] || gx > di->max_workgroup_count[0])
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "matmul: m=%u n=%u needs a %ux%u grid, over the device limit", a->m,
                        a->n, gx, gy);
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    return vkg_cmd_dispatch(cmd, p, b, &pc, gx, gy, batch, "matmul");
}
