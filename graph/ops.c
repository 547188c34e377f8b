/* The op registry of format version 1.0 (docs/graph-format.md, "Ops"). */
#include "graph/ops.h"

#include <string.h>

#define GRAPH_FAIL(g, n, ...) graph_fail(g, n, __VA_ARGS__)

static vkg_status graph_fail(const vkg_graph *g, const vkg_ir_node *n, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static vkg_status graph_fail(const vkg_graph *g, const vkg_ir_node *n, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: node \"%s\" (op %s): %s", g ? g->source : "graph", n->name, n->op,
                    msg);
}

uint64_t vkg_shape_numel(const vkg_shape *s)
{
    uint64_t n = 1;
    for (uint32_t i = 0; i < s->rank; i++) n *= (uint64_t)s->dims[i];
    return n;
}

static const vkg_ir_tensor *in_t(const vkg_graph *g, const vkg_ir_node *n, uint32_t i)
{
    return i < n->n_inputs && n->inputs[i] != VKG_IR_NONE ? &g->tensors[n->inputs[i]] : NULL;
}

/* Fixed last dim of a tensor, or -1 when symbolic or rank 0. */
static int64_t last_dim(const vkg_ir_tensor *t)
{
    return t->rank && !t->sym[t->rank - 1] ? t->dims[t->rank - 1] : -1;
}

/* ---- linear ---- */

static const vkg_attr_spec linear_attrs[] = {{"activation", VKG_ATTR_INT, false}, {NULL, 0, false}};

static vkg_status linear_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x = in_t(g, n, 0), *w = in_t(g, n, 1), *b = in_t(g, n, 2);
    if (!x || !w) return GRAPH_FAIL(g, n, "inputs x and weight are required");
    if (w->role != VKG_ROLE_CONSTANT || w->rank != 2 || (w->dtype != VKG_DTYPE_F32 && w->dtype != VKG_DTYPE_F16))
        return GRAPH_FAIL(g, n, "weight \"%s\" must be a 2-d f32 or f16 constant (N, K)", w->name);
    if (x->rank < 1) return GRAPH_FAIL(g, n, "input \"%s\" must have rank >= 1", x->name);
    if (last_dim(x) >= 0 && last_dim(x) != w->dims[1])
        return GRAPH_FAIL(g, n, "input \"%s\" has last dim %lld but weight \"%s\" is (%lld, %lld): expected K = %lld",
                          x->name, (long long)last_dim(x), w->name, (long long)w->dims[0], (long long)w->dims[1],
                          (long long)w->dims[1]);
    if (b && (b->role != VKG_ROLE_CONSTANT || b->dtype != VKG_DTYPE_F32 || b->rank != 1 || b->dims[0] != w->dims[0]))
        return GRAPH_FAIL(g, n, "bias \"%s\" must be an f32 constant of shape (%lld)", b->name, (long long)w->dims[0]);
    const vkg_ir_attr *a = vkg_ir_attr_find(n, "activation");
    if (a && (a->i < 0 || a->i > 2)) return GRAPH_FAIL(g, n, "activation %lld is not 0 (none), 1 (relu) or 2 (gelu)", (long long)a->i);
    return VKG_SUCCESS;
}

static vkg_status linear_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    const vkg_shape *x = in[0], *w = in[1];
    if (x->dims[x->rank - 1] != w->dims[1])
        return GRAPH_FAIL(g, n, "input has last dim %lld, weight expects %lld", (long long)x->dims[x->rank - 1],
                          (long long)w->dims[1]);
    *out = *x;
    out->dims[x->rank - 1] = w->dims[0];
    return VKG_SUCCESS;
}

static vkg_status linear_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    const vkg_ir_attr *a = vkg_ir_attr_find(n, "activation");
    uint64_t rows = vkg_shape_numel(&in[0]->shape) / (uint64_t)in[1]->shape.dims[1];
    if (rows > UINT32_MAX) return vkg_fail(VKG_ERROR_UNSUPPORTED, "node \"%s\": %llu rows", n->name, (unsigned long long)rows);
    vkg_matmul_args m = {.x = in[0]->ref, .w = in[1]->ref, .bias = in[2] ? in[2]->ref : (vkg_tref){0},
                         .y = out->ref, .batch = 1, .m = (uint32_t)rows, .n = (uint32_t)in[1]->shape.dims[0],
                         .k = (uint32_t)in[1]->shape.dims[1], .w_shared = true, .w_dtype = in[1]->dtype,
                         .act = a ? (vkg_act)a->i : VKG_ACT_NONE};
    return vkg_matmul(cmd, &m);
}

static double linear_flops(const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out)
{
    (void)n;
    return 2.0 * (double)vkg_shape_numel(out) * (double)in[1]->dims[1];
}

