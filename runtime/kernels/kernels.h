/* Kernel dispatch functions: each records one op into a vkg_cmd. Shapes are checked here; the
 * shader trusts them. A kernel = shaders/NAME.comp + runtime/kernels/NAME.c + tests (op NAME). */
#ifndef VKG_KERNELS_H
#define VKG_KERNELS_H

#include "../internal.h"

typedef enum vkg_act { VKG_ACT_NONE = 0, VKG_ACT_RELU = 1, VKG_ACT_GELU = 2 } vkg_act; /* = ACT_* in common.glsl */

/* A tensor's storage: a buffer and a byte offset into it. */
typedef struct vkg_tref {
    const vkg_buf *buf;
    VkDeviceSize offset;
} vkg_tref;

typedef enum vkg_mm_variant {
    VKG_MM_AUTO = 0,  /* the device's preset */
    VKG_MM_TILED = 1, /* shared-memory tiles (GPUs) */
    VKG_MM_TEXEL = 2  /* texel-buffer reads, no shared memory (lavapipe) */
} vkg_mm_variant;

typedef struct vkg_matmul_args {
    vkg_tref x;       /* (batch, m, k) fp32 */
    vkg_tref w;       /* (n, k), or (batch, n, k) unless w_shared; fp32 or fp16 */
    vkg_tref bias;    /* (n) fp32, optional (buf NULL) */
    vkg_tref y;       /* (batch, m, n) fp32 */
    vkg_tref scale;   /* (n) fp32, optional: multiplies act(x W^T + b) (LayerScale) */
    vkg_tref residual;/* (batch, m, n) fp32, optional: added last (y = residual + scale * act(...)) */
    uint32_t batch;   /* 0 means 1 */
    uint32_t m, n, k;
    bool w_shared;    /* one W for every batch element (a Linear layer) */
    vkg_dtype w_dtype;
    vkg_act act;
    vkg_mm_variant variant;
} vkg_matmul_args;

/* Whether the device can run the texel variant at all. */
bool vkg_matmul_texel_supported(const vkg_context *ctx);
/* Which variant AUTO picks on this context. */
vkg_mm_variant vkg_matmul_default_variant(const vkg_context *ctx);
vkg_status vkg_matmul(vkg_cmd *cmd, const vkg_matmul_args *a);

/* y = LayerNorm(x) over the last dim d, for `rows` rows; gamma/beta (d) optional (buf NULL). */
vkg_status vkg_layernorm(vkg_cmd *cmd, vkg_tref x, vkg_tref gamma, vkg_tref beta, vkg_tref y, uint32_t rows,
                         uint32_t d, float eps);

/* The same with a chosen variant: 0 the device's default, 1 shared-memory tree (any device),
 * 2 one subgroup of 8 per row with texel reads (lavapipe's default). */
vkg_status vkg_layernorm_variant(vkg_cmd *cmd, vkg_tref x, vkg_tref gamma, vkg_tref beta, vkg_tref y, uint32_t rows,
                                 uint32_t d, float eps, int variant);
bool vkg_layernorm_subgroup_supported(const vkg_context *ctx);

/* y = act(x) elementwise over n floats (act RELU or GELU). */
vkg_status vkg_unary(vkg_cmd *cmd, vkg_act act, vkg_tref x, vkg_tref y, uint64_t n);

typedef enum vkg_binop { VKG_BIN_ADD = 0, VKG_BIN_MUL = 1 } vkg_binop;
enum { VKG_MAX_RANK = 8 };
/* y = a (op) b with NumPy broadcasting; shapes right-aligned; y has the broadcast shape. */
vkg_status vkg_binary(vkg_cmd *cmd, vkg_binop op, vkg_tref a, const uint32_t *a_shape, uint32_t a_rank, vkg_tref b,
                      const uint32_t *b_shape, uint32_t b_rank, vkg_tref y);
/* Computes the broadcast shape of two shapes; VKG_ERROR_INVALID_ARGUMENT naming the dimension if
 * they do not broadcast. */
vkg_status vkg_broadcast_shape(const uint32_t *a, uint32_t ar, const uint32_t *b, uint32_t br, uint32_t *out,
                               uint32_t *out_rank);

/* y (rows, h) = silu(x[:, :h]) * x[:, h:] for x (rows, 2h); silu(v) = v * sigmoid(v). */
vkg_status vkg_swiglu(vkg_cmd *cmd, vkg_tref x, vkg_tref y, uint32_t rows, uint32_t h);

/* y = softmax(x) over the last dim d, for `rows` rows. */
vkg_status vkg_softmax(vkg_cmd *cmd, vkg_tref x, vkg_tref y, uint32_t rows, uint32_t d);

#endif
