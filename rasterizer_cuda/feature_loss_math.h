// The bilinear upsampling of Stage I's feature loss, shared by feature_loss.cu and the CPU extension
// (cpu/feature_loss_cpu.cpp).
#pragma once

#include "host_device.h"

namespace fit3d {

// PyTorch's area_pixel_compute_source_index for align_corners=False, then its neighbour and weight choice:
// output pixel `dst` reads input pixels i0 and i1 with weights 1 - lambda1 and lambda1.
__host__ __device__ inline void source_index(int dst, float scale, int in_size, int& i0, int& i1, float& lambda1) {
    const float real = fmaxf(scale * (dst + 0.5f) - 0.5f, 0.f);
    i0 = int(real);
    i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
    lambda1 = real - i0;
}

}  // namespace fit3d
