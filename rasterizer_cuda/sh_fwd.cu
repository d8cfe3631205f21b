// View-dependent colour from spherical harmonics, one thread per (camera, Gaussian).
// Twin of fit3d_hf.render._reference._spherical_harmonics: SH along the unit direction from the camera
// centre to the mean, + 0.5, clamped at 0 (3DGS).
#include "common.h"
#include "ops.h"
#include "sh_math.h"

namespace fit3d {

// One (camera, Gaussian) pair; also callable on the host (the CPU tests run it there).
__host__ __device__ void sh_fwd_one(const ShArgs& a, int64_t index) {
    const int b = int(index / a.N);
    const int g = int(index % a.N);
    const ViewDirection d = view_direction(a.viewmats + b * 16, a.means + g * 3);
    float basis[16];
    sh_basis(a.degree, d.x, d.y, d.z, basis);
    const int n_basis = (a.degree + 1) * (a.degree + 1);
    const float* sh = a.sh + int64_t(g) * a.K * 3;
    for (int c = 0; c < 3; ++c) {
        float v = 0.f;
        for (int k = 0; k < n_basis; ++k) v += basis[k] * sh[k * 3 + c];
        a.colors[index * 3 + c] = fmaxf(v + 0.5f, 0.f);
    }
}

__global__ void sh_fwd_kernel(ShArgs a) {
    const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (index < int64_t(a.B) * a.N) sh_fwd_one(a, index);
}

cudaError_t launch_sh_fwd(const ShArgs& args, cudaStream_t stream) {
    const int64_t total = int64_t(args.B) * args.N;
    if (total == 0) return cudaSuccess;
    const int threads = 256;
    sh_fwd_kernel<<<unsigned((total + threads - 1) / threads), threads, 0, stream>>>(args);
    return cudaGetLastError();
}

}  // namespace fit3d
