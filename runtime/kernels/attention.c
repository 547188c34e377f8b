/* Fused multi-head attention dispatch: checks the operands, picks the variant and its preset. */
#include "attention.h"

#include <math.h>
#include <string.h>

bool vkg_attention_texel_supported(const vkg_context *ctx)
{
    /* The texel kernel spells out 8 subgroup lanes, broadcasts across them and reduces row maxima. */
    const vkg_device_info *d = &ctx->info;
    return d->texel_rgba32f && d->subgroup_size == 8 && (d->subgroup_ops & VK_SUBGROUP_FEATURE_BALLOT_BIT) &&
           (d->subgroup_ops & VK_SUBGROUP_FEATURE_ARITHMETIC_BIT) && d->max_texel_buffer_elements >= (1u << 20);
}

vkg_mm_variant vkg_attention_default_variant(const vkg_context *ctx)
{
    /* As for matmul: CPU implementations want texel fetches and registers, GPUs shared-memory tiles. */
    if (ctx->info.is_cpu && vkg_attention_texel_supported(ctx)) return VKG_MM_TEXEL;
    return VKG_MM_TILED;
}

typedef struct att_push {
    uint32_t tq, tk, heads, flags;
    uint32_t qs, ks, q0, k0;
    uint32_t v0, m0, mbs, kp0;
    uint32_t o0, os;
    float sl2e;
    uint32_t pad;
} att_push;

/* Checks that `floats` floats fit at r and fills a binding that starts at r.offset rounded down to
 * `align`; *base gets the slack in units of `unit` floats (the shader adds it to every index). */
static vkg_status operand(const char *what, vkg_tref r, uint64_t floats, VkDeviceSize align, uint32_t unit,
                          VkFormat fmt, bool write, vkg_binding *b, uint32_t *base)
{
    if (!r.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "attention: %s has no buffer", what);
    if (r.offset % 4)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "attention: %s offset %llu is not a multiple of 4 bytes", what,
                        (unsigned long long)r.offset);
    VkDeviceSize bytes = (VkDeviceSize)floats * 4;
    if (r.offset > r.buf->size || bytes > r.buf->size - r.offset)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "attention: %s needs %llu bytes at offset %llu; its buffer has %llu",
                        what, (unsigned long long)bytes, (unsigned long long)r.offset,
                        (unsigned long long)r.buf->size);
    VkDeviceSize aligned = r.offset / align * align, slack = r.offset - aligned;
    if (floats + slack / 4 > UINT32_MAX)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "attention: %s spans %llu floats, over 2^32", what,
                        (unsigned long long)floats);
    VkDeviceSize range = slack + bytes;
    if (range == 0) range = VKG_MIN((VkDeviceSize)4, r.buf->size - aligned); /* empty: one unused word */
    *b = (vkg_binding){r.buf, aligned, range, fmt, write};
    *base = (uint32_t)(slack / 4 / unit);
    return VKG_SUCCESS;
}

