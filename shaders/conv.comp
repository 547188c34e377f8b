#version 450
#extension GL_GOOGLE_include_directive : require
// Conv2d and ConvTranspose2d on NCHW tensors as implicit GEMMs: rows = output pixels of one image,
// columns = output channels of one group, K = input channels x kernel taps; fp32 accumulation.
// runtime/kernels/conv.c picks the variant and records the dispatches.
//
//  VKG_CONV_TEXEL   lavapipe: the input is first repacked (VKG_CONV_PACK_X) into a zero-padded NHWC
//                   buffer with each group's channels padded to a multiple of 4, and the weights
//                   (VKG_CONV_PACK_W) into (channel, tap, 4-padded input channels) fp32 rows. Every
//                   (pixel, tap) row is then 4-float texels along K, read with no bounds checks, and
//                   the kernel is the texel matmul's register blocking (see its main()).
//                   A transposed conv becomes a plain conv on that packed buffer: k == s, p == 0 is a
//                   1x1 GEMM over the input pixels whose columns (co, a, b) scatter to the s x s
//                   output block (no overlap); any other transposed conv reads an input upsampled by
//                   the stride (zeros between rows) with flipped weights.
//  VKG_CONV_TILED   any device: storage buffers, shared-memory tiles, NCHW read directly (padding,
//                   and the transposed conv's stride holes, by bounds checks in the tile loader).
#include "common.glsl"

layout(local_size_x_id = 0) in;

#if defined(VKG_CONV_PACK_X)
// xp (N, Hp, Wp, G, Cq) vec4 = x (N, C, H, W) placed at (off + i * up) in the padded grid; zeros
// elsewhere and in the padding channels. Every element is written, so the arena needs no clearing.
layout(binding = 0) uniform samplerBuffer X; // R32F
layout(std430, binding = 1) writeonly buffer XP { vec4 xp[]; };
layout(push_constant) uniform P {
    uint total, gx;
    uint C, H, W, G, Cg, Cq, Hp, Wp;
    int offy, offx;
    uint upy, upx;
} pc;

void main()
{
    uint e = VKG_FLAT_INDEX(pc.gx);
    if (e >= pc.total) return;
    uint c4 = e % pc.Cq, r = e / pc.Cq;
    uint g = r % pc.G;
    r /= pc.G;
    uint px = r % pc.Wp;
    r /= pc.Wp;
    uint py = r % pc.Hp, n = r / pc.Hp;
    int sy = int(py) - pc.offy, sx = int(px) - pc.offx;
    vec4 v = vec4(0.0);
    if (sy >= 0 && sx >= 0 && uint(sy) % pc.upy == 0u && uint(sx) % pc.upx == 0u) {
        uint iy = uint(sy) / pc.upy, ix = uint(sx) / pc.upx;
        if (iy < pc.H && ix < pc.W) {
            uint c = c4 * 4u, hw = pc.H * pc.W;
            int base = int(((n * pc.C + g * pc.Cg + c) * pc.H + iy) * pc.W + ix);
            v.x = texelFetch(X, base).x;
            if (c + 1u < pc.Cg) v.y = texelFetch(X, base + int(hw)).x;
            if (c + 2u < pc.Cg) v.z = texelFetch(X, base + int(2u * hw)).x;
            if (c + 3u < pc.Cg) v.w = texelFetch(X, base + int(3u * hw)).x;
        }
    }
    xp[e] = v;
}
#endif

#if defined(VKG_CONV_PACK_W)
// wp (G * Og, T, Cq) vec4 in fp32 from the PyTorch weight, read through a texel view (strided reads
// are cheapest as texel fetches on lavapipe). mode 0 conv (O, Cg, kh, kw); mode 1
// transposed k == s (C, Ocg, kh, kw) as a 1x1 conv with Og = Ocg kh kw columns; mode 2 transposed,
// general: the same weight flipped in both taps, input and output channels swapped.
#extension GL_EXT_control_flow_attributes : require
layout(binding = 0) uniform samplerBuffer W; // R32F, or R16F for fp16 weights (the view decodes them)
layout(std430, binding = 1) writeonly buffer WP { vec4 wp[]; };
layout(push_constant) uniform P {
    uint total, gx, mode;
    uint T, Cq, Cg, Og, kh, kw;
} pc;

float loadw(uint e) { return texelFetch(W, int(e)).x; }

