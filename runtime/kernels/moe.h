/* Mixture-of-Experts kernels: routing (select + statistics), device-side dispatch (histogram,
 * scan, stable scatter, tile list, indirect grids), grouped matmuls over expert segments and the
 * fixed-order combine, the fused expert MLP. Shaders: moe_route.comp, moe_dispatch.comp, moe_matmul.comp,
 * moe_mlp.comp. */
#ifndef VKG_KERNELS_MOE_H
#define VKG_KERNELS_MOE_H

#include "kernels.h"

enum { VKG_MOE_MAX_COLUMNS = 1024, VKG_MOE_MAX_K = 64, VKG_MOE_BLOCK = 256 };
/* Up to these sizes vkg_moe_dispatch plans in one dispatch (moe_plan1) and the router selects and
 * reduces its statistics in one (moe_route1); larger ones take the multi-workgroup kernels. */
enum { VKG_MOE_PLAN1_PAIRS = 1024, VKG_MOE_PLAN1_EXPERTS = 256, VKG_MOE_ROUTE1_TOKENS = 1024 };

typedef struct vkg_moe_select_args {
    vkg_tref logits;  /* (T, C) f32: x W^T + b */
    vkg_tref ids;     /* (T, k) i32 out */
    vkg_tref gates;   /* (T, k) f32 out */
    vkg_tref lse;     /* (T) f32 out: logsumexp of the tempered logits (for the statistics) */
    uint32_t T, C, first, k;
    bool sigmoid, gates_are_scores, renorm;
    float temperature, scale;
} vkg_moe_select_args;
vkg_status vkg_moe_select(vkg_cmd *cmd, const vkg_moe_select_args *a);

typedef struct vkg_moe_stats_args {
    vkg_tref logits, ids, lse;                       /* as produced for vkg_moe_select */
    vkg_tref counts, fraction, mean_score, load_balance, z_loss; /* (C-first), (C-first), (C), (1), (1) */
    uint32_t T, C, first, k;
    bool sigmoid;
    float temperature;
} vkg_moe_stats_args;
vkg_status vkg_moe_stats(vkg_cmd *cmd, const vkg_moe_stats_args *a);
/* vkg_moe_select, then the statistics of that routing into stats = counts, fraction, mean_score,
 * load_balance, z_loss (as vkg_moe_stats_args): one dispatch (moe_route1) up to
 * VKG_MOE_ROUTE1_TOKENS tokens, else the two kernels. */
vkg_status vkg_moe_route(vkg_cmd *cmd, const vkg_moe_select_args *s, const vkg_tref stats[5]);

/* Where one dispatch keeps its results; all inside one scratch range (vkg_moe_plan_layout). */
typedef struct vkg_moe_plan {
    vkg_tref hist;  /* (nblocks, E) u32: per block counts, then first positions */
    vkg_tref tiles; /* (max_tiles) uvec4 (expert, row0, row1, 0) */
    vkg_tref args;  /* 4 x (x, y, z) u32 indirect grids */
    vkg_tref seg;   /* (E + 1) u32 segment starts, then the number of routed pairs */
    vkg_tref perm;  /* (P) u32: position -> pair */
    vkg_tref inv;   /* (P) u32: pair -> position, ~0u for a dropped pair */
    uint32_t T, k, E, P, nblocks, max_tiles, tile_m;
    vkg_mm_variant variant; /* of the grouped matmuls: decides tile_m */
} vkg_moe_plan;

/* Fills plan's sizes for T tokens x k slots over E experts, and, when base.buf is set, its
 * references at consecutive aligned offsets from base. Returns the bytes the plan needs. */
uint64_t vkg_moe_plan_layout(const vkg_context *ctx, uint32_t T, uint32_t k, uint32_t E, vkg_mm_variant variant,
                             vkg_tref base, vkg_moe_plan *plan);
/* Records histogram, scan and scatter for ids (T, k) i32. grids[g] is the x size of the g-th grouped
 * matmul that will use the plan (vkg_moe_gemm_grid_x); their y is the number of tiles. */
vkg_status vkg_moe_dispatch(vkg_cmd *cmd, vkg_tref ids, const vkg_moe_plan *plan, const uint32_t grids[4]);

/* vkg_moe_route, then vkg_moe_dispatch(s->ids, plan, grids), in one dispatch (moe_route_plan1: the
 * route1 kernel, a workgroup barrier, the plan1 kernel) where vkg_moe_route_plan_fits, else the two
 * calls. The plan must be one vkg_moe_plan_layout range for s->T x s->k pairs. A decoder's MoE
 * layer saves a dispatch and a barrier with no parallelism lost: both halves are one workgroup. */
bool vkg_moe_route_plan_fits(const vkg_context *ctx, uint32_t T, uint32_t k, uint32_t E);
vkg_status vkg_moe_route_plan(vkg_cmd *cmd, const vkg_moe_select_args *s, const vkg_tref stats[5],
                              const vkg_moe_plan *plan, const uint32_t grids[4]);

