#version 450
#extension GL_GOOGLE_include_directive : require
// Softmax over the last dimension: one workgroup per row; max, then sum of exp(x - max), in fixed
// tree order (deterministic). Rows of length 0 produce nothing.
#include "common.glsl"

layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer Y { float y[]; };
layout(push_constant) uniform P { uint rows, d, gx; } pc;

shared float red[gl_WorkGroupSize.x];

void main()
{
    uint row = gl_WorkGroupID.y * pc.gx + gl_WorkGroupID.x;
    if (row >= pc.rows) return;
    uint base = row * pc.d, t = gl_LocalInvocationID.x, wg = gl_WorkGroupSize.x;

    float m = -3.402823466e38;
    for (uint i = t; i < pc.d; i += wg) m = max(m, x[base + i]);
    red[t] = m;
    barrier();
    for (uint s = wg / 2; s > 0; s >>= 1) {
        if (t < s) red[t] = max(red[t], red[t + s]);
        barrier();
    }
    m = red[0];
    barrier();

    float acc = 0.0;
    for (uint i = t; i < pc.d; i += wg) acc += exp(x[base + i] - m);
    red[t] = acc;
    barrier();
    for (uint s = wg / 2; s > 0; s >>= 1) {
        if (t < s) red[t] += red[t + s];
        barrier();
    }
    float inv = 1.0 / red[0];
    for (uint i = t; i < pc.d; i += wg) y[base + i] = exp(x[base + i] - m) * inv;
}
