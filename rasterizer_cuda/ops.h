// Host-side entry points of the rasterizer kernels: one argument struct and one launcher per op and
// direction. Plain C++ (no torch): ext.cpp fills the structs from tensors and checks the returned error.
//
// Layouts (all float32, contiguous, row-major): B cameras, N Gaussians, F feature channels,
// C = 4 + F blended channels in the order (r, g, b, depth, features...).
#pragma once

#include <cstddef>
#include <cstdint>

#include "host_device.h"

namespace fit3d {

// ---- project: EWA projection of 3D Gaussians (project_fwd.cu / project_bwd.cu) -------------------------
struct ProjectArgs {
    int B, N, width, height;
    float near_plane, far_plane;
    const float* means;      // [N, 3]
    const float* quats;      // [N, 4] (w, x, y, z), any norm
    const float* scales;     // [N, 3]
    const float* opacities;  // [N] (culling only)
    const float* viewmats;   // [B, 4, 4] world to camera
    const float* Ks;         // [B, 3, 3]
    // forward outputs
    float* means2d;  // [B, N, 2]
    float* conics;   // [B, N, 3]
    float* depths;   // [B, N]
    int32_t* radii;  // [B, N]
    // backward inputs (gradients of the forward outputs) and outputs
    const float* v_means2d;  // [B, N, 2]
    const float* v_conics;   // [B, N, 3]
    const float* v_depths;   // [B, N]
    float* v_means;          // [N, 3]
    float* v_quats;          // [N, 4]
    float* v_scales;         // [N, 3]
};
cudaError_t launch_project_fwd(const ProjectArgs& args, cudaStream_t stream);
cudaError_t launch_project_bwd(const ProjectArgs& args, cudaStream_t stream);

// ---- spherical_harmonics: view-dependent colour (sh_fwd.cu / sh_bwd.cu) ---------------------------------
struct ShArgs {
    int B, N, K, degree;  // K coefficients per channel (the DC term and K - 1 more), K >= (degree + 1)^2
    // Gaussian g's coefficient 0 is at sh_dc + g * dc_stride, its coefficients 1..K-1 at sh_rest + g * rest_stride
    // (see sh_coefficient in sh_math.h): one [N, K, 3] tensor (sh_rest = sh_dc + 3, both strides K * 3), or 3DGS's two
    // parameters [N, 1, 3] and [N, K - 1, 3], read in place instead of concatenated at every iteration
    const float* sh_dc;
    const float* sh_rest;
    int64_t dc_stride, rest_stride;  // floats per Gaussian; the gradients v_dc / v_rest have the same layout
    const float* means;              // [N, 3]
    const float* viewmats;           // [B, 4, 4]
    float* colors;                   // [B, N, 3] forward output
    const float* v_colors;           // [B, N, 3] backward input
    float* v_dc;                     // backward outputs (fully written)
    float* v_rest;
    float* v_means;  // [N, 3] backward output (fully written)
};
cudaError_t launch_sh_fwd(const ShArgs& args, cudaStream_t stream);
cudaError_t launch_sh_bwd(const ShArgs& args, cudaStream_t stream);

// ---- isect_tiles: per (camera, tile), the Gaussians that reach it, front to back (isect_tiles.cu) ---------
struct IsectArgs {
    int B, N, width, height, tiles_x, tiles_y;
    const float* means2d;        // [B, N, 2]
    const float* conics;         // [B, N, 3]
    const float* opacities;      // [N]
    const int32_t* radii;        // [B, N]; Gaussians with radius 0 are skipped
    const int32_t* depth_order;  // [B * N] entries (camera * N + g) sorted by depth
    int64_t* counts;             // [B * N] tiles touched by depth_order[s] (count pass)
    const int64_t* ends;         // [B * N] inclusive prefix sum of counts (emit pass)
    int64_t capacity;            // slots of keys/values; pairs past it are dropped (the caller checks the total)
    void* keys;                  // [capacity] camera * tiles + tile, of tile_key_bytes(B, tiles) each
    int32_t* values;             // [capacity] Gaussian index
};
cudaError_t launch_isect_count(const IsectArgs& args, cudaStream_t stream);
// ends = inclusive prefix sum of counts (call with temp == nullptr to query `temp_bytes`).
cudaError_t inclusive_sum(void* temp, size_t& temp_bytes, const int64_t* counts, int64_t* ends, int64_t n,
                          cudaStream_t stream);
// Stable radix sort of (key, value) pairs over bits [0, end_bit); call with temp == nullptr to query
// `temp_bytes`.
cudaError_t sort_pairs(void* temp, size_t& temp_bytes, const uint32_t* keys_in, uint32_t* keys_out,
                       const int32_t* values_in, int32_t* values_out, int64_t n, int end_bit, cudaStream_t stream);
// Bytes of a tile key for B cameras of `tiles` tiles: 2 where every key ("no tile", B * tiles, included) fits 16
// bits, as for one camera up to about 4000 x 4000 px, else 4. A pass of the pair sort then moves 12 bytes a pair
// rather than 16.
size_t tile_key_bytes(int B, int tiles);
// Steps 4-6 of the binning, from args.ends: emits the (tile, Gaussian) pairs into args.keys and args.values (the
// slots past the pair count get the "no tile" key, which sorts last and is in no range), sorts them by tile into
// sorted_keys and sorted_values (stable: equal tiles stay in depth order), and writes ranges[t] = [first, last + 1)
// of every tile t < B * tiles, [0, 0) for an empty one. Call with temp == nullptr to query `temp_bytes` (args then
// needs only B, tiles_x, tiles_y and capacity).
cudaError_t bin_pairs(const IsectArgs& args, void* sorted_keys, int32_t* sorted_values, int32_t* ranges, void* temp,
                      size_t& temp_bytes, cudaStream_t stream);

// ---- rasterize: alpha compositing of C channels (rasterize_fwd.cu / rasterize_bwd.cu) -------------------
// One launch handles the channels [channel_begin, channel_begin + channel_count) of every camera and tile.
struct RasterizeArgs {
    int B, N, F, width, height, tiles_x, tiles_y;
    int channel_begin, channel_count;
    int routed_count;              // backward: leading channels of this launch whose gradient reaches geometry (0: none
                                   // does, and the geometry gets no gradient)
    bool first_pass;               // forward: write alpha/T/last ids; backward: add background and alpha terms
    bool alpha_clamp_grad;         // backward: the gradient passes the 0.99 alpha clamp (3DGS) or stops (gsplat)
    const float* means2d;          // [B, N, 2]
    const float* conics;           // [B, N, 3]
    const float* opacities;        // [N]
    const float* colors;           // [N, 3] or [B, N, 3]
    int64_t colors_camera_stride;  // 0 or N * 3
    const float* depths;           // [B, N]
    const float* features;         // [N, F]
    const float* background;       // [3] or nullptr
    const int32_t* tile_ranges;    // [B * tiles, 2]
    const int32_t* gaussian_ids;   // [n_isect]
    // forward outputs
    float* out_rgb;       // [B, 3, H, W]
    float* out_depth;     // [B, 1, H, W]
    float* out_features;  // [B, F, H, W]: planar (CUDA), channels-last (CPU); or nullptr, when:
    // CUDA only: the features written as bfloat16 (bits), channels-last [B, H, W, F] (what a bf16 decoder reads)
    uint16_t* out_features_bf16;
    float* out_alpha;   // [B, 1, H, W]
    float* final_t;     // [B, H, W] (also a backward input)
    int32_t* last_ids;  // [B, H, W] index of the last composited entry, -1 if none (idem)
    // backward inputs: gradients of the images (any may be nullptr = zero)
    const float* v_rgb;                 // [B, 3, H, W]
    const float* v_depth;               // [B, 1, H, W]
    const float* v_features;            // [B, F, H, W], planar or channels-last (the strides below; CUDA only)
    const float* v_alpha;               // [B, 1, H, W]
    int64_t v_features_channel_stride;  // H * W (planar) or 1 (channels-last)
    int64_t v_features_pixel_stride;    // 1 (planar) or F (channels-last)
    const uint16_t* v_features_bf16;    // CUDA only, instead of v_features: that gradient in bfloat16 (bits)
    // backward outputs (accumulated with atomics; zero them first)
    float* v_means2d;    // [B, N, 2]
    float* v_conics;     // [B, N, 3]
    float* v_opacities;  // [N]
    float* v_colors;     // like colors
    float* v_depths;     // [B, N]
    float* v_feats;      // [N, F]
};
// Shared memory (bytes) one launch of `channel_count` channels needs (backward: the first launch, with colour
// and depth, lays its channels out differently).
size_t rasterize_fwd_shared_bytes(int channel_count);
size_t rasterize_bwd_shared_bytes(int channel_count, bool first_pass);
cudaError_t launch_rasterize_fwd(const RasterizeArgs& args, cudaStream_t stream);
cudaError_t launch_rasterize_bwd(const RasterizeArgs& args, cudaStream_t stream);

// ---- feature_l1: Stage I's feature loss against an upsampled target (feature_loss.cu) --------------------
enum class ScalarType { Float32, Float16, BFloat16 };
struct FeatureL1Args {
    int B, D, H, W, h, w;    // decoded [B, H, W, D], target [B, h, w, D], both channels last
    float scale_x, scale_y;  // w / W and h / H (PyTorch's bilinear source scale)
    ScalarType decoded_type, target_type;
    const void* decoded;
    const void* target;
    const bool* mask;          // [B, H, W] or nullptr (all pixels count)
    float inv_count;           // 1 / (B * D * H * W)
    float* partials;           // forward: [feature_l1_blocks()] per-block sums of |decoded - up(target)|
    const float* grad_output;  // backward: the loss's gradient (one value on the device)
    void* grad;                // backward: [B, H, W, D] like decoded; nullptr in the forward
    // forward, optional (feature_l1_keeps_signs): the sign of decoded - up(target) per element, 2 bits each (1:
    // positive, 2: negative, 0: zero or masked), 8 channels per uint16, so that the backward need not read the
    // decoded map again
    uint16_t* signs;
};
int64_t feature_l1_blocks(const FeatureL1Args& args);
cudaError_t launch_feature_l1(const FeatureL1Args& args, cudaStream_t stream);
// Whether the forward can keep the signs: D a multiple of 8 and both maps' vectors aligned (the 8-channel kernel).
bool feature_l1_keeps_signs(const FeatureL1Args& args);
// The backward from the forward's signs: grad[i] = sign_i * grad_output * inv_count, `count` elements (a multiple
// of 8) of type `grad_type` (channels-last, like decoded).
cudaError_t launch_feature_l1_from_signs(const uint16_t* signs, int64_t count, ScalarType grad_type,
                                         const float* grad_output, float inv_count, void* grad, cudaStream_t stream);

// ---- adam: Adam steps of many tensors in one launch (adam.cu; fit3d_hf/optim.py) -------------------------
// One tensor's update, as torch's Adam without weight decay or amsgrad: m = beta1 m + (1 - beta1) g,
// v = beta2 v + (1 - beta2) g^2, param -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps), with
// step_size = lr / (1 - beta1^step) and bias_correction2_sqrt = sqrt(1 - beta2^step) (computed by the caller).
struct AdamTensor {
    float* param;
    const float* grad;
    float* exp_avg;
    float* exp_avg_sq;
    int64_t n;  // elements stepped (dense float32 tensors of one layout)
    // 1 - beta as given (in double by the caller): 1 - 0.999f in float32 is 1.3e-5 off
    float step_size, bias_correction2_sqrt, beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
    // row > 0: only the first `live` of each `row` elements are stepped (n = rows * live, contiguous tensors),
    // the rest having zero gradients and moments, which Adam leaves unchanged (Stage I's SH orders not yet in use)
    int row, live;
};
constexpr int ADAM_MAX_TENSORS = 16;  // tensors per launch (more take more launches)
cudaError_t launch_adam(const AdamTensor* tensors, int count, cudaStream_t stream);

}  // namespace fit3d
