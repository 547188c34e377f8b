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
    if (ctx->matmul_variant == 1) return VKG_MM_TILED;
    if (ctx->matmul_variant == 2 && vkg_matmul_texel_supported(ctx)) return VKG_MM_TEXEL;
    if (ctx->info.is_cpu && vkg_matmul_texel_supported(ctx)) return VKG_MM_TEXEL;
    return VKG_MM_TILED;
}

static vkg_mm_variant variant_of(const vkg_context *ctx, const vkg_matmul_args *a)
{
    return a->variant ? a->variant : vkg_matmul_default_variant(ctx);
}

typedef struct mm_push {
    uint32_t m, n, k, flags;
    uint32_t sx, sw, sy, r; /* r: LoRA rank sum, the length of the second K segment (LoRA blobs only) */
} mm_push;

VkDeviceSize vkg_matmul_lora_scratch_bytes(const vkg_matmul_args *a)
{
    return a->lora_a.buf ? (VkDeviceSize)a->m * a->lora_r * 4 : 0;
}

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
    bool lora = a->lora_a.buf != NULL;
    vkg_lora_args la = {0};
    VkDeviceSize lbb = 0, ltb = vkg_matmul_lora_scratch_bytes(a);
    if (!lora && a->lora_b.buf)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "matmul: lora_b without lora_a; give both or neither");
    if (lora) {
        if (!a->lora_b.buf)
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "matmul: lora_a without lora_b; give both or neither");
        if (batch != 1) return vkg_fail(VKG_ERROR_UNSUPPORTED, "matmul: LoRA needs batch 1 (got %u)", batch);
        la = (vkg_lora_args){.x = a->x, .a = a->lora_a, .t = a->lora_t, .m = a->m, .k = a->k, .r = a->lora_r,
                             .dtype = a->lora_dtype, .n_adapters = a->lora_n_adapters, .variant = variant_of(ctx, a)};
        memcpy(la.ranks, a->lora_ranks, sizeof la.ranks);
        memcpy(la.scales, a->lora_scales, sizeof la.scales);
        VKG_TRY(vkg_lora_check(cmd, &la, "matmul"));
        if ((uint64_t)a->n * a->lora_r > UINT32_MAX)
            return vkg_fail(VKG_ERROR_UNSUPPORTED, "matmul: lora_b (%u, %u) exceeds 2^32 elements", a->n, a->lora_r);
        lbb = (VkDeviceSize)a->n * a->lora_r * (a->lora_dtype == VKG_DTYPE_F16 ? 2 : 4);
        VKG_TRY(check_ref(a->lora_b, lbb, "lora_b"));
        /* t is written by the first dispatch and read by the second: it must alias nothing either reads
         * or the second writes. */
        const struct { vkg_tref r; VkDeviceSize bytes; const char *name; } others[] = {
            {a->w, wb, "w"}, {a->bias, a->bias.buf ? (VkDeviceSize)a->n * 4 : 0, "bias"}, {a->y, yb, "y"},
            {a->scale, a->scale.buf ? (VkDeviceSize)a->n * 4 : 0, "scale"},
            {a->residual, a->residual.buf ? yb : 0, "residual"}, {a->lora_b, lbb, "lora_b"}};
        for (size_t i = 0; i < VKG_ARRAY_LEN(others); i++)
            if (vkg_tref_overlap(a->lora_t, ltb, others[i].r, others[i].bytes))
                return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "matmul: the LoRA scratch lora_t overlaps %s",
                                others[i].name);
    }
    if (a->m == 0 || a->n == 0) return VKG_SUCCESS; /* empty output: nothing to write */

    if (a->scale.buf) VKG_TRY(check_ref(a->scale, (VkDeviceSize)a->n * 4, "scale"));
    if (a->residual.buf) VKG_TRY(check_ref(a->residual, yb, "residual"));
    mm_push pc = {a->m, a->n, a->k,
                  (a->bias.buf ? 1u : 0u) | ((uint32_t)a->act << 1) | (a->scale.buf ? 8u : 0u) | (a->residual.buf ? 16u : 0u),
                  a->m * a->k, a->w_shared ? 0 : a->n * a->k, a->m * a->n, lora ? a->lora_r : 0};
    vkg_mm_variant v = variant_of(ctx, a);
    vkg_pipeline_desc pd = {.nbindings = lora ? 8 : 6, .push_size = sizeof pc, .nspec = lora ? 8 : 6};
    uint32_t gx, gy;
    /* Absent optional operands (bias, scale, residual) bind x, which the shader then never reads. */
    vkg_binding b[8] = {
        {a->x.buf, a->x.offset, xb, 0, false},
        {a->w.buf, a->w.offset, wb, 0, false},
        {a->bias.buf ? a->bias.buf : a->x.buf, a->bias.buf ? a->bias.offset : a->x.offset, 0, 0, false},
        {a->y.buf, a->y.offset, yb, 0, true},
        {a->scale.buf ? a->scale.buf : a->x.buf, a->scale.buf ? a->scale.offset : a->x.offset, 0, 0, false},
        {a->residual.buf ? a->residual.buf : a->x.buf, a->residual.buf ? a->residual.offset : a->x.offset, 0, 0, false},
        {a->lora_t.buf, a->lora_t.offset, ltb, 0, false},
        {a->lora_b.buf, a->lora_b.offset, lbb, 0, false}};
    /* 4 ranks per fetch or per load where R allows; a spec constant, so one loop is compiled. */
    bool lv4 = lora && a->lora_r % 4 == 0;
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
        if (lora && (a->lora_t.offset % 16 || a->lora_b.offset % 16))
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                            "matmul: texel variant needs lora_t and lora_b offsets on 16 bytes");
        pd.shader = lora ? (vec4 ? "matmul_texel_lora" : "matmul_texel_k1_lora")
                         : (vec4 ? "matmul_texel" : "matmul_texel_k1");
        if (lora) {
            /* R is small next to K, so one-rank views where R % 4 != 0 cost little. */
            pd.bindings[6] = pd.bindings[7] = VKG_BIND_UNIFORM_TEXEL;
            b[6].format = lv4 ? VK_FORMAT_R32G32B32A32_SFLOAT : VK_FORMAT_R32_SFLOAT;
            b[7].format = a->lora_dtype == VKG_DTYPE_F16 ? (lv4 ? VK_FORMAT_R16G16B16A16_SFLOAT : VK_FORMAT_R16_SFLOAT)
                                                         : b[6].format;
        }
        pd.bindings[0] = pd.bindings[1] = VKG_BIND_UNIFORM_TEXEL;
        b[0].format = vec4 ? VK_FORMAT_R32G32B32A32_SFLOAT : VK_FORMAT_R32_SFLOAT;
        b[1].format = a->w_dtype == VKG_DTYPE_F16 ? (vec4 ? VK_FORMAT_R16G16B16A16_SFLOAT : VK_FORMAT_R16_SFLOAT)
                                                  : b[0].format;
        /* One subgroup per workgroup, 16 rows x 128 columns: the best of the sweep in bench/RESULTS.md.
         * Rows fewer than 16 would waste most of the block, so thin problems take 8 rows; narrow
         * outputs (a router's few experts, a LoRA down-projection) take as few columns as cover them. */
        uint32_t tn = 1;
        while (tn < 16 && 8 * tn < a->n) tn *= 2;
        const uint32_t wg = 8, tm = a->m <= 8 ? 1 : 2;
        uint32_t spec[6] = {wg, 1, 1, 1, tm, tn};
        memcpy(pd.spec, spec, sizeof spec);
        gx = (a->n + wg * tn - 1) / (wg * tn);
        gy = (a->m + 8 * tm - 1) / (8 * tm);
    } else {
        if (lora) pd.shader = a->w_dtype == VKG_DTYPE_F16 ? "matmul_tiled_f16w_lora" : "matmul_tiled_lora";
        else pd.shader = a->w_dtype == VKG_DTYPE_F16 ? "matmul_tiled_f16w" : "matmul_tiled";
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
    if (lora) { /* each variant reads only its own constant: the other stays 0, so no duplicate pipelines */
        pd.spec[6] = v != VKG_MM_TEXEL && a->lora_dtype == VKG_DTYPE_F16;
        pd.spec[7] = v == VKG_MM_TEXEL && lv4;
    }
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    if (lora) VKG_TRY(vkg_lora(cmd, &la));
    return vkg_cmd_dispatch(cmd, p, b, &pc, gx, gy, batch, lora ? "matmul_lora" : "matmul");
}
