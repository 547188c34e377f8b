/* LoRA down-projection of the fused linear: t = s_a * x A_a^T per adapter, read by matmul's LoRA
 * segment (shaders/matmul.comp, VKG_MM_LORA). Checks the adapter layout, picks the variant. */
#include <math.h>
#include <string.h>

#include "kernels.h"

typedef struct lora_push {
    uint32_t m, k, r, pad;
    uint32_t end[VKG_LORA_MAX_ADAPTERS]; /* where each adapter's ranks end: inclusive prefix sums */
    float s[VKG_LORA_MAX_ADAPTERS];
} lora_push;

static vkg_status check_ref(const char *who, vkg_tref r, VkDeviceSize bytes, const char *what)
{
    if (!r.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: %s has no buffer", who, what);
    if (r.offset > r.buf->size || bytes > r.buf->size - r.offset)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: %s needs %llu bytes at offset %llu; its buffer has %llu", who,
                        what, (unsigned long long)bytes, (unsigned long long)r.offset, (unsigned long long)r.buf->size);
    return VKG_SUCCESS;
}

/* Whether two byte ranges share memory (same VkBuffer, intersecting ranges). */
bool vkg_tref_overlap(vkg_tref a, VkDeviceSize abytes, vkg_tref b, VkDeviceSize bbytes)
{
    if (!a.buf || !b.buf || a.buf->buffer != b.buf->buffer || abytes == 0 || bbytes == 0) return false;
    VkDeviceSize a0 = a.buf->offset + a.offset, b0 = b.buf->offset + b.offset;
    return a0 < b0 + bbytes && b0 < a0 + abytes;
}

typedef struct lora_plan {
    vkg_pipeline_desc pd;
    vkg_binding b[3];
    lora_push pc;
    uint32_t gx, gy;
} lora_plan;