vkg_status vkg_attention(vkg_cmd *cmd, const vkg_attention_args *a)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    const vkg_device_info *di = &ctx->info;
    uint32_t B = a->batch, H = a->heads, d = a->head_dim, tq = a->tq, tk = a->tk;
    if (d == 0 || d > 256)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "attention: head_dim %u not supported (1..256)", d);
    uint64_t hd = (uint64_t)H * d;
    if (hd > UINT32_MAX) return vkg_fail(VKG_ERROR_UNSUPPORTED, "attention: heads * head_dim exceeds 2^32");
    uint64_t qs = a->q_stride ? a->q_stride : hd, ks = a->kv_stride ? a->kv_stride : hd;
    if (a->q_col + hd > qs)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                        "attention: q columns [%u, %llu) (q_col + heads * head_dim) exceed the q row stride %llu",
                        a->q_col, (unsigned long long)(a->q_col + hd), (unsigned long long)qs);
    if (a->k_col + hd > ks || a->v_col + hd > ks)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                        "attention: %s columns [%u, %llu) (%s + heads * head_dim) exceed the kv row stride %llu",
                        a->k_col + hd > ks ? "k" : "v", a->k_col + hd > ks ? a->k_col : a->v_col,
                        (unsigned long long)((a->k_col + hd > ks ? a->k_col : a->v_col) + hd),
                        a->k_col + hd > ks ? "k_col" : "v_col", (unsigned long long)ks);
    if (!(a->scale == a->scale) || isinf(a->scale))
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "attention: scale is not finite");
    uint64_t qrows = (uint64_t)B * tq, krows = (uint64_t)B * tk;
    uint64_t qf = qrows ? (qrows - 1) * qs + a->q_col + hd : 0;
    uint64_t kf = krows ? (krows - 1) * ks + a->k_col + hd : 0;
    uint64_t vf = krows ? (krows - 1) * ks + a->v_col + hd : 0;
    uint64_t of = qrows * hd, mf = (uint64_t)(a->mask_batched ? B : 1) * tq * tk, kpf = krows;

    vkg_mm_variant var = a->variant ? a->variant : vkg_attention_default_variant(ctx);
    if (var == VKG_MM_TEXEL && !vkg_attention_texel_supported(ctx))
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "attention: the texel variant needs subgroup size 8 with ballot and "
                        "arithmetic operations and RGBA32F uniform texel buffers; this device has subgroup size %d",
                        di->subgroup_size);
    bool texel = var == VKG_MM_TEXEL;
    /* vec4 fetches need every row start and column on 4 floats and the bases on 16 bytes. */
    bool vec4 = texel && d % 4 == 0 && qs % 4 == 0 && ks % 4 == 0 && a->q_col % 4 == 0 && a->k_col % 4 == 0 &&
                a->v_col % 4 == 0 && a->q.offset % 16 == 0 && a->k.offset % 16 == 0 && a->v.offset % 16 == 0;
    uint32_t unit = vec4 ? 4 : 1;
    VkDeviceSize talign = texel ? di->min_texel_offset_alignment : di->min_storage_offset_alignment;
    VkDeviceSize salign = di->min_storage_offset_alignment;
    VkFormat qfmt = vec4 ? VK_FORMAT_R32G32B32A32_SFLOAT : VK_FORMAT_R32_SFLOAT;
    VkFormat sfmt = texel ? VK_FORMAT_R32_SFLOAT : 0;
    if (talign == 0) talign = 4;
    if (salign == 0) salign = 4;

    att_push pc = {tq, tk, H, (a->mask.buf ? 1u : 0u) | (a->key_padding.buf ? 2u : 0u)};
    vkg_binding b[6];
    VKG_TRY(operand("q", a->q, qf, talign, unit, qfmt, false, &b[0], &pc.q0));
    VKG_TRY(operand("k", a->k, kf, talign, unit, qfmt, false, &b[1], &pc.k0));
    VKG_TRY(operand("v", a->v, vf, talign, unit, qfmt, false, &b[2], &pc.v0));
    if (a->mask.buf) VKG_TRY(operand("mask", a->mask, mf, talign, 1, sfmt, false, &b[3], &pc.m0));
    else b[3] = (vkg_binding){b[0].buf, b[0].offset, 4, sfmt, false};
    if (a->key_padding.buf) VKG_TRY(operand("key_padding", a->key_padding, kpf, talign, 1, sfmt, false, &b[4], &pc.kp0));
    else b[4] = (vkg_binding){b[0].buf, b[0].offset, 4, sfmt, false};
    VKG_TRY(operand("out", a->out, of, salign, 1, 0, true, &b[5], &pc.o0));
    if (mf > UINT32_MAX) return vkg_fail(VKG_ERROR_UNSUPPORTED, "attention: mask exceeds 2^32 elements");
    pc.q0 += a->q_col / unit;
    pc.k0 += a->k_col / unit;
    pc.v0 += a->v_col / unit;
    pc.qs = (uint32_t)(qs / unit);
    pc.ks = (uint32_t)(ks / unit);
    pc.mbs = a->mask_batched ? tq * tk : 0;
    pc.os = (uint32_t)hd;
    double scale = a->scale != 0.0f ? (double)a->scale : 1.0 / sqrt((double)d);
    pc.sl2e = (float)(scale * 1.4426950408889634);
    if (qrows == 0 || H == 0) return VKG_SUCCESS; /* empty output: nothing to write */

    vkg_pipeline_desc pd = {.nbindings = 6, .push_size = sizeof pc, .nspec = 4};
    uint32_t br;
    if (texel) {
        pd.shader = vec4 ? "attention_texel" : "attention_texel_s";
        for (int i = 0; i < 5; i++) pd.bindings[i] = VKG_BIND_UNIFORM_TEXEL;
        /* One subgroup per workgroup: 16 query rows x 64-key blocks (8 rows for a single-row-block
         * query, and for head dim 128+ where the 16-row output block alone is 256+ registers). */
        uint32_t tm = tq <= 8 || d > 64 ? 1 : 2, tn = 8;
        uint32_t spec[4] = {8, d, tm, tn};
        memcpy(pd.spec, spec, sizeof spec);
        br = 8 * tm;
    } else {
        pd.shader = "attention_tiled";
        /* One query row per invocation; K and V tiles of bc keys plus the tile's scores in shared
         * memory: (2 * d + br) * bc floats, 24 KiB at head dim 64 (lavapipe has 32 KiB). */
        br = VKG_MIN(64u, di->max_workgroup_invocations);
        uint32_t bc = (uint32_t)VKG_MIN((uint64_t)32, di->max_shared_memory / (8ull * d + 4ull * br));
        if (bc == 0) return vkg_fail(VKG_ERROR_UNSUPPORTED, "attention: head_dim %u needs %u bytes of shared memory; "
                                     "the device has %u", d, 8 * d + 4 * br, di->max_shared_memory);
        uint32_t spec[4] = {br, d, 1, bc};
        memcpy(pd.spec, spec, sizeof spec);
    }
    uint32_t gx = (uint32_t)((tq + (uint64_t)br - 1) / br);
    if (gx > di->max_workgroup_count[0] || H > di->max_workgroup_count[1] || B > di->max_workgroup_count[2])
        return vkg_fail(VKG_ERROR_UNSUPPORTED,
                        "attention: grid of %u query blocks x %u heads x batch %u is over the device limit %ux%ux%u",
                        gx, H, B, di->max_workgroup_count[0], di->max_workgroup_count[1], di->max_workgroup_count[2]);
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    return vkg_cmd_dispatch(cmd, p, b, &pc, gx, H, B, "attention");
}

