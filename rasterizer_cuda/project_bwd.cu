// Backward of the EWA projection: one thread per Gaussian, looping over the cameras (no atomics).
// Gradients reach means, quats and scales; culled (camera, Gaussian) pairs (radius 0) contribute nothing.
#include "common.h"
#include "ops.h"
#include "project_math.h"

namespace fit3d {

__global__ void project_bwd_kernel(ProjectArgs a) {
    const int g = int(blockIdx.x) * blockDim.x + threadIdx.x;
    if (g < a.N) project_bwd_one(a, g);
}

cudaError_t launch_project_bwd(const ProjectArgs& args, cudaStream_t stream) {
    if (args.N == 0) return cudaSuccess;
    // ~90 registers a thread: blocks of 128 fit 5 to an SM (20 warps), blocks of 256 only 2 (16 warps)
    const int threads = 128;
    project_bwd_kernel<<<ceil_div(args.N, threads), threads, 0, stream>>>(args);
    return cudaGetLastError();
}

}  // namespace fit3d
