// Shared helpers for every vkg kernel. Included, never compiled alone.

// erf with a rational approximation on [-4, 4] (erf is +-1 to fp32 precision beyond); max abs
// error ~2e-7, so GELU matches PyTorch's fp32 erf-GELU to within fp32 rounding noise. GLSL has no
// erf, and the tanh form of GELU differs by up to 4.7e-4: not acceptable for these models.
float vkg_erf(float x)
{
    float xc = clamp(x, -4.0, 4.0);
    float x2 = xc * xc;
    float p = -2.72614225801306e-10;
    p = p * x2 + 2.77068142495902e-08;
    p = p * x2 - 2.10102402082508e-06;
    p = p * x2 - 5.69250639462346e-05;
    p = p * x2 - 7.34990630326855e-04;
    p = p * x2 - 2.95459980854025e-03;
    p = p * x2 - 1.60960333262415e-02;
    p = p * xc;
    float q = -1.45660718464996e-05;
    q = q * x2 - 2.13374055278905e-04;
    q = q * x2 - 1.68282697438203e-03;
    q = q * x2 - 7.37332916720468e-03;
    q = q * x2 - 1.42647390514189e-02;
    return clamp(p / q, -1.0, 1.0);
}

float vkg_gelu(float x) { return 0.5 * x * (1.0 + vkg_erf(x * 0.70710678118654752)); }

// Activation codes shared by the host (runtime/kernels/kernels.h, VKG_ACT_*).
#define ACT_NONE 0u
#define ACT_RELU 1u
#define ACT_GELU 2u
#define ACT_SILU 3u
#define ACT_TANH 4u    // elementwise ops only (the matmul epilogue encodes codes 0-3)
#define ACT_SIGMOID 5u

float vkg_act(float v, uint act)
{
    if (act == ACT_RELU) return max(v, 0.0);
    if (act == ACT_GELU) return vkg_gelu(v);
    if (act == ACT_SILU) return v / (1.0 + exp(-v));
    // tanh through exp of a non-positive argument: GLSL's tanh may overflow to NaN for |v| > ~44
    if (act == ACT_TANH) { float e = exp(-2.0 * abs(v)); return sign(v) * (1.0 - e) / (1.0 + e); }
    if (act == ACT_SIGMOID) { float e = exp(-abs(v)); return v >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e); }
    return v;
}

// Flat invocation index over a 2D grid of 1D workgroups (the grid is split in y past 65535 groups).
#define VKG_FLAT_INDEX(gx) ((gl_WorkGroupID.y * (gx) + gl_WorkGroupID.x) * gl_WorkGroupSize.x + gl_LocalInvocationID.x)
