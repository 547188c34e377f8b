/* Internals of models and sessions, shared by graph/ and tools/ (the CLI reports on them). */
#ifndef VKG_GRAPH_EXEC_H
#define VKG_GRAPH_EXEC_H

#include "graph/ir.h"
#include "graph/ops.h"

struct vkg_model {
    vkg_context *ctx;
    vkg_graph *g;
    vkg_buf *weights;            /* every constant, at (data - weights_base) */
    const uint8_t *weights_base; /* the first constant's bytes in the file image */
    /* Constants holding an adapter's merged values (vkg_model_apply_adapter), restored from the
     * file image on unload. Owned by the model. */
    uint32_t *adapted;
    uint32_t n_adapted;
};

struct vkg_session {
    vkg_model *model;
    vkg_rt_tensor *rt;   /* per tensor of the graph: concrete shape and memory */
    uint32_t *root;      /* per tensor: the tensor whose memory it uses (itself unless a view) */
    vkg_buf *arena;      /* intermediates, placed by lifetime */
    vkg_buf **own;       /* per tensor: a dedicated buffer (inputs, outputs) or NULL */
    vkg_buf **bound;     /* per tensor: an application VkBuffer (vkg_session_bind_buffer) replacing own, or NULL */
    vkg_tref *scratch;        /* per node: its scratch memory in the arena */
    uint64_t *scratch_bytes;  /* per node */
    /* per node, or UINT32_MAX: a moe_router's moe_experts node whose plan it records (plan_to), and
     * that node's router (plan_from); see fuse_route_plan in session.c */
    uint32_t *plan_to, *plan_from;
    /* per node, or UINT32_MAX: a linear's attention node that records it (proj_to), and that
     * attention's linear (proj_from); see fuse_attention_proj in session.c */
    uint32_t *proj_to, *proj_from;
    vkg_cmd *cmd;
    uint64_t planned, unshared;
    double flops;
    uint32_t *dispatch_node; /* node index of each recorded dispatch */
    uint32_t n_dispatch;
    bool profile, ran;
    /* Completion of vkg_session_submit: a timeline semaphore reaching `submitted` (the number of
     * submits), or a fence without timeline semaphores. `pending`: submitted, not yet waited for. */
    VkSemaphore timeline;
    VkFence fence;
    uint64_t submitted;
    bool pending;
};

const vkg_graph *vkg_model_graph(const vkg_model *m);
/* Fills a public description from an IR tensor; strings stay owned by the graph. */
void vkg_ir_tensor_info(const vkg_ir_tensor *t, vkg_tensor_info *out);
/* FLOP estimate of one run at the session's shapes (matmul multiply-adds x 2). */
double vkg_session_flops(const vkg_session *s);

#endif
