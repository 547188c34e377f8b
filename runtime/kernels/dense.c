/* Dense-head kernels (dense.h): bilinear resize, area pooling, batch norm, argmax. Each splits its
 * work into chunks of whole units (planes, element runs, outer slices) whose windows fit the
 * device's per-binding limits, and binds only those windows. */
#include "dense.h"

#include <math.h>

/* Outputs per invocation: on lavapipe each invocation's fixed cost (index decode, row taps, channel
 * terms) outweighs a few stores; 16 (resampling) and 8 (batch norm) ran fastest of 1-32. */
enum { DENSE_WG = 64, RESAMPLE_RUN = 16, BN_RUN = 8 };

/* One big binding of a chunked kernel: `per_unit` elements of 4 bytes per unit of work. */
typedef struct dense_bind {
    vkg_tref t;
    uint64_t per_unit;
    bool texel, write;
    VkFormat format;
} dense_bind;

static uint64_t dense_align(const vkg_context *ctx)
{
    uint64_t a = VKG_MAX(ctx->info.min_storage_offset_alignment, ctx->info.min_texel_offset_alignment);
    return VKG_MAX(a, 4);
}

/* The most bytes one window of this binding may span (before aligning its start down). */
static uint64_t dense_limit(const vkg_context *ctx, const dense_bind *b, uint64_t max_window)
{
    uint64_t lim = b->texel ? ctx->info.max_texel_buffer_elements * 4 : ctx->info.max_storage_buffer_range;
    if (max_window) lim = VKG_MIN(lim, max_window);
    /* Element offsets and counts travel as uint32 push constants. */
    return VKG_MIN(lim, (uint64_t)1 << 31);
}

/* How many units one dispatch may take so that every window fits; 0 (with a message naming the op
 * and binding) when even one unit does not. */
static uint64_t dense_units(const vkg_context *ctx, const char *op, const dense_bind *b, uint32_t nb, uint64_t units,
                            uint64_t max_window, const char *const *names)
{
    uint64_t slack = dense_align(ctx) - 4, fit = units ? units : 1;
    for (uint32_t i = 0; i < nb; i++) {
        if (!b[i].per_unit) continue;
        uint64_t lim = dense_limit(ctx, &b[i], max_window), unit = b[i].per_unit * 4;
        uint64_t f = lim > slack ? (lim - slack) / unit : 0;
        if (f == 0) {
            vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: one unit of %s (%llu bytes) exceeds the device's %s limit of %llu bytes",
                     op, names[i], (unsigned long long)unit, b[i].texel ? "texel-buffer" : "storage-buffer binding",
                     (unsigned long long)lim);
            return 0;
        }
        fit = VKG_MIN(fit, f);
    }
    return fit;
}

/* The window of units [u0, u1) of a binding, bound from the aligned offset at or below its first
 * element; *elem_off = that element's index within the binding. */
static vkg_binding dense_window(const vkg_context *ctx, const dense_bind *b, uint64_t u0, uint64_t u1, uint32_t *elem_off)
{
    uint64_t a = dense_align(ctx), first = b->t.offset + u0 * b->per_unit * 4;
    uint64_t start = first / a * a;
    if (start < b->t.offset) start = b->t.offset; /* t.offset itself is aligned: never taken */
    *elem_off = (uint32_t)((first - start) / 4);
    uint64_t range = first - start + (u1 - u0) * b->per_unit * 4;
    return (vkg_binding){b->t.buf, start, range ? range : 4, b->format, b->write};
}

static vkg_status check_ref(const char *op, vkg_tref r, uint64_t bytes, const char *what)
{
    if (!r.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: %s has no buffer", op, what);
    if (r.offset > r.buf->size || bytes > r.buf->size - r.offset)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: %s needs %llu bytes at offset %llu; its buffer has %llu", op,
                        what, (unsigned long long)bytes, (unsigned long long)r.offset, (unsigned long long)r.buf->size);
    return VKG_SUCCESS;
}

/* Texel reads for `n_texel` bindings whose largest window is `bytes`: as asked, or (AUTO) where the
 * device allows them without smaller windows than storage bindings would get. */
