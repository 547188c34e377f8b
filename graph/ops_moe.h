/* The MoE ops' entries in the op table (graph/ops_moe.c): router, experts with device-side
 * dispatch, and the MoE-LoRA mixing step of the shared-base FFN. */
#ifndef VKG_GRAPH_OPS_MOE_H
#define VKG_GRAPH_OPS_MOE_H

#include "graph/ops.h"

extern const vkg_attr_spec vkg_moe_router_attrs[], vkg_moe_experts_attrs[], vkg_moe_lora_mix_attrs[];
vkg_status vkg_moe_router_validate(const vkg_graph *g, const vkg_ir_node *n);
vkg_status vkg_moe_router_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out);
vkg_status vkg_moe_router_record(const vkg_op_call *c);
uint64_t vkg_moe_router_scratch(const vkg_context *ctx, const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out);
double vkg_moe_router_flops(const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out);
vkg_status vkg_moe_experts_validate(const vkg_graph *g, const vkg_ir_node *n);
vkg_status vkg_moe_experts_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out);
vkg_status vkg_moe_experts_record(const vkg_op_call *c);
uint64_t vkg_moe_experts_scratch(const vkg_context *ctx, const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out);
double vkg_moe_experts_flops(const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out);
vkg_status vkg_moe_lora_mix_validate(const vkg_graph *g, const vkg_ir_node *n);
vkg_status vkg_moe_lora_mix_infer(const vkg_graph *g, const vkg_ir_node *n, const vkg_shape *const *in, vkg_shape *out);
vkg_status vkg_moe_lora_mix_record(const vkg_op_call *c);
uint64_t vkg_moe_lora_mix_scratch(const vkg_context *ctx, const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out);
double vkg_moe_lora_mix_flops(const vkg_ir_node *n, const vkg_shape *const *in, const vkg_shape *out);

/* Inputs: moe_router x, weight, bias | moe_experts x, ids, gates, w1, b1, w2, b2, w3, residual |
 * moe_lora_mix u, a1, ids, gates, lora_b1, lora_a2, lora_b2, b2, scale, residual. */
#define VKG_MOE_OPS                                                                                              \
    {.name = "moe_router", .min_inputs = 2, .max_inputs = 3, .min_outputs = 2, .max_outputs = 7,                 \
     .attrs = vkg_moe_router_attrs, .validate = vkg_moe_router_validate, .infer = vkg_moe_router_infer,          \
     .record_call = vkg_moe_router_record, .scratch = vkg_moe_router_scratch, .flops = vkg_moe_router_flops,      \
     .f16_inputs = 1u << 1, .i32_outputs = 1u << 0},                                                              \
    {.name = "moe_experts", .min_inputs = 4, .max_inputs = 9, .min_outputs = 1, .max_outputs = 1,                \
     .attrs = vkg_moe_experts_attrs, .validate = vkg_moe_experts_validate, .infer = vkg_moe_experts_infer,       \
     .record_call = vkg_moe_experts_record, .scratch = vkg_moe_experts_scratch, .flops = vkg_moe_experts_flops,   \
     .f16_inputs = (1u << 3) | (1u << 5) | (1u << 7), .i32_inputs = 1u << 1},                                     \
    {.name = "moe_lora_mix", .min_inputs = 7, .max_inputs = 10, .min_outputs = 2, .max_outputs = 2,              \
     .attrs = vkg_moe_lora_mix_attrs, .validate = vkg_moe_lora_mix_validate, .infer = vkg_moe_lora_mix_infer,    \
     .record_call = vkg_moe_lora_mix_record, .flops = vkg_moe_lora_mix_flops, .scratch = vkg_moe_lora_mix_scratch,                                  \
     .f16_inputs = (1u << 4) | (1u << 5) | (1u << 6), .i32_inputs = 1u << 2},

#endif
