/* vkg_session: a model at concrete shapes. Creation infers every shape, plans activation memory by
 * lifetime, and records the whole graph into one command buffer; a run is one submit. */
#include <stdlib.h>
#include <string.h>

#include "graph/exec.h"

static vkg_status sess_fail(const vkg_session *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static vkg_status sess_fail(const vkg_session *s, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: %s", s->model->g->source, msg);
}

/* Binds the inputs' symbolic dims and infers every other shape in topological order, checking each
 * against the dims the file declares. */
static vkg_status infer_shapes(vkg_session *s, const vkg_session_desc *d)
{
    const vkg_graph *g = s->model->g;
    for (uint32_t i = 0; i < d->n_dims; i++) {
        bool used = false;
        if (!d->dims[i].name) return sess_fail(s, "dim binding %u has no name", i);
        for (uint32_t k = 0; k < g->n_inputs && !used; k++) {
            const vkg_ir_tensor *t = &g->tensors[g->inputs[k]];
            for (uint32_t r = 0; r < t->rank; r++)
                if (t->sym[r] && strcmp(t->sym[r], d->dims[i].name) == 0) used = true;
        }
        if (!used) return sess_fail(s, "no input has a symbolic dim \"%s\"", d->dims[i].name);
        if (d->dims[i].value < 0 || d->dims[i].value > (1ll << 31))
            return sess_fail(s, "dim \"%s\" = %lld is out of range", d->dims[i].name, (long long)d->dims[i].value);
    }
    for (uint32_t t = 0; t < g->n_tensors; t++) {
        const vkg_ir_tensor *ti = &g->tensors[t];
        vkg_rt_tensor *rt = &s->rt[t];
        rt->dtype = ti->dtype;
        if (ti->role != VKG_ROLE_INPUT && ti->role != VKG_ROLE_CONSTANT) continue;
        rt->shape.rank = ti->rank;
        for (uint32_t r = 0; r < ti->rank; r++) {
            if (!ti->sym[r]) {
                rt->shape.dims[r] = ti->dims[r];
                continue;
            }
            const vkg_dim_binding *b = NULL;
            for (uint32_t i = 0; i < d->n_dims; i++)
                if (strcmp(d->dims[i].name, ti->sym[r]) == 0) b = &d->dims[i];
            if (!b) return sess_fail(s, "input \"%s\" dim %u is the symbol \"%s\": bind it in vkg_session_desc.dims",
                                     ti->name, r, ti->sym[r]);
            rt->shape.dims[r] = b->value;
        }
    }
    for (uint32_t n = 0; n < g->n_nodes; n++) {
        const vkg_ir_node *node = &g->nodes[n];
        const vkg_op_def *op = vkg_op_find(node->op);
        const vkg_shape *in[64];
        for (uint32_t i = 0; i < node->n_inputs; i++)
            in[i] = node->inputs[i] == VKG_IR_NONE ? NULL : &s->rt[node->inputs[i]].shape;
        for (uint32_t i = node->n_inputs; i < op->max_inputs; i++) in[i] = NULL;
        vkg_shape out[64];
        vkg_status st = op->infer(g, node, in, out);
        if (st != VKG_SUCCESS) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s", vkg_last_error());
        for (uint32_t o = 0; o < node->n_outputs; o++) {
            const vkg_ir_tensor *ot = &g->tensors[node->outputs[o]];
            if (ot->rank != out[o].rank)
                return sess_fail(s, "node \"%s\": output \"%s\" is declared with rank %u, inferred rank %u", node->name,
                                 ot->name, ot->rank, out[o].rank);
            for (uint32_t r = 0; r < out[o].rank; r++) {
                int64_t want = -1;
                if (!ot->sym[r]) want = ot->dims[r];
                else if (ot->sym[r][0])
                    for (uint32_t i = 0; i < d->n_dims; i++)
                        if (strcmp(d->dims[i].name, ot->sym[r]) == 0) want = d->dims[i].value;
                if (want >= 0 && want != out[o].dims[r])
                    return sess_fail(s, "node \"%s\": output \"%s\" dim %u is declared %lld, inferred %lld", node->name,
                                     ot->name, r, (long long)want, (long long)out[o].dims[r]);
            }
            s->rt[node->outputs[o]].shape = out[o];
        }
        if (op->scratch) s->scratch_bytes[n] = op->scratch(s->model->ctx, node, in, out);
        if (op->flops) s->flops += op->flops(node, in, &out[0]);
    }
    return VKG_SUCCESS;
}

typedef struct live {
    uint32_t tensor;
    uint64_t bytes, offset;
    uint32_t first, last; /* node steps, inclusive */
} live;

static int by_size_desc(const void *a, const void *b)
{
    const live *x = a, *y = b;
    if (x->bytes != y->bytes) return x->bytes > y->bytes ? -1 : 1;
    return x->tensor < y->tensor ? -1 : 1; /* stable: plans are deterministic */
}

/* Gives every tensor memory: constants in the model's weights buffer, inputs and outputs (and
 * whatever a view makes them share) in dedicated buffers, intermediates at offsets of one arena,
 * two tensors sharing bytes only when their lifetimes [producer, last reader] do not overlap. */
static vkg_status plan_memory(vkg_session *s)
{
    const vkg_graph *g = s->model->g;
    vkg_context *ctx = s->model->ctx;
    uint32_t nt = g->n_tensors;
    for (uint32_t t = 0; t < nt; t++) s->root[t] = t;
    for (uint32_t n = 0; n < g->n_nodes; n++) {
        const vkg_op_def *op = vkg_op_find(g->nodes[n].op);
        if (!op->record && !op->record_call) s->root[g->nodes[n].outputs[0]] = s->root[g->nodes[n].inputs[0]];
    }

    uint32_t *first = malloc(nt * sizeof *first), *last = malloc(nt * sizeof *last);
    bool *pinned = calloc(nt, sizeof *pinned);
    live *lv = malloc((nt + g->n_nodes) * sizeof *lv);
    vkg_status st = VKG_SUCCESS;
    if (!first || !last || !pinned || !lv) {
        st = vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        goto done;
    }
    for (uint32_t t = 0; t < nt; t++) {
        first[t] = UINT32_MAX;
        last[t] = 0;
    }
    for (uint32_t n = 0; n < g->n_nodes; n++) {
        const vkg_ir_node *node = &g->nodes[n];
        for (uint32_t k = 0; k < node->n_outputs; k++) {
            uint32_t o = s->root[node->outputs[k]];
            if (first[o] == UINT32_MAX) first[o] = n;
            last[o] = VKG_MAX(last[o], n);
        }
        for (uint32_t i = 0; i < node->n_inputs; i++)
            if (node->inputs[i] != VKG_IR_NONE) last[s->root[node->inputs[i]]] = VKG_MAX(last[s->root[node->inputs[i]]], n);
    }
    for (uint32_t t = 0; t < nt; t++) {
        vkg_tensor_role r = g->tensors[t].role;
        if (r == VKG_ROLE_INPUT || r == VKG_ROLE_OUTPUT) pinned[s->root[t]] = true;
    }

    uint32_t nl = 0;
    for (uint32_t t = 0; t < nt; t++) {
        const vkg_ir_tensor *ti = &g->tensors[t];
        uint64_t bytes = vkg_shape_numel(&s->rt[t].shape) * vkg_dtype_size(ti->dtype);
        if (s->root[t] != t || ti->role == VKG_ROLE_CONSTANT) continue;
        if (pinned[t]) {
            st = vkg_buf_create(ctx, bytes, &s->own[t]);
            if (st != VKG_SUCCESS) {
                vkg_fail_prefix(st, "%s: tensor \"%s\"", g->source, ti->name);
                goto done;
            }
            continue;
        }
        s->unshared += bytes;
        lv[nl++] = (live){t, bytes, 0, first[t] == UINT32_MAX ? 0 : first[t], last[t]};
    }
    /* A node's scratch lives for that node only; it takes a pseudo tensor id past the real ones. */
    for (uint32_t n = 0; n < g->n_nodes; n++)
        if (s->scratch_bytes[n]) {
            lv[nl++] = (live){nt + n, s->scratch_bytes[n], 0, n, n};
            s->unshared += s->scratch_bytes[n];
        }
    /* Greedy by decreasing size: each tensor takes the lowest aligned offset that overlaps no
     * already placed tensor alive at the same time. */
    qsort(lv, nl, sizeof *lv, by_size_desc);
    uint64_t align = ctx->alignment;
    for (uint32_t i = 0; i < nl; i++) {
        uint64_t off = 0;
        bool moved = true;
        while (moved) {
            moved = false;
            for (uint32_t j = 0; j < i; j++) {
                if (lv[j].last < lv[i].first || lv[i].last < lv[j].first) continue;
                if (off < lv[j].offset + lv[j].bytes && lv[j].offset < off + VKG_MAX(lv[i].bytes, 1)) {
                    off = (lv[j].offset + lv[j].bytes + align - 1) / align * align;
                    moved = true;
                }
            }
        }
        lv[i].offset = off;
        s->planned = VKG_MAX(s->planned, off + lv[i].bytes);
    }
    if (nl) {
        st = vkg_buf_create(ctx, s->planned, &s->arena);
        if (st != VKG_SUCCESS) {
            vkg_fail_prefix(st, "%s: activation arena", g->source);
            goto done;
        }
    }
    for (uint32_t i = 0; i < nl; i++) {
        if (lv[i].tensor >= nt) s->scratch[lv[i].tensor - nt] = (vkg_tref){s->arena, lv[i].offset};
        else s->rt[lv[i].tensor].ref = (vkg_tref){s->arena, lv[i].offset};
    }
    for (uint32_t t = 0; t < nt; t++) {
        const vkg_ir_tensor *ti = &g->tensors[t];
        if (ti->role == VKG_ROLE_CONSTANT)
            s->rt[t].ref = (vkg_tref){s->model->weights, (VkDeviceSize)((const uint8_t *)ti->data - s->model->weights_base)};
        else if (s->own[t]) s->rt[t].ref = (vkg_tref){s->own[t], 0};
    }
    for (uint32_t t = 0; t < nt; t++) /* views take their root's memory */
        if (s->root[t] != t) s->rt[t].ref = s->rt[s->root[t]].ref;
done:
    free(first);
    free(last);
    free(pinned);
    free(lv);
    return st;
}

static vkg_status record(vkg_session *s)
{
    const vkg_graph *g = s->model->g;
    VKG_TRY(vkg_cmd_begin(s->model->ctx, s->profile, &s->cmd));
    uint32_t cap = 2 * g->n_nodes + 8;
    s->dispatch_node = malloc(cap * sizeof *s->dispatch_node);
    if (!s->dispatch_node) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    for (uint32_t n = 0; n < g->n_nodes; n++) {
        const vkg_ir_node *node = &g->nodes[n];
        const vkg_op_def *op = vkg_op_find(node->op);
        if (!op->record && !op->record_call) continue;
        const vkg_rt_tensor *in[64], *outs[64];
        for (uint32_t i = 0; i < op->max_inputs; i++)
            in[i] = i < node->n_inputs && node->inputs[i] != VKG_IR_NONE ? &s->rt[node->inputs[i]] : NULL;
        for (uint32_t i = 0; i < node->n_outputs; i++) outs[i] = &s->rt[node->outputs[i]];
        uint32_t before = vkg_cmd_dispatch_count(s->cmd);
        vkg_status st;
        if (op->record_call) {
            vkg_op_call call = {s->cmd, node, in, outs, s->scratch[n], s->scratch_bytes[n]};
            st = op->record_call(&call);
        } else {
            st = op->record(s->cmd, node, in, outs[0]);
        }
        if (st != VKG_SUCCESS) return vkg_fail_prefix(st, "%s: node \"%s\" (op %s)", g->source, node->name, node->op);
        for (uint32_t d = before; d < vkg_cmd_dispatch_count(s->cmd); d++) {
            if (s->n_dispatch == cap) {
                cap *= 2;
                uint32_t *nd = realloc(s->dispatch_node, cap * sizeof *nd);
                if (!nd) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
                s->dispatch_node = nd;
            }
            s->dispatch_node[s->n_dispatch++] = n;
        }
    }
    return vkg_cmd_end(s->cmd);
}

vkg_status vkg_session_create(vkg_model *model, const vkg_session_desc *desc, vkg_session **out)
{
    if (!model || !out) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_create: NULL argument");
    *out = NULL;
    vkg_session_desc d = {0};
    if (desc) d = *desc;
    vkg_session *s = calloc(1, sizeof *s);
    if (!s) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    s->model = model;
    s->profile = d.profile != 0;
    uint32_t nt = model->g->n_tensors;
    s->rt = calloc(nt ? nt : 1, sizeof *s->rt);
    s->root = calloc(nt ? nt : 1, sizeof *s->root);
    s->own = calloc(nt ? nt : 1, sizeof *s->own);
    s->scratch = calloc(model->g->n_nodes + 1, sizeof *s->scratch);
    s->scratch_bytes = calloc(model->g->n_nodes + 1, sizeof *s->scratch_bytes);
    vkg_status st = s->rt && s->root && s->own && s->scratch && s->scratch_bytes ? VKG_SUCCESS : vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    if (st == VKG_SUCCESS) st = infer_shapes(s, &d);
    if (st == VKG_SUCCESS) st = plan_memory(s);
    if (st == VKG_SUCCESS) st = record(s);
    if (st == VKG_SUCCESS) st = vkg_context_check_validation(model->ctx);
    if (st != VKG_SUCCESS) {
        vkg_session_destroy(s);
        return st;
    }
    *out = s;
    return VKG_SUCCESS;
}

void vkg_session_destroy(vkg_session *s)
{
    if (!s) return;
    vkg_cmd_destroy(s->cmd);
    if (s->own)
        for (uint32_t t = 0; t < s->model->g->n_tensors; t++) vkg_buf_destroy(s->own[t]);
    vkg_buf_destroy(s->arena);
    free(s->own);
    free(s->scratch);
    free(s->scratch_bytes);
    free(s->rt);
    free(s->root);
    free(s->dispatch_node);
    free(s);
}

/* The graph input or output called name, with role `role`; sets a message otherwise. */
static vkg_status find_io(const vkg_session *s, const char *name, vkg_tensor_role role, uint32_t *t)
{
    const vkg_graph *g = s->model->g;
    const uint32_t *ids = role == VKG_ROLE_INPUT ? g->inputs : g->outputs;
    uint32_t n = role == VKG_ROLE_INPUT ? g->n_inputs : g->n_outputs;
    for (uint32_t i = 0; name && i < n; i++)
        if (strcmp(g->tensors[ids[i]].name, name) == 0) {
            *t = ids[i];
            return VKG_SUCCESS;
        }
    char names[512] = "";
    size_t len = 0;
    for (uint32_t i = 0; i < n && len < sizeof names; i++)
        len += (size_t)snprintf(names + len, sizeof names - len, "%s\"%s\"", i ? ", " : "", g->tensors[ids[i]].name);
    return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: no graph %s named \"%s\"; the %ss are %s", g->source,
                    role == VKG_ROLE_INPUT ? "input" : "output", name ? name : "(null)",
                    role == VKG_ROLE_INPUT ? "input" : "output", names);
}

