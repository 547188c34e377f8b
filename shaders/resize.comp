#version 450
#extension GL_GOOGLE_include_directive : require
// Resampling of NCHW planes: bilinear (PyTorch's upsample_bilinear2d) or, with VKG_RESIZE_AREA, area
// pooling (adaptive_avg_pool2d). One invocation writes RUN consecutive outputs of one row, so the
// row's source coordinates and the (plane, row) decode are paid once per run; stores are the
// expensive part on lavapipe, and a run keeps them contiguous. The input is read through a texel
// buffer (VKG_DENSE_TEXEL) or a storage buffer.
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint RUN = 4;

#ifdef VKG_DENSE_TEXEL
layout(binding = 0) uniform samplerBuffer X;
#define LOAD(i) texelFetch(X, int(i)).x
#else
layout(std430, binding = 0) readonly buffer XB { float xs[]; };
#define LOAD(i) xs[i]
#endif
layout(std430, binding = 1) writeonly buffer Y { float y[]; };

// runs: runs per output row; n: runs in this dispatch; x_off, y_off: the chunk's first element in
// each binding. flags bit 0 / bit 1: the h / w axis uses src = ratio * o (align_corners, or the
// identity with ratio 1).
layout(push_constant) uniform P {
    uint n, gx, h, w, ho, wo, runs, x_off, y_off, flags;
    float ratio_h, ratio_w;
} pc;

#ifndef VKG_RESIZE_AREA
// Source index pair and the weight of the second one along an axis of n inputs. ATen (1.13, CPU)
// rounds the ratio to float but forms the source coordinate in double and the weight from it. Here
// the product ratio * t is kept exact as p + e (Dekker's two-product with Veltkamp's split: plain
// `precise` float operations, since fma() may be unfused on some drivers), so the weight is the
// exact fraction rounded once, as ATen's.
void split(float a, out float hi, out float lo)
{
    precise float c = 4097.0 * a;
    precise float h = c - (c - a);
    hi = h;
    lo = a - h;
}

void taps(uint o, float ratio, bool align, uint n, out uint i0, out uint i1, out float l1)
{
    float t = align ? float(o) : float(o) + 0.5;
    precise float p = ratio * t;
    float rh, rl, th, tl;
    split(ratio, rh, rl);
    split(t, th, tl);
    precise float e = (((rh * th - p) + rh * tl) + rl * th) + rl * tl;
    precise float q = align ? p : p - 0.5;   // exact: p < 2^23
    float f = floor(q);
    precise float l = (q - f) + e;
    if (l < 0.0) { f -= 1.0; l += 1.0; }     // q integral, the exact coordinate just below it
    if (!align && f < 0.0) { f = 0.0; l = 0.0; } // ATen clamps the coordinate at 0
    i0 = min(uint(f), n - 1u);
    l1 = clamp(l, 0.0, 1.0);
    i1 = i0 < n - 1u ? i0 + 1u : i0;
}
// (1 - l) a + l b as ATen evaluates it; l = 0 is an exact copy of a.
float lerp2(float a, float b, float l)
{
    precise float r = a * (1.0 - l) + b * l;
    return l == 0.0 ? a : r;
}
#endif

void main()
{
    uint i = VKG_FLAT_INDEX(pc.gx);
    if (i >= pc.n) return;
    uint row = i / pc.runs, ox0 = (i % pc.runs) * RUN;
    uint plane = row / pc.ho, oy = row % pc.ho;
    uint xb = pc.x_off + plane * pc.h * pc.w, yb = pc.y_off + row * pc.wo;
    uint ox1 = min(ox0 + RUN, pc.wo);
#ifdef VKG_RESIZE_AREA
    // Windows [floor(o n / m), ceil((o + 1) n / m)); the host keeps o n below 2^32.
    uint y0 = oy * pc.h / pc.ho, y1 = ((oy + 1u) * pc.h + pc.ho - 1u) / pc.ho;
    for (uint ox = ox0; ox < ox1; ox++) {
        uint x0 = ox * pc.w / pc.wo, x1 = ((ox + 1u) * pc.w + pc.wo - 1u) / pc.wo;
        precise float s = 0.0;
        for (uint iy = y0; iy < y1; iy++)
            for (uint ix = x0; ix < x1; ix++) s += LOAD(xb + iy * pc.w + ix);
        precise float m = s / float(y1 - y0) / float(x1 - x0);
        y[yb + ox] = m;
    }
#else
    uint r0, r1;
    float lh;
    taps(oy, pc.ratio_h, (pc.flags & 1u) != 0u, pc.h, r0, r1, lh);
    uint b0 = xb + r0 * pc.w, b1 = xb + r1 * pc.w;
    for (uint ox = ox0; ox < ox1; ox++) {
        uint c0, c1;
        float lw;
        taps(ox, pc.ratio_w, (pc.flags & 2u) != 0u, pc.w, c0, c1, lw);
        float t0 = lerp2(LOAD(b0 + c0), LOAD(b0 + c1), lw);
        float v = t0;
        if (lh != 0.0) v = lerp2(t0, lerp2(LOAD(b1 + c0), LOAD(b1 + c1), lw), lh);
        y[yb + ox] = v;
    }
#endif
}
