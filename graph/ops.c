/* The op registry of format version 1.0 (docs/graph-format.md, "Ops"). */
#include "graph/ops.h"

#include <string.h>

#include "runtime/kernels/attention.h"
#include "runtime/kernels/copy.h"
#include "graph/ops_moe.h"
#include "graph/ops_dense.h"
#include "graph/ops_conv.h"

#define GRAPH_FAIL(g, n, ...) vkg_node_fail(g, n, __VA_ARGS__)

vkg_status vkg_node_fail(const vkg_graph *g, const vkg_ir_node *n, const char *fmt, ...)
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

static const vkg_attr_spec linear_attrs[] = {{"activation", VKG_ATTR_INT, false},
                                             {"lora_scale", VKG_ATTR_FLOATS, false},
                                             {"lora_ranks", VKG_ATTR_INTS, false},
                                             {NULL, 0, false}};

/* LoRA inputs 5 (lora_a, (R, K)) and 6 (lora_b, (N, R)) with their attributes. */
static vkg_status linear_lora_validate(const vkg_graph *g, const vkg_ir_node *n, const vkg_ir_tensor *w)
{
    const vkg_ir_tensor *la = in_t(g, n, 5), *lb = in_t(g, n, 6);
    const vkg_ir_attr *sc = vkg_ir_attr_find(n, "lora_scale"), *rk = vkg_ir_attr_find(n, "lora_ranks");
    if (!la && !lb) {
        if (sc || rk) return GRAPH_FAIL(g, n, "lora_scale or lora_ranks without lora_a and lora_b inputs");
        return VKG_SUCCESS;
    }
    if (!la || !lb) return GRAPH_FAIL(g, n, "give both lora_a (input 5) and lora_b (input 6), or neither");
    for (int i = 0; i < 2; i++) {
        const vkg_ir_tensor *t = i ? lb : la;
        if (t->role != VKG_ROLE_CONSTANT || t->rank != 2)
            return GRAPH_FAIL(g, n, "%s \"%s\" must be a 2-d f32 or f16 constant", i ? "lora_b" : "lora_a", t->name);
    }
    int64_t R = la->dims[0];
    if (la->dims[1] != w->dims[1] || lb->dims[0] != w->dims[0] || lb->dims[1] != R)
        return GRAPH_FAIL(g, n, "lora_a \"%s\" is (%lld, %lld) and lora_b \"%s\" (%lld, %lld); with weight (%lld, %lld) "
                          "expected (R, %lld) and (%lld, R)", la->name, (long long)la->dims[0], (long long)la->dims[1],
                          lb->name, (long long)lb->dims[0], (long long)lb->dims[1], (long long)w->dims[0],
                          (long long)w->dims[1], (long long)w->dims[1], (long long)w->dims[0]);
    if (R < 1 || R > VKG_LORA_MAX_R) return GRAPH_FAIL(g, n, "LoRA rank total %lld outside 1..%d", (long long)R, VKG_LORA_MAX_R);
    if (!sc) return GRAPH_FAIL(g, n, "LoRA inputs need the lora_scale attribute (one scale per adapter)");
    uint32_t na = sc->count;
    if (na < 1 || na > VKG_LORA_MAX_ADAPTERS)
        return GRAPH_FAIL(g, n, "%u LoRA adapters; 1 to %d are supported", na, VKG_LORA_MAX_ADAPTERS);
    if (!rk && na != 1) return GRAPH_FAIL(g, n, "%u lora_scale values need lora_ranks with as many entries", na);
    if (rk && rk->count != na)
        return GRAPH_FAIL(g, n, "lora_ranks has %u entries and lora_scale %u", rk->count, na);
    int64_t sum = 0;
    for (uint32_t i = 0; rk && i < na; i++) {
        if (rk->ints[i] < 1 || rk->ints[i] > VKG_LORA_MAX_RANK)
            return GRAPH_FAIL(g, n, "lora_ranks[%u] = %lld outside 1..%d", i, (long long)rk->ints[i], VKG_LORA_MAX_RANK);
        sum += rk->ints[i];
    }
    if (!rk && R > VKG_LORA_MAX_RANK)
        return GRAPH_FAIL(g, n, "one adapter of rank %lld; at most %d (split it with lora_ranks)", (long long)R, VKG_LORA_MAX_RANK);
    if (rk && sum != R) return GRAPH_FAIL(g, n, "lora_ranks sum to %lld; lora_a has %lld rows", (long long)sum, (long long)R);
    for (uint32_t i = 0; i < na; i++)
        if (!(sc->floats[i] == sc->floats[i]) || sc->floats[i] > 1e30 || sc->floats[i] < -1e30)
            return GRAPH_FAIL(g, n, "lora_scale[%u] = %g must be finite", i, sc->floats[i]);
    return VKG_SUCCESS;
}

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
    const vkg_ir_tensor *sc = in_t(g, n, 3), *res = in_t(g, n, 4);
    if (sc && (sc->role != VKG_ROLE_CONSTANT || sc->rank != 1 || sc->dims[0] != w->dims[0]))
        return GRAPH_FAIL(g, n, "scale \"%s\" must be an f32 constant of shape (%lld)", sc->name, (long long)w->dims[0]);
    if (res && res->rank != x->rank)
        return GRAPH_FAIL(g, n, "residual \"%s\" has rank %u; the output has rank %u", res->name, res->rank, x->rank);
    return linear_lora_validate(g, n, w);
}