static vkg_status pick_texel(const vkg_context *ctx, const char *op, vkg_dense_read read, uint32_t n_texel,
                             uint64_t bytes, bool *texel)
{
    bool ok = ctx->max_texel_per_stage >= n_texel;
    if (read == VKG_DENSE_TEXEL && !ok)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: texel reads need %u texel descriptors per stage; the device has %u",
                        op, n_texel, ctx->max_texel_per_stage);
    *texel = read == VKG_DENSE_TEXEL ||
             (read == VKG_DENSE_AUTO && ok &&
              (ctx->info.max_texel_buffer_elements * 4 >= ctx->info.max_storage_buffer_range ||
               bytes <= ctx->info.max_texel_buffer_elements * 4));
    return VKG_SUCCESS;
}

/* ---- resize_bilinear, pool_area ---- */

float vkg_resize_ratio(uint32_t n_in, uint32_t n_out, int align_corners, double scale)
{
    if (n_in == n_out) return 1.0f;
    if (align_corners) return n_out > 1 ? (float)(n_in - 1) / (float)(n_out - 1) : 0.0f;
    if (scale > 0.0) return (float)(1.0 / scale);
    return (float)n_in / (float)n_out;
}

static vkg_status resample(vkg_cmd *cmd, const vkg_resize_args *a, bool area)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    const char *op = area ? "pool_area" : "resize_bilinear";
    uint64_t in_plane = (uint64_t)a->h * a->w, out_plane = (uint64_t)a->ho * a->wo;
    if (a->planes && (!in_plane || !out_plane))
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: planes %ux%u -> %ux%u: sizes must be >= 1", op, a->h, a->w,
                        a->ho, a->wo);
    if (a->planes > UINT64_MAX / 4 / VKG_MAX(in_plane, out_plane ? out_plane : 1))
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: %llu planes overflow", op, (unsigned long long)a->planes);
    VKG_TRY(check_ref(op, a->x, a->planes * in_plane * 4, "x"));
    VKG_TRY(check_ref(op, a->y, a->planes * out_plane * 4, "y"));
    if (vkg_tref_overlap(a->x, a->planes * in_plane * 4, a->y, a->planes * out_plane * 4))
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: x and y overlap", op);
    if (area && ((uint64_t)a->h * a->ho + a->ho > UINT32_MAX || (uint64_t)a->w * a->wo + a->wo > UINT32_MAX))
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: %ux%u -> %ux%u: window bounds overflow 32 bits", op, a->h, a->w,
                        a->ho, a->wo);
    if (!a->planes) return VKG_SUCCESS;
    bool texel = false;
    VKG_TRY(pick_texel(ctx, op, a->read, 1, a->planes * in_plane * 4, &texel));
    dense_bind b[2] = {{a->x, in_plane, texel, false, texel ? VK_FORMAT_R32_SFLOAT : VK_FORMAT_UNDEFINED},
                       {a->y, out_plane, false, true, VK_FORMAT_UNDEFINED}};
    static const char *const names[2] = {"x (one input plane)", "y (one output plane)"};
    uint64_t runs = (a->wo + RESAMPLE_RUN - 1) / RESAMPLE_RUN, runs_per_plane = runs * a->ho;
    if (runs_per_plane > UINT32_MAX) return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: output plane too large", op);
    uint64_t fit = dense_units(ctx, op, b, 2, a->planes, a->max_window, names);
    if (!fit) return VKG_ERROR_UNSUPPORTED;
    fit = VKG_MIN(fit, VKG_MAX(UINT32_MAX / runs_per_plane, 1));
    vkg_pipeline_desc pd = {.shader = area ? (texel ? "pool_area_texel" : "pool_area")
                                           : (texel ? "resize_bilinear_texel" : "resize_bilinear"),
                            .nbindings = 2, .nspec = 2, .spec = {DENSE_WG, RESAMPLE_RUN}};
    if (texel) pd.bindings[0] = VKG_BIND_UNIFORM_TEXEL;
    struct {
        uint32_t n, gx, h, w, ho, wo, runs, x_off, y_off, flags;
        float ratio_h, ratio_w;
    } pc = {0, 0, a->h, a->w, a->ho, a->wo, (uint32_t)runs, 0, 0, 0, 0, 0};
    pd.push_size = sizeof pc;
    if (!area) {
        pc.ratio_h = vkg_resize_ratio(a->h, a->ho, a->align_corners, a->scale_h);
        pc.ratio_w = vkg_resize_ratio(a->w, a->wo, a->align_corners, a->scale_w);
        pc.flags = (a->align_corners || a->h == a->ho ? 1u : 0u) | (a->align_corners || a->w == a->wo ? 2u : 0u);
    }
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    for (uint64_t u0 = 0; u0 < a->planes; u0 += fit) {
        uint64_t u1 = VKG_MIN(u0 + fit, a->planes);
        vkg_binding bb[2] = {dense_window(ctx, &b[0], u0, u1, &pc.x_off), dense_window(ctx, &b[1], u0, u1, &pc.y_off)};
        pc.n = (uint32_t)((u1 - u0) * runs_per_plane);
        uint32_t gy;
        vkg_grid_1d(ctx, (pc.n + DENSE_WG - 1) / DENSE_WG, &pc.gx, &gy);
        VKG_TRY(vkg_cmd_dispatch(cmd, p, bb, &pc, pc.gx, gy, 1, op));
    }
    return VKG_SUCCESS;
}

