// Host-side entry points of the CPU rasterizer: the same argument structs as the CUDA kernels (ops.h), one
// function per op and direction. Plain C++ (no torch): cpu/ext_cpu.cpp fills the structs from tensors,
// allocates the outputs and provides the thread pool (parallel_for).
//
// The per-Gaussian and per-pixel maths is that of the CUDA kernels, from the shared headers
// (project_math.h, sh_math.h, isect_math.h, raster_common.h); only the loops around it differ. Every op is
// deterministic: a rerun gives bit-identical results whatever the number of threads.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "ops.h"

// The hot loops (the rasterizer's per-tile work) are compiled twice where GCC can dispatch at load time (x86-64
// Linux): for AVX2 + FMA machines (x86-64-v3; fmaf becomes one instruction, the channel loops 8 wide) and for
// any x86-64. The two round identically: nothing is contracted implicitly (-ffp-contract=off) nor
// reassociated, and fmaf is exact either way.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define FIT3D_CPU_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FIT3D_CPU_HOT
#endif

namespace fit3d::cpu {

// Calls body(begin, end) on chunks of [0, n) of at most `grain` items, on the threads of torch's pool; chunks
// are handed out dynamically, so costly and cheap items balance. Defined in ext_cpu.cpp.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

// ---- project (cpu/project_cpu.cpp) ------------------------------------------------------------------------
void project_fwd(const ProjectArgs& a);
void project_bwd(const ProjectArgs& a);
void sh_fwd(const ShArgs& a);
void sh_bwd(const ShArgs& a);

// ---- isect_tiles (cpu/isect_cpu.cpp) ----------------------------------------------------------------------
// Binning in two steps, so that the caller can allocate the pair list once its size is known:
// isect_count() orders each camera's visible Gaussians front to back (ties by index, as the CUDA binning's
// stable sorts) and counts the (tile, Gaussian) pairs; isect_fill() writes the per-tile ranges and the
// Gaussian ids, each tile's list front to back. Uses B, N, width, height, tiles_x, tiles_y, means2d, conics,
// opacities and radii of IsectArgs.
struct IsectPlan {
    std::vector<int32_t> order;              // visible entries (camera * N + Gaussian), camera by camera, by depth
    std::vector<int64_t> chunk_tile_counts;  // [chunks, B * tiles] first slot of each chunk of `order` per tile
    std::vector<int64_t> tile_counts;        // [B * tiles] pairs per tile
    int64_t total = 0;                       // pairs
};
IsectPlan isect_count(const IsectArgs& a, const float* depths);
// ranges: [B * tiles, 2] (zeroed by the caller), gaussian_ids: [plan.total].
void isect_fill(const IsectArgs& a, const IsectPlan& plan, int32_t* ranges, int32_t* gaussian_ids);

// ---- rasterize (cpu/rasterize_fwd_cpu.cpp, cpu/rasterize_bwd_cpu.cpp) --------------------------------------
// All 4 + F channels in one pass (channel_begin 0, channel_count 4 + F, first_pass true).
void rasterize_fwd(const RasterizeArgs& a);
// The gradient outputs (zeroed by the caller) receive the channels [0, channel_count) (4, or 4 + F when the
// feature image has a gradient), geometry from the first routed_count of them; n_pairs = size of
// gaussian_ids. Each (tile, Gaussian) pair's gradients go to a slot of their own, summed Gaussian by Gaussian
// in a fixed order afterwards: no float atomics, so reruns are bit-identical.
void rasterize_bwd(const RasterizeArgs& a, int64_t n_pairs);

// ---- feature_l1 (cpu/feature_loss_cpu.cpp) ----------------------------------------------------------------
// Any strides (elements) of the 4-d decoded [B, D, H, W] and target [B, D, h, w] tensors; mask [B, H, W] or
// nullptr. Forward: returns the mean of |decoded - up(target)| over all elements (masked pixels count 0),
// summed in double in a fixed order. Backward (grad != nullptr, same strides as decoded): writes
// sign(decoded - up(target)) * scale (the loss's gradient / count), 0 where masked.
struct Strides4 {
    int64_t b, c, y, x;
};
double feature_l1_fwd(const FeatureL1Args& a, Strides4 decoded_strides, Strides4 target_strides);
void feature_l1_bwd(const FeatureL1Args& a, Strides4 decoded_strides, Strides4 target_strides, float scale);

}  // namespace fit3d::cpu
