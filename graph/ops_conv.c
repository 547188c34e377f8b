/* conv2d and conv_transpose2d (docs/graph-format.md): NCHW, PyTorch's size formulas and weight
 * layouts; the kernels are in runtime/kernels/conv.c. */
#include <string.h>

#include "graph/ops_conv.h"
#include "runtime/kernels/conv.h"

#define gfail vkg_node_fail

/* Bounds that keep every size product of the kernels far from overflow. */
enum { CONV_MAX_PARAM = 65535 };

const vkg_attr_spec vkg_conv2d_attrs[] = {
    {"stride", VKG_ATTR_INTS, false}, {"padding", VKG_ATTR_INTS, false}, {"dilation", VKG_ATTR_INTS, false},
    {"groups", VKG_ATTR_INT, false},  {"activation", VKG_ATTR_INT, false}, {NULL, 0, false}};
const vkg_attr_spec vkg_conv_transpose2d_attrs[] = {
    {"stride", VKG_ATTR_INTS, false},   {"padding", VKG_ATTR_INTS, false}, {"output_padding", VKG_ATTR_INTS, false},
    {"dilation", VKG_ATTR_INTS, false}, {"groups", VKG_ATTR_INT, false},   {NULL, 0, false}};

static bool is_transposed(const vkg_ir_node *n) { return strcmp(n->op, "conv_transpose2d") == 0; }

static const vkg_ir_tensor *tin(const vkg_graph *g, const vkg_ir_node *n, uint32_t i)
{
    return i < n->n_inputs && n->inputs[i] != VKG_IR_NONE ? &g->tensors[n->inputs[i]] : NULL;
}

/* A pair attribute (INTS of 2 entries) or its default; false with a message when malformed. */
static vkg_status attr_pair(const vkg_graph *g, const vkg_ir_node *n, const char *name, int64_t dflt, int64_t lo,
                            int64_t out[2])
{
    const vkg_ir_attr *a = vkg_ir_attr_find(n, name);
    out[0] = out[1] = dflt;
    if (!a) return VKG_SUCCESS;
    if (a->count != 2) return gfail(g, n, "%s has %u entries; expected 2 (height, width)", name, a->count);
    for (int i = 0; i < 2; i++) {
        if (a->ints[i] < lo || a->ints[i] > CONV_MAX_PARAM)
            return gfail(g, n, "%s[%d] = %lld outside %lld..%d", name, i, (long long)a->ints[i], (long long)lo,
                         CONV_MAX_PARAM);
        out[i] = a->ints[i];
    }
    return VKG_SUCCESS;
}

typedef struct conv_attrs {
    int64_t stride[2], pad[2], dil[2], out_pad[2], groups, act;
} conv_attrs;

static vkg_status read_attrs(const vkg_graph *g, const vkg_ir_node *n, conv_attrs *a)
{
    VKG_TRY(attr_pair(g, n, "stride", 1, 1, a->stride));
    VKG_TRY(attr_pair(g, n, "padding", 0, 0, a->pad));
    VKG_TRY(attr_pair(g, n, "dilation", 1, 1, a->dil));
    VKG_TRY(attr_pair(g, n, "output_padding", 0, 0, a->out_pad));
    const vkg_ir_attr *gr = vkg_ir_attr_find(n, "groups"), *act = vkg_ir_attr_find(n, "activation");
    a->groups = gr ? gr->i : 1;
    a->act = act ? act->i : 0;
    if (a->groups < 1 || a->groups > CONV_MAX_PARAM)
        return gfail(g, n, "groups = %lld outside 1..%d", (long long)a->groups, CONV_MAX_PARAM);
    if (a->act != 0 && a->act != 1) return gfail(g, n, "activation %lld is not 0 (none) or 1 (relu)", (long long)a->act);
    for (int i = 0; i < 2; i++)
        if (a->out_pad[i] && a->out_pad[i] >= a->stride[i] && a->out_pad[i] >= a->dil[i])
            return gfail(g, n, "output_padding[%d] = %lld must be smaller than the stride (%lld) or the dilation (%lld)",
                         i, (long long)a->out_pad[i], (long long)a->stride[i], (long long)a->dil[i]);
    return VKG_SUCCESS;
}

/* Output size along one axis by PyTorch's formula; <= 0 when the input is too small. */
static int64_t out_dim(bool transposed, int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, int64_t op)
{
    if (transposed) return (in - 1) * s - 2 * p + d * (k - 1) + op + 1;
    int64_t num = in + 2 * p - d * (k - 1) - 1;
    return num < 0 ? 0 : num / s + 1;
}