/* ---- layernorm ---- */

static const vkg_attr_spec layernorm_attrs[] = {{"eps", VKG_ATTR_FLOAT, true}, {NULL, 0, false}};

static vkg_status layernorm_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x = in_t(g, n, 0), *w = in_t(g, n, 1), *b = in_t(g, n, 2);
    if (!x) return GRAPH_FAIL(g, n, "input x is required");
    if (x->rank < 1) return GRAPH_FAIL(g, n, "input \"%s\" must have rank >= 1", x->name);
    if (!w != !b) return GRAPH_FAIL(g, n, "give both weight and bias, or neither");
    for (int i = 0; i < 2 && w; i++) {
        const vkg_ir_tensor *p = i ? b : w;
        if (p->role != VKG_ROLE_CONSTANT || p->dtype != VKG_DTYPE_F32 || p->rank != 1)
            return GRAPH_FAIL(g, n, "\"%s\" must be a 1-d f32 constant", p->name);
        if (last_dim(x) >= 0 && p->dims[0] != last_dim(x))
            return GRAPH_FAIL(g, n, "\"%s\" has %lld elements, expected %lld (the last dim of \"%s\")", p->name,
                              (long long)p->dims[0], (long long)last_dim(x), x->name);
    }
    if (w && b->dims[0] != w->dims[0]) return GRAPH_FAIL(g, n, "weight and bias sizes differ");
    const vkg_ir_attr *e = vkg_ir_attr_find(n, "eps");
    if (!(e->f >= 0.0 && e->f < 1.0)) return GRAPH_FAIL(g, n, "eps %g outside [0, 1)", e->f);
    return VKG_SUCCESS;
}

static vkg_status same_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    (void)g;
    (void)n;
    *out = *in[0];
    return VKG_SUCCESS;
}

static vkg_status layernorm_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    if (in[1] && in[1]->dims[0] != in[0]->dims[in[0]->rank - 1])
        return GRAPH_FAIL(g, n, "weight has %lld elements, input's last dim is %lld", (long long)in[1]->dims[0],
                          (long long)in[0]->dims[in[0]->rank - 1]);
    *out = *in[0];
    return VKG_SUCCESS;
}

static vkg_status layernorm_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    uint64_t d = (uint64_t)in[0]->shape.dims[in[0]->shape.rank - 1];
    uint64_t rows = d ? vkg_shape_numel(&in[0]->shape) / d : 0;
    const vkg_ir_attr *e = vkg_ir_attr_find(n, "eps");
    return vkg_layernorm(cmd, in[0]->ref, in[1] ? in[1]->ref : (vkg_tref){0}, in[2] ? in[2]->ref : (vkg_tref){0},
                         out->ref, (uint32_t)rows, (uint32_t)d, (float)e->f);
}

/* ---- gelu, relu ---- */

static const vkg_attr_spec gelu_attrs[] = {{"approximate", VKG_ATTR_STRING, false}, {NULL, 0, false}};
static const vkg_attr_spec no_attrs[] = {{NULL, 0, false}};

static vkg_status gelu_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_attr *a = vkg_ir_attr_find(n, "approximate");
    if (a && strcmp(a->s, "none") != 0)
        return GRAPH_FAIL(g, n, "approximate=\"%s\" is not supported: only the exact erf GELU (\"none\")", a->s);
    return VKG_SUCCESS;
}

static vkg_status gelu_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    (void)n;
    return vkg_unary(cmd, VKG_ACT_GELU, in[0]->ref, out->ref, vkg_shape_numel(&out->shape));
}

static vkg_status relu_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    (void)n;
    return vkg_unary(cmd, VKG_ACT_RELU, in[0]->ref, out->ref, vkg_shape_numel(&out->shape));
}

/* ---- add, mul ---- */

static vkg_status binary_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *a = in_t(g, n, 0), *b = in_t(g, n, 1);
    if (!a || !b) return GRAPH_FAIL(g, n, "both inputs are required");
    uint32_t r = VKG_MAX(a->rank, b->rank);
    for (uint32_t i = 0; i < r; i++) {
        int ia = (int)i - (int)(r - a->rank), ib = (int)i - (int)(r - b->rank);
        if (ia < 0 || ib < 0 || a->sym[ia] || b->sym[ib]) continue;
        int64_t da = a->dims[ia], db = b->dims[ib];
        if (da != db && da != 1 && db != 1)
            return GRAPH_FAIL(g, n, "\"%s\" and \"%s\" do not broadcast: sizes %lld and %lld at dim %u of %u", a->name,
                              b->name, (long long)da, (long long)db, i, r);
    }
    return VKG_SUCCESS;
}

