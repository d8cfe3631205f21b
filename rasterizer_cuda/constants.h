// Numeric constants of the rasterizer. Plain C++ (ext.cpp includes it too).
//
// The first group mirrors fit3d_hf/render/_constants.py; tests/test_render_reference.py parses this file
// and checks that the values agree.
#pragma once

namespace fit3d {

// ---- constants (keep in sync with fit3d_hf/render/_constants.py) -------------------------------------
constexpr int TILE_SIZE = 16;                      // pixels per tile side; one block per tile
constexpr int BLOCK_SIZE = TILE_SIZE * TILE_SIZE;  // threads per block, one per pixel
constexpr float ALPHA_THRESHOLD = 1.0f / 255.0f;   // alpha below this is skipped (3DGS)
constexpr float MAX_ALPHA = 0.99f;                 // alpha clamp, keeps 1 - alpha invertible
constexpr float TRANSMITTANCE_THRESHOLD = 1e-4f;   // stop before T would fall below this
constexpr float COV2D_BLUR = 0.3f;                 // EWA low-pass added to the 2D covariance (px^2)
constexpr float FRUSTUM_MARGIN = 0.3f;             // Jacobian clamp: image edge + this x tan(fov/2)
constexpr float RADIUS_SIGMAS = 3.0f;              // `radii` output in standard deviations
constexpr float SH_C0 = 0.28209479177387814f;      // degree-0 SH basis constant

// ---- kernel shape (internal; not mirrored in Python) -------------------------------------------------
constexpr int WARPS_PER_BLOCK = BLOCK_SIZE / 32;
constexpr int FWD_BATCH = 32;              // Gaussians staged in shared memory per step of the forward kernel
constexpr int BWD_BATCH = 16;              // ... of the backward kernel (bits of a 32-bit mask; shared memory bound)
constexpr int FWD_MAX_PASS_CHANNELS = 72;  // channels blended per forward launch (registers per thread)
constexpr int BWD_MAX_PASS_FEATURES = 64;  // feature channels per backward launch (8 warps x 8 channels)
constexpr unsigned FULL_MASK = 0xffffffffu;

}  // namespace fit3d
