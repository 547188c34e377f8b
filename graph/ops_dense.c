/* The dense-head ops (docs/graph-format.md): resize_bilinear, adaptive_avg_pool2d, batchnorm,
 * argmax on their kernels, concat and permute on the strided copy. */
#include <math.h>
#include <string.h>

#include "graph/ops_dense.h"
#include "runtime/kernels/copy.h"
#include "runtime/kernels/dense.h"

#define gfail vkg_node_fail

static const vkg_ir_tensor *tin(const vkg_graph *g, const vkg_ir_node *n, uint32_t i)
{
    return i < n->n_inputs && n->inputs[i] != VKG_IR_NONE ? &g->tensors[n->inputs[i]] : NULL;
}

static int64_t attr_i(const vkg_ir_node *n, const char *name, int64_t dflt)
{
    const vkg_ir_attr *a = vkg_ir_attr_find(n, name);
    return a ? a->i : dflt;
}

/* A fixed dim of a tensor, or -1 when symbolic. */
static int64_t fixed(const vkg_ir_tensor *t, uint32_t d) { return t->sym[d] ? -1 : t->dims[d]; }

static uint64_t prod(const vkg_shape *s, uint32_t from, uint32_t to)
{
    uint64_t p = 1;
    for (uint32_t i = from; i < to; i++) p *= (uint64_t)s->dims[i];
    return p;
}

/* An axis attribute resolved against a rank (negative counts from the end); -1 when out of range. */
static int64_t resolve_axis(int64_t a, uint32_t rank)
{
    if (a < 0) a += rank;
    return a >= 0 && a < (int64_t)rank ? a : -1;
}

static vkg_status fits_u32(const vkg_ir_node *n, const vkg_shape *s)
{
    if (vkg_shape_numel(s) > UINT32_MAX)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "node \"%s\": tensor of %llu elements exceeds 2^32", n->name,
                        (unsigned long long)vkg_shape_numel(s));
    return VKG_SUCCESS;
}

/* ---- resize_bilinear, adaptive_avg_pool2d ---- */

const vkg_attr_spec vkg_resize_attrs[] = {{"size", VKG_ATTR_INTS, false},
                                          {"scale", VKG_ATTR_FLOATS, false},
                                          {"align_corners", VKG_ATTR_INT, false},
                                          {NULL, 0, false}};
const vkg_attr_spec vkg_pool_attrs[] = {{"size", VKG_ATTR_INTS, true}, {NULL, 0, false}};

enum { MAX_SPATIAL = 1 << 30 };

static vkg_status check_size_attr(const vkg_graph *g, const vkg_ir_node *n, const vkg_ir_attr *sz)
{
    if (sz->count != 2) return gfail(g, n, "size has %u entries; expected [Ho, Wo]", sz->count);
    for (uint32_t i = 0; i < 2; i++)
        if (sz->ints[i] < 1 || sz->ints[i] > MAX_SPATIAL)
            return gfail(g, n, "size[%u] = %lld: expected 1..%d", i, (long long)sz->ints[i], MAX_SPATIAL);
    return VKG_SUCCESS;
}

/* Input spatial dims must be >= 1 where fixed; x must be (N, C, H, W). */
static vkg_status check_image(const vkg_graph *g, const vkg_ir_node *n, const vkg_ir_tensor *x)
{
    if (x->rank != 4) return gfail(g, n, "input \"%s\" must be (N, C, H, W), has rank %u", x->name, x->rank);
    for (uint32_t d = 2; d < 4; d++)
        if (fixed(x, d) == 0) return gfail(g, n, "input \"%s\" has %s = 0; resampling needs >= 1", x->name, d == 2 ? "H" : "W");
    return VKG_SUCCESS;
}

/* floor(size * scale) as PyTorch's interpolate computes the output size (in double). */
static int64_t scaled_size(int64_t size, double scale)
{
    double v = floor((double)size * scale);
    return v > MAX_SPATIAL ? MAX_SPATIAL + 1ll : (int64_t)v;
}

vkg_status vkg_resize_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x = tin(g, n, 0);
    VKG_TRY(check_image(g, n, x));
    const vkg_ir_attr *sz = vkg_ir_attr_find(n, "size"), *sc = vkg_ir_attr_find(n, "scale");
    if (!sz == !sc)
        return gfail(g, n, "%s: give exactly one of size (INTS [Ho, Wo]) and scale (FLOATS [sh, sw])",
                     sz ? "both size and scale are given" : "neither size nor scale is given");
    int64_t ac = attr_i(n, "align_corners", 0);
    if (ac != 0 && ac != 1) return gfail(g, n, "align_corners = %lld: expected 0 or 1", (long long)ac);
    if (sz) return check_size_attr(g, n, sz);
    if (sc->count != 2) return gfail(g, n, "scale has %u entries; expected [sh, sw]", sc->count);
    for (uint32_t i = 0; i < 2; i++) {
        double s = sc->floats[i];
        if (!(s > 0.0 && s < 1e9)) return gfail(g, n, "scale[%u] = %g: expected a finite number > 0", i, s);
        int64_t d = fixed(x, 2 + i);
        if (d > 0 && (scaled_size(d, s) < 1 || scaled_size(d, s) > MAX_SPATIAL))
            return gfail(g, n, "scale[%u] = %g takes %s = %lld to %lld; expected 1..%d", i, s, i ? "W" : "H",
                         (long long)d, (long long)scaled_size(d, s), MAX_SPATIAL);
    }
    return VKG_SUCCESS;
}