static vkg_status binary_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    uint32_t a[VKG_IR_MAX_RANK], b[VKG_IR_MAX_RANK], o[VKG_MAX_RANK], r;
    for (uint32_t i = 0; i < in[0]->rank; i++) a[i] = (uint32_t)in[0]->dims[i];
    for (uint32_t i = 0; i < in[1]->rank; i++) b[i] = (uint32_t)in[1]->dims[i];
    vkg_status s = vkg_broadcast_shape(a, in[0]->rank, b, in[1]->rank, o, &r);
    if (s != VKG_SUCCESS) return GRAPH_FAIL(g, n, "%s", vkg_last_error());
    out->rank = r;
    for (uint32_t i = 0; i < r; i++) out->dims[i] = o[i];
    return VKG_SUCCESS;
}

static vkg_status binary_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    uint32_t a[VKG_IR_MAX_RANK], b[VKG_IR_MAX_RANK];
    for (uint32_t i = 0; i < in[0]->shape.rank; i++) a[i] = (uint32_t)in[0]->shape.dims[i];
    for (uint32_t i = 0; i < in[1]->shape.rank; i++) b[i] = (uint32_t)in[1]->shape.dims[i];
    return vkg_binary(cmd, strcmp(n->op, "add") == 0 ? VKG_BIN_ADD : VKG_BIN_MUL, in[0]->ref, a, in[0]->shape.rank,
                      in[1]->ref, b, in[1]->shape.rank, out->ref);
}

/* ---- softmax ---- */

static const vkg_attr_spec softmax_attrs[] = {{"axis", VKG_ATTR_INT, false}, {NULL, 0, false}};

static vkg_status softmax_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x = in_t(g, n, 0);
    const vkg_ir_attr *a = vkg_ir_attr_find(n, "axis");
    if (!x || x->rank < 1) return GRAPH_FAIL(g, n, "input must have rank >= 1");
    if (a && a->i != -1 && a->i != (int64_t)x->rank - 1)
        return GRAPH_FAIL(g, n, "axis %lld: only the last dimension (-1 or %u) is supported", (long long)a->i, x->rank - 1);
    return VKG_SUCCESS;
}

static vkg_status softmax_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    (void)n;
    uint64_t d = (uint64_t)in[0]->shape.dims[in[0]->shape.rank - 1];
    return vkg_softmax(cmd, in[0]->ref, out->ref, (uint32_t)(d ? vkg_shape_numel(&in[0]->shape) / d : 0), (uint32_t)d);
}

/* ---- reshape (a view: no dispatch) ---- */

static const vkg_attr_spec reshape_attrs[] = {{"shape", VKG_ATTR_INTS, true}, {NULL, 0, false}};

static vkg_status reshape_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_attr *a = vkg_ir_attr_find(n, "shape");
    const vkg_ir_tensor *x = in_t(g, n, 0);
    if (!x) return GRAPH_FAIL(g, n, "input is required");
    if (a->count > VKG_IR_MAX_RANK) return GRAPH_FAIL(g, n, "shape has %u entries, at most %d", a->count, VKG_IR_MAX_RANK);
    int infer = 0;
    for (uint32_t i = 0; i < a->count; i++) {
        if (a->ints[i] < -1) return GRAPH_FAIL(g, n, "shape[%u] = %lld: expected >= -1", i, (long long)a->ints[i]);
        if (a->ints[i] == -1 && ++infer > 1) return GRAPH_FAIL(g, n, "shape has more than one -1");
        if (a->ints[i] == 0 && i >= x->rank)
            return GRAPH_FAIL(g, n, "shape[%u] = 0 copies an input dim, but the input has rank %u", i, x->rank);
    }
    return VKG_SUCCESS;
}

static vkg_status reshape_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    const vkg_ir_attr *a = vkg_ir_attr_find(n, "shape");
    uint64_t total = vkg_shape_numel(in[0]), known = 1;
    int minus = -1;
    out->rank = a->count;
    for (uint32_t i = 0; i < a->count; i++) {
        int64_t v = a->ints[i] == 0 ? in[0]->dims[i] : a->ints[i];
        if (v == -1) minus = (int)i;
        else known *= (uint64_t)v;
        out->dims[i] = v;
    }
    if (minus >= 0) {
        if (known == 0 || total % known)
            return GRAPH_FAIL(g, n, "cannot infer the -1 dim: %llu elements into blocks of %llu",
                              (unsigned long long)total, (unsigned long long)known);
        out->dims[minus] = (int64_t)(total / known);
    } else if (known != total) {
        return GRAPH_FAIL(g, n, "new shape holds %llu elements, the input %llu", (unsigned long long)known,
                          (unsigned long long)total);
    }
    return VKG_SUCCESS;
}

/* ---- the table ---- */

