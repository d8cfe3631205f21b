// The EWA projection of Gaussians and its backward, shared by project_fwd.cu, project_bwd.cu and the CPU
// extension (cpu/project_cpu.cpp). Twin of fit3d_hf.render._reference._project: the same quantities in the same
// order, with products by reciprocals (1 / z, 1 / det, 1 / fx) where the reference divides.
#pragma once

#include "common.h"
#include "ops.h"

namespace fit3d {

struct Camera {
    Mat3 R;    // world-to-camera rotation
    float3 t;  // world-to-camera translation
    float fx, fy, cx, cy;
    float lim_x_neg, lim_x_pos, lim_y_neg, lim_y_pos;  // clamp of x/z and y/z for the Jacobian
};

__host__ __device__ inline Camera load_camera(const float* viewmat, const float* K, int width, int height) {
    Camera c;
#pragma unroll
    for (int i = 0; i < 3; ++i)
#pragma unroll
        for (int j = 0; j < 3; ++j) c.R.m[i][j] = viewmat[i * 4 + j];
    c.t = make_float3(viewmat[3], viewmat[7], viewmat[11]);
    c.fx = K[0];
    c.cx = K[2];
    c.fy = K[4];
    c.cy = K[5];
    // one reciprocal per focal length rather than six divisions: every thread of both projection kernels loads
    // the camera
    const float inv_fx = 1.f / c.fx, inv_fy = 1.f / c.fy;
    const float tan_x = 0.5f * width * inv_fx, tan_y = 0.5f * height * inv_fy;
    c.lim_x_neg = c.cx * inv_fx + FRUSTUM_MARGIN * tan_x;
    c.lim_x_pos = (width - c.cx) * inv_fx + FRUSTUM_MARGIN * tan_x;
    c.lim_y_neg = c.cy * inv_fy + FRUSTUM_MARGIN * tan_y;
    c.lim_y_pos = (height - c.cy) * inv_fy + FRUSTUM_MARGIN * tan_y;
    return c;
}

__host__ __device__ inline float3 world_to_cam(const Camera& c, float3 m) {
    return make_float3(c.R.m[0][0] * m.x + c.R.m[0][1] * m.y + c.R.m[0][2] * m.z + c.t.x,
                       c.R.m[1][0] * m.x + c.R.m[1][1] * m.y + c.R.m[1][2] * m.z + c.t.y,
                       c.R.m[2][0] * m.x + c.R.m[2][1] * m.y + c.R.m[2][2] * m.z + c.t.z);
}

// World covariance R(q) diag(s)^2 R(q)^T and the pieces its backward needs.
struct Covariance {
    float qw, qx, qy, qz;  // normalised quaternion
    float inv_norm;        // 1 / max(|q|, 1e-12)
    Mat3 rot;              // R(q)
    float3 s;              // scales
    Mat3 M;                // R(q) diag(s)
    Mat3 sigma;            // M M^T
};

__host__ __device__ inline Covariance world_covariance(const float* quat, const float* scale) {
    Covariance c;
    const float w = quat[0], x = quat[1], y = quat[2], z = quat[3];
    c.inv_norm = 1.f / fmaxf(sqrtf(w * w + x * x + y * y + z * z), 1e-12f);
    c.qw = w * c.inv_norm;
    c.qx = x * c.inv_norm;
    c.qy = y * c.inv_norm;
    c.qz = z * c.inv_norm;
    c.rot = quat_to_rotmat(c.qw, c.qx, c.qy, c.qz);
    c.s = make_float3(scale[0], scale[1], scale[2]);
#pragma unroll
    for (int i = 0; i < 3; ++i) {
        c.M.m[i][0] = c.rot.m[i][0] * c.s.x;
        c.M.m[i][1] = c.rot.m[i][1] * c.s.y;
        c.M.m[i][2] = c.rot.m[i][2] * c.s.z;
    }
    c.sigma = mat3_mul(c.M, mat3_transpose(c.M));
    return c;
}

__host__ __device__ inline Mat3 camera_covariance(const Camera& cam, const Mat3& sigma_world) {
    return mat3_mul(mat3_mul(cam.R, sigma_world), mat3_transpose(cam.R));
}

__host__ __device__ inline Mat3 camera_covariance(const Camera& cam, const float* quat, const float* scale) {
    return camera_covariance(cam, world_covariance(quat, scale).sigma);
}

struct Projection {
    float mean_x, mean_y;       // 2D mean (px)
    float cov_a, cov_b, cov_c;  // 2D covariance [[a, b], [b, c]] including the low-pass
    float det;                  // a c - b^2
    float inv_z;                // 1 / z
    float u, v;                 // x / z, y / z
    float uc, vc;               // the same clamped for the Jacobian (tx / z, ty / z of 3DGS)
    bool clamped_x, clamped_y;  // whether the clamp was active (its gradient then goes to z)
    float J00, J02, J11, J12;   // non-zero entries of the 2x3 Jacobian
};

__host__ __device__ inline Projection project_gaussian(const Camera& cam, float3 p, const Mat3& cov) {
    Projection r;
    // one division: everything below is a product with 1 / z (fx tx / z^2 = fx uc / z, with tx = z uc)
    r.inv_z = 1.f / p.z;
    const float u = p.x * r.inv_z, v = p.y * r.inv_z;
    r.u = u;
    r.v = v;
    r.uc = fminf(fmaxf(u, -cam.lim_x_neg), cam.lim_x_pos);
    r.vc = fminf(fmaxf(v, -cam.lim_y_neg), cam.lim_y_pos);
    r.clamped_x = !(u >= -cam.lim_x_neg && u <= cam.lim_x_pos);
    r.clamped_y = !(v >= -cam.lim_y_neg && v <= cam.lim_y_pos);
    r.J00 = cam.fx * r.inv_z;
    r.J02 = -r.J00 * r.uc;
    r.J11 = cam.fy * r.inv_z;
    r.J12 = -r.J11 * r.vc;
    // T = J cov (2 x 3), then cov2d = T J^T
    float T0[3], T1[3];
#pragma unroll
    for (int j = 0; j < 3; ++j) {
        T0[j] = r.J00 * cov.m[0][j] + r.J02 * cov.m[2][j];
        T1[j] = r.J11 * cov.m[1][j] + r.J12 * cov.m[2][j];
    }
    r.cov_a = T0[0] * r.J00 + T0[2] * r.J02 + COV2D_BLUR;
    r.cov_b = T0[1] * r.J11 + T0[2] * r.J12;
    r.cov_c = T1[1] * r.J11 + T1[2] * r.J12 + COV2D_BLUR;
    r.det = r.cov_a * r.cov_c - r.cov_b * r.cov_b;
    r.mean_x = cam.fx * u + cam.cx;
    r.mean_y = cam.fy * v + cam.cy;
    return r;
}

// Projection of one (camera, Gaussian) pair (`index` = camera * N + Gaussian): a thread of project_fwd.cu,
// an iteration of the CPU loop.
__host__ __device__ inline void project_fwd_one(const ProjectArgs& a, int64_t index) {
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
    const float inv_det = 1.f / pr.det;
    const float ca = pr.cov_c * inv_det, cb = -pr.cov_b * inv_det, cc = pr.cov_a * inv_det;

    const float opacity = a.opacities[g];
    int col0, col1, row0, row1;
    if (!pixel_box(pr.mean_x, pr.mean_y, ca, cb, cc, opacity, a.width, a.height, col0, col1, row0, row1)) return;

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

// Backward of the projection of one Gaussian, over all cameras (no atomics): a thread of project_bwd.cu, an
// iteration of the CPU loop. Culled (camera, Gaussian) pairs (radius 0) contribute nothing.
__host__ __device__ inline void project_bwd_one(const ProjectArgs& a, int g) {
    // only the world covariance lives through the loop over cameras; its factors are computed again after it,
    // so that fewer registers are held across the loop (more warps per SM for project_bwd.cu)
    const Mat3 sigma = world_covariance(a.quats + g * 4, a.scales + g * 3).sigma;
    const float3 mean = make_float3(a.means[g * 3 + 0], a.means[g * 3 + 1], a.means[g * 3 + 2]);
    float3 v_mean = make_float3(0.f, 0.f, 0.f);
    Mat3 v_sigma = {};  // dL / d(world covariance), summed over cameras

    for (int b = 0; b < a.B; ++b) {
        const int64_t index = int64_t(b) * a.N + g;
        if (a.radii[index] <= 0) continue;
        const Camera cam = load_camera(a.viewmats + b * 16, a.Ks + b * 9, a.width, a.height);
        const float3 p = world_to_cam(cam, mean);
        const Mat3 cov_cam = camera_covariance(cam, sigma);
        const Projection pr = project_gaussian(cam, p, cov_cam);

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
                vJ[i][j] = 2.f * (GJ[i][0] * cov_cam.m[0][j] + GJ[i][1] * cov_cam.m[1][j] + GJ[i][2] * cov_cam.m[2][j]);

        // Jacobian entries -> camera-space position (J00 = fx / z, J02 = -fx tx / z^2 with tx = z uc: every
        // power of 1 / z below is a product of J00 or J11 with inv_z)
        float3 v_p = make_float3(0.f, 0.f, 0.f);
        const float rz = pr.inv_z;
        v_p.z += -(vJ[0][0] * pr.J00 + vJ[1][1] * pr.J11) * rz;
        v_p.z += 2.f * (vJ[0][2] * pr.J00 * pr.uc + vJ[1][2] * pr.J11 * pr.vc) * rz;
        const float v_tx = -vJ[0][2] * pr.J00 * rz;  // dL / d tx
        const float v_ty = -vJ[1][2] * pr.J11 * rz;
        if (pr.clamped_x)
            v_p.z += v_tx * pr.uc;
        else
            v_p.x += v_tx;
        if (pr.clamped_y)
            v_p.z += v_ty * pr.vc;
        else
            v_p.y += v_ty;

        // 2D mean (fx x / z + cx) and depth
        const float vmx = a.v_means2d[index * 2 + 0], vmy = a.v_means2d[index * 2 + 1];
        v_p.x += vmx * pr.J00;
        v_p.y += vmy * pr.J11;
        v_p.z += -(vmx * pr.J00 * pr.u + vmy * pr.J11 * pr.v) + a.v_depths[index];

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
    const Covariance cov = world_covariance(a.quats + g * 4, a.scales + g * 3);
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
    const float vw =
        2.f * (-z * G.m[0][1] + y * G.m[0][2] + z * G.m[1][0] - x * G.m[1][2] - y * G.m[2][0] + x * G.m[2][1]);
    const float vx = 2.f * (y * G.m[0][1] + z * G.m[0][2] + y * G.m[1][0] - 2.f * x * G.m[1][1] - w * G.m[1][2] +
                            z * G.m[2][0] + w * G.m[2][1] - 2.f * x * G.m[2][2]);
    const float vy = 2.f * (-2.f * y * G.m[0][0] + x * G.m[0][1] + w * G.m[0][2] + x * G.m[1][0] + z * G.m[1][2] -
                            w * G.m[2][0] + z * G.m[2][1] - 2.f * y * G.m[2][2]);
    const float vz = 2.f * (-2.f * z * G.m[0][0] - w * G.m[0][1] + x * G.m[0][2] + w * G.m[1][0] - 2.f * z * G.m[1][1] +
                            y * G.m[1][2] + x * G.m[2][0] + y * G.m[2][1]);
    const float dot = w * vw + x * vx + y * vy + z * vz;
    a.v_quats[g * 4 + 0] = (vw - w * dot) * cov.inv_norm;
    a.v_quats[g * 4 + 1] = (vx - x * dot) * cov.inv_norm;
    a.v_quats[g * 4 + 2] = (vy - y * dot) * cov.inv_norm;
    a.v_quats[g * 4 + 3] = (vz - z * dot) * cov.inv_norm;
}

}  // namespace fit3d
