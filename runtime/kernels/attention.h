/* Fused multi-head attention (shaders/attention.comp): softmax(q k^T * scale + mask + key_padding) v
 * per (batch, head), flash-attention style (online softmax, no score matrix in memory). */
#ifndef VKG_KERNEL_ATTENTION_H
#define VKG_KERNEL_ATTENTION_H

#include "kernels.h"

typedef struct vkg_attention_args {
    /* Row r of batch b of q is at q.offset + 4 * ((b * tq + r) * q_stride + q_col), and head h's
     * d values follow at + 4 * h * head_dim; likewise k and v with kv_stride, k_col, v_col. A packed
     * qkv tensor (N, T, 3*H*d) is q = k = v = the same buffer with stride 3*H*d and columns 0,
     * H*d, 2*H*d. Strides and columns are in floats; 0 stride means H*d (a plain tensor). */
    vkg_tref q, k, v;
    uint32_t q_stride, kv_stride;
    uint32_t q_col, k_col, v_col;
    vkg_tref mask;        /* optional (buf NULL): additive f32, (tq, tk), or (batch, tq, tk) if mask_batched */
    bool mask_batched;
    vkg_tref key_padding; /* optional: additive f32 (batch, tk) */
    vkg_tref out;         /* (batch, tq, heads * head_dim), heads concatenated */
    uint32_t batch, heads, tq, tk, head_dim;
    float scale;          /* 0 means 1/sqrt(head_dim) */
    vkg_mm_variant variant; /* AUTO: the device's preset; TILED: shared-memory K/V tiles; TEXEL: lavapipe */
} vkg_attention_args;

/* A row whose every score is -inf (or below -FLT_MAX/2) after mask and key_padding is written as 0.
 * head_dim 1..256; 32, 64 and 128 (and multiples of 4 on the texel variant) take the vec4 paths. */
vkg_status vkg_attention(vkg_cmd *cmd, const vkg_attention_args *a);
/* Whether the device can run the texel variant at all. */
bool vkg_attention_texel_supported(const vkg_context *ctx);
/* Which variant AUTO picks on this context. */
vkg_mm_variant vkg_attention_default_variant(const vkg_context *ctx);

/* The attention with its input projection in one dispatch (shaders/attention_proj.comp): q, or for a
 * packed self-attention q, k and v, are x W^T + bias for this call's x (batch, tq, in_features),
 * W (N, in_features) f32 or f16 with N = heads * head_dim (3x that packed), bias optional (N);
 * cross-attention reads k and v as column windows k_col, v_col of kv (batch, tk, kv_stride).
 * One workgroup per (batch, head) holds the head's q, k, v in shared memory. */
typedef struct vkg_attention_proj_args {
    vkg_tref x, w, bias, kv;
    vkg_dtype w_dtype;
    bool packed;
    uint32_t in_features, kv_stride, k_col, v_col;
    vkg_tref mask;
    bool mask_batched;
    vkg_tref key_padding;
    vkg_tref out;
    uint32_t batch, heads, tq, tk, head_dim;
    float scale; /* 0 means 1/sqrt(head_dim) */
} vkg_attention_proj_args;

/* Whether the fused kernel takes these sizes on this device: head_dim 1..128, the head's q, k, v
 * ((tq + 2 tk) x head_dim floats) within the device's shared memory and 32 KiB, in_features <= 65536. */
bool vkg_attention_proj_fits(const vkg_context *ctx, uint32_t tq, uint32_t tk, uint32_t head_dim, uint32_t in_features);
vkg_status vkg_attention_proj(vkg_cmd *cmd, const vkg_attention_proj_args *a);

#endif
