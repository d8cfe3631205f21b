// EWA projection of 3D Gaussians, one thread per (camera, Gaussian).
// Twin of fit3d_hf.render._reference._project (same expressions, in the same order).
#include "common.h"
#include "ops.h"
#include "project_math.h"

namespace fit3d {

__global__ void project_fwd_kernel(ProjectArgs a) {
    const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (index < int64_t(a.B) * a.N) project_fwd_one(a, index);
}

cudaError_t launch_project_fwd(const ProjectArgs& args, cudaStream_t stream) {
    const int64_t total = int64_t(args.B) * args.N;
    if (total == 0) return cudaSuccess;
    const int threads = 256;
    project_fwd_kernel<<<unsigned((total + threads - 1) / threads), threads, 0, stream>>>(args);
    return cudaGetLastError();
}

}  // namespace fit3d
