#version 450
// Shader read bandwidth: each invocation sums `per` vec4 loads spaced a grid apart (coalesced across
// invocations), through a storage buffer or a uniform texel buffer.
layout(local_size_x_id = 0) in;
#ifdef VKG_READ_TEXEL
layout(binding = 0) uniform samplerBuffer src;
#define LOAD(i) texelFetch(src, int(i))
#else
layout(std430, binding = 0) readonly buffer S { vec4 src[]; };
#define LOAD(i) src[i]
#endif
layout(std430, binding = 1) writeonly buffer Y { float y[]; };
// The host sizes the grid so that per * invocations covers the buffer exactly: no bounds check.
layout(push_constant) uniform P { uint per; } pc;

void main()
{
    uint g = gl_GlobalInvocationID.x, stride = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
    vec4 acc0 = vec4(0.0), acc1 = vec4(0.0);
    for (uint i = 0; i < pc.per; i += 2) {
        acc0 += LOAD(g + i * stride);
        acc1 += LOAD(g + (i + 1) * stride);
    }
    vec4 acc = acc0 + acc1;
    y[g] = acc.x + acc.y + acc.z + acc.w;
}
