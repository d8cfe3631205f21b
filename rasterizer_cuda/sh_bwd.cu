// Backward of the SH colour: one thread per Gaussian, looping over the cameras (no atomics).
// Gradients reach the SH coefficients and, through the view direction, the means.
#include "common.h"
#include "ops.h"
#include "sh_math.h"

namespace fit3d {

template <int DEG>
__global__ void sh_bwd_kernel(ShArgs a) {
    const int g = int(blockIdx.x) * blockDim.x + threadIdx.x;
    if (g < a.N) sh_bwd_one<DEG>(a, g);
}

cudaError_t launch_sh_bwd(const ShArgs& args, cudaStream_t stream) {
    if (args.N == 0) return cudaSuccess;
    const int threads = 128;
    with_sh_degree(args.degree, [&](auto deg) {
        sh_bwd_kernel<decltype(deg)::value><<<ceil_div(args.N, threads), threads, 0, stream>>>(args);
    });
    return cudaGetLastError();
}

}  // namespace fit3d
