// The SH colour along the view direction and its backward, shared by sh_fwd.cu, sh_bwd.cu and the CPU
// extension (cpu/project_cpu.cpp).
#pragma once

#include <type_traits>

#include "common.h"
#include "ops.h"

namespace fit3d {

struct ViewDirection {
    float x, y, z;   // unit vector from the camera centre to the mean
    float inv_norm;  // 1 / max(|mean - centre|, 1e-12)
};

__host__ __device__ inline ViewDirection view_direction(const float* viewmat, const float* mean) {
    // camera centre = -R^T t
    float centre[3];
    for (int k = 0; k < 3; ++k)
        centre[k] =
            -(viewmat[0 * 4 + k] * viewmat[3] + viewmat[1 * 4 + k] * viewmat[7] + viewmat[2 * 4 + k] * viewmat[11]);
    const float dx = mean[0] - centre[0], dy = mean[1] - centre[1], dz = mean[2] - centre[2];
    ViewDirection d;
    d.inv_norm = 1.f / fmaxf(sqrtf(dx * dx + dy * dy + dz * dz), 1e-12f);
    d.x = dx * d.inv_norm;
    d.y = dy * d.inv_norm;
    d.z = dz * d.inv_norm;
    return d;
}

// The coefficients' layout (see ShArgs): one [N, K, 3] tensor at `dc` (split false), or the DC terms [N, 1, 3] at
// `dc` and the K - 1 others [N, K - 1, 3] at `rest` (split true); the gradients, at `v_dc` and `v_rest`, alike.
inline void set_sh_layout(ShArgs& a, bool split, int K, const float* dc, const float* rest) {
    a.K = K;
    a.sh_dc = dc;
    a.sh_rest = split ? rest : dc + 3;
    a.dc_stride = split ? 3 : int64_t(K) * 3;
    a.rest_stride = split ? int64_t(K - 1) * 3 : int64_t(K) * 3;
}
inline void set_sh_gradient_layout(ShArgs& a, bool split, float* v_dc, float* v_rest) {
    a.v_dc = v_dc;
    a.v_rest = split ? v_rest : v_dc + 3;
}

// Coefficient k (3 floats, one per channel) of Gaussian g, and where its gradient goes (see ShArgs).
__host__ __device__ inline int64_t sh_offset(const ShArgs& a, int g, int k) {
    return k == 0 ? int64_t(g) * a.dc_stride : int64_t(g) * a.rest_stride + (k - 1) * 3;
}
__host__ __device__ inline const float* sh_coefficient(const ShArgs& a, int g, int k) {
    return (k == 0 ? a.sh_dc : a.sh_rest) + sh_offset(a, g, k);
}
__host__ __device__ inline float* sh_gradient(const ShArgs& a, int g, int k) {
    return (k == 0 ? a.v_dc : a.v_rest) + sh_offset(a, g, k);
}

// Colour of one (camera, Gaussian) pair (`index` = camera * N + Gaussian). The SH degree is a template
// argument so that the basis and the coefficient loops unroll into registers: with a run-time degree the
// arrays below lived in local memory and the backward kernel took 1.26 ms for 1M Gaussians on an H100.
template <int DEG>
__host__ __device__ inline void sh_fwd_one(const ShArgs& a, int64_t index) {
    constexpr int n_basis = (DEG + 1) * (DEG + 1);
    const int b = int(index / a.N);
    const int g = int(index % a.N);
    const ViewDirection d = view_direction(a.viewmats + b * 16, a.means + g * 3);
    float basis[16];
    sh_basis(DEG, d.x, d.y, d.z, basis);
    float v[3] = {0.f, 0.f, 0.f};
#pragma unroll
    for (int k = 0; k < n_basis; ++k) {
        const float* sh = sh_coefficient(a, g, k);
#pragma unroll
        for (int c = 0; c < 3; ++c) v[c] += basis[k] * sh[c];
    }
#pragma unroll
    for (int c = 0; c < 3; ++c) a.colors[index * 3 + c] = fmaxf(v[c] + 0.5f, 0.f);
}

// Backward of the colours of Gaussian `g`, over all cameras (no atomics). Its coefficients are read from `sh_g`
// and the gradients of the degree's (DEG + 1)^2 coefficients written to `v_sh_g` (coefficient k, channel c at
// k * 3 + c; those of any further coefficients are zero, written by the callers): local copies on the CPU, a
// shared-memory staging area on the GPU.
template <int DEG>
__host__ __device__ inline void sh_bwd_core(const ShArgs& a, int g, const float* sh_g, float* v_sh_g) {
    constexpr int n_basis = (DEG + 1) * (DEG + 1);
    float coeffs[n_basis][3];
#pragma unroll
    for (int k = 0; k < n_basis; ++k)
#pragma unroll
        for (int c = 0; c < 3; ++c) coeffs[k][c] = sh_g[k * 3 + c];
    float v_sh[n_basis][3] = {};
    float v_mean[3] = {0.f, 0.f, 0.f};
    for (int b = 0; b < a.B; ++b) {
        const int64_t index = int64_t(b) * a.N + g;
        const ViewDirection d = view_direction(a.viewmats + b * 16, a.means + g * 3);
        float basis[16];
        sh_basis(DEG, d.x, d.y, d.z, basis);
        float v_rgb[3];
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            float v = 0.f;
#pragma unroll
            for (int k = 0; k < n_basis; ++k) v += basis[k] * coeffs[k][c];
            // clamp_min(v + 0.5, 0) passes the gradient where v + 0.5 >= 0
            v_rgb[c] = (v + 0.5f >= 0.f) ? a.v_colors[index * 3 + c] : 0.f;
        }
        float coef[16];
#pragma unroll
        for (int k = 0; k < n_basis; ++k) {
            coef[k] = coeffs[k][0] * v_rgb[0] + coeffs[k][1] * v_rgb[1] + coeffs[k][2] * v_rgb[2];
#pragma unroll
            for (int c = 0; c < 3; ++c) v_sh[k][c] += basis[k] * v_rgb[c];
        }
        float gx, gy, gz;
        sh_basis_grad(DEG, d.x, d.y, d.z, coef, gx, gy, gz);
        // d = v / |v|: dL/dv = (g - d (d . g)) / |v|
        const float dot = d.x * gx + d.y * gy + d.z * gz;
        v_mean[0] += (gx - d.x * dot) * d.inv_norm;
        v_mean[1] += (gy - d.y * dot) * d.inv_norm;
        v_mean[2] += (gz - d.z * dot) * d.inv_norm;
    }
#pragma unroll
    for (int k = 0; k < n_basis; ++k)
#pragma unroll
        for (int c = 0; c < 3; ++c) v_sh_g[k * 3 + c] = v_sh[k][c];
    for (int c = 0; c < 3; ++c) a.v_means[g * 3 + c] = v_mean[c];
}