static vkg_status linear_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    const vkg_shape *x = in[0], *w = in[1];
    if (x->dims[x->rank - 1] != w->dims[1])
        return GRAPH_FAIL(g, n, "input has last dim %lld, weight expects %lld", (long long)x->dims[x->rank - 1],
                          (long long)w->dims[1]);
    *out = *x;
    out->dims[x->rank - 1] = w->dims[0];
    const vkg_shape *res = in[4];
    if (res) {
        bool same = res->rank == out->rank;
        for (uint32_t i = 0; same && i < out->rank; i++) same = res->dims[i] == out->dims[i];
        if (!same) return GRAPH_FAIL(g, n, "residual must have the output's shape");
    }
    return VKG_SUCCESS;
}

static void linear_args(const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out,
                        vkg_matmul_args *m)
{
    const vkg_ir_attr *a = vkg_ir_attr_find(n, "activation");
    uint64_t rows = vkg_shape_numel(&in[0]->shape) / (uint64_t)in[1]->shape.dims[1];
    *m = (vkg_matmul_args){.x = in[0]->ref, .w = in[1]->ref, .bias = in[2] ? in[2]->ref : (vkg_tref){0},
                           .scale = in[3] ? in[3]->ref : (vkg_tref){0}, .residual = in[4] ? in[4]->ref : (vkg_tref){0},
                           .y = out ? out->ref : (vkg_tref){0}, .batch = 1, .m = (uint32_t)rows,
                           .n = (uint32_t)in[1]->shape.dims[0], .k = (uint32_t)in[1]->shape.dims[1], .w_shared = true,
                           .w_dtype = in[1]->dtype, .act = a ? (vkg_act)a->i : VKG_ACT_NONE};
    if (!in[5]) return;
    const vkg_ir_attr *sc = vkg_ir_attr_find(n, "lora_scale"), *rk = vkg_ir_attr_find(n, "lora_ranks");
    m->lora_a = in[5]->ref;
    m->lora_b = in[6]->ref;
    m->lora_dtype = in[5]->dtype;
    m->lora_r = (uint32_t)in[5]->shape.dims[0];
    m->lora_n_adapters = sc->count;
    for (uint32_t i = 0; i < sc->count && i < VKG_LORA_MAX_ADAPTERS; i++) {
        m->lora_scales[i] = (float)sc->floats[i];
        m->lora_ranks[i] = rk ? (uint32_t)rk->ints[i] : m->lora_r;
    }
}

static vkg_status linear_record(const vkg_op_call *c)
{
    uint64_t rows = vkg_shape_numel(&c->in[0]->shape) / (uint64_t)c->in[1]->shape.dims[1];
    if (rows > UINT32_MAX)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "node \"%s\": %llu rows", c->node->name, (unsigned long long)rows);
    vkg_matmul_args m;
    linear_args(c->node, c->in, c->out[0], &m);
    if (m.lora_a.buf) m.lora_t = c->scratch;
    if (vkg_matmul_lora_scratch_bytes(&m) > c->scratch_bytes)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "node \"%s\": LoRA scratch too small", c->node->name);
    return vkg_matmul(c->cmd, &m);
}

static uint64_t linear_scratch(const vkg_context *ctx, const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out)
{
    (void)ctx;
    (void)n;
    if (!in[5]) return 0;
    return vkg_shape_numel(out) / (uint64_t)out->dims[out->rank - 1] * (uint64_t)in[5]->dims[0] * 4;
}

static double linear_flops(const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out)
{
    (void)n;
    double f = 2.0 * (double)vkg_shape_numel(out) * (double)in[1]->dims[1];
    if (in[5]) /* x A^T and t B^T */
        f += 2.0 * (double)vkg_shape_numel(out) / (double)out->dims[out->rank - 1] * (double)in[5]->dims[0] *
             (double)(in[1]->dims[1] + in[1]->dims[0]);
    return f;
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
    vkg_act a = !strcmp(n->op, "tanh") ? VKG_ACT_TANH : !strcmp(n->op, "sigmoid") ? VKG_ACT_SIGMOID : VKG_ACT_RELU;
    return vkg_unary(cmd, a, in[0]->ref, out->ref, vkg_shape_numel(&out->shape));
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

/* ---- add_n ---- */

static const vkg_attr_spec add_n_attrs[] = {{"scale", VKG_ATTR_FLOAT, false}, {NULL, 0, false}};

static vkg_status add_n_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *a = in_t(g, n, 0);
    for (uint32_t i = 1; i < n->n_inputs; i++) {
        const vkg_ir_tensor *b = in_t(g, n, i);
        if (!b) return GRAPH_FAIL(g, n, "input %u is absent; every input of add_n is required", i);
        if (b->rank != a->rank)
            return GRAPH_FAIL(g, n, "\"%s\" has rank %u and \"%s\" rank %u; add_n needs one shape", a->name, a->rank,
                              b->name, b->rank);
        for (uint32_t d = 0; d < a->rank; d++)
            if (!a->sym[d] && !b->sym[d] && a->dims[d] != b->dims[d])
                return GRAPH_FAIL(g, n, "\"%s\" and \"%s\" differ in dim %u (%lld and %lld); add_n needs one shape",
                                  a->name, b->name, d, (long long)a->dims[d], (long long)b->dims[d]);
    }
    const vkg_ir_attr *sc = vkg_ir_attr_find(n, "scale");
    if (sc && !(sc->f == sc->f && sc->f < 1e38 && sc->f > -1e38)) return GRAPH_FAIL(g, n, "scale %g is not finite", sc->f);
    return VKG_SUCCESS;
}

