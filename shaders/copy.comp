#version 450
#extension GL_GOOGLE_include_directive : require
// Strided copy of an up-to-8-d box: dst[dst_off + sum(i_d * ds_d)] = src[src_off + sum(i_d * ss_d)].
// One kernel for every layout move of the graph: patchify (im2col of a stride-p convolution), token
// insertion (cls, registers), slicing, and broadcasts (a stride of 0).
#include "common.glsl"

layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer S { float src[]; };
layout(std430, binding = 1) writeonly buffer D { float dst[]; };
layout(push_constant) uniform P {
    uint n, gx, rank, src_off, dst_off;
    uint shape[8];
    uint ss[8];
    uint ds[8];
} pc;

void main()
{
    uint i = VKG_FLAT_INDEX(pc.gx);
    if (i >= pc.n) return;
    uint rem = i, is = pc.src_off, id = pc.dst_off;
    for (int d = int(pc.rank) - 1; d >= 0; d--) {
        uint c = rem % pc.shape[d];
        rem /= pc.shape[d];
        is += c * pc.ss[d];
        id += c * pc.ds[d];
    }
    dst[id] = src[is];
}
