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
    const float* sh = a.sh + int64_t(g) * a.K * 3;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
        float v = 0.f;
#pragma unroll
        for (int k = 0; k < n_basis; ++k) v += basis[k] * sh[k * 3 + c];
        a.colors[index * 3 + c] = fmaxf(v + 0.5f, 0.f);
    }
}

// Backward of the colours of Gaussian `g`, over all cameras (no atomics). Its coefficients are read from `sh_g`
// and their gradients written to `v_sh_g` (both `[K, 3]`, coefficient k, channel c at k * 3 + c, K = a.K;
// gradients are zero past the degree's basis): global memory on the CPU, a shared-memory staging area on the GPU.
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
    for (int k = n_basis; k < a.K; ++k)
        for (int c = 0; c < 3; ++c) v_sh_g[k * 3 + c] = 0.f;
    for (int c = 0; c < 3; ++c) a.v_means[g * 3 + c] = v_mean[c];
}

// The backward of one Gaussian, straight from and to the `[N, K, 3]` tensors (the CPU extension's loop).
template <int DEG>
__host__ __device__ inline void sh_bwd_one(const ShArgs& a, int g) {
    sh_bwd_core<DEG>(a, g, a.sh + int64_t(g) * a.K * 3, a.v_sh + int64_t(g) * a.K * 3);
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
