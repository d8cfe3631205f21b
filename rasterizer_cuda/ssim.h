// Fused SSIM of Stage I's RGB loss (ssim.cu): the 3DGS variant that fit3d_hf/losses.py composes from torch ops
// (11-tap separable Gaussian window, zero padding, C1 = 0.01^2, C2 = 0.03^2, mean of the SSIM map), as one
// forward and one backward launch. Plain C++ (no torch): ext.cpp fills the struct from tensors.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace fit3d {

constexpr int SSIM_TAPS = 11;  // window size; the kernels' halo is SSIM_TAPS / 2

struct SsimArgs {
    int B, C, H, W;            // images [B, C, H, W], float32, contiguous; H, W >= 1
    float taps[SSIM_TAPS];     // normalised 1-D Gaussian taps (ssim_gaussian_taps)
    const float* prediction;   // [B, C, H, W]
    const float* target;       // [B, C, H, W] (a constant: it receives no gradient)
    float* derivatives;        // [3, B, C, H, W]: dS/dmu_p, dS/dE[pp], dS/dE[pt] of the SSIM map S per pixel,
                               // written by the forward, read by the backward
    float* partials;           // forward: [ssim_blocks()] per-block sums of S
    const float* grad_output;  // backward: the mean SSIM's gradient (one value on the device)
    float inv_count;           // backward: 1 / (B C H W)
    float* grad;               // backward: dL/dprediction [B, C, H, W] (fully written)
};

// The taps of losses.py's `_gaussian_window_1d(11, sigma)`: computed in double, then rounded to float.
void ssim_gaussian_taps(double sigma, float taps[SSIM_TAPS]);
// Blocks of either launch, one per 32 x 32 tile of each image plane (= the forward's partials).
int64_t ssim_blocks(const SsimArgs& args);
cudaError_t launch_ssim_fwd(const SsimArgs& args, cudaStream_t stream);
cudaError_t launch_ssim_bwd(const SsimArgs& args, cudaStream_t stream);

}  // namespace fit3d