/* Shared by both ops: output (N, C, Ho, Wo) from size or scale; refuses empty planes. */
static vkg_status resample_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *x, vkg_shape *out)
{
    if (x->dims[2] < 1 || x->dims[3] < 1)
        return gfail(g, n, "input is %lldx%lld; resampling needs H and W >= 1", (long long)x->dims[2], (long long)x->dims[3]);
    *out = *x;
    const vkg_ir_attr *sz = vkg_ir_attr_find(n, "size"), *sc = vkg_ir_attr_find(n, "scale");
    for (uint32_t i = 0; i < 2; i++) {
        out->dims[2 + i] = sz ? sz->ints[i] : scaled_size(x->dims[2 + i], sc->floats[i]);
        if (out->dims[2 + i] < 1 || out->dims[2 + i] > MAX_SPATIAL)
            return gfail(g, n, "scale[%u] = %g takes %s = %lld to %lld; expected 1..%d", i, sc->floats[i],
                         i ? "W" : "H", (long long)x->dims[2 + i], (long long)out->dims[2 + i], MAX_SPATIAL);
    }
    return VKG_SUCCESS;
}

vkg_status vkg_resize_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    return resample_infer(g, n, in[0], out);
}

static vkg_resize_args resample_args(const vkg_ir_node *n, const vkg_rt_tensor *x, const vkg_rt_tensor *y)
{
    const vkg_ir_attr *sc = vkg_ir_attr_find(n, "scale");
    return (vkg_resize_args){.x = x->ref, .y = y->ref, .planes = prod(&x->shape, 0, 2),
                             .h = (uint32_t)x->shape.dims[2], .w = (uint32_t)x->shape.dims[3],
                             .ho = (uint32_t)y->shape.dims[2], .wo = (uint32_t)y->shape.dims[3],
                             .align_corners = (int)attr_i(n, "align_corners", 0),
                             .scale_h = sc ? sc->floats[0] : 0.0, .scale_w = sc ? sc->floats[1] : 0.0};
}

vkg_status vkg_resize_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    vkg_resize_args a = resample_args(n, in[0], out);
    return vkg_resize_bilinear(cmd, &a);
}

vkg_status vkg_pool_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    VKG_TRY(check_image(g, n, tin(g, n, 0)));
    return check_size_attr(g, n, vkg_ir_attr_find(n, "size"));
}

vkg_status vkg_pool_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    return resample_infer(g, n, in[0], out);
}

vkg_status vkg_pool_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    vkg_resize_args a = resample_args(n, in[0], out);
    return vkg_pool_area(cmd, &a);
}

/* ---- batchnorm ---- */

const vkg_attr_spec vkg_batchnorm_attrs[] = {{"eps", VKG_ATTR_FLOAT, true}, {NULL, 0, false}};

static const char *const bn_names[5] = {"x", "mean", "var", "weight", "bias"};

vkg_status vkg_batchnorm_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x = tin(g, n, 0);
    if (x->rank < 2) return gfail(g, n, "input \"%s\" must be (N, C, ...), has rank %u", x->name, x->rank);
    for (uint32_t i = 1; i < 5; i++) {
        const vkg_ir_tensor *p = tin(g, n, i);
        if (!p) {
            if (i < 3) return gfail(g, n, "input %u (%s) is required", i, bn_names[i]);
            continue;
        }
        if (p->rank != 1) return gfail(g, n, "%s \"%s\" must be 1-d (C), has rank %u", bn_names[i], p->name, p->rank);
        if (fixed(x, 1) >= 0 && fixed(p, 0) >= 0 && p->dims[0] != x->dims[1])
            return gfail(g, n, "%s \"%s\" has %lld elements; expected %lld (dim 1 of \"%s\")", bn_names[i], p->name,
                         (long long)p->dims[0], (long long)x->dims[1], x->name);
    }
    double eps = vkg_ir_attr_find(n, "eps")->f;
    if (!(eps >= 0.0 && eps < 1e30)) return gfail(g, n, "eps %g must be finite and >= 0", eps);
    return VKG_SUCCESS;
}

