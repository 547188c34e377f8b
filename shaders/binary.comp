#version 450
#extension GL_GOOGLE_include_directive : require
// Elementwise add / multiply with NumPy broadcasting. The host collapses dimensions and passes
// per-operand strides, 0 along broadcast dimensions.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint OP = 0; // 0 add, 1 mul

layout(std430, binding = 0) readonly buffer A { float a[]; };
layout(std430, binding = 1) readonly buffer B { float b[]; };
layout(std430, binding = 2) writeonly buffer Y { float y[]; };
layout(push_constant) uniform P {
    uint n, gx, rank, pad;
    uint shape[8];
    uint sa[8];
    uint sb[8];
} pc;

void main()
{
    uint i = VKG_FLAT_INDEX(pc.gx);
    if (i >= pc.n) return;
    uint rem = i, ia = 0, ib = 0;
    for (int d = int(pc.rank) - 1; d >= 0; d--) {
        uint c = rem % pc.shape[d];
        rem /= pc.shape[d];
        ia += c * pc.sa[d];
        ib += c * pc.sb[d];
    }
    y[i] = OP == 0u ? a[ia] + b[ib] : a[ia] * b[ib];
}
