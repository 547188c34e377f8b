#version 450
#extension GL_GOOGLE_include_directive : require
// Elementwise activations (ReLU, erf-GELU, SiLU, tanh, sigmoid) over a flat tensor.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint OP = 0; // ACT_* code

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer Y { float y[]; };
layout(push_constant) uniform P { uint n; uint gx; } pc;

void main()
{
    uint i = VKG_FLAT_INDEX(pc.gx);
    if (i >= pc.n) return;
    y[i] = vkg_act(x[i], OP);
}