vkg_status vkg_batchnorm_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    for (uint32_t i = 1; i < 5; i++)
        if (in[i] && in[i]->dims[0] != in[0]->dims[1])
            return gfail(g, n, "%s has %lld elements; the input has %lld channels", bn_names[i], (long long)in[i]->dims[0],
                         (long long)in[0]->dims[1]);
    *out = *in[0];
    return VKG_SUCCESS;
}

vkg_status vkg_batchnorm_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    VKG_TRY(fits_u32(n, &in[0]->shape));
    const vkg_shape *s = &in[0]->shape;
    vkg_batchnorm_args a = {.x = in[0]->ref, .mean = in[1]->ref, .var = in[2]->ref,
                            .weight = in[3] ? in[3]->ref : (vkg_tref){0}, .bias = in[4] ? in[4]->ref : (vkg_tref){0},
                            .y = out->ref, .outer = (uint64_t)s->dims[0], .channels = (uint32_t)s->dims[1],
                            .inner = prod(s, 2, s->rank), .eps = (float)vkg_ir_attr_find(n, "eps")->f};
    return vkg_batchnorm(cmd, &a);
}

/* ---- concat ---- */

const vkg_attr_spec vkg_concat_attrs[] = {{"axis", VKG_ATTR_INT, true}, {NULL, 0, false}};

vkg_status vkg_concat_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x0 = tin(g, n, 0);
    for (uint32_t i = 0; i < n->n_inputs; i++)
        if (!tin(g, n, i)) return gfail(g, n, "input %u is absent; concat takes 2 to 8 present inputs", i);
    if (x0->rank < 1) return gfail(g, n, "input \"%s\" has rank 0; concat needs rank >= 1", x0->name);
    int64_t axis = resolve_axis(vkg_ir_attr_find(n, "axis")->i, x0->rank);
    if (axis < 0)
        return gfail(g, n, "axis %lld outside the %u dims of \"%s\"", (long long)vkg_ir_attr_find(n, "axis")->i,
                     x0->rank, x0->name);
    for (uint32_t i = 1; i < n->n_inputs; i++) {
        const vkg_ir_tensor *t = tin(g, n, i);
        if (t->rank != x0->rank)
            return gfail(g, n, "input %u \"%s\" has rank %u; input 0 \"%s\" has rank %u", i, t->name, t->rank, x0->name,
                         x0->rank);
        for (uint32_t d = 0; d < t->rank; d++)
            if (d != axis && fixed(t, d) >= 0 && fixed(x0, d) >= 0 && t->dims[d] != x0->dims[d])
                return gfail(g, n, "input %u \"%s\" has dim %u = %lld; input 0 \"%s\" has %lld (every dim but axis %lld "
                             "must match)", i, t->name, d, (long long)t->dims[d], x0->name, (long long)x0->dims[d],
                             (long long)axis);
    }
    return VKG_SUCCESS;
}

vkg_status vkg_concat_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    uint32_t axis = (uint32_t)resolve_axis(vkg_ir_attr_find(n, "axis")->i, in[0]->rank);
    *out = *in[0];
    for (uint32_t i = 1; i < n->n_inputs; i++) {
        for (uint32_t d = 0; d < out->rank; d++)
            if (d != axis && in[i]->dims[d] != in[0]->dims[d])
                return gfail(g, n, "input %u has dim %u = %lld; input 0 has %lld (every dim but axis %u must match)", i,
                             d, (long long)in[i]->dims[d], (long long)in[0]->dims[d], axis);
        out->dims[axis] += in[i]->dims[axis];
    }
    return VKG_SUCCESS;
}

vkg_status vkg_concat_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    VKG_TRY(fits_u32(n, &out->shape));
    uint64_t total = vkg_shape_numel(&out->shape);
    if (!total) return VKG_SUCCESS;
    uint32_t axis = (uint32_t)resolve_axis(vkg_ir_attr_find(n, "axis")->i, out->shape.rank);
    /* Each input is one (outer, mid, inner) box of the output, at its offset along the axis. */
    uint32_t outer = (uint32_t)prod(&out->shape, 0, axis), inner = (uint32_t)prod(&out->shape, axis + 1, out->shape.rank);
    uint32_t mid_out = (uint32_t)out->shape.dims[axis], at = 0;
    for (uint32_t i = 0; i < n->n_inputs; i++) {
        uint32_t mid = (uint32_t)in[i]->shape.dims[axis];
        vkg_copy_args a = {.src = in[i]->ref, .dst = out->ref, .src_elems = vkg_shape_numel(&in[i]->shape),
                           .dst_elems = total, .dst_off = at * inner, .rank = 3, .shape = {outer, mid, inner},
                           .src_stride = {mid * inner, inner, 1}, .dst_stride = {mid_out * inner, inner, 1}};
        VKG_TRY(vkg_copy(cmd, &a));
        at += mid;
    }
    return VKG_SUCCESS;
}