// The backward of one Gaussian through local copies of its coefficients (the CPU extension's loop).
template <int DEG>
__host__ __device__ inline void sh_bwd_one(const ShArgs& a, int g) {
    constexpr int n_basis = (DEG + 1) * (DEG + 1);
    float sh_g[n_basis * 3], v_sh_g[n_basis * 3];
    for (int k = 0; k < n_basis; ++k)
        for (int c = 0; c < 3; ++c) sh_g[k * 3 + c] = sh_coefficient(a, g, k)[c];
    sh_bwd_core<DEG>(a, g, sh_g, v_sh_g);
    for (int k = 0; k < a.K; ++k)
        for (int c = 0; c < 3; ++c) sh_gradient(a, g, k)[c] = k < n_basis ? v_sh_g[k * 3 + c] : 0.f;
}

// Calls `body(std::integral_constant<int, degree>{})` for an SH degree of 0..3 (checked by ext.cpp): the
// launches pick the kernel compiled for the degree.
template <typename Body>
inline void with_sh_degree(int degree, Body&& body) {
    switch (degree) {
        case 0:
            body(std::integral_constant<int, 0>{});
            break;
        case 1:
            body(std::integral_constant<int, 1>{});
            break;
        case 2:
            body(std::integral_constant<int, 2>{});
            break;
        default:
            body(std::integral_constant<int, 3>{});
            break;
    }
}

}  // namespace fit3d