vkg_status vkg_session_tensor(const vkg_session *s, const char *name, vkg_tensor_info *out)
{
    if (!s || !name || !out) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_tensor: NULL argument");
    uint32_t t = vkg_ir_tensor_find(s->model->g, name);
    if (t == VKG_IR_NONE) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: no tensor named \"%s\"", s->model->g->source, name);
    vkg_ir_tensor_info(&s->model->g->tensors[t], out);
    for (uint32_t r = 0; r < out->rank; r++) out->dims[r] = s->rt[t].shape.dims[r];
    return VKG_SUCCESS;
}

static vkg_status io_bytes(const vkg_session *s, uint32_t t, size_t bytes, const char *what)
{
    const vkg_ir_tensor *ti = &s->model->g->tensors[t];
    uint64_t want = vkg_shape_numel(&s->rt[t].shape) * vkg_dtype_size(ti->dtype);
    if (bytes != want)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: %s \"%s\" holds %llu bytes (%s, %llu elements); got %zu",
                        s->model->g->source, what, ti->name, (unsigned long long)want, vkg_dtype_name(ti->dtype),
                        (unsigned long long)vkg_shape_numel(&s->rt[t].shape), bytes);
    return VKG_SUCCESS;
}

vkg_status vkg_session_set_input(vkg_session *s, const char *name, const void *data, size_t bytes)
{
    uint32_t t;
    if (!s || (!data && bytes)) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_set_input: NULL argument");
    VKG_TRY(find_io(s, name, VKG_ROLE_INPUT, &t));
    VKG_TRY(io_bytes(s, t, bytes, "input"));
    const vkg_rt_tensor *rt = &s->rt[t];
    return vkg_buf_upload((vkg_buf *)rt->ref.buf, rt->ref.offset, data, bytes);
}

