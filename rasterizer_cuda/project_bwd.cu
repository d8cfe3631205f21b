// Backward of the EWA projection: one thread per Gaussian, looping over the cameras (no atomics).
// Gradients reach means, quats and scales; culled (camera, Gaussian) pairs (radius 0) contribute nothing.
#include "common.h"
#include "ops.h"
#include "project_math.h"

namespace fit3d {

// One Gaussian; also callable on the host (the CPU tests run it there).
__host__ __device__ void project_bwd_one(const ProjectArgs& a, int g) {

    const Covariance cov = world_covariance(a.quats + g * 4, a.scales + g * 3);
    const float3 mean = make_float3(a.means[g * 3 + 0], a.means[g * 3 + 1], a.means[g * 3 + 2]);
    float3 v_mean = make_float3(0.f, 0.f, 0.f);
    Mat3 v_sigma = {};  // dL / d(world covariance), summed over cameras

    for (int b = 0; b < a.B; ++b) {
        const int64_t index = int64_t(b) * a.N + g;
        if (a.radii[index] <= 0) continue;
        const Camera cam = load_camera(a.viewmats + b * 16, a.Ks + b * 9, a.width, a.height);
        const float3 p = world_to_cam(cam, mean);
        const Mat3 cov_cam = camera_covariance(cam, cov.sigma);
        const Projection pr = project_gaussian(cam, p, cov_cam);
        const float z = p.z;

        // conic (ca, cb, cc) = (c, -b, a) / det  ->  2D covariance (a, b, c)
        const float vca = a.v_conics[index * 3 + 0], vcb = a.v_conics[index * 3 + 1];
        const float vcc = a.v_conics[index * 3 + 2];
        const float A = pr.cov_a, Bc = pr.cov_b, C = pr.cov_c;
        const float inv_det2 = 1.f / (pr.det * pr.det);
        const float v_a = (-vca * C * C + vcb * Bc * C - vcc * Bc * Bc) * inv_det2;
        const float v_b = (2.f * vca * Bc * C - vcb * (pr.det + 2.f * Bc * Bc) + 2.f * vcc * A * Bc) * inv_det2;
        const float v_c = (-vca * Bc * Bc + vcb * A * Bc - vcc * A * A) * inv_det2;
        // symmetric gradient matrix of the 2D covariance
        const float G00 = v_a, G01 = 0.5f * v_b, G11 = v_c;

        // cov2d = J cov_cam J^T: dL/dcov_cam = J^T G J, dL/dJ = 2 G J cov_cam
        const float J[2][3] = {{pr.J00, 0.f, pr.J02}, {0.f, pr.J11, pr.J12}};
        const float Gm[2][2] = {{G00, G01}, {G01, G11}};
        float GJ[2][3];  // G J
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 3; ++j) GJ[i][j] = Gm[i][0] * J[0][j] + Gm[i][1] * J[1][j];
        Mat3 v_cov_cam;
#pragma unroll
        for (int i = 0; i < 3; ++i)
#pragma unroll
            for (int j = 0; j < 3; ++j) v_cov_cam.m[i][j] = J[0][i] * GJ[0][j] + J[1][i] * GJ[1][j];
        float vJ[2][3];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 3; ++j)
                vJ[i][j] = 2.f * (GJ[i][0] * cov_cam.m[0][j] + GJ[i][1] * cov_cam.m[1][j] +
                                  GJ[i][2] * cov_cam.m[2][j]);

        // Jacobian entries -> camera-space position
        float3 v_p = make_float3(0.f, 0.f, 0.f);
        const float z2 = z * z, z3 = z2 * z;
        v_p.z += -vJ[0][0] * cam.fx / z2 - vJ[1][1] * cam.fy / z2;
        v_p.z += vJ[0][2] * 2.f * cam.fx * pr.tx / z3 + vJ[1][2] * 2.f * cam.fy * pr.ty / z3;
        const float v_tx = -vJ[0][2] * cam.fx / z2;
        const float v_ty = -vJ[1][2] * cam.fy / z2;
        if (pr.clamped_x) v_p.z += v_tx * (pr.tx / z);
        else v_p.x += v_tx;
        if (pr.clamped_y) v_p.z += v_ty * (pr.ty / z);
        else v_p.y += v_ty;

