// The EWA projection of one Gaussian into one camera, shared by project_fwd.cu and project_bwd.cu.
#pragma once

#include "common.h"

namespace fit3d {

struct Camera {
    Mat3 R;          // world-to-camera rotation
    float3 t;        // world-to-camera translation
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
    const float tan_x = 0.5f * width / c.fx, tan_y = 0.5f * height / c.fy;
    c.lim_x_neg = c.cx / c.fx + FRUSTUM_MARGIN * tan_x;
    c.lim_x_pos = (width - c.cx) / c.fx + FRUSTUM_MARGIN * tan_x;
    c.lim_y_neg = c.cy / c.fy + FRUSTUM_MARGIN * tan_y;
    c.lim_y_pos = (height - c.cy) / c.fy + FRUSTUM_MARGIN * tan_y;
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
    float inv_norm; // 1 / max(|q|, 1e-12)
    Mat3 rot;       // R(q)
    float3 s;       // scales
    Mat3 M;         // R(q) diag(s)
    Mat3 sigma;     // M M^T
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
    float mean_x, mean_y;          // 2D mean (px)
    float cov_a, cov_b, cov_c;     // 2D covariance [[a, b], [b, c]] including the low-pass
    float det;                     // a c - b^2
    float tx, ty;                  // z * clamped x/z, y/z
    bool clamped_x, clamped_y;     // whether the clamp was active (its gradient then goes to z)
    float J00, J02, J11, J12;      // non-zero entries of the 2x3 Jacobian
};

__host__ __device__ inline Projection project_gaussian(const Camera& cam, float3 p, const Mat3& cov) {
    Projection r;
    const float z = p.z;
    const float u = p.x / z, v = p.y / z;
    const float uc = fminf(fmaxf(u, -cam.lim_x_neg), cam.lim_x_pos);
    const float vc = fminf(fmaxf(v, -cam.lim_y_neg), cam.lim_y_pos);
    r.clamped_x = !(u >= -cam.lim_x_neg && u <= cam.lim_x_pos);
    r.clamped_y = !(v >= -cam.lim_y_neg && v <= cam.lim_y_pos);
    r.tx = z * uc;
    r.ty = z * vc;
    r.J00 = cam.fx / z;
    r.J02 = -cam.fx * r.tx / (z * z);
    r.J11 = cam.fy / z;
    r.J12 = -cam.fy * r.ty / (z * z);
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
    r.mean_x = cam.fx * p.x / z + cam.cx;
    r.mean_y = cam.fy * p.y / z + cam.cy;
    return r;
}

}  // namespace fit3d