static vkg_status add_n_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    for (uint32_t i = 1; i < n->n_inputs; i++)
        for (uint32_t d = 0; d < in[0]->rank; d++)
            if (in[i]->dims[d] != in[0]->dims[d])
                return GRAPH_FAIL(g, n, "input %u differs from input 0 in dim %u (%lld and %lld)", i, d,
                                  (long long)in[i]->dims[d], (long long)in[0]->dims[d]);
    *out = *in[0];
    return VKG_SUCCESS;
}

static vkg_status add_n_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    vkg_tref x[VKG_ADD_N_MAX];
    for (uint32_t i = 0; i < n->n_inputs; i++) x[i] = in[i]->ref;
    const vkg_ir_attr *sc = vkg_ir_attr_find(n, "scale");
    return vkg_add_n(cmd, x, n->n_inputs, out->ref, vkg_shape_numel(&out->shape), sc ? (float)sc->f : 1.0f);
}

/* ---- swiglu ---- */

static vkg_status swiglu_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x = in_t(g, n, 0);
    if (x->rank < 1) return GRAPH_FAIL(g, n, "input must have rank >= 1");
    if (last_dim(x) >= 0 && last_dim(x) % 2)
        return GRAPH_FAIL(g, n, "input \"%s\" has an odd last dim %lld; expected 2h (gate and value halves)", x->name,
                          (long long)last_dim(x));
    return VKG_SUCCESS;
}

static vkg_status swiglu_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    if (in[0]->dims[in[0]->rank - 1] % 2)
        return GRAPH_FAIL(g, n, "last dim %lld is odd", (long long)in[0]->dims[in[0]->rank - 1]);
    *out = *in[0];
    out->dims[out->rank - 1] /= 2;
    return VKG_SUCCESS;
}

static vkg_status swiglu_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    (void)n;
    uint64_t h = (uint64_t)out->shape.dims[out->shape.rank - 1];
    return vkg_swiglu(cmd, in[0]->ref, out->ref, (uint32_t)(h ? vkg_shape_numel(&out->shape) / h : 0), (uint32_t)h);
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


/* ---- layout ops on the strided copy kernel ---- */

/* Row-major strides of a shape, in elements. */
static void contiguous(const vkg_shape *s, uint32_t *st)
{
    uint64_t acc = 1;
    for (int i = (int)s->rank - 1; i >= 0; i--) {
        st[i] = (uint32_t)acc;
        acc *= (uint64_t)s->dims[i];
    }
}

static vkg_status copy_fits(const vkg_ir_node *n, const vkg_rt_tensor *t)
{
    if (vkg_shape_numel(&t->shape) > UINT32_MAX)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "node \"%s\": tensor of %llu elements exceeds 2^32", n->name,
                        (unsigned long long)vkg_shape_numel(&t->shape));
    return VKG_SUCCESS;
}

static const vkg_attr_spec patchify_attrs[] = {{"patch", VKG_ATTR_INT, true}, {NULL, 0, false}};

static vkg_status patchify_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x = in_t(g, n, 0);
    int64_t p = vkg_ir_attr_find(n, "patch")->i;
    if (p < 1 || p > 1024) return GRAPH_FAIL(g, n, "patch %lld outside 1..1024", (long long)p);
    if (x->rank != 4) return GRAPH_FAIL(g, n, "input \"%s\" must be (N, C, H, W), has rank %u", x->name, x->rank);
    for (uint32_t d = 2; d < 4; d++)
        if (!x->sym[d] && x->dims[d] % p)
            return GRAPH_FAIL(g, n, "input \"%s\" dim %u is %lld, not a multiple of the patch %lld", x->name, d,
                              (long long)x->dims[d], (long long)p);
    return VKG_SUCCESS;
}

static vkg_status patchify_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    int64_t p = vkg_ir_attr_find(n, "patch")->i;
    const vkg_shape *x = in[0];
    if (x->dims[2] % p || x->dims[3] % p)
        return GRAPH_FAIL(g, n, "image %lldx%lld is not a multiple of the patch %lld", (long long)x->dims[2],
                          (long long)x->dims[3], (long long)p);
    out->rank = 3;
    out->dims[0] = x->dims[0];
    out->dims[1] = (x->dims[2] / p) * (x->dims[3] / p);
    out->dims[2] = x->dims[1] * p * p;
    return VKG_SUCCESS;
}