void main()
{
    uint e = VKG_FLAT_INDEX(pc.gx);
    if (e >= pc.total) return;
    uint c4 = e % pc.Cq, r = e / pc.Cq;
    uint t = r % pc.T, o = r / pc.T;
    uint g = o / pc.Og, ol = o % pc.Og;
    vec4 v = vec4(0.0);
    [[unroll]] for (uint i = 0u; i < 4u; i++) {
        uint c = c4 * 4u + i;
        if (c >= pc.Cg) continue;
        uint src;
        if (pc.mode == 0u) src = (o * pc.Cg + c) * pc.T + t;
        else if (pc.mode == 1u) src = (g * pc.Cg + c) * pc.Og + ol;
        else {
            uint ky = t / pc.kw, kx = t % pc.kw;
            src = ((g * pc.Cg + c) * pc.Og + ol) * pc.T + (pc.kh - 1u - ky) * pc.kw + (pc.kw - 1u - kx);
        }
        v[i] = loadw(src);
    }
    wp[e] = v;
}
#endif

#if defined(VKG_CONV_TEXEL) || defined(VKG_CONV_TILED)
layout(std430, binding = 2) readonly buffer Bias { float bias[]; };
layout(std430, binding = 3) writeonly buffer Yb { float y[]; };
layout(std430, binding = 4) readonly buffer Res { float res[]; };
#if defined(VKG_CONV_TEXEL)
// y and the residual again as vec4 (the same ranges, bound only when M % 4 == 0): on lavapipe a store
// costs about the same at any width, so whole vec4s of 4 pixels cut the epilogue's cost by 4.
layout(std430, binding = 5) writeonly buffer Y4 { vec4 y4[]; };
layout(std430, binding = 6) readonly buffer Res4 { vec4 res4[]; };
#endif

// flags: bit0 bias, bit1 relu, bit2 residual, bit3 scatter (transposed k == s: column n = (co, a, b)
// of GEMM pixel (i, j) lands at output (co, i ka + a, j kb + b)); bits 4-5 the tiled loader's mode;
// bit6 (texel) y and residual through their vec4 bindings.
#define F_BIAS 1u
#define F_RELU 2u
#define F_RES 4u
#define F_SCATTER 8u
#define F_VEC4 64u

#if defined(VKG_CONV_TEXEL)
layout(push_constant) uniform P {
    uint M, Wo, Og, G;          // GEMM pixels per image and the width of their grid; columns per group
    uint Hp, Wp, Cq;            // packed input (N, Hp, Wp, G, Cq) vec4
    uint sy, sx, dy, dx, kw, T; // stride, dilation, kernel width, taps
    uint flags, O, Hy, Wy, ka, kb;
} pc;
#else
layout(push_constant) uniform P {
    uint M, Wo, Og, G, K;       // GEMM: pixels per image, their grid width, columns per group, K per group
    uint C, H, W, Cg;           // input
    uint sy, sx, py, px, dy, dx, kh, kw;
    uint flags, O, Hy, Wy, ka, kb;
} pc;
#endif

// The epilogue: y = act(acc + bias) + residual, at GEMM pixel m and column n of group g.
void store(uint img, uint g, uint m, uint n, float v)
{
    uint o, idx;
    if ((pc.flags & F_SCATTER) != 0u) {
        uint kk = pc.ka * pc.kb, co = n / kk, r = n % kk, i = m / pc.Wo, j = m % pc.Wo;
        o = g * (pc.Og / kk) + co;
        idx = ((img * pc.O + o) * pc.Hy + i * pc.ka + r / pc.kb) * pc.Wy + j * pc.kb + r % pc.kb;
    } else {
        o = g * pc.Og + n;
        idx = (img * pc.O + o) * pc.M + m;
    }
    if ((pc.flags & F_BIAS) != 0u) v += bias[o];
    if ((pc.flags & F_RELU) != 0u) v = max(v, 0.0);
    if ((pc.flags & F_RES) != 0u) v += res[idx];
    y[idx] = v;
}

#if defined(VKG_CONV_TEXEL)
// store() for pixels m .. m + 3 of column n (plain layout, M % 4 == 0 and m % 4 == 0).
void store4(uint img, uint g, uint m, uint n, vec4 v)
{
    uint o = g * pc.Og + n, idx = ((img * pc.O + o) * pc.M + m) >> 2;
    if ((pc.flags & F_BIAS) != 0u) v += bias[o];
    if ((pc.flags & F_RELU) != 0u) v = max(v, vec4(0.0));
    if ((pc.flags & F_RES) != 0u) v += res4[idx];
    y4[idx] = v;
}
#endif
#endif

