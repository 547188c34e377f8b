#version 450
#extension GL_GOOGLE_include_directive : require
// y = scale * (x0 + x1 + ... + x_{count-1}) elementwise, summed left to right: one dispatch for a
// sum of several same-shaped tensors (a decoder's per-layer statistics) instead of a chain of adds.
// Bindings past count are bound to x0 by the host and never read.
#include "common.glsl"

layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer X0 { float x0[]; };
layout(std430, binding = 1) readonly buffer X1 { float x1[]; };
layout(std430, binding = 2) readonly buffer X2 { float x2[]; };
layout(std430, binding = 3) readonly buffer X3 { float x3[]; };
layout(std430, binding = 4) readonly buffer X4 { float x4[]; };
layout(std430, binding = 5) readonly buffer X5 { float x5[]; };
layout(std430, binding = 6) readonly buffer X6 { float x6[]; };
layout(std430, binding = 7) readonly buffer X7 { float x7[]; };
layout(std430, binding = 8) writeonly buffer Y { float y[]; };
layout(push_constant) uniform P {
    uint n, gx, count;
    float scale;
} pc;

void main()
{
    uint i = VKG_FLAT_INDEX(pc.gx);
    if (i >= pc.n) return;
    float s = x0[i] + x1[i];
    if (pc.count > 2u) s += x2[i];
    if (pc.count > 3u) s += x3[i];
    if (pc.count > 4u) s += x4[i];
    if (pc.count > 5u) s += x5[i];
    if (pc.count > 6u) s += x6[i];
    if (pc.count > 7u) s += x7[i];
    y[i] = s * pc.scale;
}