static const vkg_op_def ops[] = {
    {"linear", 2, 3, 1, linear_attrs, linear_validate, linear_infer, linear_record, linear_flops},
    {"layernorm", 1, 3, 1, layernorm_attrs, layernorm_validate, layernorm_infer, layernorm_record, NULL},
    {"gelu", 1, 1, 1, gelu_attrs, gelu_validate, same_infer, gelu_record, NULL},
    {"relu", 1, 1, 1, no_attrs, NULL, same_infer, relu_record, NULL},
    {"add", 2, 2, 1, no_attrs, binary_validate, binary_infer, binary_record, NULL},
    {"mul", 2, 2, 1, no_attrs, binary_validate, binary_infer, binary_record, NULL},
    {"softmax", 1, 1, 1, softmax_attrs, softmax_validate, same_infer, softmax_record, NULL},
    {"reshape", 1, 1, 1, reshape_attrs, reshape_validate, reshape_infer, NULL, NULL},
};

const vkg_op_def *vkg_op_find(const char *name)
{
    for (size_t i = 0; i < VKG_ARRAY_LEN(ops); i++)
        if (strcmp(ops[i].name, name) == 0) return &ops[i];
    return NULL;
}

bool vkg_op_known(const char *op) { return vkg_op_find(op) != NULL; }

static const char *attr_type_name(vkg_attr_type t)
{
    switch (t) {
    case VKG_ATTR_INT: return "INT";
    case VKG_ATTR_FLOAT: return "FLOAT";
    case VKG_ATTR_STRING: return "STRING";
    case VKG_ATTR_INTS: return "INTS";
    case VKG_ATTR_FLOATS: return "FLOATS";
    }
    return "?";
}

vkg_status vkg_op_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_op_def *op = vkg_op_find(n->op);
    if (!op) return GRAPH_FAIL(g, n, "unknown op \"%s\" (this reader knows format version 1.0 ops)", n->op);
    if (n->n_inputs < op->min_inputs || n->n_inputs > op->max_inputs) {
        if (op->min_inputs == op->max_inputs)
            return GRAPH_FAIL(g, n, "%u inputs, expected %u", n->n_inputs, op->min_inputs);
        return GRAPH_FAIL(g, n, "%u inputs, expected %u to %u", n->n_inputs, op->min_inputs, op->max_inputs);
    }
    if (n->n_outputs != op->n_outputs) return GRAPH_FAIL(g, n, "%u outputs, expected %u", n->n_outputs, op->n_outputs);
    /* Only optional inputs (past min_inputs) may be absent. */
    for (uint32_t i = 0; i < op->min_inputs; i++)
        if (n->inputs[i] == VKG_IR_NONE) return GRAPH_FAIL(g, n, "input %u is required but absent", i);
    for (uint32_t i = 0; i < n->n_attrs; i++) {
        const vkg_attr_spec *s = op->attrs;
        while (s->name && strcmp(s->name, n->attrs[i].name) != 0) s++;
        if (!s->name) {
            /* A newer minor version may add attributes; in a file of our version it is an error. */
            if (g->version_minor > 0) continue;
            return GRAPH_FAIL(g, n, "unknown attribute \"%s\"", n->attrs[i].name);
        }
        if (s->type != n->attrs[i].type)
            return GRAPH_FAIL(g, n, "attribute \"%s\" is %s, expected %s", s->name, attr_type_name(n->attrs[i].type),
                              attr_type_name(s->type));
    }
    for (const vkg_attr_spec *s = op->attrs; s->name; s++)
        if (s->required && !vkg_ir_attr_find(n, s->name))
            return GRAPH_FAIL(g, n, "required attribute \"%s\" (%s) is missing", s->name, attr_type_name(s->type));
    /* Generic dtype rules: activations are f32; only linear's weight may be f16. */
    for (uint32_t i = 0; i < n->n_inputs; i++) {
        const vkg_ir_tensor *t = in_t(g, n, i);
        bool f16_ok = strcmp(n->op, "linear") == 0 && i == 1;
        if (t && t->dtype != VKG_DTYPE_F32 && !(f16_ok && t->dtype == VKG_DTYPE_F16))
            return GRAPH_FAIL(g, n, "input %u \"%s\" has dtype %s, expected f32%s", i, t->name, vkg_dtype_name(t->dtype),
                              f16_ok ? " or f16" : "");
    }
    for (uint32_t i = 0; i < n->n_outputs; i++) {
        const vkg_ir_tensor *t = &g->tensors[n->outputs[i]];
        if (t->dtype != VKG_DTYPE_F32)
            return GRAPH_FAIL(g, n, "output \"%s\" has dtype %s, expected f32", t->name, vkg_dtype_name(t->dtype));
    }
    return op->validate ? op->validate(g, n) : VKG_SUCCESS;
}
