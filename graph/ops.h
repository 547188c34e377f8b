/* The op registry: for each op its schema check (load time), shape inference (session creation),
 * kernel recording and cost estimate. Adding an op = one table entry in ops.c plus its kernel. */
#ifndef VKG_GRAPH_OPS_H
#define VKG_GRAPH_OPS_H

#include "graph/ir.h"
#include "runtime/kernels/kernels.h"

/* A tensor with concrete shape, as a session sees it. */
typedef struct vkg_shape {
    uint32_t rank;
    int64_t dims[VKG_IR_MAX_RANK];
} vkg_shape;

uint64_t vkg_shape_numel(const vkg_shape *s);

/* A tensor bound to memory in a session. */
typedef struct vkg_rt_tensor {
    vkg_shape shape;
    vkg_dtype dtype;
    vkg_tref ref;
} vkg_rt_tensor;

typedef struct vkg_attr_spec {
    const char *name;
    vkg_attr_type type;
    bool required;
} vkg_attr_spec;

/* What a multi-output op's recorder gets. */
typedef struct vkg_op_call {
    vkg_cmd *cmd;
    const vkg_ir_node *node;
    const vkg_rt_tensor *const *in;  /* max_inputs entries; absent optional inputs are NULL */
    const vkg_rt_tensor *const *out; /* node->n_outputs entries */
    vkg_tref scratch;                /* the op's scratch bytes, private to this node's dispatches */
    uint64_t scratch_bytes;
    /* Set by the session where a moe_router's ids feed exactly one moe_experts node and both fit one
     * workgroup: the router also records that node's dispatch plan (plan_for is the experts node's
     * call, its scratch alive from the router on), and the experts node skips it (plan_recorded). */
    const struct vkg_op_call *plan_for;
    bool plan_recorded;
} vkg_op_call;

typedef struct vkg_op_def {
    const char *name;
    uint32_t min_inputs, max_inputs;
    uint32_t min_outputs, max_outputs; /* optional outputs: a node lists a prefix of them */
    const vkg_attr_spec *attrs;        /* terminated by {NULL} */
    /* Extra checks beyond arity and generic dtype rules; NULL for none. */
    vkg_status (*validate)(const vkg_graph *g, const vkg_ir_node *n);
    /* Output shapes (out[0 .. n_outputs-1]) from input shapes (absent optional inputs are NULL). */
    vkg_status (*infer)(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out);
    /* Records a single-output node's dispatches; NULL for views (the output aliases input 0) and
     * for ops that set record_call. */
    vkg_status (*record)(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out);
    /* Multiply-adds x 2 for the FLOP estimate (out = the first output); NULL counts 0. */
    double (*flops)(const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out);
    /* Recorder with every output and scratch memory (MoE, LoRA). */
    vkg_status (*record_call)(const vkg_op_call *c);
    /* Scratch bytes the recorder needs at these shapes on this device (out = every output); NULL for none. */
    uint64_t (*scratch)(const vkg_context *ctx, const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out);
    /* Dtype rules: inputs are f32 unless their bit is set here (bit i = input i). */
    uint32_t f16_inputs; /* f32 or f16 (constant weights) */
    uint32_t i32_inputs; /* i32 (routing ids) */
    uint32_t i32_outputs;
} vkg_op_def;

const vkg_op_def *vkg_op_find(const char *name);
/* The q / packed qkv projection fused into the attention (see fuse_attention_proj in session.c). */
bool vkg_attention_proj_fusable(const vkg_context *ctx, const vkg_graph *g, const vkg_ir_node *lin,
                                const vkg_ir_node *att, const vkg_shape *const *lin_in, const vkg_shape *const *in);
vkg_status vkg_attention_proj_record(vkg_cmd *cmd, const vkg_ir_node *att, const vkg_rt_tensor *const *in,
                                     const vkg_rt_tensor *const *lin_in, const vkg_rt_tensor *out);
/* VKG_ERROR_INVALID_GRAPH with "SOURCE: node "NAME" (op OP): message". */
vkg_status vkg_node_fail(const vkg_graph *g, const vkg_ir_node *n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
