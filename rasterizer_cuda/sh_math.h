// The view direction used by the SH colour, shared by sh_fwd.cu and sh_bwd.cu.
#pragma once

#include "common.h"

namespace fit3d {

struct ViewDirection {
    float x, y, z;    // unit vector from the camera centre to the mean
    float inv_norm;   // 1 / max(|mean - centre|, 1e-12)
};

__host__ __device__ inline ViewDirection view_direction(const float* viewmat, const float* mean) {
    // camera centre = -R^T t
    float centre[3];
    for (int k = 0; k < 3; ++k)
        centre[k] = -(viewmat[0 * 4 + k] * viewmat[3] + viewmat[1 * 4 + k] * viewmat[7] +
                      viewmat[2 * 4 + k] * viewmat[11]);
    const float dx = mean[0] - centre[0], dy = mean[1] - centre[1], dz = mean[2] - centre[2];
    ViewDirection d;
    d.inv_norm = 1.f / fmaxf(sqrtf(dx * dx + dy * dy + dz * dz), 1e-12f);
    d.x = dx * d.inv_norm;
    d.y = dy * d.inv_norm;
    d.z = dz * d.inv_norm;
    return d;
}

}  // namespace fit3d
