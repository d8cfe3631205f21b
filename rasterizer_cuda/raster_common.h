// Helpers shared by rasterize_fwd.cu, rasterize_bwd.cu and the CPU rasterizer (cpu/rasterize_*.cpp): where
// channel values, image planes and gradient targets live for the channel order (r, g, b, depth, features...),
// and the alpha of a Gaussian at a pixel.
#pragma once

#include "common.h"
#include "ops.h"

namespace fit3d {

__host__ __device__ inline Splat load_splat(const RasterizeArgs& a, int b, int g) {
    const int64_t i = int64_t(b) * a.N + g;
    Splat s;
    s.x = a.means2d[i * 2 + 0];
    s.y = a.means2d[i * 2 + 1];
    s.opacity = a.opacities[g];
    s.a = a.conics[i * 3 + 0];
    s.b = a.conics[i * 3 + 1];
    s.c = a.conics[i * 3 + 2];
    // alpha = o exp(-sigma) >= 1/255 needs sigma <= ln(255 o); the 1e-3 margin (0.1 % of alpha) is far above
    // the rounding of fast_expf and the product, so no pixel that could pass the threshold is cut
    s.sigma_cut = logf(fmaxf(s.opacity / ALPHA_THRESHOLD, 1e-30f)) + 1e-3f;
    return s;
}

// Where channel `c` of Gaussian `g` seen from camera `b` is read (one address, so that a kernel can issue many
// such loads before it waits for the first).
__host__ __device__ inline const float* channel_source(const RasterizeArgs& a, int b, int g, int c) {
    return c < 3    ? a.colors + b * a.colors_camera_stride + int64_t(g) * 3 + c
           : c == 3 ? a.depths + int64_t(b) * a.N + g
                    : a.features + int64_t(g) * a.F + (c - 4);
}

// Value of channel `c` of Gaussian `g` seen from camera `b`.
__host__ __device__ inline float channel_value(const RasterizeArgs& a, int b, int g, int c) {
    return *channel_source(a, b, g, c);
}

// Where the gradient of channel `c` of Gaussian `g` (camera `b`) is accumulated.
__host__ __device__ inline float* channel_grad(const RasterizeArgs& a, int b, int g, int c) {
    if (c < 3) return a.v_colors + b * a.colors_camera_stride + int64_t(g) * 3 + c;
    if (c == 3) return a.v_depths + int64_t(b) * a.N + g;
    return a.v_feats + int64_t(g) * a.F + (c - 4);
}

// Image plane (H x W) of channel `c` of camera `b` in the forward outputs.
__host__ __device__ inline float* output_plane(const RasterizeArgs& a, int b, int c) {
    const int64_t hw = int64_t(a.width) * a.height;
    if (c < 3) return a.out_rgb + (int64_t(b) * 3 + c) * hw;
    if (c == 3) return a.out_depth + int64_t(b) * hw;
    return a.out_features + (int64_t(b) * a.F + (c - 4)) * hw;
}

// Where the gradient of feature channel `c` (>= 4) of camera `b` at pixel `pix` is, in elements of v_features (or
// v_features_bf16); the next channel's is v_features_channel_stride elements on.
__host__ __device__ inline int64_t feature_grad_offset(const RasterizeArgs& a, int b, int c, int64_t pix) {
    const int64_t hw = int64_t(a.width) * a.height;
    return int64_t(b) * a.F * hw + (c - 4) * a.v_features_channel_stride + pix * a.v_features_pixel_stride;
}

// Gradient of the image value of channel `c`, camera `b`, at pixel index `pix` (0 where none was given). The
// feature gradient may be channels-last: Stage I's decoder convolves channels-last maps, so its gradient
// arrives in that layout, and transposing it took 0.65 ms per iteration at 876 x 584 x 64 on an H100.
__host__ __device__ inline float image_grad(const RasterizeArgs& a, int b, int c, int64_t pix) {
    const int64_t hw = int64_t(a.width) * a.height;
    if (c < 3) return a.v_rgb ? a.v_rgb[(int64_t(b) * 3 + c) * hw + pix] : 0.f;
    if (c == 3) return a.v_depth ? a.v_depth[int64_t(b) * hw + pix] : 0.f;
    return a.v_features ? a.v_features[feature_grad_offset(a, b, c, pix)] : 0.f;  // (float32 gradients only)
}

// The alpha of a Gaussian at a pixel, written with explicit fused multiply-adds so that the forward and
// the backward kernel round it identically (they must agree on which Gaussians were composited). Most
// (pixel, Gaussian) pairs of a tile lie outside the Gaussian's 1/255 ellipse: they return 0 without the
// exponential, which would otherwise bound the kernels' speed (one per pair and pixel).
__host__ __device__ inline float splat_alpha(const Splat& s, float px, float py, float& dx, float& dy, float& sigma,
                                             float& gauss, float& raw) {
    dx = px - s.x;
    dy = py - s.y;
    sigma = fmaf(s.b * dx, dy, 0.5f * fmaf(s.a * dx, dx, (s.c * dy) * dy));
    if (sigma > s.sigma_cut) {
        gauss = raw = 0.f;
        return 0.f;
    }
    gauss = fast_expf(-sigma);
    raw = s.opacity * gauss;
    return fminf(MAX_ALPHA, raw);
}

__host__ __device__ inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Tile-local column and row of the pixel of thread `t`: each warp covers a compact 8 x 4 block (two across,
// four down), so that a small Gaussian concerns fewer warps than with 16 x 2 rows.
__host__ __device__ inline int pixel_x(int t) { return ((t / 32) % 2) * 8 + t % 8; }
__host__ __device__ inline int pixel_y(int t) { return ((t / 32) / 2) * 4 + (t % 32) / 8; }
static_assert(TILE_SIZE == 16, "pixel_x/pixel_y assume 16 x 16 tiles of 8 warps");

}  // namespace fit3d
