// EWA projection of 3D Gaussians, one thread per (camera, Gaussian).
// Twin of fit3d_hf.render._reference._project (same expressions, in the same order).
#include "common.h"
#include "ops.h"
#include "project_math.h"

namespace fit3d {

// One (camera, Gaussian) pair; also callable on the host (the CPU tests run it there).
__host__ __device__ void project_fwd_one(const ProjectArgs& a, int64_t index) {
    const int b = int(index / a.N);
    const int g = int(index % a.N);

    a.means2d[index * 2 + 0] = 0.f;
    a.means2d[index * 2 + 1] = 0.f;
    a.conics[index * 3 + 0] = 0.f;
    a.conics[index * 3 + 1] = 0.f;
    a.conics[index * 3 + 2] = 0.f;
    a.depths[index] = 0.f;
    a.radii[index] = 0;

    const Camera cam = load_camera(a.viewmats + b * 16, a.Ks + b * 9, a.width, a.height);
    const float3 mean = make_float3(a.means[g * 3 + 0], a.means[g * 3 + 1], a.means[g * 3 + 2]);
    const float3 p = world_to_cam(cam, mean);
    if (!(p.z >= a.near_plane && p.z <= a.far_plane)) return;

    const Mat3 cov_cam = camera_covariance(cam, a.quats + g * 4, a.scales + g * 3);
    const Projection pr = project_gaussian(cam, p, cov_cam);
    if (!(pr.det > 0.f)) return;
    const float ca = pr.cov_c / pr.det, cb = -pr.cov_b / pr.det, cc = pr.cov_a / pr.det;

    const float opacity = a.opacities[g];
    int col0, col1, row0, row1;
    if (!pixel_box(pr.mean_x, pr.mean_y, ca, cb, cc, opacity, a.width, a.height, col0, col1, row0, row1))
        return;

    const float mid = 0.5f * (pr.cov_a + pr.cov_c);
    const float lambda_max = mid + sqrtf(fmaxf(mid * mid - pr.det, 0.1f));
    a.means2d[index * 2 + 0] = pr.mean_x;
    a.means2d[index * 2 + 1] = pr.mean_y;
    a.conics[index * 3 + 0] = ca;
    a.conics[index * 3 + 1] = cb;
    a.conics[index * 3 + 2] = cc;
    a.depths[index] = p.z;
    a.radii[index] = int32_t(ceilf(RADIUS_SIGMAS * sqrtf(lambda_max)));
}

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
