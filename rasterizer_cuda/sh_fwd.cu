// View-dependent colour from spherical harmonics, one thread per (camera, Gaussian).
// Twin of fit3d_hf.render._reference._spherical_harmonics: SH along the unit direction from the camera
// centre to the mean, + 0.5, clamped at 0 (3DGS).
#include "common.h"
#include "ops.h"
#include "sh_math.h"

namespace fit3d {

template <int DEG>
__global__ void sh_fwd_kernel(ShArgs a) {
    const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (index < int64_t(a.B) * a.N) sh_fwd_one<DEG>(a, index);
}

cudaError_t launch_sh_fwd(const ShArgs& args, cudaStream_t stream) {
    const int64_t total = int64_t(args.B) * args.N;
    if (total == 0) return cudaSuccess;
    const int threads = 256;
    const unsigned blocks = unsigned((total + threads - 1) / threads);
    with_sh_degree(args.degree,
                   [&](auto deg) { sh_fwd_kernel<decltype(deg)::value><<<blocks, threads, 0, stream>>>(args); });
    return cudaGetLastError();
}

}  // namespace fit3d
