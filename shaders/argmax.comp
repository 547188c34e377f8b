#version 450
#extension GL_GOOGLE_include_directive : require
// argmax over the middle dim of x (outer, k, inner) into i32 y (outer, inner): one invocation per
// output, k strided reads. Values are compared as order-preserving integers made from their bits:
// exact for denormals (a device may flush them in float compares) and with -0 == +0 (ties keep the
// lower index, as torch.argmax). The first NaN wins, as PyTorch treats NaN as the maximum.
#include "common.glsl"

layout(local_size_x_id = 0) in;

#ifdef VKG_DENSE_TEXEL
layout(binding = 0) uniform usamplerBuffer X;
#define LOAD(i) texelFetch(X, int(i)).x
#else
layout(std430, binding = 0) readonly buffer XB { uint xs[]; };
#define LOAD(i) xs[i]
#endif
layout(std430, binding = 1) writeonly buffer Y { int y[]; };

layout(push_constant) uniform P { uint n, gx, inner, k, x_off, y_off; } pc;

bool is_nan(uint b) { return (b & 0x7fffffffu) > 0x7f800000u; }

// Monotonic in the float value for every non-NaN; -0 and +0 map to the same key.
int key(uint b)
{
    if (b == 0x80000000u) b = 0u;
    int s = int(b);
    return s < 0 ? s ^ 0x7fffffff : s;
}

void main()
{
    uint i = VKG_FLAT_INDEX(pc.gx);
    if (i >= pc.n) return;
    uint o = i / pc.inner, j = i % pc.inner;
    uint base = pc.x_off + o * pc.k * pc.inner + j;
    uint b = LOAD(base);
    int best = key(b);
    uint bi = 0u;
    bool nan = is_nan(b);
    for (uint c = 1u; c < pc.k && !nan; c++) {
        b = LOAD(base + c * pc.inner);
        if (is_nan(b)) {
            nan = true;
            bi = c;
        } else if (key(b) > best) {
            best = key(b);
            bi = c;
        }
    }
    y[pc.y_off + i] = int(bi);
}