static vkg_status patchify_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    VKG_TRY(copy_fits(n, in[0]));
    const vkg_shape *x = &in[0]->shape;
    uint32_t p = (uint32_t)vkg_ir_attr_find(n, "patch")->i;
    uint32_t N = (uint32_t)x->dims[0], C = (uint32_t)x->dims[1], H = (uint32_t)x->dims[2], W = (uint32_t)x->dims[3];
    /* out[n][py][px][c][ky][kx] = x[n][c][py*p + ky][px*p + kx] */
    vkg_copy_args a = {.src = in[0]->ref, .dst = out->ref, .src_elems = vkg_shape_numel(x),
                       .dst_elems = vkg_shape_numel(&out->shape), .rank = 6,
                       .shape = {N, H / p, W / p, C, p, p},
                       .src_stride = {C * H * W, p * W, p, H * W, W, 1}};
    vkg_shape os = {6, {N, H / p, W / p, C, p, p}};
    contiguous(&os, a.dst_stride);
    return vkg_copy(cmd, &a);
}

static const vkg_attr_spec insert_attrs[] = {{"index", VKG_ATTR_INT, true}, {NULL, 0, false}};

static vkg_status insert_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x = in_t(g, n, 0), *t = in_t(g, n, 1);
    int64_t idx = vkg_ir_attr_find(n, "index")->i;
    if (x->rank != 3 || t->rank != 3)
        return GRAPH_FAIL(g, n, "x and t must be (N, T, D) and (1 or N, R, D); ranks are %u and %u", x->rank, t->rank);
    if (last_dim(x) >= 0 && last_dim(t) >= 0 && last_dim(x) != last_dim(t))
        return GRAPH_FAIL(g, n, "token widths differ: %lld and %lld", (long long)last_dim(x), (long long)last_dim(t));
    if (idx < 0 || (!x->sym[1] && idx > x->dims[1]))
        return GRAPH_FAIL(g, n, "index %lld outside 0..%lld", (long long)idx, (long long)x->dims[1]);
    return VKG_SUCCESS;
}

static vkg_status insert_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    const vkg_shape *x = in[0], *t = in[1];
    int64_t idx = vkg_ir_attr_find(n, "index")->i;
    if (t->dims[0] != 1 && t->dims[0] != x->dims[0])
        return GRAPH_FAIL(g, n, "tokens have batch %lld; expected 1 or %lld", (long long)t->dims[0], (long long)x->dims[0]);
    if (t->dims[2] != x->dims[2] || idx > x->dims[1])
        return GRAPH_FAIL(g, n, "cannot insert (%lld, %lld, %lld) at %lld into (%lld, %lld, %lld)", (long long)t->dims[0],
                          (long long)t->dims[1], (long long)t->dims[2], (long long)idx, (long long)x->dims[0],
                          (long long)x->dims[1], (long long)x->dims[2]);
    *out = *x;
    out->dims[1] = x->dims[1] + t->dims[1];
    return VKG_SUCCESS;
}

static vkg_status insert_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    VKG_TRY(copy_fits(n, out));
    const vkg_shape *x = &in[0]->shape, *t = &in[1]->shape;
    uint32_t N = (uint32_t)x->dims[0], T = (uint32_t)x->dims[1], D = (uint32_t)x->dims[2], R = (uint32_t)t->dims[1];
    uint32_t idx = (uint32_t)vkg_ir_attr_find(n, "index")->i, OT = T + R;
    uint64_t on = vkg_shape_numel(&out->shape);
    /* Three boxes: x's head, the tokens (batch stride 0 when shared), x's tail. */
    vkg_copy_args head = {.src = in[0]->ref, .dst = out->ref, .src_elems = vkg_shape_numel(x), .dst_elems = on,
                          .rank = 3, .shape = {N, idx, D}, .src_stride = {T * D, D, 1}, .dst_stride = {OT * D, D, 1}};
    vkg_copy_args tail = head;
    tail.shape[1] = T - idx;
    tail.src_off = idx * D;
    tail.dst_off = (idx + R) * D;
    vkg_copy_args tok = {.src = in[1]->ref, .dst = out->ref, .src_elems = vkg_shape_numel(t), .dst_elems = on,
                         .dst_off = idx * D, .rank = 3, .shape = {N, R, D},
                         .src_stride = {t->dims[0] == 1 ? 0 : R * D, D, 1}, .dst_stride = {OT * D, D, 1}};
    VKG_TRY(vkg_copy(cmd, &head));
    VKG_TRY(vkg_copy(cmd, &tok));
    return vkg_copy(cmd, &tail);
}

static const vkg_attr_spec slice_attrs[] = {
    {"axis", VKG_ATTR_INT, true}, {"start", VKG_ATTR_INT, true}, {"end", VKG_ATTR_INT, true}, {NULL, 0, false}};

/* Resolves Python-style axis/start/end against a shape; -1 axis when out of range. */
static void slice_bounds(const vkg_ir_node *n, const vkg_shape *x, int64_t *axis, int64_t *start, int64_t *end)
{
    int64_t a = vkg_ir_attr_find(n, "axis")->i, s = vkg_ir_attr_find(n, "start")->i, e = vkg_ir_attr_find(n, "end")->i;
    if (a < 0) a += x->rank;
    *axis = a >= 0 && a < (int64_t)x->rank ? a : -1;
    if (*axis < 0) return;
    int64_t size = x->dims[a];
    *start = s < 0 ? s + size : s;
    *end = e < 0 ? e + size : e;
}

