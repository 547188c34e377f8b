#version 450
// fp32 FMA throughput: 8 independent vec4 chains per invocation, registers only. Every invocation
// writes its sum so the compiler cannot drop the work.
layout(local_size_x_id = 0) in;
layout(std430, binding = 0) writeonly buffer Y { float y[]; };
layout(push_constant) uniform P { uint iters; float seed; } pc;

void main()
{
    vec4 a = vec4(pc.seed) + vec4(gl_LocalInvocationID.x) * 1e-7;
    vec4 m = vec4(0.9999), c = vec4(1e-6);
    vec4 r0 = a, r1 = a + 1.0, r2 = a + 2.0, r3 = a + 3.0, r4 = a + 4.0, r5 = a + 5.0, r6 = a + 6.0, r7 = a + 7.0;
    for (uint i = 0; i < pc.iters; i++) {
        r0 = fma(r0, m, c); r1 = fma(r1, m, c); r2 = fma(r2, m, c); r3 = fma(r3, m, c);
        r4 = fma(r4, m, c); r5 = fma(r5, m, c); r6 = fma(r6, m, c); r7 = fma(r7, m, c);
    }
    vec4 s = r0 + r1 + r2 + r3 + r4 + r5 + r6 + r7;
    y[gl_GlobalInvocationID.x] = s.x + s.y + s.z + s.w;
}