vkg_status vkg_resize_bilinear(vkg_cmd *cmd, const vkg_resize_args *a)
{
    if (!(a->scale_h >= 0.0 && a->scale_w >= 0.0 && a->scale_h < 1e300 && a->scale_w < 1e300))
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "resize_bilinear: scale (%g, %g) must be positive or 0 (none)",
                        a->scale_h, a->scale_w);
    return resample(cmd, a, false);
}

vkg_status vkg_pool_area(vkg_cmd *cmd, const vkg_resize_args *a) { return resample(cmd, a, true); }

/* ---- batchnorm ---- */

vkg_status vkg_batchnorm(vkg_cmd *cmd, const vkg_batchnorm_args *a)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    const char *op = "batchnorm";
    if (a->inner && a->channels && a->outer > UINT32_MAX / a->channels / a->inner)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: tensor exceeds 2^32 elements", op);
    uint64_t n = a->outer * a->channels * a->inner, cb = (uint64_t)a->channels * 4;
    if (!(a->eps >= 0.0f && a->eps < INFINITY)) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: eps %g", op, (double)a->eps);
    VKG_TRY(check_ref(op, a->x, n * 4, "x"));
    VKG_TRY(check_ref(op, a->y, n * 4, "y"));
    VKG_TRY(check_ref(op, a->mean, cb, "mean"));
    VKG_TRY(check_ref(op, a->var, cb, "var"));
    if (a->weight.buf) VKG_TRY(check_ref(op, a->weight, cb, "weight"));
    if (a->bias.buf) VKG_TRY(check_ref(op, a->bias, cb, "bias"));
    /* In place (x == y) is fine: each element is read before it is written, by one invocation. */
    if (!n) return VKG_SUCCESS;
    bool texel = false;
    VKG_TRY(pick_texel(ctx, op, a->read, 5, n * 4, &texel));
    if (texel && a->channels > ctx->info.max_texel_buffer_elements) {
        if (a->read == VKG_DENSE_TEXEL)
            return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: %u channels exceed maxTexelBufferElements %llu", op,
                            a->channels, (unsigned long long)ctx->info.max_texel_buffer_elements);
        texel = false;
    }
    if (!texel && ctx->max_storage_per_stage < 6)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: storage reads need 6 storage buffers per stage; the device has %u",
                        op, ctx->max_storage_per_stage);
    /* A unit is 64 elements (256 bytes, the largest offset alignment Vulkan allows), so chunk
     * boundaries need no realignment; the last unit may be partial. */
    enum { UNIT = 64 };
    uint64_t units = (n + UNIT - 1) / UNIT;
    VkFormat f = texel ? VK_FORMAT_R32_SFLOAT : VK_FORMAT_UNDEFINED;
    dense_bind b[2] = {{a->x, UNIT, texel, false, f}, {a->y, UNIT, false, true, VK_FORMAT_UNDEFINED}};
    static const char *const names[2] = {"x", "y"};
    uint64_t fit = dense_units(ctx, op, b, 2, units, a->max_window, names);
    if (!fit) return VKG_ERROR_UNSUPPORTED;
    vkg_pipeline_desc pd = {.shader = texel ? "batchnorm_texel" : "batchnorm", .nbindings = 6, .nspec = 2,
                            .spec = {DENSE_WG, BN_RUN}};
    for (int i = 0; i < 5 && texel; i++) pd.bindings[i] = VKG_BIND_UNIFORM_TEXEL;
    struct {
        uint32_t n, gx, inner, channels, e0, x_off, y_off, flags;
        float eps;
    } pc = {0, 0, (uint32_t)a->inner, a->channels, 0, 0, 0,
            (a->weight.buf ? 1u : 0u) | (a->bias.buf ? 2u : 0u), a->eps};
    pd.push_size = sizeof pc;
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    /* Absent weight or bias bind mean, which the shader then never reads. */
    vkg_tref w = a->weight.buf ? a->weight : a->mean, bi = a->bias.buf ? a->bias : a->mean;
    for (uint64_t u0 = 0; u0 < units; u0 += fit) {
        uint64_t u1 = VKG_MIN(u0 + fit, units), e0 = u0 * UNIT, e1 = VKG_MIN(u1 * UNIT, n);
        vkg_binding bb[6] = {dense_window(ctx, &b[0], u0, u1, &pc.x_off),
                             {a->mean.buf, a->mean.offset, cb, f, false},
                             {a->var.buf, a->var.offset, cb, f, false},
                             {w.buf, w.offset, cb, f, false},
                             {bi.buf, bi.offset, cb, f, false},
                             dense_window(ctx, &b[1], u0, u1, &pc.y_off)};
        /* The last window ends at the tensor's end, not at a whole unit. */
        bb[0].range -= (u1 * UNIT - e1) * 4;
        bb[5].range -= (u1 * UNIT - e1) * 4;
        pc.n = (uint32_t)(e1 - e0);
        pc.e0 = (uint32_t)e0;
        uint32_t gy;
        vkg_grid_1d(ctx, ((uint64_t)pc.n + BN_RUN * DENSE_WG - 1) / (BN_RUN * DENSE_WG), &pc.gx, &gy);
        VKG_TRY(vkg_cmd_dispatch(cmd, p, bb, &pc, pc.gx, gy, 1, op));
    }
    return VKG_SUCCESS;
}