static vkg_status plan(vkg_context *ctx, const vkg_lora_args *a, const char *who, lora_plan *p)
{
    const vkg_device_info *di = &ctx->info;
    memset(p, 0, sizeof *p);
    if (a->n_adapters == 0 || a->n_adapters > VKG_LORA_MAX_ADAPTERS)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: %u LoRA adapters; 1 to %d are supported", who, a->n_adapters,
                        VKG_LORA_MAX_ADAPTERS);
    if (a->r == 0 || a->r > VKG_LORA_MAX_R)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: LoRA rank sum R = %u; 1 to %d are supported", who, a->r,
                        VKG_LORA_MAX_R);
    uint32_t sum = 0;
    for (uint32_t i = 0; i < a->n_adapters; i++) {
        if (a->ranks[i] == 0 || a->ranks[i] > VKG_LORA_MAX_RANK)
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: LoRA adapter %u has rank %u; 1 to %d are supported", who,
                            i, a->ranks[i], VKG_LORA_MAX_RANK);
        if (!isfinite(a->scales[i]))
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: LoRA adapter %u has a scale that is not finite", who, i);
        sum += a->ranks[i];
        p->pc.end[i] = sum;
        p->pc.s[i] = a->scales[i];
    }
    if (sum != a->r)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                        "%s: LoRA adapter ranks sum to %u, but lora_a has R = %u rows (and lora_b R columns)", who, sum,
                        a->r);
    for (uint32_t i = a->n_adapters; i < VKG_LORA_MAX_ADAPTERS; i++) p->pc.end[i] = a->r; /* empty */
    if (a->dtype != VKG_DTYPE_F32 && a->dtype != VKG_DTYPE_F16)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: LoRA dtype %d not supported (fp32 or fp16)", who, (int)a->dtype);
    if ((uint64_t)a->m * a->k > UINT32_MAX || (uint64_t)a->r * a->k > UINT32_MAX || (uint64_t)a->m * a->r > UINT32_MAX)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: LoRA m=%u k=%u R=%u exceeds 2^32 elements per operand", who, a->m,
                        a->k, a->r);
    VkDeviceSize esz = a->dtype == VKG_DTYPE_F16 ? 2 : 4;
    VkDeviceSize xb = (VkDeviceSize)a->m * a->k * 4, ab = (VkDeviceSize)a->r * a->k * esz;
    VkDeviceSize tb = (VkDeviceSize)a->m * a->r * 4;
    VKG_TRY(check_ref(who, a->x, xb, "x"));
    VKG_TRY(check_ref(who, a->a, ab, "lora_a"));
    VKG_TRY(check_ref(who, a->t, tb, "lora_t"));
    if (vkg_tref_overlap(a->t, tb, a->x, xb) || vkg_tref_overlap(a->t, tb, a->a, ab))
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: lora_t overlaps %s, which the LoRA dispatch reads", who,
                        vkg_tref_overlap(a->t, tb, a->x, xb) ? "x" : "lora_a");

    vkg_mm_variant v = a->variant ? a->variant : vkg_matmul_default_variant(ctx);
    p->pc.m = a->m;
    p->pc.k = a->k;
    p->pc.r = a->r;
    p->pd.nbindings = 3;
    p->pd.push_size = sizeof p->pc;
    p->b[0] = (vkg_binding){a->x.buf, a->x.offset, xb, 0, false};
    p->b[1] = (vkg_binding){a->a.buf, a->a.offset, ab, 0, false};
    p->b[2] = (vkg_binding){a->t.buf, a->t.offset, tb, 0, true};
    uint32_t rows, cols;
    if (v == VKG_MM_TEXEL) {
        if (!vkg_matmul_texel_supported(ctx))
            return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: the texel LoRA variant needs subgroup size 8 with ballot "
                            "operations and RGBA32F/RGBA16F uniform texel buffers; this device has subgroup size %d",
                            who, di->subgroup_size);
        if (a->x.offset % 16 || a->a.offset % 16)
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: the texel LoRA variant needs x and lora_a offsets on 16 "
                            "bytes", who);
        bool vec4 = a->k % 4 == 0;
        p->pd.shader = vec4 ? "lora_texel" : "lora_texel_k1";
        p->pd.bindings[0] = p->pd.bindings[1] = VKG_BIND_UNIFORM_TEXEL;
        p->b[0].format = vec4 ? VK_FORMAT_R32G32B32A32_SFLOAT : VK_FORMAT_R32_SFLOAT;
        p->b[1].format = a->dtype == VKG_DTYPE_F16 ? (vec4 ? VK_FORMAT_R16G16B16A16_SFLOAT : VK_FORMAT_R16_SFLOAT)
                                                   : p->b[0].format;
        /* One subgroup; 8 * tn ranks cover R up to 64 in one workgroup column, so X is fetched once
         * per row block. Up to 32 ranks each lane owns 8 rows and the ranks are broadcast; beyond, as in
         * matmul, 2 rows per lane are broadcast. Measured on lavapipe (m = 257 and 1370, K = 384 and
         * 1536): r = 8 runs 2-8x faster than with rows broadcast; r = 64 the same either way. */
        uint32_t tn = VKG_MIN((a->r + 7) / 8, 8u), lane_rows = tn <= 4;
        uint32_t tm = a->m <= 8 ? 1 : lane_rows ? 8 : 2;
        uint32_t spec[8] = {8, 1, 1, 1, tm, tn, 0, lane_rows};
        memcpy(p->pd.spec, spec, sizeof spec);
        p->pd.nspec = 8;
        rows = 8 * tm;
        cols = 8 * tn;
    } else {
        p->pd.shader = "lora";
        /* 32 x 32 tiles, 4 x 2 per invocation: 128 invocations, the least every Vulkan device has. */
        uint32_t spec[7] = {128, 32, 32, 16, 4, 2, a->dtype == VKG_DTYPE_F16};
        memcpy(p->pd.spec, spec, sizeof spec);
        p->pd.nspec = 7;
        rows = cols = 32;
    }
    p->gx = (a->r + cols - 1) / cols;
    p->gy = (uint32_t)(((uint64_t)a->m + rows - 1) / rows);
    if (p->gy > di->max_workgroup_count[1] || p->gx > di->max_workgroup_count[0])
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: LoRA m=%u R=%u needs a %ux%u grid, over the device limit", who,
                        a->m, a->r, p->gx, p->gy);
    return VKG_SUCCESS;
}

vkg_status vkg_lora_check(vkg_cmd *cmd, const vkg_lora_args *a, const char *who)
{
    lora_plan p;
    vkg_context *ctx = vkg_cmd_context(cmd);
    VKG_TRY(plan(ctx, a, who, &p));
    const vkg_pipeline *pipe;
    return a->m ? vkg_pipeline_get(ctx, &p.pd, &pipe) : VKG_SUCCESS;
}

vkg_status vkg_lora(vkg_cmd *cmd, const vkg_lora_args *a)
{
    lora_plan p;
    vkg_context *ctx = vkg_cmd_context(cmd);
    VKG_TRY(plan(ctx, a, "lora", &p));
    if (a->m == 0) return VKG_SUCCESS; /* empty output: nothing to write */
    const vkg_pipeline *pipe;
    VKG_TRY(vkg_pipeline_get(ctx, &p.pd, &pipe));
    return vkg_cmd_dispatch(cmd, pipe, p.b, &p.pc, p.gx, p.gy, 1, "lora");
}
