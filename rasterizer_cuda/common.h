// Small vector/matrix and device helpers shared by the rasterizer kernels. Plain CUDA C++, no torch.
#pragma once

#include <cstdint>

#include "constants.h"
#include "host_device.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fit3d's CUDA rasterizer needs compute capability 8.0 or newer (warp reductions, TF32 tensor cores)"
#endif

namespace fit3d {

// ---- small vector / matrix helpers -------------------------------------------------------------------
struct Mat3 {
    float m[3][3];
};

__host__ __device__ inline Mat3 mat3_mul(const Mat3& a, const Mat3& b) {
    Mat3 r;
#pragma unroll
    for (int i = 0; i < 3; ++i)
#pragma unroll
        for (int j = 0; j < 3; ++j) r.m[i][j] = a.m[i][0] * b.m[0][j] + a.m[i][1] * b.m[1][j] + a.m[i][2] * b.m[2][j];
    return r;
}

__host__ __device__ inline Mat3 mat3_transpose(const Mat3& a) {
    Mat3 r;
#pragma unroll
    for (int i = 0; i < 3; ++i)
#pragma unroll
        for (int j = 0; j < 3; ++j) r.m[i][j] = a.m[j][i];
    return r;
}

// Rotation matrix of a unit quaternion (w, x, y, z).
__host__ __device__ inline Mat3 quat_to_rotmat(float w, float x, float y, float z) {
    Mat3 r;
    r.m[0][0] = 1.f - 2.f * (y * y + z * z);
    r.m[0][1] = 2.f * (x * y - w * z);
    r.m[0][2] = 2.f * (x * z + w * y);
    r.m[1][0] = 2.f * (x * y + w * z);
    r.m[1][1] = 1.f - 2.f * (x * x + z * z);
    r.m[1][2] = 2.f * (y * z - w * x);
    r.m[2][0] = 2.f * (x * z - w * y);
    r.m[2][1] = 2.f * (y * z + w * x);
    r.m[2][2] = 1.f - 2.f * (x * x + y * y);
    return r;
}

// A projected Gaussian as the rasterizer sees it: 2D mean, opacity, conic (a, b, c) of [[a, b], [b, c]], and
// sigma_cut: beyond this Mahalanobis term its alpha is surely below 1/255 (see splat_alpha).
struct Splat {
    float x, y, opacity, a, b, c, sigma_cut;
};

// Inclusive pixel ranges (clipped to the image) that a Gaussian can reach with alpha >= 1/255; false
// when empty. alpha >= 1/255 needs d^T conic d <= 2 ln(255 o), over which |dx| <= sqrt(2 ln(255 o) cov_xx).
__host__ __device__ inline bool pixel_box(float mx, float my, float a, float b, float c, float opacity, int width,
                                          int height, int& col0, int& col1, int& row0, int& row1) {
    if (!(opacity >= ALPHA_THRESHOLD)) return false;
    const float det = fmaxf(a * c - b * b, 1e-30f);
    const float level = 2.f * logf(fmaxf(opacity / ALPHA_THRESHOLD, 1.f));
    const float rx = sqrtf(level * c / det);
    const float ry = sqrtf(level * a / det);
    // clip in float before converting, so far-off-screen means cannot overflow an int
    const float c0 = fmaxf(ceilf(mx - rx - 0.5f), 0.f);
    const float c1 = fminf(floorf(mx + rx - 0.5f), float(width - 1));
    const float r0 = fmaxf(ceilf(my - ry - 0.5f), 0.f);
    const float r1 = fminf(floorf(my + ry - 0.5f), float(height - 1));
    if (!(c0 <= c1) || !(r0 <= r1)) return false;  // also false for NaN
    col0 = int(c0);
    col1 = int(c1);
    row0 = int(r0);
    row1 = int(r1);
    return true;
}

#ifdef __CUDACC__
__device__ inline float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}
#endif

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- spherical harmonics (real basis, degrees 0-3, the 3DGS ordering) --------------------------------
// Basis values at the unit direction (x, y, z); entries beyond (degree + 1)^2 are left untouched.
__host__ __device__ inline void sh_basis(int degree, float x, float y, float z, float* out) {
    out[0] = SH_C0;
    if (degree < 1) return;
    const float c1 = 0.4886025119029199f;
    out[1] = -c1 * y;
    out[2] = c1 * z;
    out[3] = -c1 * x;
    if (degree < 2) return;
    const float xx = x * x, yy = y * y, zz = z * z;
    out[4] = 1.0925484305920792f * x * y;
    out[5] = -1.0925484305920792f * y * z;
    out[6] = 0.31539156525252005f * (2.f * zz - xx - yy);
    out[7] = -1.0925484305920792f * x * z;
    out[8] = 0.5462742152960396f * (xx - yy);
    if (degree < 3) return;
    out[9] = -0.5900435899266435f * y * (3.f * xx - yy);
    out[10] = 2.890611442640554f * x * y * z;
    out[11] = -0.4570457994644658f * y * (4.f * zz - xx - yy);
    out[12] = 0.3731763325901154f * z * (2.f * zz - 3.f * xx - 3.f * yy);
    out[13] = -0.4570457994644658f * x * (4.f * zz - xx - yy);
    out[14] = 1.445305721320277f * z * (xx - yy);
    out[15] = -0.5900435899266435f * x * (xx - 3.f * yy);
}