/* ---- argmax ---- */

vkg_status vkg_argmax(vkg_cmd *cmd, const vkg_argmax_args *a)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    const char *op = "argmax";
    if (!a->k) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: reduction over an empty dim", op);
    if (a->inner && a->outer > UINT32_MAX / a->k / a->inner)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: tensor exceeds 2^32 elements", op);
    uint64_t no = a->outer * a->inner;
    VKG_TRY(check_ref(op, a->x, no * a->k * 4, "x"));
    VKG_TRY(check_ref(op, a->y, no * 4, "y"));
    if (vkg_tref_overlap(a->x, no * a->k * 4, a->y, no * 4))
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: x and y overlap", op);
    if (!no) return VKG_SUCCESS;
    bool texel = false;
    VKG_TRY(pick_texel(ctx, op, a->read, 1, no * a->k * 4, &texel));
    dense_bind b[2] = {{a->x, a->k * a->inner, texel, false, texel ? VK_FORMAT_R32_UINT : VK_FORMAT_UNDEFINED},
                       {a->y, a->inner, false, true, VK_FORMAT_UNDEFINED}};
    static const char *const names[2] = {"x (one outer slice)", "y"};
    uint64_t fit = dense_units(ctx, op, b, 2, a->outer, a->max_window, names);
    if (!fit) return VKG_ERROR_UNSUPPORTED;
    vkg_pipeline_desc pd = {.shader = texel ? "argmax_texel" : "argmax", .nbindings = 2, .nspec = 1, .spec = {DENSE_WG}};
    if (texel) pd.bindings[0] = VKG_BIND_UNIFORM_TEXEL;
    struct { uint32_t n, gx, inner, k, x_off, y_off; } pc = {0, 0, (uint32_t)a->inner, a->k, 0, 0};
    pd.push_size = sizeof pc;
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    for (uint64_t u0 = 0; u0 < a->outer; u0 += fit) {
        uint64_t u1 = VKG_MIN(u0 + fit, a->outer);
        vkg_binding bb[2] = {dense_window(ctx, &b[0], u0, u1, &pc.x_off), dense_window(ctx, &b[1], u0, u1, &pc.y_off)};
        pc.n = (uint32_t)((u1 - u0) * a->inner);
        uint32_t gy;
        vkg_grid_1d(ctx, (pc.n + DENSE_WG - 1) / DENSE_WG, &pc.gx, &gy);
        VKG_TRY(vkg_cmd_dispatch(cmd, p, bb, &pc, pc.gx, gy, 1, op));
    }
    return VKG_SUCCESS;
}