/* ---- permute ---- */

const vkg_attr_spec vkg_permute_attrs[] = {{"perm", VKG_ATTR_INTS, true}, {NULL, 0, false}};

vkg_status vkg_permute_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x = tin(g, n, 0);
    const vkg_ir_attr *p = vkg_ir_attr_find(n, "perm");
    if (p->count != x->rank)
        return gfail(g, n, "perm has %u entries; input \"%s\" has rank %u", p->count, x->name, x->rank);
    bool seen[VKG_IR_MAX_RANK] = {false};
    for (uint32_t i = 0; i < p->count; i++) {
        int64_t v = p->ints[i];
        if (v < 0 || v >= (int64_t)x->rank || seen[v])
            return gfail(g, n, "perm[%u] = %lld: expected a permutation of 0..%u", i, (long long)v, x->rank - 1);
        seen[v] = true;
    }
    return VKG_SUCCESS;
}

vkg_status vkg_permute_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    (void)g;
    const vkg_ir_attr *p = vkg_ir_attr_find(n, "perm");
    out->rank = in[0]->rank;
    for (uint32_t d = 0; d < out->rank; d++) out->dims[d] = in[0]->dims[p->ints[d]];
    return VKG_SUCCESS;
}

vkg_status vkg_permute_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    VKG_TRY(fits_u32(n, &out->shape));
    uint64_t total = vkg_shape_numel(&out->shape);
    if (!total) return VKG_SUCCESS;
    const vkg_shape *x = &in[0]->shape;
    const vkg_ir_attr *p = vkg_ir_attr_find(n, "perm");
    uint32_t xs[VKG_IR_MAX_RANK];
    uint64_t acc = 1;
    for (int d = (int)x->rank - 1; d >= 0; d--) {
        xs[d] = (uint32_t)acc;
        acc *= (uint64_t)x->dims[d];
    }
    /* Output dims in order with their source strides; size-1 dims dropped and runs that stay
     * contiguous in the source merged, so the kernel decodes as few dims as the move needs. */
    vkg_copy_args a = {.src = in[0]->ref, .dst = out->ref, .src_elems = total, .dst_elems = total};
    for (uint32_t d = 0; d < out->shape.rank; d++) {
        uint32_t size = (uint32_t)out->shape.dims[d], st = xs[p->ints[d]];
        if (size == 1) continue;
        if (a.rank && a.src_stride[a.rank - 1] == size * st) {
            a.shape[a.rank - 1] *= size;
            a.src_stride[a.rank - 1] = st;
        } else {
            a.shape[a.rank] = size;
            a.src_stride[a.rank++] = st;
        }
    }
    if (!a.rank) a = (vkg_copy_args){a.src, a.dst, 1, 1, 0, 0, 1, {1}, {1}, {1}};
    for (int d = (int)a.rank - 1, s = 1; d >= 0; s *= (int)a.shape[d], d--) a.dst_stride[d] = (uint32_t)s;
    return vkg_copy(cmd, &a);
}

/* ---- argmax ---- */

const vkg_attr_spec vkg_argmax_attrs[] = {{"axis", VKG_ATTR_INT, false}, {NULL, 0, false}};

vkg_status vkg_argmax_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x = tin(g, n, 0);
    int64_t a = attr_i(n, "axis", 1), axis = resolve_axis(a, x->rank);
    if (axis < 0) return gfail(g, n, "axis %lld outside the %u dims of \"%s\"", (long long)a, x->rank, x->name);
    if (fixed(x, (uint32_t)axis) == 0)
        return gfail(g, n, "argmax over dim %lld of \"%s\", which has size 0", (long long)axis, x->name);
    return VKG_SUCCESS;
}

vkg_status vkg_argmax_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    uint32_t axis = (uint32_t)resolve_axis(attr_i(n, "axis", 1), in[0]->rank);
    if (in[0]->dims[axis] < 1) return gfail(g, n, "argmax over dim %u, which has size 0", axis);
    out->rank = in[0]->rank - 1;
    for (uint32_t d = 0, o = 0; d < in[0]->rank; d++)
        if (d != axis) out->dims[o++] = in[0]->dims[d];
    return VKG_SUCCESS;
}

vkg_status vkg_argmax_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    VKG_TRY(fits_u32(n, &in[0]->shape));
    const vkg_shape *s = &in[0]->shape;
    uint32_t axis = (uint32_t)resolve_axis(attr_i(n, "axis", 1), s->rank);
    vkg_argmax_args a = {.x = in[0]->ref, .y = out->ref, .outer = prod(s, 0, axis), .k = (uint32_t)s->dims[axis],
                         .inner = prod(s, axis + 1, s->rank)};
    return vkg_argmax(cmd, &a);
}
