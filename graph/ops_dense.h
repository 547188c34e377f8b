/* The dense-head ops' entries in the op table (graph/ops_dense.c): resize_bilinear,
 * adaptive_avg_pool2d, batchnorm, argmax on their kernels (runtime/kernels/dense.h), and concat,
 * permute on the strided copy. */
#ifndef VKG_GRAPH_OPS_DENSE_H
#define VKG_GRAPH_OPS_DENSE_H

#include "graph/ops.h"

extern const vkg_attr_spec vkg_resize_attrs[], vkg_pool_attrs[], vkg_batchnorm_attrs[], vkg_concat_attrs[],
    vkg_permute_attrs[], vkg_argmax_attrs[];
vkg_status vkg_resize_validate(const vkg_graph *g, const vkg_ir_node *n);
vkg_status vkg_resize_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out);
vkg_status vkg_resize_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out);
vkg_status vkg_pool_validate(const vkg_graph *g, const vkg_ir_node *n);
vkg_status vkg_pool_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out);
vkg_status vkg_pool_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out);
vkg_status vkg_batchnorm_validate(const vkg_graph *g, const vkg_ir_node *n);
vkg_status vkg_batchnorm_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out);
vkg_status vkg_batchnorm_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out);
vkg_status vkg_concat_validate(const vkg_graph *g, const vkg_ir_node *n);
vkg_status vkg_concat_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out);
vkg_status vkg_concat_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out);
vkg_status vkg_permute_validate(const vkg_graph *g, const vkg_ir_node *n);
vkg_status vkg_permute_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out);
vkg_status vkg_permute_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out);
vkg_status vkg_argmax_validate(const vkg_graph *g, const vkg_ir_node *n);
vkg_status vkg_argmax_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out);
vkg_status vkg_argmax_record(vkg_cmd *cmd, const vkg_ir_node *n, const vkg_rt_tensor *const *in, const vkg_rt_tensor *out);

/* Inputs: resize_bilinear x | adaptive_avg_pool2d x | batchnorm x, mean, var, weight, bias |
 * concat x0 .. x7 | permute x | argmax x (output i32). */
#define VKG_DENSE_OPS                                                                                            \
    {.name = "resize_bilinear", .min_inputs = 1, .max_inputs = 1, .min_outputs = 1, .max_outputs = 1,           \
     .attrs = vkg_resize_attrs, .validate = vkg_resize_validate, .infer = vkg_resize_infer,                      \
     .record = vkg_resize_record},                                                                               \
    {.name = "adaptive_avg_pool2d", .min_inputs = 1, .max_inputs = 1, .min_outputs = 1, .max_outputs = 1,       \
     .attrs = vkg_pool_attrs, .validate = vkg_pool_validate, .infer = vkg_pool_infer, .record = vkg_pool_record}, \
    {.name = "batchnorm", .min_inputs = 3, .max_inputs = 5, .min_outputs = 1, .max_outputs = 1,                 \
     .attrs = vkg_batchnorm_attrs, .validate = vkg_batchnorm_validate, .infer = vkg_batchnorm_infer,             \
     .record = vkg_batchnorm_record},                                                                            \
    {.name = "concat", .min_inputs = 2, .max_inputs = 8, .min_outputs = 1, .max_outputs = 1,                    \
     .attrs = vkg_concat_attrs, .validate = vkg_concat_validate, .infer = vkg_concat_infer,                      \
     .record = vkg_concat_record},                                                                               \
    {.name = "permute", .min_inputs = 1, .max_inputs = 1, .min_outputs = 1, .max_outputs = 1,                   \
     .attrs = vkg_permute_attrs, .validate = vkg_permute_validate, .infer = vkg_permute_infer,                   \
     .record = vkg_permute_record},                                                                              \
    {.name = "argmax", .min_inputs = 1, .max_inputs = 1, .min_outputs = 1, .max_outputs = 1,                    \
     .attrs = vkg_argmax_attrs, .validate = vkg_argmax_validate, .infer = vkg_argmax_infer,                      \
     .record = vkg_argmax_record, .i32_outputs = 1u << 0},

#endif
