/* vkg_session: a model at concrete shapes. Creation infers every shape, plans activation memory by
 * lifetime, and records the whole graph into one command buffer; a run is one submit. */
#include <stdlib.h>
#include <string.h>

#include "graph/exec.h"
#include "runtime/kernels/moe.h"

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
        if (st != VKG_SUCCESS) {
            /* Re-raise as a bad-argument status (these shapes come from the caller's dims); the
             * message is copied out first because vkg_fail writes the buffer it would read. */
            char msg[1024];
            snprintf(msg, sizeof msg, "%s", vkg_last_error());
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s", msg);
        }
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

/* The node reading tensor t, when exactly one input slot of the whole graph reads it; else
 * UINT32_MAX. The session fusions below need their producer's output to have no other reader. */
static uint32_t sole_reader(const vkg_graph *g, uint32_t t)
{
    uint32_t reader = UINT32_MAX, uses = 0;
    for (uint32_t n = 0; n < g->n_nodes; n++)
        for (uint32_t i = 0; i < g->nodes[n].n_inputs; i++)
            if (g->nodes[n].inputs[i] == t) {
                reader = n;
                uses++;
            }
    return uses == 1 ? reader : UINT32_MAX;
}

/* Where a moe_router with statistics has its ids read by one moe_experts node only and both the
 * routing and the dispatch plan fit one workgroup, the router records the plan too
 * (vkg_moe_route_plan): a dispatch and a barrier fewer per MoE layer. The experts node's scratch,
 * which holds the plan, then lives from the router on. VKG_MOE_FUSED_ROUTE_PLAN=0 keeps them apart
 * (for comparisons). */
static void fuse_route_plan(vkg_session *s)
{
    const vkg_graph *g = s->model->g;
    for (uint32_t n = 0; n < g->n_nodes; n++) s->plan_to[n] = s->plan_from[n] = UINT32_MAX;
    const char *env = getenv("VKG_MOE_FUSED_ROUTE_PLAN");
    if (env && strcmp(env, "0") == 0) return;
    for (uint32_t r = 0; r < g->n_nodes; r++) {
        /* Only a router with statistics selects in one workgroup (moe_route1); without, selection
         * spreads over T / 64 workgroups, which a one-workgroup fusion would give up. */
        if (strcmp(g->nodes[r].op, "moe_router") != 0 || g->nodes[r].n_outputs <= 2) continue;
        uint32_t ids = g->nodes[r].outputs[0], reader = sole_reader(g, ids);
        /* One use, as the experts' ids (input 1), after the router (a valid graph is in order). */
        if (reader == UINT32_MAX || reader <= r || strcmp(g->nodes[reader].op, "moe_experts") != 0 ||
            g->nodes[reader].inputs[1] != ids || !s->scratch_bytes[reader])
            continue;
        const vkg_shape *is = &s->rt[ids].shape, *w1 = &s->rt[g->nodes[reader].inputs[3]].shape;
        int64_t k = is->dims[is->rank - 1];
        uint64_t T = k ? vkg_shape_numel(is) / (uint64_t)k : 0;
        if (T > UINT32_MAX || w1->dims[2] == 0 || !vkg_moe_route_plan_fits(s->model->ctx, (uint32_t)T, (uint32_t)k,
                                                                           (uint32_t)w1->dims[0]))
            continue;
        s->plan_to[r] = reader;
        s->plan_from[reader] = r;
    }
}

/* Where a linear (x, weight, optional bias) feeds only an attention's q (or packed qkv) and the
 * head's q, k, v fit one workgroup's shared memory, the attention records the projection too
 * (vkg_attention_proj): the projection's dispatch and its barrier go and q is never written (its
 * arena space is still planned).
 * The linear's input then lives until the attention. Opt-in (VKG_ATTENTION_FUSED_PROJ=1): on
 * lavapipe the one-workgroup-per-head kernel is slower than the texel matmul it replaces
 * (bench/RESULTS.md, Transfuser section). */