vkg_status vkg_conv_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    bool tr = is_transposed(n);
    const vkg_ir_tensor *x = tin(g, n, 0), *w = tin(g, n, 1), *b = tin(g, n, 2), *res = tr ? NULL : tin(g, n, 3);
    conv_attrs a;
    VKG_TRY(read_attrs(g, n, &a));
    if (x->rank != 4) return gfail(g, n, "x \"%s\" must be (N, C, H, W), has rank %u", x->name, x->rank);
    if (w->role != VKG_ROLE_CONSTANT || w->rank != 4)
        return gfail(g, n, "weight \"%s\" must be a rank-4 f32 or f16 constant %s", w->name,
                     tr ? "(C, O/groups, kh, kw)" : "(O, C/groups, kh, kw)");
    for (uint32_t i = 0; i < 4; i++)
        if (w->dims[i] < 1 || w->dims[i] > (i < 2 ? (int64_t)1 << 24 : CONV_MAX_PARAM))
            return gfail(g, n, "weight \"%s\" dim %u is %lld", w->name, i, (long long)w->dims[i]);
    int64_t G = a.groups, C = x->sym[1] ? -1 : x->dims[1];
    int64_t O = tr ? w->dims[1] * G : w->dims[0];
    if (tr) {
        if (w->dims[0] % G)
            return gfail(g, n, "weight \"%s\" has %lld input channels, not a multiple of groups = %lld", w->name,
                         (long long)w->dims[0], (long long)G);
        if (C >= 0 && C != w->dims[0])
            return gfail(g, n, "x \"%s\" has %lld channels but weight \"%s\" is (%lld, %lld, %lld, %lld): expected C = %lld",
                         x->name, (long long)C, w->name, (long long)w->dims[0], (long long)w->dims[1],
                         (long long)w->dims[2], (long long)w->dims[3], (long long)w->dims[0]);
    } else {
        if (O % G) return gfail(g, n, "%lld output channels are not a multiple of groups = %lld", (long long)O, (long long)G);
        if (C >= 0 && C != w->dims[1] * G)
            return gfail(g, n, "x \"%s\" has %lld channels but weight \"%s\" is (%lld, %lld, %lld, %lld) with groups = %lld: "
                         "expected C = %lld", x->name, (long long)C, w->name, (long long)w->dims[0],
                         (long long)w->dims[1], (long long)w->dims[2], (long long)w->dims[3], (long long)G,
                         (long long)(w->dims[1] * G));
    }
    if (b && (b->role != VKG_ROLE_CONSTANT || b->dtype != VKG_DTYPE_F32 || b->rank != 1 || b->dims[0] != O))
        return gfail(g, n, "bias \"%s\" must be an f32 constant of shape (%lld)", b->name, (long long)O);
    if (res && res->rank != 4) return gfail(g, n, "residual \"%s\" must be (N, O, Ho, Wo), has rank %u", res->name, res->rank);
    for (uint32_t d = 2; d < 4; d++) {
        if (x->sym[d]) continue;
        int64_t o = out_dim(tr, x->dims[d], w->dims[d], a.stride[d - 2], a.pad[d - 2], a.dil[d - 2], a.out_pad[d - 2]);
        if (o < 1)
            return gfail(g, n, "x \"%s\" has %s %lld, which gives an output %s of %lld with kernel %lld, stride %lld, "
                         "padding %lld, dilation %lld", x->name, d == 2 ? "height" : "width", (long long)x->dims[d],
                         d == 2 ? "height" : "width", (long long)o, (long long)w->dims[d], (long long)a.stride[d - 2],
                         (long long)a.pad[d - 2], (long long)a.dil[d - 2]);
    }
    return VKG_SUCCESS;
}