typedef struct vkg_moe_gemm_args {
    vkg_tref x;          /* gather: (T, ldx) token rows; else (P, ldx) rows in position order */
    uint32_t ldx, xe;    /* x row stride; expert e reads columns [e*xe, e*xe + K) */
    bool gather;
    vkg_tref w;          /* (E, N, K) f32/f16 */
    vkg_dtype w_dtype;
    vkg_tref bias;       /* (E, N), optional */
    vkg_tref urow;       /* (T, N), optional: the token's row added before the activation */
    vkg_tref gates;      /* (T*k) per pair, optional: multiplies the result */
    vkg_tref y;          /* (P, N) rows in position order */
    bool mul_into_y;     /* y = y * result (SwiGLU's up projection) */
    uint32_t n, k;
    float alpha;         /* multiplies the product; 0 means 1 */
    vkg_act act;
    uint32_t grid;       /* which of the plan's indirect grids */
    uint32_t x_rows;     /* rows of x (for the binding range) */
} vkg_moe_gemm_args;
/* The x size of the grid of a grouped matmul with n outputs and depth k (for vkg_moe_dispatch). */
uint32_t vkg_moe_gemm_grid_x(const vkg_context *ctx, vkg_mm_variant variant, uint32_t n, uint32_t k);
vkg_status vkg_moe_gemm(vkg_cmd *cmd, const vkg_moe_plan *plan, const vkg_moe_gemm_args *a);

/* The expert MLP in one dispatch (moe_mlp.comp): per row tile of the plan, y = gate * (act(x W1_e^T +
 * b1_e) W2_e^T + b2_e) with the hidden activations kept in shared memory, chunk by chunk of F. */
typedef struct vkg_moe_mlp_args {
    vkg_tref x;                /* (T, D) token rows, gathered through the plan */
    vkg_tref w1, b1, w2, b2;   /* (E, F, D), (E, F) optional, (E, D, F), (E, D) optional */
    vkg_dtype w1_dtype, w2_dtype;
    vkg_tref gates;            /* (T*k) per pair */
    vkg_tref y;                /* (P, D) rows in position order, for vkg_moe_combine */
    uint32_t D, F;
    vkg_act act;               /* relu or gelu */
} vkg_moe_mlp_args;
/* Whether the fused kernel takes these widths on this device with this plan variant: the texel
 * variant (subgroups of 8: lavapipe), D and F multiples of 4, D <= VKG_MOE_MLP_MAX_D, relu/gelu.
 * Everything else (GPUs' tiled variant, SwiGLU, other widths) takes the grouped matmuls. */
enum { VKG_MOE_MLP_MAX_D = 256, VKG_MOE_MLP_GRID_X = 1 };
bool vkg_moe_mlp_shapes(const vkg_context *ctx, vkg_mm_variant variant, uint32_t D, uint32_t F, vkg_act act);
/* As vkg_moe_mlp_shapes, and the operands' offsets allow vec4 texel views. */
bool vkg_moe_mlp_supported(const vkg_context *ctx, const vkg_moe_plan *plan, const vkg_moe_mlp_args *a);
/* The plan's indirect grid 0 must have x = VKG_MOE_MLP_GRID_X (one workgroup per 16-row tile). */
vkg_status vkg_moe_mlp(vkg_cmd *cmd, const vkg_moe_plan *plan, const vkg_moe_mlp_args *a);

typedef struct vkg_moe_combine_args {
    vkg_tref ids, rows, gates, residual, bias, scale, y; /* rows (P, D) by position; y (T, D) */
    bool gate_rows;      /* multiply each row by its pair's gate */
    uint32_t D;
} vkg_moe_combine_args;
vkg_status vkg_moe_combine(vkg_cmd *cmd, const vkg_moe_plan *plan, const vkg_moe_combine_args *a);

/* The fused MoE-LoRA mixing step (moe_lora.comp): one workgroup per token, no per-pair memory. */
typedef struct vkg_moe_lora_args {
    vkg_tref u, a1, ids, gates;           /* (T, H), (T, E*r), (T, k) i32, (T, k) */
    vkg_tref b1, a2, b2;                  /* (E, H, r), (E, r, H), (E, D, r) */
    vkg_dtype b1_dtype, a2_dtype, b2_dtype;
    vkg_tref bias, scale, residual;       /* (D), (D), (T, D): optional */
    vkg_tref hbar, c;                     /* (T, H), (T, D) out */
    uint32_t T, H, E, r, D, k;
    float s;
    vkg_act act;
} vkg_moe_lora_args;
/* Whether the fused kernel takes these widths on this device (it needs no scratch memory). */
bool vkg_moe_lora_fused_shapes(const vkg_context *ctx, uint32_t H, uint32_t D, uint32_t r, uint32_t k);
/* Whether the fused kernel runs these shapes and buffer offsets on this device (else the grouped path does). */
bool vkg_moe_lora_fused_supported(const vkg_context *ctx, const vkg_moe_lora_args *a);
vkg_status vkg_moe_lora_fused(vkg_cmd *cmd, const vkg_moe_lora_args *a);

#endif