static vkg_status slice_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    const vkg_ir_tensor *x = in_t(g, n, 0);
    int64_t a = vkg_ir_attr_find(n, "axis")->i;
    if (a < -(int64_t)x->rank || a >= (int64_t)x->rank)
        return GRAPH_FAIL(g, n, "axis %lld outside the %u dims of \"%s\"", (long long)a, x->rank, x->name);
    return VKG_SUCCESS;
}

static vkg_status slice_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    int64_t axis, start = 0, end = 0;
    slice_bounds(n, in[0], &axis, &start, &end);
    if (axis < 0 || start < 0 || end < start || end > in[0]->dims[axis])
        return GRAPH_FAIL(g, n, "slice [%lld, %lld) of dim %lld (size %lld) is out of range",
                          (long long)vkg_ir_attr_find(n, "start")->i, (long long)vkg_ir_attr_find(n, "end")->i,
                          (long long)axis, axis >= 0 ? (long long)in[0]->dims[axis] : -1ll);
    *out = *in[0];
    out->dims[axis] = end - start;
    return VKG_SUCCESS;
}

static vkg_status slice_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    VKG_TRY(copy_fits(n, in[0]));
    int64_t axis, start = 0, end = 0;
    slice_bounds(n, &in[0]->shape, &axis, &start, &end);
    vkg_copy_args a = {.src = in[0]->ref, .dst = out->ref, .src_elems = vkg_shape_numel(&in[0]->shape),
                       .dst_elems = vkg_shape_numel(&out->shape), .rank = out->shape.rank};
    contiguous(&in[0]->shape, a.src_stride);
    contiguous(&out->shape, a.dst_stride);
    for (uint32_t d = 0; d < out->shape.rank; d++) a.shape[d] = (uint32_t)out->shape.dims[d];
    a.src_off = (uint32_t)start * a.src_stride[axis];
    return vkg_copy(cmd, &a);
}

/* ---- attention ---- */

static const vkg_attr_spec attention_attrs[] = {
    {"heads", VKG_ATTR_INT, true}, {"scale", VKG_ATTR_FLOAT, false}, {"packed", VKG_ATTR_INT, false},
    {"k_col", VKG_ATTR_INT, false}, {"v_col", VKG_ATTR_INT, false}, {NULL, 0, false}};

/* k_col / v_col: k and v are column windows of wider tensors (the memory K/V of several decoder
 * layers from one projection); -1 when the attribute is absent. */
static int64_t attention_col(const vkg_ir_node *n, const char *name)
{
    const vkg_ir_attr *a = vkg_ir_attr_find(n, name);
    return a ? a->i : -1;
}

static bool attention_packed(const vkg_ir_node *n)
{
    const vkg_ir_attr *a = vkg_ir_attr_find(n, "packed");
    return a && a->i != 0;
}

static vkg_status attention_validate(const vkg_graph *g, const vkg_ir_node *n)
{
    bool packed = attention_packed(n);
    uint32_t nqkv = packed ? 1 : 3;
    int64_t heads = vkg_ir_attr_find(n, "heads")->i;
    if (heads < 1 || heads > 4096) return GRAPH_FAIL(g, n, "heads %lld outside 1..4096", (long long)heads);
    if (n->n_inputs < nqkv || n->n_inputs > nqkv + 2)
        return GRAPH_FAIL(g, n, "%u inputs; expected %s then optional mask and key_padding", n->n_inputs,
                          packed ? "qkv" : "q, k, v");
    for (uint32_t i = 0; i < nqkv; i++) {
        const vkg_ir_tensor *t = in_t(g, n, i);
        if (!t) return GRAPH_FAIL(g, n, "input %u (%s) is required", i, packed ? "qkv" : i == 0 ? "q" : i == 1 ? "k" : "v");
        if (t->rank != 3) return GRAPH_FAIL(g, n, "\"%s\" must be (N, T, features), has rank %u", t->name, t->rank);
        int64_t f = last_dim(t);
        if (i > 0 && vkg_ir_attr_find(n, "k_col")) continue; /* windows of any width; infer checks them */
        if (f >= 0 && f % (heads * (packed ? 3 : 1)))
            return GRAPH_FAIL(g, n, "\"%s\" has %lld features, not a multiple of %s%lld heads", t->name, (long long)f,
                              packed ? "3 x " : "", (long long)heads);
    }
    int64_t kc = attention_col(n, "k_col"), vc = attention_col(n, "v_col");
    if ((kc >= 0 || vc >= 0) && packed) return GRAPH_FAIL(g, n, "k_col and v_col apply to separate q, k, v inputs, not packed");
    if ((kc >= 0) != (vc >= 0) || (vkg_ir_attr_find(n, "k_col") && kc < 0) || (vkg_ir_attr_find(n, "v_col") && vc < 0))
        return GRAPH_FAIL(g, n, "k_col and v_col come together, each >= 0");
    const vkg_ir_tensor *mask = in_t(g, n, nqkv), *kp = in_t(g, n, nqkv + 1);
    if (mask && mask->rank != 2 && mask->rank != 3)
        return GRAPH_FAIL(g, n, "mask \"%s\" must be (Tq, Tk) or (N, Tq, Tk)", mask->name);
    if (kp && kp->rank != 2) return GRAPH_FAIL(g, n, "key_padding \"%s\" must be (N, Tk)", kp->name);
    const vkg_ir_attr *sc = vkg_ir_attr_find(n, "scale");
    if (sc && !(sc->f > 0.0)) return GRAPH_FAIL(g, n, "scale %g must be > 0", sc->f);
    return VKG_SUCCESS;
}

