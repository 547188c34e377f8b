#version 450
#extension GL_GOOGLE_include_directive : require
// SwiGLU gate: y[r, j] = silu(x[r, j]) * x[r, h + j] for rows of width 2h (the FFN of DINOv2 ViT-g
// and of SwiGLU MoE experts, after the packed up-projection).
#include "common.glsl"

layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer Y { float y[]; };
layout(push_constant) uniform P { uint n, gx, h; } pc;

void main()
{
    uint i = VKG_FLAT_INDEX(pc.gx);
    if (i >= pc.n) return;
    uint r = i / pc.h, j = i - r * pc.h;
    float a = x[r * 2u * pc.h + j], b = x[r * 2u * pc.h + pc.h + j];
    y[i] = a / (1.0 + exp(-a)) * b;
}
