#version 450
#extension GL_GOOGLE_include_directive : require
// Inference batch norm over dim 1: y = x * alpha[c] + beta[c] with ATen's per-channel terms
// alpha = (1 / sqrt(var + eps)) * weight, beta = bias - mean * alpha (fp32, `precise` so they round
// as written). One invocation handles RUN consecutive elements and recomputes the terms only when
// the channel changes. x and the four per-channel vectors are texel buffers (VKG_DENSE_TEXEL) or
// storage buffers.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint RUN = 4;

#ifdef VKG_DENSE_TEXEL
layout(binding = 0) uniform samplerBuffer X;
layout(binding = 1) uniform samplerBuffer M;
layout(binding = 2) uniform samplerBuffer V;
layout(binding = 3) uniform samplerBuffer W;
layout(binding = 4) uniform samplerBuffer B;
#define LOAD(t, i) texelFetch(t, int(i)).x
#else
layout(std430, binding = 0) readonly buffer XB { float X[]; };
layout(std430, binding = 1) readonly buffer MB { float M[]; };
layout(std430, binding = 2) readonly buffer VB { float V[]; };
layout(std430, binding = 3) readonly buffer WB { float W[]; };
layout(std430, binding = 4) readonly buffer BB { float B[]; };
#define LOAD(t, i) t[i]
#endif
layout(std430, binding = 5) writeonly buffer Y { float y[]; };

// n: elements in this dispatch; e0: the global index of its first element (for the channel);
// flags: bit 0 weight given, bit 1 bias given.
layout(push_constant) uniform P { uint n, gx, inner, channels, e0, x_off, y_off, flags; float eps; } pc;

void main()
{
    uint r = VKG_FLAT_INDEX(pc.gx);
    uint i0 = r * RUN;
    if (i0 >= pc.n) return;
    uint i1 = min(i0 + RUN, pc.n);
    uint prev = 0xffffffffu;
    float alpha = 0.0, beta = 0.0;
    for (uint i = i0; i < i1; i++) {
        uint c = ((pc.e0 + i) / pc.inner) % pc.channels;
        if (c != prev) {
            float w = (pc.flags & 1u) != 0u ? LOAD(W, c) : 1.0;
            float b = (pc.flags & 2u) != 0u ? LOAD(B, c) : 0.0;
            precise float invstd = 1.0 / sqrt(LOAD(V, c) + pc.eps);
            precise float a = invstd * w;
            precise float s = b - LOAD(M, c) * a;
            alpha = a;
            beta = s;
            prev = c;
        }
        precise float v = LOAD(X, pc.x_off + i) * alpha + beta;
        y[pc.y_off + i] = v;
    }
}