static vkg_status attention_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out)
{
    bool packed = attention_packed(n);
    int64_t heads = vkg_ir_attr_find(n, "heads")->i;
    const vkg_shape *q = in[0], *k = packed ? in[0] : in[1], *v = packed ? in[0] : in[2];
    int64_t hd = packed ? q->dims[2] / 3 : q->dims[2];
    if ((packed && q->dims[2] % 3) || hd % heads || hd == 0)
        return GRAPH_FAIL(g, n, "%lld features do not split into %s%lld heads", (long long)q->dims[2], packed ? "3 x " : "",
                          (long long)heads);
    int64_t kc = attention_col(n, "k_col"), vc = attention_col(n, "v_col");
    if (!packed && kc >= 0 && (k->dims[2] != v->dims[2] || kc + hd > k->dims[2] || vc + hd > v->dims[2]))
        return GRAPH_FAIL(g, n, "k_col %lld and v_col %lld with %lld features: k (%lld, %lld, %lld) and v (%lld, %lld, "
                          "%lld) must have one width holding both windows", (long long)kc, (long long)vc, (long long)hd,
                          (long long)k->dims[0], (long long)k->dims[1], (long long)k->dims[2], (long long)v->dims[0],
                          (long long)v->dims[1], (long long)v->dims[2]);
    int64_t kw = kc >= 0 ? k->dims[2] : hd;
    if (!packed && (k->dims[0] != q->dims[0] || v->dims[0] != q->dims[0] || k->dims[1] != v->dims[1] ||
                    k->dims[2] != kw || v->dims[2] != kw))
        return GRAPH_FAIL(g, n, "q (%lld, %lld, %lld), k (%lld, %lld, %lld), v (%lld, %lld, %lld): expected k and v "
                          "(N, Tk, %lld) with q's N", (long long)q->dims[0], (long long)q->dims[1], (long long)q->dims[2],
                          (long long)k->dims[0], (long long)k->dims[1], (long long)k->dims[2], (long long)v->dims[0],
                          (long long)v->dims[1], (long long)v->dims[2], (long long)hd);
    uint32_t nqkv = packed ? 1 : 3;
    const vkg_shape *mask = in[nqkv], *kp = in[nqkv + 1];
    int64_t tq = q->dims[1], tk = k->dims[1];
    if (mask && (mask->dims[mask->rank - 2] != tq || mask->dims[mask->rank - 1] != tk ||
                 (mask->rank == 3 && mask->dims[0] != q->dims[0])))
        return GRAPH_FAIL(g, n, "mask must be (%lld, %lld) or (%lld, %lld, %lld)", (long long)tq, (long long)tk,
                          (long long)q->dims[0], (long long)tq, (long long)tk);
    if (kp && (kp->dims[0] != q->dims[0] || kp->dims[1] != tk))
        return GRAPH_FAIL(g, n, "key_padding must be (%lld, %lld)", (long long)q->dims[0], (long long)tk);
    out->rank = 3;
    out->dims[0] = q->dims[0];
    out->dims[1] = tq;
    out->dims[2] = hd;
    return VKG_SUCCESS;
}

/* The optional mask and key_padding inputs after q, k, v (or packed qkv), for both kernels. */
static void attention_extras(const vkg_rt_tensor *const *in, uint32_t nqkv, vkg_tref *mask, bool *mask_batched,
                             vkg_tref *key_padding)
{
    if (in[nqkv]) {
        *mask = in[nqkv]->ref;
        *mask_batched = in[nqkv]->shape.rank == 3;
    }
    if (in[nqkv + 1]) *key_padding = in[nqkv + 1]->ref;
}

static vkg_status attention_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out)
{
    bool packed = attention_packed(n);
    uint32_t heads = (uint32_t)vkg_ir_attr_find(n, "heads")->i, nqkv = packed ? 1 : 3;
    const vkg_ir_attr *sc = vkg_ir_attr_find(n, "scale");
    uint32_t hd = (uint32_t)out->shape.dims[2];
    vkg_attention_args a = {.q = in[0]->ref, .k = in[packed ? 0 : 1]->ref, .v = in[packed ? 0 : 2]->ref,
                            .out = out->ref, .batch = (uint32_t)out->shape.dims[0], .heads = heads,
                            .tq = (uint32_t)out->shape.dims[1], .tk = (uint32_t)in[packed ? 0 : 1]->shape.dims[1],
                            .head_dim = hd / heads, .scale = sc ? (float)sc->f : 0.0f};
    if (packed) {
        a.q_stride = a.kv_stride = 3 * hd;
        a.k_col = hd;
        a.v_col = 2 * hd;
    } else if (attention_col(n, "k_col") >= 0) {
        a.kv_stride = (uint32_t)in[1]->shape.dims[2];
        a.k_col = (uint32_t)attention_col(n, "k_col");
        a.v_col = (uint32_t)attention_col(n, "v_col");
    }
    attention_extras(in, nqkv, &a.mask, &a.mask_batched, &a.key_padding);
    return vkg_attention(cmd, &a);
}

