#version 450
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
// The MoE-LoRA mixing step of the shared-base FFN, one workgroup (one subgroup of 8 on lavapipe)
// per token. For the token's slots j in ascending expert id (expert e, gate g):
//   h_j  = act(u + s * B1_e a1_e)            the expert's own pre-activation shift (rank r)
//   hbar = sum_j g_j h_j                      written once per token
//   a2_j = A2_e h_j                           reduced over H across the lanes (shared memory, lane order)
//   c    = residual + scale * ((sum g) b2 + s sum_j g_j B2_e a2_j)
// Nothing per (token, slot) pair is written to memory: on lavapipe stores cost more than the
// multiply-adds, and the expert LoRA matrices (E (H + H + D) r floats) stay in cache.
// Vectors of 4 run along r for B1/B2 and along H for u/A2/hbar; the host picks this kernel only
// when r, H and D are multiples of 4 (otherwise the grouped path of moe_matmul.comp runs).
#include "common.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint K = 2;  // slots per token
layout(constant_id = 2) const uint R = 8;  // LoRA rank

layout(push_constant) uniform P {
    uint T, H, E, D;
    uint flags; // bits 0-1 activation, bit2 bias, bit3 scale, bit4 residual
    float s;
    uint gx, pad;
} pc;

layout(binding = 0) uniform samplerBuffer U;   // (T, H/4)
layout(binding = 1) uniform samplerBuffer A1;  // (T, E*R/4)
layout(binding = 2) uniform samplerBuffer B1;  // (E, H, R/4)
layout(binding = 3) uniform samplerBuffer A2;  // (E, R, H/4)
layout(binding = 4) uniform samplerBuffer B2;  // (E, D, R/4)
layout(std430, binding = 5) readonly buffer Ids { int ids[]; };
layout(std430, binding = 6) readonly buffer G { float gates[]; };
layout(std430, binding = 7) readonly buffer Bias { vec4 bias[]; };   // (D/4)
layout(std430, binding = 8) readonly buffer Scale { vec4 scale[]; }; // (D/4)
layout(std430, binding = 9) readonly buffer Res { vec4 res[]; };     // (T, D/4)
layout(std430, binding = 10) writeonly buffer HB { vec4 hbar[]; };   // (T, H/4)
layout(std430, binding = 11) writeonly buffer C { vec4 cout[]; };    // (T, D/4)

const uint SG = 8u, R4 = R / 4u;
shared float part[SG * K * R];
shared float a2s[K * R];

void main()
{
    uint t = gl_WorkGroupID.y * pc.gx + gl_WorkGroupID.x;
    if (t >= pc.T) return;
    uint lane = gl_LocalInvocationID.x;
    uint H4 = pc.H / 4u, D4 = pc.D / 4u;

    // slots in ascending (expert id, slot); dropped ids (outside [0, E)) take no part
    int e[K];
    float g[K];
    uint n = 0u;
    float gsum = 0.0;
    for (uint j = 0u; j < K; j++) {
        int id = ids[t * K + j];
        if (id < 0 || id >= int(pc.E)) continue;
        float gj = gates[t * K + j];
        uint i = n++;
        while (i > 0u && e[i - 1u] > id) {
            e[i] = e[i - 1u];
            g[i] = g[i - 1u];
            i--;
        }
        e[i] = id;
        g[i] = gj;
    }
    for (uint j = 0u; j < n; j++) gsum += g[j];

    vec4 a1v[K * R4];
    [[unroll]] for (uint j = 0u; j < K; j++)
        [[unroll]] for (uint q = 0u; q < R4; q++)
            a1v[j * R4 + q] = j < n ? texelFetch(A1, int((t * pc.E + uint(e[j])) * R4 + q)) : vec4(0.0);
    float a2acc[K * R];
    [[unroll]] for (uint i = 0u; i < K * R; i++) a2acc[i] = 0.0;

    uint act = pc.flags & 3u;
    for (uint n4 = lane; n4 < H4; n4 += SG) {
        vec4 uq = texelFetch(U, int(t * H4 + n4));
        vec4 hb = vec4(0.0);
        [[unroll]] for (uint j = 0u; j < K; j++) {
            if (j >= n) break;
            uint eb = uint(e[j]);
            vec4 pre;
            [[unroll]] for (uint c = 0u; c < 4u; c++) {
                int row = int((eb * pc.H + n4 * 4u + c) * R4);
                float v = 0.0;
                [[unroll]] for (uint q = 0u; q < R4; q++) v += dot(a1v[j * R4 + q], texelFetch(B1, row + int(q)));
                pre[c] = v;
            }
            vec4 h = uq + pc.s * pre;
            h = vec4(vkg_act(h.x, act), vkg_act(h.y, act), vkg_act(h.z, act), vkg_act(h.w, act));
            hb += g[j] * h;
            [[unroll]] for (uint q = 0u; q < R; q++)
                a2acc[j * R + q] += dot(texelFetch(A2, int((eb * R + q) * H4 + n4)), h);
        }
        hbar[t * H4 + n4] = hb;
    }
    [[unroll]] for (uint i = 0u; i < K * R; i++) part[lane * K * R + i] = a2acc[i];
    barrier();
    for (uint i = lane; i < K * R; i += SG) {
        float v = 0.0;
        for (uint l = 0u; l < SG; l++) v += part[l * K * R + i];
        a2s[i] = v;
    }
    barrier();

    for (uint d4 = lane; d4 < D4; d4 += SG) {
        vec4 acc = vec4(0.0);
        for (uint j = 0u; j < n; j++) {
            uint eb = uint(e[j]);
            vec4 v;
            [[unroll]] for (uint c = 0u; c < 4u; c++) {
                int row = int((eb * pc.D + d4 * 4u + c) * R4);
                float x = 0.0;
                [[unroll]] for (uint q = 0u; q < R4; q++)
                    x += dot(texelFetch(B2, row + int(q)),
                             vec4(a2s[j * R + 4u * q], a2s[j * R + 4u * q + 1u], a2s[j * R + 4u * q + 2u],
                                  a2s[j * R + 4u * q + 3u]));
                v[c] = x;
            }
            acc += pc.s * g[j] * v;
        }
        if ((pc.flags & 4u) != 0u) acc += gsum * bias[d4];
        if ((pc.flags & 8u) != 0u) acc *= scale[d4];
        if ((pc.flags & 16u) != 0u) acc += res[t * D4 + d4];
        cout[t * D4 + d4] = acc;
    }
}
