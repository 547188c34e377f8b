#version 450
#extension GL_GOOGLE_include_directive : require
// LayerNorm over the last dimension: one workgroup per row, biased variance, eps inside the sqrt
// (PyTorch's definition). Two passes over the row (mean, then centred variance) for accuracy;
// tree reductions in a fixed order, so results are bit-identical run to run.
#include "common.glsl"

layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer G { float gamma[]; };
layout(std430, binding = 2) readonly buffer Bt { float beta[]; };
layout(std430, binding = 3) writeonly buffer Y { float y[]; };
layout(push_constant) uniform P { uint rows, d, gx, affine; float eps; } pc;

shared float red[gl_WorkGroupSize.x];

float reduce_sum(float v)
{
    uint t = gl_LocalInvocationID.x;
    red[t] = v;
    barrier();
    for (uint s = gl_WorkGroupSize.x / 2; s > 0; s >>= 1) {
        if (t < s) red[t] += red[t + s];
        barrier();
    }
    float r = red[0];
    barrier();
    return r;
}

void main()
{
    uint row = gl_WorkGroupID.y * pc.gx + gl_WorkGroupID.x;
    if (row >= pc.rows) return; // uniform per workgroup: barriers stay in uniform control flow
    uint base = row * pc.d, t = gl_LocalInvocationID.x, wg = gl_WorkGroupSize.x;
    float s = 0.0;
    for (uint i = t; i < pc.d; i += wg) s += x[base + i];
    float mean = reduce_sum(s) / float(pc.d);
    float v = 0.0;
    for (uint i = t; i < pc.d; i += wg) {
        float c = x[base + i] - mean;
        v += c * c;
    }
    float rstd = inversesqrt(reduce_sum(v) / float(pc.d) + pc.eps);
    for (uint i = t; i < pc.d; i += wg) {
        float o = (x[base + i] - mean) * rstd;
        y[base + i] = pc.affine != 0u ? o * gamma[i] + beta[i] : o;
    }
}
