/* Conv2d / ConvTranspose2d dispatch: the shape plan of each variant, every range and limit check,
 * then the pack and GEMM dispatches (shaders/conv.comp). */
#include "conv.h"

#include <string.h>

void vkg_conv_out_size(const vkg_conv_args *a, int64_t *ho, int64_t *wo)
{
    int64_t in[2] = {a->h, a->w}, k[2] = {a->kh, a->kw}, out[2];
    for (int i = 0; i < 2; i++) {
        int64_t s = a->stride[i], p = a->pad[i], d = a->dilation[i];
        if (a->transposed) out[i] = (in[i] - 1) * s - 2 * p + d * (k[i] - 1) + a->out_pad[i] + 1;
        else out[i] = s ? (in[i] + 2 * p - d * (k[i] - 1) - 1) / s + 1 : 0;
        /* C division truncates toward zero; PyTorch floors, and a negative numerator means no output */
        if (!a->transposed && in[i] + 2 * p - d * (k[i] - 1) - 1 < 0) out[i] = 0;
    }
    *ho = out[0];
    *wo = out[1];
}

bool vkg_conv_texel_supported(const vkg_context *ctx)
{
    /* The GEMM binds 2 texel buffers and 5 storage buffers (y and the residual twice: float and vec4). */
    return vkg_matmul_texel_supported(ctx) && ctx->max_storage_per_stage >= 5 && ctx->max_texel_per_stage >= 2;
}

vkg_mm_variant vkg_conv_default_variant(const vkg_context *ctx) { return vkg_matmul_default_variant(ctx); }

/* How one conv maps onto the GEMM kernels. */
typedef struct conv_plan {
    vkg_mm_variant variant;
    int mode;         /* 0 conv, 1 transposed k == s (a 1x1 GEMM whose columns scatter), 2 transposed */
    int64_t ho, wo;   /* the output */
    uint32_t cg, og;  /* input channels per group; GEMM columns per group */
    uint32_t m, gw;   /* GEMM pixels per image, the width of their grid */
    /* texel: packed input (n, hp, wp, groups, cq) and weights (groups og, taps, cq), in vec4 */
    uint32_t hp, wp, cq, taps, kw, sy, sx, dy, dx, upy, upx;
    int32_t offy, offx;
    uint64_t xp_texels, wp_texels;
    VkDeviceSize wp_offset, scratch;
} conv_plan;

