/* Kernel dispatch functions: each records one op into a vkg_cmd. Shapes are checked here; the
 * shader trusts them. A kernel = shaders/NAME.comp + runtime/kernels/NAME.c + tests (op NAME). */
#ifndef VKG_KERNELS_H
#define VKG_KERNELS_H

#include "../internal.h"

/* = ACT_* in common.glsl; the matmul epilogue takes codes 0-3, vkg_unary every one but NONE. */
typedef enum vkg_act {
    VKG_ACT_NONE = 0, VKG_ACT_RELU = 1, VKG_ACT_GELU = 2, VKG_ACT_SILU = 3, VKG_ACT_TANH = 4, VKG_ACT_SIGMOID = 5
} vkg_act;

/* A tensor's storage: a buffer and a byte offset into it. */
typedef struct vkg_tref {
    const vkg_buf *buf;
    VkDeviceSize offset;
} vkg_tref;

/* Whether two byte ranges of abytes and bbytes share memory (one VkBuffer, intersecting ranges). */
bool vkg_tref_overlap(vkg_tref a, VkDeviceSize abytes, vkg_tref b, VkDeviceSize bbytes);

typedef enum vkg_mm_variant {
    VKG_MM_AUTO = 0,  /* the device's preset */
    VKG_MM_TILED = 1, /* shared-memory tiles (GPUs) */
    VKG_MM_TEXEL = 2  /* texel-buffer reads, no shared memory (lavapipe) */
} vkg_mm_variant;

/* LoRA limits of the linear op (docs/graph-format.md): they bound the push constants and registers. */
enum { VKG_LORA_MAX_ADAPTERS = 8, VKG_LORA_MAX_RANK = 64, VKG_LORA_MAX_R = 512 };

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
    /* LoRA, optional (lora_a.buf NULL = none; then every lora_ field is ignored): adds
     * sum_a s_a (x A_a^T) B_a^T before the epilogue. Adapter a owns rows [o_a, o_a + r_a) of lora_a
     * and the same columns of lora_b, o_a = lora_ranks[0] + ... + lora_ranks[a-1]. Needs batch 1.
     * vkg_matmul records two dispatches: t = the scaled x A^T into lora_t (vkg_lora), then the
     * matmul with t B^T as a second K segment of the same accumulators. */
    vkg_tref lora_a;          /* (lora_r, k), fp32 or fp16 (lora_dtype) */
    vkg_tref lora_b;          /* (n, lora_r), same dtype */
    vkg_tref lora_t;          /* scratch (m, lora_r) fp32, vkg_matmul_lora_scratch_bytes; overlaps no operand */
    vkg_dtype lora_dtype;
    uint32_t lora_r;          /* R = sum of the ranks, 1..VKG_LORA_MAX_R */
    uint32_t lora_n_adapters; /* 1..VKG_LORA_MAX_ADAPTERS */
    uint32_t lora_ranks[VKG_LORA_MAX_ADAPTERS]; /* each 1..VKG_LORA_MAX_RANK */
    float lora_scales[VKG_LORA_MAX_ADAPTERS];   /* s_a (alpha / r in PEFT's convention) */
} vkg_matmul_args;

/* Whether the device can run the texel variant at all. */
bool vkg_matmul_texel_supported(const vkg_context *ctx);
/* Which variant AUTO picks on this context. */
vkg_mm_variant vkg_matmul_default_variant(const vkg_context *ctx);
vkg_status vkg_matmul(vkg_cmd *cmd, const vkg_matmul_args *a);
/* Bytes of the lora_t scratch a LoRA matmul needs (m * lora_r * 4); 0 without LoRA. */
VkDeviceSize vkg_matmul_lora_scratch_bytes(const vkg_matmul_args *a);

/* The LoRA down-projection: t (m, r) fp32 = s_a * x A_a^T for each adapter a, where a owns rows
 * [o_a, o_a + r_a) of a (r, k) and columns [o_a, o_a + r_a) of t. x (m, k) fp32; a fp32 or fp16. */
typedef struct vkg_lora_args {
    vkg_tref x, a, t;
    uint32_t m, k, r;
    vkg_dtype dtype;       /* of a */
    uint32_t n_adapters;   /* 1..VKG_LORA_MAX_ADAPTERS; ranks each 1..VKG_LORA_MAX_RANK, summing to r */
    uint32_t ranks[VKG_LORA_MAX_ADAPTERS];
    float scales[VKG_LORA_MAX_ADAPTERS];
    vkg_mm_variant variant; /* TEXEL: texel fetches, one subgroup of 8 (lavapipe); TILED: storage
                             * buffers and shared memory (any device); AUTO: as matmul's default */
} vkg_lora_args;
vkg_status vkg_lora(vkg_cmd *cmd, const vkg_lora_args *a);
/* Every check of vkg_lora (and its pipeline), recording nothing; messages start with `who`. Lets
 * vkg_matmul refuse a bad LoRA before it records either of its dispatches. */
vkg_status vkg_lora_check(vkg_cmd *cmd, const vkg_lora_args *a, const char *who);

/* y = LayerNorm(x) over the last dim d, for `rows` rows; gamma/beta (d) optional (buf NULL). */
vkg_status vkg_layernorm(vkg_cmd *cmd, vkg_tref x, vkg_tref gamma, vkg_tref beta, vkg_tref y, uint32_t rows,
                         uint32_t d, float eps);

/* The same with a chosen variant: 0 the device's default, 1 shared-memory tree (any device),
 * 2 one subgroup of 8 per row with texel reads (lavapipe's default). */
vkg_status vkg_layernorm_variant(vkg_cmd *cmd, vkg_tref x, vkg_tref gamma, vkg_tref beta, vkg_tref y, uint32_t rows,
                                 uint32_t d, float eps, int variant);
bool vkg_layernorm_subgroup_supported(const vkg_context *ctx);

/* y = act(x) elementwise over n floats (any activation but NONE). */
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

/* y = scale * (x[0] + x[1] + ... + x[count-1]) over n floats each, summed left to right;
 * count 2..VKG_ADD_N_MAX. */
enum { VKG_ADD_N_MAX = 8 };
vkg_status vkg_add_n(vkg_cmd *cmd, const vkg_tref *x, uint32_t count, vkg_tref y, uint64_t n, float scale);

/* y (rows, h) = silu(x[:, :h]) * x[:, h:] for x (rows, 2h); silu(v) = v * sigmoid(v). */
vkg_status vkg_swiglu(vkg_cmd *cmd, vkg_tref x, vkg_tref y, uint32_t rows, uint32_t h);

/* y = softmax(x) over the last dim d, for `rows` rows. */
vkg_status vkg_softmax(vkg_cmd *cmd, vkg_tref x, vkg_tref y, uint32_t rows, uint32_t d);

#endif