bool vkg_attention_proj_fits(const vkg_context *ctx, uint32_t tq, uint32_t tk, uint32_t head_dim, uint32_t in_features)
{
    /* 32 KiB is lavapipe's limit and what every Vulkan 1.x GPU offers at least as much of; head_dim
     * past 128 would put two 128-float rows (q and the accumulator) in each invocation's registers. */
    uint64_t smem = VKG_MIN((uint64_t)ctx->info.max_shared_memory, 32768u);
    uint64_t need = ((uint64_t)tq + 2ull * tk) * head_dim * 4;
    return head_dim >= 1 && head_dim <= 128 && tq >= 1 && in_features >= 1 && in_features <= 65536 && need <= smem;
}

typedef struct attp_push {
    uint32_t tq, tk, heads, flags;
    uint32_t kin, x0, w0, b0;
    uint32_t kv0, ks, kc, vc;
    uint32_t m0, mbs, kp0, o0;
    float sl2e;
} attp_push;

vkg_status vkg_attention_proj(vkg_cmd *cmd, const vkg_attention_proj_args *a)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    const vkg_device_info *di = &ctx->info;
    uint32_t B = a->batch, H = a->heads, d = a->head_dim, tq = a->tq, tk = a->packed ? a->tq : a->tk, K = a->in_features;
    if (!vkg_attention_proj_fits(ctx, tq, tk, d, K))
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "attention_proj: tq %u, tk %u, head_dim %u, %u in features do not fit "
                        "one workgroup per head", tq, tk, d, K);
    if (a->w_dtype != VKG_DTYPE_F32 && a->w_dtype != VKG_DTYPE_F16)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "attention_proj: weight dtype %d (fp32 or fp16)", (int)a->w_dtype);
    uint64_t hd = (uint64_t)H * d, nw = (a->packed ? 3 : 1) * hd;
    if (!a->packed && (a->k_col + hd > a->kv_stride || a->v_col + hd > a->kv_stride))
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "attention_proj: k/v columns exceed the kv row stride %u", a->kv_stride);
    if (!(a->scale == a->scale) || isinf(a->scale))
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "attention_proj: scale is not finite");
    if (a->w.offset % 4)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "attention_proj: weight offset %llu is not on 4 bytes",
                        (unsigned long long)a->w.offset);
    VkDeviceSize salign = di->min_storage_offset_alignment ? di->min_storage_offset_alignment : 4;
    uint64_t wsz = a->w_dtype == VKG_DTYPE_F16 ? 2 : 4, wfl = (nw * K * wsz + 3) / 4;
    uint64_t qrows = (uint64_t)B * tq, krows = (uint64_t)B * tk;
    attp_push pc = {tq, tk, H, (a->mask.buf ? 1u : 0u) | (a->key_padding.buf ? 2u : 0u) | (a->bias.buf ? 4u : 0u) |
                                   (a->packed ? 8u : 0u), K};
    vkg_binding b[7];
    VKG_TRY(operand("x", a->x, qrows * K, salign, 1, 0, false, &b[0], &pc.x0));
    VKG_TRY(operand("weight", a->w, wfl, salign, 1, 0, false, &b[1], &pc.w0));
    pc.w0 = (uint32_t)(pc.w0 * 4 / wsz); /* the slack in weight elements */
    if (a->bias.buf) VKG_TRY(operand("bias", a->bias, nw, salign, 1, 0, false, &b[2], &pc.b0));
    else b[2] = b[0];
    if (!a->packed) {
        VKG_TRY(operand("kv", a->kv, krows ? (krows - 1) * a->kv_stride + VKG_MAX(a->k_col, a->v_col) + hd : 0, salign,
                        1, 0, false, &b[3], &pc.kv0));
        pc.ks = a->kv_stride;
        pc.kc = a->k_col;
        pc.vc = a->v_col;
    } else {
        b[3] = b[0];
    }
    uint64_t mf = (uint64_t)(a->mask_batched ? B : 1) * tq * tk;
    if (a->mask.buf) VKG_TRY(operand("mask", a->mask, mf, salign, 1, 0, false, &b[4], &pc.m0));
    else b[4] = b[0];
    if (a->key_padding.buf) VKG_TRY(operand("key_padding", a->key_padding, krows, salign, 1, 0, false, &b[5], &pc.kp0));
    else b[5] = b[0];
    VKG_TRY(operand("out", a->out, qrows * hd, salign, 1, 0, true, &b[6], &pc.o0));
    pc.mbs = a->mask_batched ? tq * tk : 0;
    double scale = a->scale != 0.0f ? (double)a->scale : 1.0 / sqrt((double)d);
    pc.sl2e = (float)(scale * 1.4426950408889634);
    if (qrows == 0 || H == 0) return VKG_SUCCESS;
    if (H > di->max_workgroup_count[0] || B > di->max_workgroup_count[1])
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "attention_proj: %u heads x batch %u over the device's grid", H, B);
    vkg_pipeline_desc pd = {.nbindings = 7, .push_size = sizeof pc, .nspec = 3};
    pd.shader = a->w_dtype == VKG_DTYPE_F16 ? "attention_proj_f16w" : "attention_proj";
    /* 64 invocations: enough for 31 query rows and 3 x 32 projection columns each, and the size
     * every device runs. The shared array is sized to the largest case (32 KiB) so one pipeline
     * per head dim serves every token count. */
    uint32_t wg = VKG_MIN(64u, di->max_workgroup_invocations);
    uint32_t smem = (uint32_t)(VKG_MIN((uint64_t)di->max_shared_memory, 32768u) / 4);
    uint32_t spec[3] = {wg, d, smem};
    memcpy(pd.spec, spec, sizeof spec);
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    return vkg_cmd_dispatch(cmd, p, b, &pc, H, B, 1, "attention_proj");
}