#if defined(VKG_CONV_TEXEL)
// As the texel matmul: llvmpipe runs the 8 lanes of a subgroup as the SIMD lanes of one thread and
// turns storage loads into per-lane loops, so both operands come through texel fetches and pixel
// rows are shared by subgroupBroadcast. A subgroup owns 8 TM pixels (each lane fetches TM of them)
// and 8 TN columns (each lane TN); every index into acc is a compile-time constant.
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_ballot : require
#extension GL_EXT_control_flow_attributes : require
layout(constant_id = 1) const uint TM = 2;
layout(constant_id = 2) const uint TN = 8;
layout(binding = 0) uniform samplerBuffer XP; // RGBA32F
layout(binding = 1) uniform samplerBuffer WP; // RGBA32F
const uint SG = 8u;

#define CV_BC4(i) { vec4 xs = subgroupBroadcast(xv[r], i); \
            [[unroll]] for (uint j = 0; j < TN; j++) { uint o = (r * SG + i) * TN + j; float a = acc[o]; \
                a = fma(xs.x, wv[j].x, a); a = fma(xs.y, wv[j].y, a); \
                a = fma(xs.z, wv[j].z, a); a = fma(xs.w, wv[j].w, a); acc[o] = a; } }
#define CV_BC_ALL CV_BC4(0) CV_BC4(1) CV_BC4(2) CV_BC4(3) CV_BC4(4) CV_BC4(5) CV_BC4(6) CV_BC4(7)

void main()
{
    uint lane = gl_LocalInvocationID.x;
    uint m0 = gl_WorkGroupID.x * (SG * TM), n0 = gl_WorkGroupID.y * (SG * TN);
    uint img = gl_WorkGroupID.z / pc.G, g = gl_WorkGroupID.z % pc.G;
    uint cs = pc.G * pc.Cq; // texels per packed pixel
    // Pixels and columns past the edge read the last valid one (clamped) and are never stored.
    int xr[TM], wr[TN];
    [[unroll]] for (uint r = 0; r < TM; r++) {
        uint p = min(m0 + r * SG + lane, pc.M - 1u), oy = p / pc.Wo, ox = p - oy * pc.Wo;
        xr[r] = int(((img * pc.Hp + oy * pc.sy) * pc.Wp + ox * pc.sx) * cs + g * pc.Cq);
    }
    [[unroll]] for (uint j = 0; j < TN; j++)
        wr[j] = int((g * pc.Og + min(n0 + j * SG + lane, pc.Og - 1u)) * pc.T * pc.Cq);

    float acc[TM * SG * TN];
    [[unroll]] for (uint i = 0; i < TM * SG * TN; i++) acc[i] = 0.0;
    uint ky = 0u, kx = 0u;
    for (uint t = 0u; t < pc.T; t++) {
        int xo = int((ky * pc.dy * pc.Wp + kx * pc.dx) * cs), wo = int(t * pc.Cq);
        for (int c = 0; c < int(pc.Cq); c++) {
            vec4 xv[TM], wv[TN];
            [[unroll]] for (uint r = 0; r < TM; r++) xv[r] = texelFetch(XP, xr[r] + xo + c);
            [[unroll]] for (uint j = 0; j < TN; j++) wv[j] = texelFetch(WP, wr[j] + wo + c);
            [[unroll]] for (uint r = 0; r < TM; r++) { CV_BC_ALL }
        }
        if (++kx == pc.kw) {
            kx = 0u;
            ky++;
        }
    }
    if ((pc.flags & F_VEC4) != 0u) {
        [[unroll]] for (uint j = 0; j < TN; j++) {
            uint n = n0 + j * SG + lane;
            if (n >= pc.Og) continue;
            [[unroll]] for (uint i = 0; i < TM * SG; i += 4u) {
                if (m0 + i >= pc.M) continue;
                store4(img, g, m0 + i, n, vec4(acc[i * TN + j], acc[(i + 1u) * TN + j], acc[(i + 2u) * TN + j],
                                               acc[(i + 3u) * TN + j]));
            }
        }
        return;
    }
    [[unroll]] for (uint j = 0; j < TN; j++) {
        uint n = n0 + j * SG + lane;
        if (n >= pc.Og) continue;
        [[unroll]] for (uint r = 0; r < TM; r++)
            [[unroll]] for (uint i = 0; i < SG; i++) {
                uint m = m0 + r * SG + i;
                if (m < pc.M) store(img, g, m, n, acc[(r * SG + i) * TN + j]);
            }
    }
}
#endif