static vkg_status plan_conv(const vkg_context *ctx, const vkg_conv_args *a, conv_plan *p)
{
    memset(p, 0, sizeof *p);
    const char *op = a->transposed ? "conv_transpose2d" : "conv2d";
    if (a->groups < 1 || a->c % a->groups || a->o % a->groups)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: %u input and %u output channels do not split into %u groups",
                        op, a->c, a->o, a->groups);
    if (!a->kh || !a->kw || !a->stride[0] || !a->stride[1] || !a->dilation[0] || !a->dilation[1])
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: kernel %ux%u, stride %ux%u and dilation %ux%u must be >= 1", op,
                        a->kh, a->kw, a->stride[0], a->stride[1], a->dilation[0], a->dilation[1]);
    vkg_conv_out_size(a, &p->ho, &p->wo);
    if (p->ho < 1 || p->wo < 1)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: input %ux%u gives an output of %lldx%lld", op, a->h, a->w,
                        (long long)p->ho, (long long)p->wo);
    if (p->ho > UINT32_MAX / 2 || p->wo > UINT32_MAX / 2)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: output %lldx%lld is too large", op, (long long)p->ho, (long long)p->wo);
    p->variant = a->variant ? a->variant : vkg_conv_default_variant(ctx);
    p->cg = a->c / a->groups;
    uint32_t ocg = a->o / a->groups;
    bool fast = a->transposed && a->kh == a->stride[0] && a->kw == a->stride[1] && !a->pad[0] && !a->pad[1] &&
                a->dilation[0] == 1 && a->dilation[1] == 1 && !a->out_pad[0] && !a->out_pad[1];
    p->mode = !a->transposed ? 0 : fast ? 1 : 2;
    if (p->mode == 1) {
        p->og = ocg * a->kh * a->kw;
        p->m = a->h * a->w;
        p->gw = a->w;
    } else {
        p->og = ocg;
        p->m = (uint32_t)(p->ho * p->wo);
        p->gw = (uint32_t)p->wo;
    }
    if (p->variant != VKG_MM_TEXEL) return VKG_SUCCESS;
    p->cq = (p->cg + 3) / 4;
    p->upy = p->upx = 1;
    p->sy = p->sx = p->dy = p->dx = 1;
    if (p->mode == 0) {
        p->hp = a->h + 2 * a->pad[0];
        p->wp = a->w + 2 * a->pad[1];
        p->offy = (int32_t)a->pad[0];
        p->offx = (int32_t)a->pad[1];
        p->sy = a->stride[0];
        p->sx = a->stride[1];
    } else if (p->mode == 1) {
        p->hp = a->h;
        p->wp = a->w;
    } else {
        /* A stride-1 conv over the input upsampled by the stride and padded by d (k - 1) - p (which
         * may be negative: those rows are never read), with the weights flipped. */
        p->hp = (uint32_t)p->ho + a->dilation[0] * (a->kh - 1);
        p->wp = (uint32_t)p->wo + a->dilation[1] * (a->kw - 1);
        p->offy = (int32_t)(a->dilation[0] * (a->kh - 1)) - (int32_t)a->pad[0];
        p->offx = (int32_t)(a->dilation[1] * (a->kw - 1)) - (int32_t)a->pad[1];
        p->upy = a->stride[0];
        p->upx = a->stride[1];
    }
    if (p->mode != 1) {
        p->dy = a->dilation[0];
        p->dx = a->dilation[1];
    }
    p->taps = p->mode == 1 ? 1 : a->kh * a->kw;
    p->kw = p->mode == 1 ? 1 : a->kw;
    p->xp_texels = (uint64_t)a->n * p->hp * p->wp * a->groups * p->cq;
    p->wp_texels = (uint64_t)a->groups * p->og * p->taps * p->cq;
    p->wp_offset = (p->xp_texels * 16 + 255) / 256 * 256;
    p->scratch = p->wp_offset + p->wp_texels * 16;
    return VKG_SUCCESS;
}

VkDeviceSize vkg_conv_scratch_bytes(const vkg_context *ctx, const vkg_conv_args *a)
{
    conv_plan p;
    if (plan_conv(ctx, a, &p) != VKG_SUCCESS) return 0;
    return p.scratch;
}

static vkg_status check_ref(const char *op, vkg_tref r, VkDeviceSize bytes, const char *what)
{
    if (!r.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: %s has no buffer", op, what);
    if (r.offset > r.buf->size || bytes > r.buf->size - r.offset)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: %s needs %llu bytes at offset %llu; its buffer has %llu", op,
                        what, (unsigned long long)bytes, (unsigned long long)r.offset, (unsigned long long)r.buf->size);
    return VKG_SUCCESS;
}

/* A tensor the shaders index with 32-bit integers through one binding of this kind. */
static vkg_status check_binding(const vkg_context *ctx, const char *op, const char *what, uint64_t elems,
                                uint64_t elem_bytes, bool texel)
{
    const vkg_device_info *d = &ctx->info;
    if (texel ? elems > d->max_texel_buffer_elements || elems > INT32_MAX
              : elems * elem_bytes > d->max_storage_buffer_range || elems > UINT32_MAX)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: %s of %llu elements (%llu bytes) exceeds the device's %s limit of %llu",
                        op, what, (unsigned long long)elems, (unsigned long long)(elems * elem_bytes),
                        texel ? "texel buffer" : "storage buffer",
                        texel ? (unsigned long long)d->max_texel_buffer_elements
                              : (unsigned long long)d->max_storage_buffer_range);
    return VKG_SUCCESS;
}

typedef struct pack_x_push {
    uint32_t total, gx, C, H, W, G, Cg, Cq, Hp, Wp;
    int32_t offy, offx;
    uint32_t upy, upx;
} pack_x_push;