/* A linear (x, weight, optional bias only) whose output is this attention's q (or packed qkv): the
 * session records them as one dispatch (vkg_attention_proj) where the sizes fit one workgroup per
 * head. in[] are the attention's input shapes, lin_in[] the linear's. */
bool vkg_attention_proj_fusable(const vkg_context *ctx, const vkg_graph *g, const vkg_ir_node *lin,
                                const vkg_ir_node *att, const vkg_shape *const *lin_in, const vkg_shape *const *in)
{
    if (strcmp(lin->op, "linear") != 0 || strcmp(att->op, "attention") != 0 || att->inputs[0] != lin->outputs[0])
        return false;
    for (uint32_t i = 3; i < lin->n_inputs; i++)
        if (lin->inputs[i] != VKG_IR_NONE) return false; /* scale, residual, LoRA: the matmul's epilogue */
    const vkg_ir_attr *act = vkg_ir_attr_find(lin, "activation");
    if (act && act->i != 0) return false;
    const vkg_ir_tensor *w = &g->tensors[lin->inputs[1]];
    if (w->dtype != VKG_DTYPE_F32 && w->dtype != VKG_DTYPE_F16) return false;
    bool packed = attention_packed(att);
    /* Cross-attention: k and v are windows of one memory K/V tensor (the kernel reads one). */
    if (!packed && (attention_col(att, "k_col") < 0 || att->inputs[1] != att->inputs[2])) return false;
    const vkg_shape *x = lin_in[0], *q = in[0];
    if (x->rank != 3 || q->rank != 3) return false;
    int64_t heads = vkg_ir_attr_find(att, "heads")->i, hd = packed ? q->dims[2] / 3 : q->dims[2];
    int64_t tk = packed ? q->dims[1] : in[1]->dims[1];
    if (q->dims[0] > 65535 || q->dims[1] > UINT32_MAX || tk > UINT32_MAX || x->dims[2] > UINT32_MAX) return false;
    return vkg_attention_proj_fits(ctx, (uint32_t)q->dims[1], (uint32_t)tk, (uint32_t)(hd / heads), (uint32_t)x->dims[2]);
}

vkg_status vkg_attention_proj_record(vkg_cmd *cmd, const vkg_ir_node *att, const vkg_rt_tensor *const *in,
                                     const vkg_rt_tensor *const *lin_in, const vkg_rt_tensor *out)
{
    bool packed = attention_packed(att);
    uint32_t heads = (uint32_t)vkg_ir_attr_find(att, "heads")->i, nqkv = packed ? 1 : 3;
    const vkg_ir_attr *sc = vkg_ir_attr_find(att, "scale");
    uint32_t hd = (uint32_t)out->shape.dims[2];
    vkg_attention_proj_args a = {.x = lin_in[0]->ref, .w = lin_in[1]->ref, .w_dtype = lin_in[1]->dtype,
                                 .packed = packed, .in_features = (uint32_t)lin_in[1]->shape.dims[1],
                                 .out = out->ref, .batch = (uint32_t)out->shape.dims[0], .heads = heads,
                                 .tq = (uint32_t)out->shape.dims[1], .tk = (uint32_t)in[packed ? 0 : 1]->shape.dims[1],
                                 .head_dim = hd / heads, .scale = sc ? (float)sc->f : 0.0f};
    if (lin_in[2]) a.bias = lin_in[2]->ref;
    if (!packed) {
        a.kv = in[1]->ref;
        a.kv_stride = (uint32_t)in[1]->shape.dims[2];
        a.k_col = (uint32_t)attention_col(att, "k_col");
        a.v_col = (uint32_t)attention_col(att, "v_col");
    }
    attention_extras(in, nqkv, &a.mask, &a.mask_batched, &a.key_padding);
    return vkg_attention_proj(cmd, &a);
}

static double attention_flops(const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out)
{
    bool packed = attention_packed(n);
    double tk = (double)(packed ? in[0] : in[1])->dims[1];
    /* q k^T and p v: 2 x (N Tq Tk H d) multiply-adds */
    return 4.0 * (double)out->dims[0] * (double)out->dims[1] * tk * (double)out->dims[2];
}

/* ---- the table ---- */