        // 2D mean and depth
        const float vmx = a.v_means2d[index * 2 + 0], vmy = a.v_means2d[index * 2 + 1];
        v_p.x += vmx * cam.fx / z;
        v_p.y += vmy * cam.fy / z;
        v_p.z += -vmx * cam.fx * p.x / z2 - vmy * cam.fy * p.y / z2 + a.v_depths[index];

        // p = R mean + t
        v_mean.x += cam.R.m[0][0] * v_p.x + cam.R.m[1][0] * v_p.y + cam.R.m[2][0] * v_p.z;
        v_mean.y += cam.R.m[0][1] * v_p.x + cam.R.m[1][1] * v_p.y + cam.R.m[2][1] * v_p.z;
        v_mean.z += cam.R.m[0][2] * v_p.x + cam.R.m[1][2] * v_p.y + cam.R.m[2][2] * v_p.z;

        // cov_cam = R sigma R^T: dL/dsigma = R^T v_cov_cam R
        const Mat3 vs = mat3_mul(mat3_mul(mat3_transpose(cam.R), v_cov_cam), cam.R);
#pragma unroll
        for (int i = 0; i < 3; ++i)
#pragma unroll
            for (int j = 0; j < 3; ++j) v_sigma.m[i][j] += vs.m[i][j];
    }

    a.v_means[g * 3 + 0] = v_mean.x;
    a.v_means[g * 3 + 1] = v_mean.y;
    a.v_means[g * 3 + 2] = v_mean.z;

    // sigma = M M^T (v_sigma symmetric): dL/dM = 2 v_sigma M; M = R(q) diag(s)
    const Mat3 v_M = mat3_mul(v_sigma, cov.M);
    const float s[3] = {cov.s.x, cov.s.y, cov.s.z};
    float v_s[3] = {0.f, 0.f, 0.f};
    Mat3 G;  // dL / dR(q)
#pragma unroll
    for (int i = 0; i < 3; ++i)
#pragma unroll
        for (int j = 0; j < 3; ++j) {
            const float vm = 2.f * v_M.m[i][j];
            G.m[i][j] = vm * s[j];
            v_s[j] += vm * cov.rot.m[i][j];
        }
    a.v_scales[g * 3 + 0] = v_s[0];
    a.v_scales[g * 3 + 1] = v_s[1];
    a.v_scales[g * 3 + 2] = v_s[2];

    // R(q) of the unit quaternion (w, x, y, z), then the normalisation q / |q|
    const float w = cov.qw, x = cov.qx, y = cov.qy, z = cov.qz;
    const float vw = 2.f * (-z * G.m[0][1] + y * G.m[0][2] + z * G.m[1][0] - x * G.m[1][2] - y * G.m[2][0] +
                            x * G.m[2][1]);
    const float vx = 2.f * (y * G.m[0][1] + z * G.m[0][2] + y * G.m[1][0] - 2.f * x * G.m[1][1] -
                            w * G.m[1][2] + z * G.m[2][0] + w * G.m[2][1] - 2.f * x * G.m[2][2]);
    const float vy = 2.f * (-2.f * y * G.m[0][0] + x * G.m[0][1] + w * G.m[0][2] + x * G.m[1][0] +
                            z * G.m[1][2] - w * G.m[2][0] + z * G.m[2][1] - 2.f * y * G.m[2][2]);
    const float vz = 2.f * (-2.f * z * G.m[0][0] - w * G.m[0][1] + x * G.m[0][2] + w * G.m[1][0] -
                            2.f * z * G.m[1][1] + y * G.m[1][2] + x * G.m[2][0] + y * G.m[2][1]);
    const float dot = w * vw + x * vx + y * vy + z * vz;
    a.v_quats[g * 4 + 0] = (vw - w * dot) * cov.inv_norm;
    a.v_quats[g * 4 + 1] = (vx - x * dot) * cov.inv_norm;
    a.v_quats[g * 4 + 2] = (vy - y * dot) * cov.inv_norm;
    a.v_quats[g * 4 + 3] = (vz - z * dot) * cov.inv_norm;
}

__global__ void project_bwd_kernel(ProjectArgs a) {
    const int g = int(blockIdx.x) * blockDim.x + threadIdx.x;
    if (g < a.N) project_bwd_one(a, g);
}

cudaError_t launch_project_bwd(const ProjectArgs& args, cudaStream_t stream) {
    if (args.N == 0) return cudaSuccess;
    const int threads = 256;
    project_bwd_kernel<<<ceil_div(args.N, threads), threads, 0, stream>>>(args);
    return cudaGetLastError();
}

}  // namespace fit3d
