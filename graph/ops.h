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

typedef struct vkg_op_def {
    const char *name;
    uint32_t min_inputs, max_inputs, n_outputs;
    const vkg_attr_spec *attrs; /* terminated by {NULL} */
    /* Extra checks beyond arity and generic dtype rules; NULL for none. */
    vkg_status (*validate)(const vkg_graph *g, const vkg_ir_node *n);
    /* Output shapes from input shapes (absent optional inputs are NULL). */
    vkg_status (*infer)(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out);
    /* Records the node's dispatches; NULL for ops that are views (the output aliases input 0). */
    vkg_status (*record)(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out);
    /* Multiply-adds x 2 for the FLOP estimate; NULL counts 0. */
    double (*flops)(const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out);
} vkg_op_def;

const vkg_op_def *vkg_op_find(const char *name);

#endif
