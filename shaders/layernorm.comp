#version 450
#extension GL_GOOGLE_include_directive : require
// LayerNorm over the last dimension: one workgroup per row, biased variance, eps inside the sqrt
// (PyTorch's definition). Two passes over the row (mean, then centred variance) for accuracy;
// tree reductions in a fixed order, so results are bit-identical run to run.
#include "common.glsl"

layout(local_size_x_id = 0) in;

#ifdef VKG_LN_SUBGROUP
// Lavapipe variant: one subgroup of 8 lanes per row, no shared memory and no barriers (on llvmpipe
// a workgroup barrier switches between the subgroups' coroutines, and shared loads are per-lane
// loops). Reads go through texel views, 4 floats per fetch (VW = 4) or 1 (VKG_LN_SCALAR);
// subgroupAdd reduces in the same fixed order every run.
#extension GL_KHR_shader_subgroup_arithmetic : require
layout(binding = 0) uniform samplerBuffer X;
layout(binding = 1) uniform samplerBuffer G;
layout(binding = 2) uniform samplerBuffer Bt;
layout(std430, binding = 3) writeonly buffer Y { float y[]; };
layout(push_constant) uniform P { uint rows, d, gx, affine; float eps; } pc;
#ifdef VKG_LN_SCALAR
#define VW 1u
#define FETCH(t, i) vec4(texelFetch(t, int(i)).x, 0.0, 0.0, 0.0)
#else
#define VW 4u
#define FETCH(t, i) texelFetch(t, int(i))
#endif

void main()
{
    uint row = gl_WorkGroupID.y * pc.gx + gl_WorkGroupID.x;
    if (row >= pc.rows) return;
    uint lane = gl_LocalInvocationID.x, dv = pc.d / VW, base = row * dv;
    vec4 s = vec4(0.0);
    for (uint i = lane; i < dv; i += gl_WorkGroupSize.x) s += FETCH(X, base + i);
    float mean = subgroupAdd((s.x + s.y) + (s.z + s.w)) / float(pc.d);
    vec4 v = vec4(0.0);
    for (uint i = lane; i < dv; i += gl_WorkGroupSize.x) {
        vec4 c = FETCH(X, base + i) - mean;
#ifdef VKG_LN_SCALAR
        c.yzw = vec3(0.0);
#endif
        v += c * c;
    }
    float rstd = inversesqrt(subgroupAdd((v.x + v.y) + (v.z + v.w)) / float(pc.d) + pc.eps);
    for (uint i = lane; i < dv; i += gl_WorkGroupSize.x) {
        vec4 o = (FETCH(X, base + i) - mean) * rstd;
        if (pc.affine != 0u) o = o * FETCH(G, i) + FETCH(Bt, i);
        uint e = (base + i) * VW;
        y[e] = o.x;
#ifndef VKG_LN_SCALAR
        y[e + 1u] = o.y;
        y[e + 2u] = o.z;
        y[e + 3u] = o.w;
#endif
    }
}
#else
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
#endif