static const vkg_op_def ops[] = {
    {.name = "linear", .min_inputs = 2, .max_inputs = 7, .min_outputs = 1, .max_outputs = 1, .attrs = linear_attrs,
     .validate = linear_validate, .infer = linear_infer, .record_call = linear_record, .scratch = linear_scratch,
     .flops = linear_flops, .f16_inputs = (1u << 1) | (1u << 5) | (1u << 6)},
    {.name = "layernorm", .min_inputs = 1, .max_inputs = 3, .min_outputs = 1, .max_outputs = 1, .attrs = layernorm_attrs,
     .validate = layernorm_validate, .infer = layernorm_infer, .record = layernorm_record, .flops = NULL},
    {.name = "gelu", .min_inputs = 1, .max_inputs = 1, .min_outputs = 1, .max_outputs = 1, .attrs = gelu_attrs,
     .validate = gelu_validate, .infer = same_infer, .record = gelu_record, .flops = NULL},
    {.name = "relu", .min_inputs = 1, .max_inputs = 1, .min_outputs = 1, .max_outputs = 1, .attrs = no_attrs,
     .validate = NULL, .infer = same_infer, .record = relu_record, .flops = NULL},
    {.name = "tanh", .min_inputs = 1, .max_inputs = 1, .min_outputs = 1, .max_outputs = 1, .attrs = no_attrs,
     .validate = NULL, .infer = same_infer, .record = relu_record, .flops = NULL},
    {.name = "sigmoid", .min_inputs = 1, .max_inputs = 1, .min_outputs = 1, .max_outputs = 1, .attrs = no_attrs,
     .validate = NULL, .infer = same_infer, .record = relu_record, .flops = NULL},
    {.name = "add", .min_inputs = 2, .max_inputs = 2, .min_outputs = 1, .max_outputs = 1, .attrs = no_attrs,
     .validate = binary_validate, .infer = binary_infer, .record = binary_record, .flops = NULL},
    {.name = "mul", .min_inputs = 2, .max_inputs = 2, .min_outputs = 1, .max_outputs = 1, .attrs = no_attrs,
     .validate = binary_validate, .infer = binary_infer, .record = binary_record, .flops = NULL},
    {.name = "add_n", .min_inputs = 2, .max_inputs = VKG_ADD_N_MAX, .min_outputs = 1, .max_outputs = 1,
     .attrs = add_n_attrs, .validate = add_n_validate, .infer = add_n_infer, .record = add_n_record, .flops = NULL},
    {.name = "swiglu", .min_inputs = 1, .max_inputs = 1, .min_outputs = 1, .max_outputs = 1, .attrs = no_attrs,
     .validate = swiglu_validate, .infer = swiglu_infer, .record = swiglu_record, .flops = NULL},
    {.name = "softmax", .min_inputs = 1, .max_inputs = 1, .min_outputs = 1, .max_outputs = 1, .attrs = softmax_attrs,
     .validate = softmax_validate, .infer = same_infer, .record = softmax_record, .flops = NULL},
    {.name = "reshape", .min_inputs = 1, .max_inputs = 1, .min_outputs = 1, .max_outputs = 1, .attrs = reshape_attrs,
     .validate = reshape_validate, .infer = reshape_infer, .record = NULL, .flops = NULL},
    {.name = "patchify", .min_inputs = 1, .max_inputs = 1, .min_outputs = 1, .max_outputs = 1, .attrs = patchify_attrs,
     .validate = patchify_validate, .infer = patchify_infer, .record = patchify_record, .flops = NULL},
    {.name = "insert_tokens", .min_inputs = 2, .max_inputs = 2, .min_outputs = 1, .max_outputs = 1, .attrs = insert_attrs,
     .validate = insert_validate, .infer = insert_infer, .record = insert_record, .flops = NULL},
    {.name = "slice", .min_inputs = 1, .max_inputs = 1, .min_outputs = 1, .max_outputs = 1, .attrs = slice_attrs,
     .validate = slice_validate, .infer = slice_infer, .record = slice_record, .flops = NULL},
    {.name = "attention", .min_inputs = 1, .max_inputs = 5, .min_outputs = 1, .max_outputs = 1, .attrs = attention_attrs,
     .validate = attention_validate, .infer = attention_infer, .record = attention_record, .flops = attention_flops},
    VKG_MOE_OPS
    VKG_DENSE_OPS
    VKG_CONV_OPS
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
    if (n->n_outputs < op->min_outputs || n->n_outputs > op->max_outputs) {
        if (op->min_outputs == op->max_outputs)
            return GRAPH_FAIL(g, n, "%u outputs, expected %u", n->n_outputs, op->min_outputs);
        return GRAPH_FAIL(g, n, "%u outputs, expected %u to %u (optional outputs are a prefix of the op's list)",
                          n->n_outputs, op->min_outputs, op->max_outputs);
    }
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
    /* Generic dtype rules: activations are f32; weights named in f16_inputs may be f16; routing ids are i32. */
    for (uint32_t i = 0; i < n->n_inputs; i++) {
        const vkg_ir_tensor *t = in_t(g, n, i);
        if (!t) continue;
        bool f16_ok = i < 32 && (op->f16_inputs >> i) & 1u, i32 = i < 32 && (op->i32_inputs >> i) & 1u;
        vkg_dtype want = i32 ? VKG_DTYPE_I32 : VKG_DTYPE_F32;
        if (t->dtype != want && !(f16_ok && t->dtype == VKG_DTYPE_F16))
            return GRAPH_FAIL(g, n, "input %u \"%s\" has dtype %s, expected %s%s", i, t->name, vkg_dtype_name(t->dtype),
                              vkg_dtype_name(want), f16_ok ? " or f16" : "");
    }
    for (uint32_t i = 0; i < n->n_outputs; i++) {
        const vkg_ir_tensor *t = &g->tensors[n->outputs[i]];
        vkg_dtype want = i < 32 && (op->i32_outputs >> i) & 1u ? VKG_DTYPE_I32 : VKG_DTYPE_F32;
        if (t->dtype != want)
            return GRAPH_FAIL(g, n, "output \"%s\" has dtype %s, expected %s", t->name, vkg_dtype_name(t->dtype),
                              vkg_dtype_name(want));
    }
    return op->validate ? op->validate(g, n) : VKG_SUCCESS;
}