vkg_status vkg_conv_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    bool tr = is_transposed(n);
    const vkg_shape *x = in[0], *w = in[1], *res = tr ? NULL : in[3];
    conv_attrs a;
    VKG_TRY(read_attrs(g, n, &a));
    int64_t C = tr ? w->dims[0] : w->dims[1] * a.groups, O = tr ? w->dims[1] * a.groups : w->dims[0];
    if (x->dims[1] != C)
        return gfail(g, n, "x has %lld channels; the weight expects %lld", (long long)x->dims[1], (long long)C);
    out->rank = 4;
    out->dims[0] = x->dims[0];
    out->dims[1] = O;
    for (uint32_t d = 2; d < 4; d++) {
        out->dims[d] = out_dim(tr, x->dims[d], w->dims[d], a.stride[d - 2], a.pad[d - 2], a.dil[d - 2], a.out_pad[d - 2]);
        if (out->dims[d] < 1)
            return gfail(g, n, "input %lldx%lld gives an output of %lldx%lld", (long long)x->dims[2],
                         (long long)x->dims[3], (long long)out_dim(tr, x->dims[2], w->dims[2], a.stride[0], a.pad[0],
                                                                 a.dil[0], a.out_pad[0]),
                         (long long)out_dim(tr, x->dims[3], w->dims[3], a.stride[1], a.pad[1], a.dil[1], a.out_pad[1]));
    }
    if (vkg_shape_numel(x) > UINT32_MAX || vkg_shape_numel(out) > UINT32_MAX || x->dims[2] > UINT32_MAX / 4 ||
        x->dims[3] > UINT32_MAX / 4)
        return gfail(g, n, "x (%lld, %lld, %lld, %lld) or its output exceeds 2^32 elements", (long long)x->dims[0],
                     (long long)x->dims[1], (long long)x->dims[2], (long long)x->dims[3]);
    if (res) {
        bool same = res->rank == 4;
        for (uint32_t i = 0; same && i < 4; i++) same = res->dims[i] == out->dims[i];
        if (!same)
            return gfail(g, n, "residual (%lld, %lld, %lld, %lld) must have the output's shape (%lld, %lld, %lld, %lld)",
                         (long long)res->dims[0], (long long)res->dims[1], (long long)res->dims[2],
                         (long long)res->dims[3], (long long)out->dims[0], (long long)out->dims[1],
                         (long long)out->dims[2], (long long)out->dims[3]);
    }
    return VKG_SUCCESS;
}

/* The kernel's arguments at these shapes (buffers left empty). Attributes were validated at load. */
static vkg_conv_args conv_args(const vkg_ir_node *n, const vkg_shape *x, const vkg_shape *w)
{
    bool tr = is_transposed(n);
    conv_attrs a;
    read_attrs(NULL, n, &a);
    vkg_conv_args c = {.transposed = tr, .n = (uint32_t)x->dims[0], .c = (uint32_t)x->dims[1],
                       .h = (uint32_t)x->dims[2], .w = (uint32_t)x->dims[3],
                       .o = (uint32_t)(tr ? w->dims[1] * a.groups : w->dims[0]), .kh = (uint32_t)w->dims[2],
                       .kw = (uint32_t)w->dims[3], .groups = (uint32_t)a.groups, .act = (vkg_act)a.act};
    for (int i = 0; i < 2; i++) {
        c.stride[i] = (uint32_t)a.stride[i];
        c.pad[i] = (uint32_t)a.pad[i];
        c.dilation[i] = (uint32_t)a.dil[i];
        c.out_pad[i] = (uint32_t)a.out_pad[i];
    }
    return c;
}

uint64_t vkg_conv_scratch(const vkg_context *ctx, const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out)
{
    (void)out;
    vkg_conv_args c = conv_args(n, in[0], in[1]);
    return vkg_conv_scratch_bytes(ctx, &c);
}

double vkg_conv_flops(const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out)
{
    const vkg_shape *w = in[1];
    double taps = (double)w->dims[2] * (double)w->dims[3];
    if (is_transposed(n)) /* every input pixel meets every tap once */
        return 2.0 * (double)vkg_shape_numel(in[0]) * (double)w->dims[1] * taps;
    return 2.0 * (double)vkg_shape_numel(out) * (double)w->dims[1] * taps;
}

vkg_status vkg_conv_record(const vkg_op_call *c)
{
    const vkg_rt_tensor *x = c->in[0], *w = c->in[1], *b = c->in[2];
    const vkg_rt_tensor *res = is_transposed(c->node) ? NULL : c->in[3];
    vkg_conv_args a = conv_args(c->node, &x->shape, &w->shape);
    a.x = x->ref;
    a.weight = w->ref;
    a.w_dtype = w->dtype;
    a.bias = b ? b->ref : (vkg_tref){0};
    a.residual = res ? res->ref : (vkg_tref){0};
    a.y = c->out[0]->ref;
    a.scratch = c->scratch;
    VkDeviceSize need = vkg_conv_scratch_bytes(vkg_cmd_context(c->cmd), &a);
    if (need > c->scratch_bytes)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: scratch of %llu bytes, %llu needed", c->node->op,
                        (unsigned long long)c->scratch_bytes, (unsigned long long)need);
    return vkg_conv2d(c->cmd, &a);
}