// Gradient w.r.t. the (unnormalised-as-independent) direction (x, y, z) of sum_k coef[k] * basis_k.
__host__ __device__ inline void sh_basis_grad(int degree, float x, float y, float z, const float* coef, float& gx,
                                              float& gy, float& gz) {
    gx = gy = gz = 0.f;
    if (degree < 1) return;
    const float c1 = 0.4886025119029199f;
    gy += -c1 * coef[1];
    gz += c1 * coef[2];
    gx += -c1 * coef[3];
    if (degree < 2) return;
    const float xx = x * x, yy = y * y, zz = z * z;
    float k = 1.0925484305920792f * coef[4];
    gx += k * y;
    gy += k * x;
    k = -1.0925484305920792f * coef[5];
    gy += k * z;
    gz += k * y;
    k = 0.31539156525252005f * coef[6];
    gx += -2.f * k * x;
    gy += -2.f * k * y;
    gz += 4.f * k * z;
    k = -1.0925484305920792f * coef[7];
    gx += k * z;
    gz += k * x;
    k = 0.5462742152960396f * coef[8];
    gx += 2.f * k * x;
    gy += -2.f * k * y;
    if (degree < 3) return;
    k = -0.5900435899266435f * coef[9];
    gx += k * 6.f * x * y;
    gy += k * (3.f * xx - 3.f * yy);
    k = 2.890611442640554f * coef[10];
    gx += k * y * z;
    gy += k * x * z;
    gz += k * x * y;
    k = -0.4570457994644658f * coef[11];
    gx += k * -2.f * x * y;
    gy += k * (4.f * zz - xx - 3.f * yy);
    gz += k * 8.f * y * z;
    k = 0.3731763325901154f * coef[12];
    gx += k * -6.f * x * z;
    gy += k * -6.f * y * z;
    gz += k * (6.f * zz - 3.f * xx - 3.f * yy);
    k = -0.4570457994644658f * coef[13];
    gx += k * (4.f * zz - 3.f * xx - yy);
    gy += k * -2.f * x * y;
    gz += k * 8.f * x * z;
    k = 1.445305721320277f * coef[14];
    gx += k * 2.f * x * z;
    gy += k * -2.f * y * z;
    gz += k * (xx - yy);
    k = -0.5900435899266435f * coef[15];
    gx += k * (3.f * xx - 3.f * yy);
    gy += k * -6.f * x * y;
}

}  // namespace fit3d