vkg_status vkg_session_run(vkg_session *s)
{
    if (!s) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_run: NULL session");
    VKG_TRY(vkg_cmd_submit_wait(s->cmd));
    s->ran = true;
    return VKG_SUCCESS;
}

vkg_status vkg_session_get_output(vkg_session *s, const char *name, void *data, size_t bytes)
{
    uint32_t t;
    if (!s || (!data && bytes)) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_get_output: NULL argument");
    VKG_TRY(find_io(s, name, VKG_ROLE_OUTPUT, &t));
    VKG_TRY(io_bytes(s, t, bytes, "output"));
    const vkg_rt_tensor *rt = &s->rt[t];
    return vkg_buf_download((vkg_buf *)rt->ref.buf, rt->ref.offset, data, bytes);
}

uint64_t vkg_session_planned_bytes(const vkg_session *s) { return s ? s->planned : 0; }
uint64_t vkg_session_unshared_bytes(const vkg_session *s) { return s ? s->unshared : 0; }
uint32_t vkg_session_dispatch_count(const vkg_session *s) { return s ? s->n_dispatch : 0; }
uint32_t vkg_session_barrier_count(const vkg_session *s) { return s && s->cmd ? vkg_cmd_barrier_count(s->cmd) : 0; }
double vkg_session_flops(const vkg_session *s) { return s ? s->flops : 0; }

vkg_status vkg_session_profile(const vkg_session *s, uint32_t i, const char **node, const char **op, double *ns)
{
    if (!s || i >= s->n_dispatch)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_profile: dispatch %u of %u", i, s ? s->n_dispatch : 0);
    if (!s->profile || !s->ran)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_profile: create the session with profile = 1 and run it");
    const vkg_ir_node *n = &s->model->g->nodes[s->dispatch_node[i]];
    if (node) *node = n->name;
    if (op) *op = n->op;
    double t = 0;
    VKG_TRY(vkg_cmd_dispatch_time_ns(s->cmd, i, &t, NULL));
    if (ns) *ns = t;
    return VKG_SUCCESS;
}