typedef struct pack_w_push {
    uint32_t total, gx, mode, T, Cq, Cg, Og, kh, kw;
} pack_w_push;

typedef struct texel_push {
    uint32_t M, Wo, Og, G, Hp, Wp, Cq, sy, sx, dy, dx, kw, T, flags, O, Hy, Wy, ka, kb;
} texel_push;

typedef struct tiled_push {
    uint32_t M, Wo, Og, G, K, C, H, W, Cg, sy, sx, py, px, dy, dx, kh, kw, flags, O, Hy, Wy, ka, kb;
} tiled_push;

enum { PACK_WG = 64 };

vkg_status vkg_conv2d(vkg_cmd *cmd, const vkg_conv_args *a)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    const vkg_device_info *di = &ctx->info;
    const char *op = a->transposed ? "conv_transpose2d" : "conv2d";
    if (a->w_dtype != VKG_DTYPE_F32 && a->w_dtype != VKG_DTYPE_F16)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: weight dtype %d not supported (fp32 or fp16)", op, (int)a->w_dtype);
    if (a->act != VKG_ACT_NONE && a->act != VKG_ACT_RELU)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: activation %d (none or relu only)", op, (int)a->act);
    conv_plan p;
    VKG_TRY(plan_conv(ctx, a, &p));
    if (p.variant == VKG_MM_TEXEL && !vkg_conv_texel_supported(ctx))
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: the texel variant needs subgroup size 8 with ballot operations "
                        "and RGBA32F uniform texel buffers; this device has subgroup size %d", op, di->subgroup_size);
    uint64_t xe = (uint64_t)a->n * a->c * a->h * a->w, ye = (uint64_t)a->n * a->o * (uint64_t)p.ho * (uint64_t)p.wo;
    uint64_t we = (uint64_t)a->o * p.cg * a->kh * a->kw;
    VkDeviceSize wsz = a->w_dtype == VKG_DTYPE_F16 ? 2 : 4;
    VKG_TRY(check_ref(op, a->x, xe * 4, "x"));
    VKG_TRY(check_ref(op, a->weight, we * wsz, "weight"));
    VKG_TRY(check_ref(op, a->y, ye * 4, "y"));
    if (a->bias.buf) VKG_TRY(check_ref(op, a->bias, (VkDeviceSize)a->o * 4, "bias"));
    if (a->residual.buf) VKG_TRY(check_ref(op, a->residual, ye * 4, "residual"));
    bool texel = p.variant == VKG_MM_TEXEL;
    VKG_TRY(check_binding(ctx, op, "the input", xe, 4, texel));
    VKG_TRY(check_binding(ctx, op, "the weight", texel ? we : (we * wsz + 3) / 4, texel ? wsz : 4, texel));
    VKG_TRY(check_binding(ctx, op, "the output", ye, 4, false));
    if (texel) {
        /* The pack kernels write the scratch through storage bindings; the GEMM reads it as texels. */
        VKG_TRY(check_binding(ctx, op, "the packed input", p.xp_texels, 16, false));
        VKG_TRY(check_binding(ctx, op, "the packed input", p.xp_texels, 16, true));
        VKG_TRY(check_binding(ctx, op, "the packed weight", p.wp_texels, 16, false));
        VKG_TRY(check_binding(ctx, op, "the packed weight", p.wp_texels, 16, true));
        VKG_TRY(check_ref(op, a->scratch, p.scratch, "scratch"));
        const struct { vkg_tref r; VkDeviceSize bytes; const char *name; } others[] = {
            {a->x, xe * 4, "x"}, {a->weight, we * wsz, "weight"}, {a->y, ye * 4, "y"},
            {a->bias, a->bias.buf ? (VkDeviceSize)a->o * 4 : 0, "bias"},
            {a->residual, a->residual.buf ? ye * 4 : 0, "residual"}};
        for (size_t i = 0; i < VKG_ARRAY_LEN(others); i++)
            if (vkg_tref_overlap(a->scratch, p.scratch, others[i].r, others[i].bytes))
                return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: the scratch overlaps %s", op, others[i].name);
    }
    if (ye == 0) return VKG_SUCCESS;

    uint32_t flags = (a->bias.buf ? 1u : 0u) | (a->act == VKG_ACT_RELU ? 2u : 0u) | (a->residual.buf ? 4u : 0u) |
                     (p.mode == 1 ? 8u : 0u);
    /* Absent bias and residual bind 4 bytes of x, which the shader then never reads. */
    vkg_binding bias_b = a->bias.buf ? (vkg_binding){a->bias.buf, a->bias.offset, (VkDeviceSize)a->o * 4, 0, false}
                                     : (vkg_binding){a->x.buf, a->x.offset, 4, 0, false};
    vkg_binding res_b = a->residual.buf ? (vkg_binding){a->residual.buf, a->residual.offset, ye * 4, 0, false}
                                        : (vkg_binding){a->x.buf, a->x.offset, 4, 0, false};
    vkg_binding y_b = {a->y.buf, a->y.offset, ye * 4, 0, true};
    uint32_t ka = p.mode == 1 ? a->kh : 1, kb = p.mode == 1 ? a->kw : 1;
    const vkg_pipeline *pl;

    if (!texel) {
        /* 64x64 tiles, 4x4 per invocation (as the tiled matmul); 32x32 where the device is small. */
        uint32_t bm = 64, bn = 64, bk = 16, tm = 4, tn = 4;
        if (di->max_workgroup_invocations < 256 || di->max_shared_memory < 2 * bk * 64 * 4) bm = bn = 32;
        uint32_t gx = (p.m + bm - 1) / bm, gy = (p.og + bn - 1) / bn, gz = a->n * a->groups;
        if (gx > di->max_workgroup_count[0] || gy > di->max_workgroup_count[1] || gz > di->max_workgroup_count[2])
            return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: a %ux%ux%u grid exceeds the device's workgroup count limits", op,
                            gx, gy, gz);
        tiled_push pc = {p.m, p.gw, p.og, a->groups, p.mode == 1 ? p.cg : p.cg * a->kh * a->kw, a->c, a->h, a->w, p.cg,
                         a->stride[0], a->stride[1], a->pad[0], a->pad[1], a->dilation[0], a->dilation[1], a->kh,
                         a->kw, flags | (uint32_t)p.mode << 4, a->o, (uint32_t)p.ho, (uint32_t)p.wo, ka, kb};
        vkg_pipeline_desc pd = {.shader = "conv_tiled", .nbindings = 5, .push_size = sizeof pc, .nspec = 7,
                                .spec = {(bm / tm) * (bn / tn), bm, bn, bk, tm, tn, a->w_dtype == VKG_DTYPE_F16}};
        VKG_TRY(vkg_pipeline_get(ctx, &pd, &pl));
        vkg_binding b[5] = {{a->x.buf, a->x.offset, xe * 4, 0, false}, {a->weight.buf, a->weight.offset, we * wsz, 0, false},
                            bias_b, y_b, res_b};
        return vkg_cmd_dispatch(cmd, pl, b, &pc, gx, gy, gz, op);
    }

    /* One subgroup per workgroup: 16 pixels x 64 columns, or 8 to 32 columns where a group has few
     * (DPT's 64 -> 32 and 32 -> 1 convs would otherwise compute mostly padding). Measured on
     * lavapipe (3x3 64 -> 64 at 296x296): TM 2 x TN 8 beats 4 x 8, 2 x 16 and 1 x 16. */
    const uint32_t tm = 2, tn = p.og <= 8 ? 1 : p.og <= 16 ? 2 : p.og <= 32 ? 4 : 8;
    /* Whole vec4s of 4 pixels per store where every column's run of pixels starts 16-byte aligned. */
    bool vec4 = p.mode != 1 && p.m % 4 == 0 && (a->y.buf->offset + a->y.offset) % 16 == 0 &&
                (!a->residual.buf || (a->residual.buf->offset + a->residual.offset) % 16 == 0);
    if (vec4) flags |= 64u;
    uint32_t gx = (p.m + 8 * tm - 1) / (8 * tm), gy = (p.og + 8 * tn - 1) / (8 * tn), gz = a->n * a->groups;
    if (gx > di->max_workgroup_count[0] || gy > di->max_workgroup_count[1] || gz > di->max_workgroup_count[2])
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: a %ux%ux%u grid exceeds the device's workgroup count limits", op, gx,
                        gy, gz);
    vkg_tref xp = a->scratch, wp = {a->scratch.buf, a->scratch.offset + p.wp_offset};
    const vkg_pipeline *px, *pw;
    pack_x_push xpc = {(uint32_t)p.xp_texels, 0, a->c, a->h, a->w, a->groups, p.cg, p.cq, p.hp, p.wp, p.offy, p.offx,
                       p.upy, p.upx};
    pack_w_push wpc = {(uint32_t)p.wp_texels, 0, (uint32_t)p.mode, p.taps, p.cq, p.cg, p.og, a->kh, a->kw};
    texel_push tpc = {p.m, p.gw, p.og, a->groups, p.hp, p.wp, p.cq, p.sy, p.sx, p.dy, p.dx, p.kw, p.taps, flags,
                      a->o, (uint32_t)p.ho, (uint32_t)p.wo, ka, kb};
    vkg_pipeline_desc xd = {.shader = "conv_pack_x", .nbindings = 2, .bindings = {VKG_BIND_UNIFORM_TEXEL},
                            .push_size = sizeof xpc, .nspec = 1, .spec = {PACK_WG}};
    vkg_pipeline_desc wd = {.shader = "conv_pack_w", .nbindings = 2, .bindings = {VKG_BIND_UNIFORM_TEXEL},
                            .push_size = sizeof wpc, .nspec = 1, .spec = {PACK_WG}};
    vkg_pipeline_desc td = {.shader = "conv_texel", .nbindings = 7,
                            .bindings = {VKG_BIND_UNIFORM_TEXEL, VKG_BIND_UNIFORM_TEXEL}, .push_size = sizeof tpc,
                            .nspec = 3, .spec = {8, tm, tn}};
    VKG_TRY(vkg_pipeline_get(ctx, &xd, &px));
    VKG_TRY(vkg_pipeline_get(ctx, &wd, &pw));
    VKG_TRY(vkg_pipeline_get(ctx, &td, &pl));
    uint32_t xgx, xgy, wgx, wgy;
    vkg_grid_1d(ctx, (p.xp_texels + PACK_WG - 1) / PACK_WG, &xgx, &xgy);
    vkg_grid_1d(ctx, (p.wp_texels + PACK_WG - 1) / PACK_WG, &wgx, &wgy);
    xpc.gx = xgx;
    wpc.gx = wgx;
    vkg_binding xb[2] = {{a->x.buf, a->x.offset, xe * 4, VK_FORMAT_R32_SFLOAT, false},
                         {xp.buf, xp.offset, p.xp_texels * 16, 0, true}};
    vkg_binding wb[2] = {{a->weight.buf, a->weight.offset, we * wsz,
                          a->w_dtype == VKG_DTYPE_F16 ? VK_FORMAT_R16_SFLOAT : VK_FORMAT_R32_SFLOAT, false},
                         {wp.buf, wp.offset, p.wp_texels * 16, 0, true}};
    vkg_binding tb[7] = {{xp.buf, xp.offset, p.xp_texels * 16, VK_FORMAT_R32G32B32A32_SFLOAT, false},
                         {wp.buf, wp.offset, p.wp_texels * 16, VK_FORMAT_R32G32B32A32_SFLOAT, false}, bias_b, y_b,
                         res_b, y_b, res_b};
    VKG_TRY(vkg_cmd_dispatch(cmd, px, xb, &xpc, xgx, xgy, 1, "conv_pack_x"));
    VKG_TRY(vkg_cmd_dispatch(cmd, pw, wb, &wpc, wgx, wgy, 1, "conv_pack_w"));
    return vkg_cmd_dispatch(cmd, pl, tb, &tpc, gx, gy, gz, op);
}
