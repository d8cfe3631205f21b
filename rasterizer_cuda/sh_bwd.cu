// Backward of the SH colour: one thread per Gaussian, looping over the cameras (no atomics).
// Gradients reach the SH coefficients and, through the view direction, the means.
#include "common.h"
#include "ops.h"
#include "sh_math.h"

namespace fit3d {

// One Gaussian; also callable on the host (the CPU tests run it there).
__host__ __device__ void sh_bwd_one(const ShArgs& a, int g) {
    const int n_basis = (a.degree + 1) * (a.degree + 1);
    const float* sh = a.sh + int64_t(g) * a.K * 3;
    float v_sh[16][3] = {};
    float v_mean[3] = {0.f, 0.f, 0.f};
    for (int b = 0; b < a.B; ++b) {
        const int64_t index = int64_t(b) * a.N + g;
        const ViewDirection d = view_direction(a.viewmats + b * 16, a.means + g * 3);
        float basis[16];
        sh_basis(a.degree, d.x, d.y, d.z, basis);
        float v_rgb[3];
        for (int c = 0; c < 3; ++c) {
            float v = 0.f;
            for (int k = 0; k < n_basis; ++k) v += basis[k] * sh[k * 3 + c];
            // clamp_min(v + 0.5, 0) passes the gradient where v + 0.5 >= 0
            v_rgb[c] = (v + 0.5f >= 0.f) ? a.v_colors[index * 3 + c] : 0.f;
        }
        float coef[16];
        for (int k = 0; k < n_basis; ++k) {
            coef[k] = sh[k * 3 + 0] * v_rgb[0] + sh[k * 3 + 1] * v_rgb[1] + sh[k * 3 + 2] * v_rgb[2];
            for (int c = 0; c < 3; ++c) v_sh[k][c] += basis[k] * v_rgb[c];
        }
        float gx, gy, gz;
        sh_basis_grad(a.degree, d.x, d.y, d.z, coef, gx, gy, gz);
        // d = v / |v|: dL/dv = (g - d (d . g)) / |v|
        const float dot = d.x * gx + d.y * gy + d.z * gz;
        v_mean[0] += (gx - d.x * dot) * d.inv_norm;
        v_mean[1] += (gy - d.y * dot) * d.inv_norm;
        v_mean[2] += (gz - d.z * dot) * d.inv_norm;
    }
    float* out = a.v_sh + int64_t(g) * a.K * 3;
    for (int k = 0; k < a.K; ++k)
        for (int c = 0; c < 3; ++c) out[k * 3 + c] = k < n_basis ? v_sh[k][c] : 0.f;
    for (int c = 0; c < 3; ++c) a.v_means[g * 3 + c] = v_mean[c];
}

__global__ void sh_bwd_kernel(ShArgs a) {
    const int g = int(blockIdx.x) * blockDim.x + threadIdx.x;
    if (g < a.N) sh_bwd_one(a, g);
}

cudaError_t launch_sh_bwd(const ShArgs& args, cudaStream_t stream) {
    if (args.N == 0) return cudaSuccess;
    const int threads = 128;
    sh_bwd_kernel<<<ceil_div(args.N, threads), threads, 0, stream>>>(args);
    return cudaGetLastError();
}

}  // namespace fit3d
