/* The convolution ops' entries in the op table (graph/ops_conv.c): conv2d and conv_transpose2d, NCHW,
 * PyTorch semantics (docs/graph-format.md). */
#ifndef VKG_GRAPH_OPS_CONV_H
#define VKG_GRAPH_OPS_CONV_H

#include "graph/ops.h"

extern const vkg_attr_spec vkg_conv2d_attrs[], vkg_conv_transpose2d_attrs[];
vkg_status vkg_conv_validate(const vkg_graph *g, const vkg_ir_node *n);
vkg_status vkg_conv_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out);
vkg_status vkg_conv_record(const vkg_op_call *c);
uint64_t vkg_conv_scratch(const vkg_context *ctx, const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out);
double vkg_conv_flops(const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out);

/* Inputs: conv2d x, weight, bias, residual | conv_transpose2d x, weight, bias. */
#define VKG_CONV_OPS                                                                                             \
    {.name = "conv2d", .min_inputs = 2, .max_inputs = 4, .min_outputs = 1, .max_outputs = 1,                     \
     .attrs = vkg_conv2d_attrs, .validate = vkg_conv_validate, .infer = vkg_conv_infer,                          \
     .record_call = vkg_conv_record, .scratch = vkg_conv_scratch, .flops = vkg_conv_flops, .f16_inputs = 1u << 1}, \
    {.name = "conv_transpose2d", .min_inputs = 2, .max_inputs = 3, .min_outputs = 1, .max_outputs = 1,           \
     .attrs = vkg_conv_transpose2d_attrs, .validate = vkg_conv_validate, .infer = vkg_conv_infer,                \
     .record_call = vkg_conv_record, .scratch = vkg_conv_scratch, .flops = vkg_conv_flops, .f16_inputs = 1u << 1},

#endif