#if defined(VKG_CONV_TILED)
// The tiled matmul with a loader that gathers the implicit im2col rows. Modes (flags bits 4-5):
// 0 conv: k = (ci, ky, kx), weight (O, Cg, kh, kw) rows; 1 transposed k == s: pixels are input
// pixels, k = ci, columns (co, a, b) of the (C, Ocg kh kw) weight, scattered by store(); 2 transposed,
// general: output (oy, ox) gathers input (oy + p - ky d) / s where that divides exactly.
layout(constant_id = 1) const uint BM = 64;
layout(constant_id = 2) const uint BN = 64;
layout(constant_id = 3) const uint BK = 16;
layout(constant_id = 4) const uint TM = 4;
layout(constant_id = 5) const uint TN = 4;
layout(constant_id = 6) const bool W_F16 = false;
layout(std430, binding = 0) readonly buffer Xb { float x[]; };
layout(std430, binding = 1) readonly buffer Wb { uint w[]; };

shared float As[BK * BM];
shared float Ws[BK * BN];

float loadw(uint e)
{
    if (W_F16) {
        vec2 h = unpackHalf2x16(w[e >> 1]);
        return (e & 1u) != 0u ? h.y : h.x;
    }
    return uintBitsToFloat(w[e]);
}

// Input coordinate along one axis for output o and tap k, or -1 where the tap reads padding.
int src_coord(uint mode, uint o, uint k, uint s, uint p, uint d, uint n)
{
    int v;
    if (mode == 0u) v = int(o * s + k * d) - int(p);
    else {
        int t = int(o + p) - int(k * d);
        if (t < 0 || uint(t) % s != 0u) return -1;
        v = int(uint(t) / s);
    }
    return v >= 0 && v < int(n) ? v : -1;
}

float load_x(uint mode, uint img, uint g, uint m, uint k)
{
    if (mode == 1u) return x[((img * pc.C + g * pc.Cg + k) * pc.H) * pc.W + m];
    uint khw = pc.kh * pc.kw, ci = k / khw, r = k % khw, oy = m / pc.Wo, ox = m % pc.Wo;
    int iy = src_coord(mode, oy, r / pc.kw, pc.sy, pc.py, pc.dy, pc.H);
    int ix = src_coord(mode, ox, r % pc.kw, pc.sx, pc.px, pc.dx, pc.W);
    if (iy < 0 || ix < 0) return 0.0;
    return x[((img * pc.C + g * pc.Cg + ci) * pc.H + uint(iy)) * pc.W + uint(ix)];
}

float load_w(uint mode, uint g, uint n, uint k)
{
    if (mode == 0u) return loadw((g * pc.Og + n) * pc.K + k);
    if (mode == 1u) return loadw((g * pc.Cg + k) * pc.Og + n);
    uint khw = pc.kh * pc.kw;
    return loadw(((g * pc.Cg + k / khw) * pc.Og + n) * khw + k % khw);
}

void main()
{
    const uint tn_count = BN / TN;
    uint t = gl_LocalInvocationID.x, mode = (pc.flags >> 4) & 3u;
    uint tn = t % tn_count, tm = t / tn_count;
    uint m0 = gl_WorkGroupID.x * BM, n0 = gl_WorkGroupID.y * BN;
    uint img = gl_WorkGroupID.z / pc.G, g = gl_WorkGroupID.z % pc.G;

    float acc[TM * TN];
    for (uint i = 0; i < TM * TN; i++) acc[i] = 0.0;

    for (uint k0 = 0; k0 < pc.K; k0 += BK) {
        for (uint e = t; e < BK * BM; e += gl_WorkGroupSize.x) {
            uint mm = e % BM, kk = e / BM, gm = m0 + mm, gk = k0 + kk;
            As[kk * BM + mm] = (gm < pc.M && gk < pc.K) ? load_x(mode, img, g, gm, gk) : 0.0;
        }
        for (uint e = t; e < BK * BN; e += gl_WorkGroupSize.x) {
            uint nn = e / BK, kk = e % BK, gn = n0 + nn, gk = k0 + kk;
            Ws[kk * BN + nn] = (gn < pc.Og && gk < pc.K) ? load_w(mode, g, gn, gk) : 0.0;
        }
        barrier();
        for (uint kk = 0; kk < BK; kk++) {
            float a[TM], b[TN];
            for (uint i = 0; i < TM; i++) a[i] = As[kk * BM + tm + i * (BM / TM)];
            for (uint j = 0; j < TN; j++) b[j] = Ws[kk * BN + tn + j * tn_count];
            for (uint i = 0; i < TM; i++)
                for (uint j = 0; j < TN; j++) acc[i * TN + j] = fma(a[i], b[j], acc[i * TN + j]);
        }
        barrier();
    }
    for (uint i = 0; i < TM; i++) {
        uint gm = m0 + tm + i * (BM / TM);
        if (gm >= pc.M) continue;
        for (uint j = 0; j < TN; j++) {
            uint gn = n0 + tn + j * tn_count;
            if (gn < pc.Og) store(img, g, gm, gn, acc[i * TN + j]);
        }
    }
}
#endif