static void fuse_attention_proj(vkg_session *s)
{
    const vkg_graph *g = s->model->g;
    for (uint32_t n = 0; n < g->n_nodes; n++) s->proj_to[n] = s->proj_from[n] = UINT32_MAX;
    const char *env = getenv("VKG_ATTENTION_FUSED_PROJ");
    if (!env || strcmp(env, "1") != 0) return;
    for (uint32_t l = 0; l < g->n_nodes; l++) {
        const vkg_ir_node *lin = &g->nodes[l];
        if (strcmp(lin->op, "linear") != 0) continue;
        uint32_t y = lin->outputs[0];
        if (g->tensors[y].role == VKG_ROLE_OUTPUT) continue;
        uint32_t reader = sole_reader(g, y);
        if (reader == UINT32_MAX || reader <= l || s->proj_from[reader] != UINT32_MAX) continue;
        const vkg_ir_node *att = &g->nodes[reader];
        const vkg_shape *lin_in[8] = {0}, *in[8] = {0};
        for (uint32_t i = 0; i < lin->n_inputs && i < 8; i++)
            lin_in[i] = lin->inputs[i] == VKG_IR_NONE ? NULL : &s->rt[lin->inputs[i]].shape;
        for (uint32_t i = 0; i < att->n_inputs && i < 8; i++)
            in[i] = att->inputs[i] == VKG_IR_NONE ? NULL : &s->rt[att->inputs[i]].shape;
        if (!vkg_attention_proj_fusable(s->model->ctx, g, lin, att, lin_in, in)) continue;
        s->proj_to[l] = reader;
        s->proj_from[reader] = l;
    }
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

static uint64_t tensor_bytes(const vkg_session *s, uint32_t t)
{
    return vkg_shape_numel(&s->rt[t].shape) * vkg_dtype_size(s->model->g->tensors[t].dtype);
}

/* Inputs and outputs, and the intermediates they are views of, get buffers of their own. */
static bool own_buffer(const vkg_session *s, const bool *pinned, uint32_t t)
{
    return pinned[t] && s->root[t] == t && s->model->g->tensors[t].role != VKG_ROLE_CONSTANT;
}

/* Allocates the pinned tensors' buffers and the arena, after checking that the context's budget
 * can hold them all: a session that cannot fit fails before taking anything, saying what it needs. */
static vkg_status allocate(vkg_session *s, const bool *pinned, bool arena)
{
    const vkg_graph *g = s->model->g;
    vkg_context *ctx = s->model->ctx;
    uint64_t io = 0, need;
    for (uint32_t t = 0; t < g->n_tensors; t++)
        if (own_buffer(s, pinned, t)) io += vkg_mem_footprint(ctx, tensor_bytes(s, t));
    need = io + (arena ? vkg_mem_footprint(ctx, s->planned) : 0);
    VkDeviceSize avail = vkg_mem_available(ctx);
    vkg_status st = need > avail ? VKG_ERROR_OUT_OF_DEVICE_MEMORY : VKG_SUCCESS;
    for (uint32_t t = 0; t < g->n_tensors && st == VKG_SUCCESS; t++)
        if (own_buffer(s, pinned, t)) st = vkg_buf_create(ctx, tensor_bytes(s, t), &s->own[t]);
    if (st == VKG_SUCCESS && arena) st = vkg_buf_create(ctx, s->planned, &s->arena);
    if (st == VKG_ERROR_OUT_OF_DEVICE_MEMORY && ctx->budget) {
        vkg_memory_stats ms;
        vkg_context_memory_stats(ctx, &ms);
        return vkg_fail(st, "%s: the session needs %llu bytes of device memory (activation arena %llu, inputs and "
                        "outputs %llu); the context's budget of %llu bytes has %llu left (%llu held, %llu of it in use)",
                        g->source, (unsigned long long)need, (unsigned long long)(need - io), (unsigned long long)io,
                        (unsigned long long)ctx->budget, (unsigned long long)(avail == UINT64_MAX ? 0 : avail),
                        (unsigned long long)ms.allocated, (unsigned long long)ms.used);
    }
    if (st != VKG_SUCCESS) return vkg_fail_prefix(st, "%s: session memory (%llu bytes)", g->source, (unsigned long long)need);
    return VKG_SUCCESS;
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
        /* A linear recorded by its attention reads its inputs at the attention's step. */
        uint32_t at = s->proj_to[n] != UINT32_MAX ? s->proj_to[n] : n;
        for (uint32_t i = 0; i < node->n_inputs; i++)
            if (node->inputs[i] != VKG_IR_NONE) last[s->root[node->inputs[i]]] = VKG_MAX(last[s->root[node->inputs[i]]], at);
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
        if (pinned[t]) continue; /* a buffer of its own, allocated below */
        s->unshared += bytes;
        lv[nl++] = (live){t, bytes, 0, first[t] == UINT32_MAX ? 0 : first[t], last[t]};
    }
    /* A node's scratch lives for that node only; it takes a pseudo tensor id past the real ones. */
    for (uint32_t n = 0; n < g->n_nodes; n++)
        if (s->scratch_bytes[n]) {
            lv[nl++] = (live){nt + n, s->scratch_bytes[n], 0, s->plan_from[n] != UINT32_MAX ? s->plan_from[n] : n, n};
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
    st = allocate(s, pinned, nl > 0);
    if (st != VKG_SUCCESS) goto done;
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

/* Node n's inputs (up to its op's max_inputs; absent optional ones NULL) and outputs, as the
 * recording functions take them. */
static void node_tensors(const vkg_session *s, uint32_t n, const vkg_rt_tensor **in, const vkg_rt_tensor **outs)
{
    const vkg_ir_node *node = &s->model->g->nodes[n];
    const vkg_op_def *op = vkg_op_find(node->op);
    for (uint32_t i = 0; i < op->max_inputs; i++)
        in[i] = i < node->n_inputs && node->inputs[i] != VKG_IR_NONE ? &s->rt[node->inputs[i]] : NULL;
    for (uint32_t i = 0; i < node->n_outputs; i++) outs[i] = &s->rt[node->outputs[i]];
}

/* Records the whole graph into a new command buffer with the tensors' current memory; on success
 * replaces the session's (and its dispatch-to-node table), on failure leaves them as they were. */
static vkg_status record_graph(vkg_session *s, vkg_cmd **cmd_out, uint32_t **node_out, uint32_t *n_out)
{
    const vkg_graph *g = s->model->g;
    uint32_t cap = 2 * g->n_nodes + 8, n_dispatch = 0;
    uint32_t *dispatch_node = malloc(cap * sizeof *dispatch_node);
    if (!dispatch_node) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    vkg_cmd *cmd = NULL;
    vkg_status st = vkg_cmd_begin(s->model->ctx, s->profile, &cmd);
    for (uint32_t n = 0; n < g->n_nodes && st == VKG_SUCCESS; n++) {
        const vkg_ir_node *node = &g->nodes[n];
        const vkg_op_def *op = vkg_op_find(node->op);
        if (!op->record && !op->record_call) continue;
        if (s->proj_to[n] != UINT32_MAX) continue; /* recorded by its attention node */
        const vkg_rt_tensor *in[64], *outs[64];
        node_tensors(s, n, in, outs);
        uint32_t before = vkg_cmd_dispatch_count(cmd);
        if (s->proj_from[n] != UINT32_MAX) {
            const vkg_rt_tensor *lin[64], *lout[64];
            node_tensors(s, s->proj_from[n], lin, lout);
            st = vkg_attention_proj_record(cmd, node, in, lin, outs[0]);
        } else if (op->record_call) {
            vkg_op_call call = {cmd, node, in, outs, s->scratch[n], s->scratch_bytes[n], NULL,
                                s->plan_from[n] != UINT32_MAX};
            const vkg_rt_tensor *pin[64], *pout[64];
            vkg_op_call plan_call;
            uint32_t x = s->plan_to[n];
            if (x != UINT32_MAX) {
                const vkg_ir_node *xn = &g->nodes[x];
                node_tensors(s, x, pin, pout);
                plan_call = (vkg_op_call){cmd, xn, pin, pout, s->scratch[x], s->scratch_bytes[x], NULL, false};
                call.plan_for = &plan_call;
            }
            st = op->record_call(&call);
        } else {
            st = op->record(cmd, node, in, outs[0]);
        }
        if (st != VKG_SUCCESS) {
            st = vkg_fail_prefix(st, "%s: node \"%s\" (op %s)", g->source, node->name, node->op);
            break;
        }
        for (uint32_t d = before; d < vkg_cmd_dispatch_count(cmd); d++) {
            if (n_dispatch == cap) {
                cap *= 2;
                uint32_t *nd = realloc(dispatch_node, cap * sizeof *nd);
                if (!nd) {
                    st = vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
                    break;
                }
                dispatch_node = nd;
            }
            dispatch_node[n_dispatch++] = n;
        }
    }
    if (st == VKG_SUCCESS) st = vkg_cmd_end(cmd);
    if (st != VKG_SUCCESS) {
        vkg_cmd_destroy(cmd);
        free(dispatch_node);
        return st;
    }
    *cmd_out = cmd;
    *node_out = dispatch_node;
    *n_out = n_dispatch;
    return VKG_SUCCESS;
}

/* (Re-)records the session; the previous command buffer, if any, is destroyed only on success. */
static vkg_status record(vkg_session *s)
{
    vkg_cmd *cmd;
    uint32_t *dispatch_node, n;
    VKG_TRY(record_graph(s, &cmd, &dispatch_node, &n));
    vkg_cmd_destroy(s->cmd);
    free(s->dispatch_node);
    s->cmd = cmd;
    s->dispatch_node = dispatch_node;
    s->n_dispatch = n;
    s->ran = false; /* timestamps belong to the old command buffer */
    return VKG_SUCCESS;
}

/* The object vkg_session_submit signals: a timeline semaphore, or a fence where there is none. */
static vkg_status create_sync(vkg_session *s)
{
    vkg_context *ctx = s->model->ctx;
    if (ctx->use_timeline) {
        VkSemaphoreTypeCreateInfo type = {.sType = VK_STRUCTURE_TYPE_SEMAPHORE_TYPE_CREATE_INFO,
                                          .semaphoreType = VK_SEMAPHORE_TYPE_TIMELINE, .initialValue = 0};
        VkSemaphoreCreateInfo ci = {.sType = VK_STRUCTURE_TYPE_SEMAPHORE_CREATE_INFO, .pNext = &type};
        VKG_VK(vkCreateSemaphore(ctx->device, &ci, NULL, &s->timeline));
    } else {
        VkFenceCreateInfo ci = {.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
        VKG_VK(vkCreateFence(ctx->device, &ci, NULL, &s->fence));
    }
    return VKG_SUCCESS;
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
    s->bound = calloc(nt ? nt : 1, sizeof *s->bound);
    s->scratch = calloc(model->g->n_nodes + 1, sizeof *s->scratch);
    s->scratch_bytes = calloc(model->g->n_nodes + 1, sizeof *s->scratch_bytes);
    s->plan_to = calloc(model->g->n_nodes + 1, sizeof *s->plan_to);
    s->plan_from = calloc(model->g->n_nodes + 1, sizeof *s->plan_from);
    s->proj_to = calloc(model->g->n_nodes + 1, sizeof *s->proj_to);
    s->proj_from = calloc(model->g->n_nodes + 1, sizeof *s->proj_from);
    bool got = s->rt && s->root && s->own && s->bound && s->scratch && s->scratch_bytes && s->plan_to && s->plan_from &&
               s->proj_to && s->proj_from;
    vkg_status st = got ? VKG_SUCCESS : vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    if (st == VKG_SUCCESS) st = vkg_context_alive(model->ctx, "vkg_session_create");
    if (st == VKG_SUCCESS) st = infer_shapes(s, &d);
    if (st == VKG_SUCCESS) fuse_route_plan(s);
    if (st == VKG_SUCCESS) fuse_attention_proj(s);
    if (st == VKG_SUCCESS) st = plan_memory(s);
    if (st == VKG_SUCCESS) st = record(s);
    if (st == VKG_SUCCESS) st = create_sync(s);
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
    VkDevice dev = s->model->ctx->device;
    /* A submitted run still uses the command buffer and memory: let it finish first. */
    if (s->pending) (void)vkg_session_wait(s, UINT64_MAX);
    /* After a device loss nothing can be waited for any more: vkDeviceWaitIdle returns at once
     * on a lost device, and everything may then be destroyed. */
    if (atomic_load(&s->model->ctx->lost)) vkDeviceWaitIdle(dev);
    if (s->timeline) vkDestroySemaphore(dev, s->timeline, NULL);
    if (s->fence) vkDestroyFence(dev, s->fence, NULL);
    vkg_cmd_destroy(s->cmd);
    if (s->own)
        for (uint32_t t = 0; t < s->model->g->n_tensors; t++) vkg_buf_destroy(s->own[t]);
    if (s->bound) /* wrappers only: the VkBuffers are the application's */
        for (uint32_t t = 0; t < s->model->g->n_tensors; t++) free(s->bound[t]);
    vkg_buf_destroy(s->arena);
    free(s->own);
    free(s->bound);
    free(s->scratch);
    free(s->scratch_bytes);
    free(s->plan_to);
    free(s->plan_from);
    free(s->proj_to);
    free(s->proj_from);
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

/* Refuses calls that need the session's memory or command buffer while a submit is not waited for. */
static vkg_status idle(const vkg_session *s, const char *call)
{
    if (!s->pending) return VKG_SUCCESS;
    return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                    "%s: run %llu of this session was submitted and not yet waited for; call vkg_session_wait first",
                    call, (unsigned long long)s->submitted);
}

static vkg_status not_bound(const vkg_session *s, uint32_t t, const char *call, const char *verb)
{
    if (!s->bound[s->root[t]]) return VKG_SUCCESS;
    const vkg_ir_tensor *ti = &s->model->g->tensors[t];
    return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                    "%s: %s \"%s\" is bound to an application buffer (vkg_session_bind_buffer): %s that buffer "
                    "instead, or unbind it with VK_NULL_HANDLE", call, ti->role == VKG_ROLE_INPUT ? "input" : "output",
                    ti->name, verb);
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
    VKG_TRY(idle(s, "vkg_session_set_input"));
    VKG_TRY(find_io(s, name, VKG_ROLE_INPUT, &t));
    VKG_TRY(not_bound(s, t, "vkg_session_set_input", "write"));
    VKG_TRY(io_bytes(s, t, bytes, "input"));
    const vkg_rt_tensor *rt = &s->rt[t];
    return vkg_buf_upload((vkg_buf *)rt->ref.buf, rt->ref.offset, data, bytes);
}

vkg_status vkg_session_run(vkg_session *s)
{
    if (!s) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_run: NULL session");
    VKG_TRY(vkg_session_submit(s, NULL));
    return vkg_session_wait(s, UINT64_MAX);
}

vkg_status vkg_session_submit(vkg_session *s, const vkg_submit_desc *desc)
{
    if (!s) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_submit: NULL session");
    VKG_TRY(idle(s, "vkg_session_submit"));
    vkg_submit_desc d = {0};
    if (desc) d = *desc;
    if (d.n_wait && !d.wait_semaphores)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_submit: n_wait is %u but wait_semaphores is NULL", d.n_wait);
    if (d.n_signal && !d.signal_semaphores)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_submit: n_signal is %u but signal_semaphores is NULL",
                        d.n_signal);
    for (uint32_t i = 0; i < d.n_wait; i++)
        if (!d.wait_semaphores[i])
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_submit: wait_semaphores[%u] is VK_NULL_HANDLE", i);
    for (uint32_t i = 0; i < d.n_signal; i++)
        if (!d.signal_semaphores[i])
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_submit: signal_semaphores[%u] is VK_NULL_HANDLE", i);
    vkg_context *ctx = s->model->ctx;
    VKG_TRY(vkg_context_alive(ctx, "vkg_session_submit"));
    if ((d.wait_values || d.signal_values) && !ctx->info.timeline_semaphore)
        return vkg_fail(VKG_ERROR_UNSUPPORTED,
                        "vkg_session_submit: %s given, but the device has no timeline semaphores enabled for vkg "
                        "(an adopted device needs VKG_FEATURE_TIMELINE_SEMAPHORE in external.enabled_features)",
                        d.wait_values ? "wait_values" : "signal_values");
    uint64_t value = s->submitted + 1;
    vkg_cmd_submit_info info = {d.wait_semaphores, d.wait_values, d.n_wait, d.signal_semaphores, d.signal_values,
                                d.n_signal, s->timeline, s->timeline ? value : 0, s->fence};
    if (s->fence) VKG_VK(vkResetFences(ctx->device, 1, &s->fence));
    VKG_TRY(vkg_cmd_submit(s->cmd, &info));
    s->submitted = value;
    s->pending = true;
    return VKG_SUCCESS;
}

vkg_status vkg_session_wait(vkg_session *s, uint64_t timeout_ns)
{
    if (!s) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_wait: NULL session");
    if (!s->pending) return VKG_SUCCESS;
    vkg_context *ctx = s->model->ctx;
    VkResult r;
    const char *call;
    if (s->timeline) {
        VkSemaphoreWaitInfo wi = {.sType = VK_STRUCTURE_TYPE_SEMAPHORE_WAIT_INFO, .semaphoreCount = 1,
                                  .pSemaphores = &s->timeline, .pValues = &s->submitted};
        r = ctx->wait_semaphores(ctx->device, &wi, timeout_ns);
        if (r == VK_SUCCESS) r = vkg_context_fault(ctx, VKG_FAULT_WAIT);
        vkg_context_note(ctx, r);
        call = "vkWaitSemaphores";
    } else {
        r = vkg_wait_fence(ctx, s->fence, timeout_ns);
        call = "vkWaitForFences";
    }
    if (r == VK_TIMEOUT)
        return vkg_fail(VKG_TIMEOUT, "vkg_session_wait: run %llu of the session has not completed after %llu ns",
                        (unsigned long long)s->submitted, (unsigned long long)timeout_ns);
    /* Completed, or failed for good (a lost device does not come back): either way not pending. */
    s->pending = false;
    if (r != VK_SUCCESS) return vkg_fail_vk(r, call);
    s->ran = true;
    return vkg_cmd_complete(s->cmd);
}

VkSemaphore vkg_session_timeline(const vkg_session *s) { return s ? s->timeline : VK_NULL_HANDLE; }
uint64_t vkg_session_timeline_value(const vkg_session *s) { return s ? s->submitted : 0; }
VkFence vkg_session_fence(const vkg_session *s) { return s ? s->fence : VK_NULL_HANDLE; }

vkg_status vkg_session_record(vkg_session *s, VkCommandBuffer cb)
{
    if (!s || !cb)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_record: %s is NULL", s ? "command buffer" : "session");
    return vkg_cmd_replay(s->cmd, cb);
}

/* Points tensor t, and every view of it, at offset 0 of buf. */
static void point_at(vkg_session *s, uint32_t t, vkg_buf *buf)
{
    for (uint32_t u = 0; u < s->model->g->n_tensors; u++)
        if (s->root[u] == t) s->rt[u].ref = (vkg_tref){buf, 0};
}

vkg_status vkg_session_bind_buffer(vkg_session *s, const char *name, VkBuffer buffer, VkDeviceSize offset,
                                   VkDeviceSize size)
{
    if (!s || !name) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_bind_buffer: %s is NULL", s ? "tensor" : "session");
    VKG_TRY(idle(s, "vkg_session_bind_buffer"));
    const vkg_graph *g = s->model->g;
    vkg_context *ctx = s->model->ctx;
    uint32_t t = vkg_ir_tensor_find(g, name);
    if (t == VKG_IR_NONE || (g->tensors[t].role != VKG_ROLE_INPUT && g->tensors[t].role != VKG_ROLE_OUTPUT)) {
        char names[512] = "";
        size_t len = 0;
        for (uint32_t i = 0; i < g->n_inputs + g->n_outputs && len < sizeof names; i++) {
            uint32_t id = i < g->n_inputs ? g->inputs[i] : g->outputs[i - g->n_inputs];
            len += (size_t)snprintf(names + len, sizeof names - len, "%s\"%s\"", i ? ", " : "", g->tensors[id].name);
        }
        if (t == VKG_IR_NONE)
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                            "vkg_session_bind_buffer: %s has no tensor named \"%s\"; graph inputs and outputs: %s",
                            g->source, name, names);
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                        "vkg_session_bind_buffer: %s: tensor \"%s\" is %s, not a graph input or output; only those "
                        "can be bound: %s", g->source, name,
                        g->tensors[t].role == VKG_ROLE_CONSTANT ? "a constant" : "an intermediate", names);
    }
    /* A view's memory is its root's: an output reshaped from an intermediate binds that
     * intermediate's memory (a buffer of its own, planned for the output; the intermediate's readers
     * read it there); a view of another input or output is refused: bind that tensor. Any other view
     * of the bound memory follows it (and refuses set_input/get_output while bound). */
    uint32_t r = s->root[t];
    vkg_tensor_role root_role = g->tensors[r].role;
    if (r != t && (root_role == VKG_ROLE_INPUT || root_role == VKG_ROLE_OUTPUT))
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                        "vkg_session_bind_buffer: %s: %s \"%s\" is a view of \"%s\" (same memory); bind \"%s\" instead",
                        g->source, g->tensors[t].role == VKG_ROLE_INPUT ? "input" : "output", name,
                        g->tensors[s->root[t]].name, g->tensors[s->root[t]].name);
    const char *what = g->tensors[t].role == VKG_ROLE_INPUT ? "input" : "output";
    uint64_t bytes = vkg_shape_numel(&s->rt[r].shape) * vkg_dtype_size(g->tensors[r].dtype);

    if (buffer == VK_NULL_HANDLE) { /* unbind: vkg's own memory again */
        if (!s->bound[r]) return VKG_SUCCESS;
        vkg_buf *own = NULL;
        vkg_status st = vkg_buf_create(ctx, bytes, &own);
        if (st != VKG_SUCCESS) return vkg_fail_prefix(st, "vkg_session_bind_buffer: %s \"%s\"", what, name);
        point_at(s, r, own);
        st = record(s);
        if (st != VKG_SUCCESS) {
            point_at(s, r, s->bound[r]);
            vkg_buf_destroy(own);
            return st;
        }
        free(s->bound[r]);
        s->bound[r] = NULL;
        s->own[r] = own;
        return VKG_SUCCESS;
    }

    VkDeviceSize align = ctx->alignment;
    if (offset % align)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                        "vkg_session_bind_buffer: %s \"%s\": offset %llu is not a multiple of %llu (max of 64, "
                        "minStorageBufferOffsetAlignment %llu and minTexelBufferOffsetAlignment %llu)",
                        what, name, (unsigned long long)offset, (unsigned long long)align,
                        (unsigned long long)ctx->info.min_storage_offset_alignment,
                        (unsigned long long)ctx->info.min_texel_offset_alignment);
    VkDeviceSize need = bytes ? (bytes + 15) / 16 * 16 : 16;
    if (size < need)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                        "vkg_session_bind_buffer: %s \"%s\" holds %llu bytes (%s, %llu elements): the bound range "
                        "must have at least %llu bytes (rounded up to 16), got %llu",
                        what, name, (unsigned long long)bytes, vkg_dtype_name(g->tensors[t].dtype),
                        (unsigned long long)vkg_shape_numel(&s->rt[t].shape), (unsigned long long)need,
                        (unsigned long long)size);
    vkg_buf *wrap = calloc(1, sizeof *wrap);
    if (!wrap) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    *wrap = (vkg_buf){.ctx = ctx, .buffer = buffer, .offset = offset, .size = bytes, .capacity = size};
    vkg_buf *prev = s->bound[r] ? s->bound[r] : s->own[r];
    point_at(s, r, wrap);
    vkg_status st = record(s);
    if (st != VKG_SUCCESS) {
        point_at(s, r, prev);
        free(wrap);
        return vkg_fail_prefix(st, "vkg_session_bind_buffer: %s \"%s\"", what, name);
    }
    free(s->bound[r]);
    s->bound[r] = wrap;
    vkg_buf_destroy(s->own[r]); /* its memory is not needed while bound */
    s->own[r] = NULL;
    return vkg_context_check_validation(ctx);
}

vkg_status vkg_session_get_output(vkg_session *s, const char *name, void *data, size_t bytes)
{
    uint32_t t;
    if (!s || (!data && bytes)) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_session_get_output: NULL argument");
    VKG_TRY(idle(s, "vkg_session_get_output"));
    VKG_TRY(find_io(s, name, VKG_ROLE_OUTPUT, &t));
    VKG_TRY(not_bound(s, t, "vkg_session_get_output", "read"));
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
