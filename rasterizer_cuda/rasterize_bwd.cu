// Backward of the alpha compositing: gradients of channel values, 2D means, conics and opacities.
//
// One block of 16x16 threads per (tile, camera), walking the tile's list back to front in batches of
// BWD_BATCH Gaussians. Per pixel, with g = dL/d(image) of the pixel and q_k = c_k . g over the channels
// routed to geometry, the alpha gradient needs only two running scalars (T and the suffix
// S = sum_{j > k} w_j q_j, seeded with the background and alpha-image terms):
//     dL/dalpha_k = T_k q_k - S / (1 - alpha_k).
// Each thread stores, per Gaussian of the batch, its weight w and u = dL/dsigma in shared memory; then the
// block reduces over its 256 pixels:
//  * geometry: the gradients of mean and conic are linear in the pixel moments sum_p u_p {1, x, y, x^2,
//    xy, y^2}, and dL/dopacity = sum_p G_p dL/dalpha_p = -sum_p u_p / opacity (alpha = o G, unclamped), so
//    each warp sums 6 moments per Gaussian (no per-pixel shuffles) and one thread adds the 6 gradients with
//    one atomic each per tile. In the first launch the same warp also sums sum_p w_p g_p for the colour and
//    depth channels (0-3).
//  * the other channels: dL/dc_k = sum_p w_kp g_p, the product W (16 Gaussians x 256 pixels) G (256 pixels x
//    channels), one 8-channel column block per warp, on the tensor cores (mma m16n8k8 in TF32, three products
//    of split operands, so that each term is within about 1e-6 of float32's: see mma_3xtf32; two where the
//    gradients came in bfloat16, whose rest is 0), skipping 32-pixel
//    groups where no Gaussian of the batch landed; then one atomic per (Gaussian, channel, tile), four channels
//    to a 16-byte atomic on sm_90 (add_channel_grads).
// Twin of fit3d_hf.render._reference._rasterize (backward, through autograd).
#include <cuda_bf16.h>

#include "common.h"
#include "ops.h"
#include "raster_common.h"
#include "shared_memory_grant.h"
#include "tensor_core.h"

namespace fit3d {

constexpr int GROUP = 32;                   // pixels per warp (an 8 x 4 pixel group of the tile)
constexpr int GROUPS = BLOCK_SIZE / GROUP;  // 8
constexpr int MMA_K = 8;                    // pixels per tensor-core step (m16n8k8)
constexpr int MMA_N = 8;                    // channels per column block
static_assert(BWD_BATCH == 16, "one 16-row tensor-core tile per batch");
// Pixel p's slot in a per-pixel row: one float4 of skew per 32-pixel group, so that the eight lanes of a
// quarter-warp reading the same offset in eight different groups hit eight different bank groups.
__host__ __device__ inline int skewed(int p) { return p + (p / GROUP) * 4; }
constexpr int ROW = BLOCK_SIZE + (GROUPS - 1) * 4;  // floats per (Gaussian) row of s_w/s_u: 71 float4s, odd
static_assert((ROW / 4) % 2 == 1, "rows must start in alternating bank groups");
static_assert(ROW % 32 == 28, "the tensor-core loads of W (rows g and g + 8, columns t) hit 32 banks");
// Pixel p's row of the pixel-major gradient matrix starts here (the same skew, per group).
__host__ __device__ inline int grad_row(int p, int rs) { return p * rs + (p / GROUP) * 4; }

// The first channel of a launch that the channel product handles: colour and depth (0-3) of the first
// launch go with the geometry.
__host__ __device__ inline int product_begin(bool first_pass) { return first_pass ? 4 : 0; }

// Channels stored per pixel: the launch's channels, the product's part padded to whole 8-channel blocks.
__host__ __device__ inline int bwd_channel_stride(int channel_count, bool first_pass) {
    const int begin = product_begin(first_pass);
    return begin + round_up(channel_count - begin, MMA_N);
}

// Floats per pixel row of the gradient matrix: = 8 or 24 (mod 32), so that the tensor-core loads of G (rows t
// and t + 4 of a step, 8 consecutive channels) hit 32 different banks.
__host__ __device__ inline int bwd_pixel_stride(int cp) {
    int rs = cp;
    while (rs % 32 != 8 && rs % 32 != 24) rs += 4;
    return rs;
}

size_t rasterize_bwd_shared_bytes(int channel_count, bool first_pass) {
    const size_t cp = size_t(bwd_channel_stride(channel_count, first_pass));
    const size_t rs = size_t(bwd_pixel_stride(int(cp)));
    const size_t rc = size_t(round_up(channel_count, 4));  // routed channel values: at most the launch's channels
    const size_t floats = BLOCK_SIZE * rs + GROUPS * 4 + 2 * size_t(BWD_BATCH) * ROW + size_t(BWD_BATCH) * rc;
    return sizeof(float) * floats + sizeof(Splat) * BWD_BATCH + sizeof(int) * (2 * BWD_BATCH + GROUPS + 2);
}

// Adds a warp's D fragment (Gaussians = rows, channels [n0, n0 + 8) = columns) to the channel gradients. Rows of
// slots past the batch or not composited hold stale weights: a row of D depends only on its row of W, so they are
// just not added. On sm_90 lanes col and col ^ 1 swap half their sums so that each holds four consecutive channels
// of one Gaussian (the even lane row `row`, the odd one row + 8), added with one 16-byte atomic where the four
// gradients are adjacent, 16-byte aligned feature channels: a third of the scalar atomics' instructions.
__device__ inline void add_channel_grads(const RasterizeArgs& a, int b, const float (&d)[4], const int* s_gid,
                                         unsigned mask, int n0, int cc, int row, int col) {
#if __CUDA_ARCH__ >= 900
    const bool even = col % 2 == 0;
    const float send0 = even ? d[2] : d[0], send1 = even ? d[3] : d[1];
    const float got0 = __shfl_xor_sync(0xffffffffu, send0, 1), got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
    const int k = even ? row : row + 8;
    const int c = n0 + 2 * (col & ~1);
    const float4 sums = even ? make_float4(d[0], d[1], got0, got1) : make_float4(got0, got1, d[2], d[3]);
    if (!((mask >> k) & 1u)) return;
    const int channel = a.channel_begin + c;
    float* at = channel_grad(a, b, s_gid[k], channel);
    if (channel >= 4 && c + 4 <= cc && reinterpret_cast<uintptr_t>(at) % 16 == 0) {
        atomicAdd(reinterpret_cast<float4*>(at), sums);
        return;
    }
    const float parts[4] = {sums.x, sums.y, sums.z, sums.w};
#pragma unroll
    for (int i = 0; i < 4; ++i)
        if (c + i < cc) atomicAdd(channel_grad(a, b, s_gid[k], channel + i), parts[i]);
#else
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int k = row + (i / 2) * 8, c = n0 + 2 * col + i % 2;
        if (((mask >> k) & 1u) && c < cc) atomicAdd(channel_grad(a, b, s_gid[k], a.channel_begin + c), d[i]);
    }
#endif
}

// dL/dc_k = sum_p W[k][p] G[p][c] for the launch's channels [c0, cc) and the composited slots of `mask`, added
// to the channel gradients: one 8-channel column block per warp. With EXACT_G (the gradients came in bfloat16, so
// each is exact in TF32) a step takes two tensor-core products instead of three, with the same result.
template <bool EXACT_G>
__device__ inline void channel_product(const RasterizeArgs& a, int b, const float* s_w, const float* s_g, int rs,
                                       const int* s_gid, const unsigned* s_wmask, unsigned mask, int c0, int cc,
                                       int warp, int lane) {
    // mma fragments: lane = 4 row + col; A (16 x 8, W) rows row and row + 8, columns col and col + 4; B (8 x 8, G)
    // rows col and col + 4, column row; D rows row and row + 8, columns 2 col and 2 col + 1
    const int row = lane / 4, col = lane % 4;
    const int blocks = ceil_div(cc - c0, MMA_N);
    for (int block = warp; block < blocks; block += WARPS_PER_BLOCK) {
        const int n0 = c0 + block * MMA_N;
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        // pixel p = 32 group + 8 step + col (+ 4) sits at skewed(p) = 36 group + 8 step + col (+ 4) of a W row and
        // starts G's row grad_row(p, rs) = p rs + 4 group
        const float* w_top = s_w + row * ROW + col;
        const float* w_bottom = w_top + 8 * ROW;
        const float* g_col = s_g + col * rs + n0 + row;
        for (int group = 0; group < GROUPS; ++group) {
            if (s_wmask[group] == 0u) continue;  // W is 0 there (uniform over the block)
            const int w_at = group * (GROUP + 4);
            const float* g_at = g_col + group * (GROUP * rs + 4);
#pragma unroll
            for (int step = 0; step < GROUP / MMA_K; ++step) {
                const int k = step * MMA_K;
                const float w[4] = {w_top[w_at + k], w_bottom[w_at + k], w_top[w_at + k + 4], w_bottom[w_at + k + 4]};
                const float g[2] = {g_at[k * rs], g_at[(k + 4) * rs]};
                if constexpr (EXACT_G)
                    mma_2xtf32_exact_b(d, w, g);
                else
                    mma_3xtf32(d, w, g);
            }
        }
        add_channel_grads(a, b, d, s_gid, mask, n0, cc, row, col);
    }
}

__global__ void __launch_bounds__(BLOCK_SIZE, 2) rasterize_bwd_kernel(RasterizeArgs a) {
    extern __shared__ float4 shared[];
    const int cc = a.channel_count;
    const int cp = bwd_channel_stride(cc, a.first_pass);
    const int rs = bwd_pixel_stride(cp);
    const int rcap = round_up(cc, 4);
    float* s_g = reinterpret_cast<float*>(shared);    // pixel p's gradients at grad_row(p, rs)
    float* s_w = s_g + BLOCK_SIZE * rs + GROUPS * 4;  // [BWD_BATCH][ROW] weights w
    float* s_u = s_w + BWD_BATCH * ROW;               // [BWD_BATCH][ROW] dL/dsigma
    float* s_chan = s_u + BWD_BATCH * ROW;            // [BWD_BATCH][rc] routed channel values
    Splat* s_splat = reinterpret_cast<Splat*>(s_chan + BWD_BATCH * rcap);
    int* s_gid = reinterpret_cast<int*>(s_splat + BWD_BATCH);              // [BWD_BATCH]
    int* s_klist = s_gid + BWD_BATCH;                                      // [BWD_BATCH] slots some pixel composited
    unsigned* s_wmask = reinterpret_cast<unsigned*>(s_klist + BWD_BATCH);  // [GROUPS] per-warp slot masks
    int* s_last = reinterpret_cast<int*>(s_wmask + GROUPS);                // block max of last ids
    unsigned* s_mask = reinterpret_cast<unsigned*>(s_last + 1);            // union of s_wmask

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int tile = blockIdx.x, b = blockIdx.y;
    const int n_tiles = a.tiles_x * a.tiles_y;
    const int tile_x0 = (tile % a.tiles_x) * TILE_SIZE, tile_y0 = (tile / a.tiles_x) * TILE_SIZE;
    const int col = tile_x0 + pixel_x(tid);
    const int row = tile_y0 + pixel_y(tid);
    const bool inside = col < a.width && row < a.height;
    const float px = col + 0.5f, py = row + 0.5f;
    const int64_t hw = int64_t(a.width) * a.height;
    const int64_t pix = int64_t(row) * a.width + col;
    const int start = a.tile_ranges[(int64_t(b) * n_tiles + tile) * 2];
    const int my_slot = skewed(tid);
    const int c0 = product_begin(a.first_pass);  // channels [0, c0) go with the geometry

    // this pixel's image gradients, its row of G: the loads of a row go out together (one at a time, each
    // waiting for the last, they took a fifth of the kernel's time)
    float* my_g = s_g + grad_row(tid, rs);
    if (c0 > 0) {  // colour and depth
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (inside)
            v = make_float4(image_grad(a, b, 0, pix), image_grad(a, b, 1, pix), image_grad(a, b, 2, pix),
                            image_grad(a, b, 3, pix));
        *reinterpret_cast<float4*>(my_g) = v;
    }
    // channel c0 of the launch (a feature) of this pixel, in float32 or bfloat16
    const float* my_features = nullptr;
    const __nv_bfloat16* my_features_bf16 = nullptr;
    if (inside) {
        const int64_t at = feature_grad_offset(a, b, a.channel_begin + c0, pix);
        if (a.v_features != nullptr) my_features = a.v_features + at;
        if (a.v_features_bf16 != nullptr)
            my_features_bf16 = reinterpret_cast<const __nv_bfloat16*>(a.v_features_bf16) + at;
    }
    // channels-last gradients (Stage I's decoder) are read 8 channels per 16-byte load (bf16) or two (float32)
    // where aligned, rather than one element per load
    const bool channels_last = a.v_features_channel_stride == 1;
    // every gradient the channel product reads is then a bfloat16 value or a padding 0
    const bool exact_product_grads = a.v_features == nullptr && a.v_features_bf16 != nullptr;
    const bool vector_bf16 = channels_last && my_features_bf16 != nullptr && is_aligned(my_features_bf16, 16);
    const bool vector_f32 = channels_last && my_features != nullptr && is_aligned(my_features, 16);
    for (int c = c0; c < cp; c += 8) {
        float v[8];
        if (c + 8 <= cc && vector_bf16) {
            const uint4 raw = *reinterpret_cast<const uint4*>(my_features_bf16 + (c - c0));
            const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float2 f = __bfloat1622float2(pairs[i]);
                v[2 * i] = f.x;
                v[2 * i + 1] = f.y;
            }
        } else if (c + 8 <= cc && vector_f32) {
            const float4 lo = *reinterpret_cast<const float4*>(my_features + (c - c0));
            const float4 hi = *reinterpret_cast<const float4*>(my_features + (c - c0) + 4);
            v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int64_t at = (c + i - c0) * a.v_features_channel_stride;
                v[i] = c + i >= cc                   ? 0.f
                       : my_features != nullptr      ? my_features[at]
                       : my_features_bf16 != nullptr ? __bfloat162float(my_features_bf16[at])
                                                     : 0.f;
            }
        }
        *reinterpret_cast<float4*>(my_g + c) = make_float4(v[0], v[1], v[2], v[3]);
        *reinterpret_cast<float4*>(my_g + c + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
    float T = inside ? a.final_t[int64_t(b) * hw + pix] : 1.f;
    const int last = inside ? a.last_ids[int64_t(b) * hw + pix] : -1;
    // suffix sum S, seeded with the terms of the background (rgb += T_final bg) and the alpha image
    // (alpha = 1 - T_final); both are in the first launch, whose channels start at 0
    float S = 0.f;
    if (a.first_pass && inside) {
        float bg_dot = 0.f;
        if (a.background != nullptr)
            for (int c = 0; c < 3; ++c) bg_dot += a.background[c] * my_g[c];
        const float v_alpha_image = a.v_alpha != nullptr ? a.v_alpha[int64_t(b) * hw + pix] : 0.f;
        S = T * (bg_dot - v_alpha_image);
    }
    const bool geometry = a.routed_count > 0;
    const int rc = round_up(a.routed_count, 4);  // only routed channels are needed (for q); <= rcap
    const float4 g_routed4 = reinterpret_cast<const float4*>(my_g)[0];  // the common case: rgb + depth
    if (tid == 0) *s_last = -1;
    __syncthreads();
    if (last >= 0) atomicMax(s_last, last);
    __syncthreads();
    const int walk_end = *s_last + 1;

    for (int batch_end = walk_end; batch_end > start; batch_end -= BWD_BATCH) {
        const int batch_start = max(start, batch_end - BWD_BATCH);
        const int count = batch_end - batch_start;
        __syncthreads();  // the previous batch's shared memory is no longer read
        if (tid < count) {
            const int g = a.gaussian_ids[batch_start + tid];
            s_gid[tid] = g;
            s_splat[tid] = load_splat(a, b, g);
        }
        for (int e = tid; e < count * rc; e += BLOCK_SIZE) {
            const int k = e / rc, c = e - k * rc;
            s_chan[e] = c < cc ? channel_value(a, b, a.gaussian_ids[batch_start + k], a.channel_begin + c) : 0.f;
        }
        if (tid == 0) *s_mask = 0u;
        __syncthreads();

        // ---- per pixel, back to front: weight, alpha gradient, dL/dsigma, dL/dopacity ---------------------
        unsigned composited = 0;
        for (int k = count - 1; k >= 0; --k) {
            float w = 0.f, v_sigma = 0.f;
            if (batch_start + k <= last) {
                float dx, dy, sigma, gauss, raw;
                const float alpha = splat_alpha(s_splat[k], px, py, dx, dy, sigma, gauss, raw);
                if (sigma >= 0.f && alpha >= ALPHA_THRESHOLD) {
                    composited |= 1u << k;
                    // one correctly rounded reciprocal for both quotients: two divisions (each about ten
                    // instructions and a branch to a slow path) made it 3.6 % slower at Stage I density, H100
                    const float inv_one_minus = __frcp_rn(1.f - alpha);
                    const float t_before = T * inv_one_minus;
                    w = alpha * t_before;
                    if (geometry) {
                        const float4* chan = reinterpret_cast<const float4*>(s_chan + k * rc);
                        float q;
                        if (a.routed_count == 4) {
                            const float4 cv = chan[0];
                            q = cv.x * g_routed4.x + cv.y * g_routed4.y + cv.z * g_routed4.z + cv.w * g_routed4.w;
                        } else {
                            q = 0.f;
                            const float4* grad = reinterpret_cast<const float4*>(my_g);
                            for (int c4 = 0; c4 < (a.routed_count + 3) / 4; ++c4) {
                                const float4 cv = chan[c4], gv = grad[c4];
                                q += cv.x * gv.x + cv.y * gv.y + cv.z * gv.z + cv.w * gv.w;
                            }
                        }
                        const float v_alpha = t_before * q - S * inv_one_minus;
                        S += w * q;
                        // 3DGS differentiates alpha = o G through the min(0.99, .) clamp; gsplat stops there
                        if (a.alpha_clamp_grad || raw <= MAX_ALPHA) v_sigma = -raw * v_alpha;
                    }
                    T = t_before;
                }
            }
            s_w[k * ROW + my_slot] = w;
            s_u[k * ROW + my_slot] = v_sigma;
        }
        const unsigned warp_composited = __reduce_or_sync(FULL_MASK, composited);
        if (lane == 0) {
            s_wmask[warp] = warp_composited;
            if (warp_composited != 0) atomicOr(s_mask, warp_composited);
        }
        __syncthreads();
        const unsigned mask = *s_mask;
        if (mask == 0) continue;
        if (tid < BWD_BATCH && (mask & (1u << tid))) s_klist[__popc(mask & ((1u << tid) - 1u))] = tid;
        __syncthreads();
        const int nk = __popc(mask);

        // ---- geometry (6 pixel moments of u) and colour/depth (sum_p w g), per Gaussian by one warp -------
        if (geometry || c0 > 0) {
            const float lane_x = pixel_x(lane) + 0.5f, lane_y = pixel_y(lane) + 0.5f;  // + the group's corner
            for (int kk = warp; kk < nk; kk += WARPS_PER_BLOCK) {
                const int k = s_klist[kk];
                float su = 0.f, sux = 0.f, suy = 0.f, suxx = 0.f, suxy = 0.f, suyy = 0.f;
                float4 swg = make_float4(0.f, 0.f, 0.f, 0.f);
                for (int group = 0; group < GROUPS; ++group) {
                    if (!(s_wmask[group] & (1u << k))) continue;  // uniform over the warp
                    const int p = group * GROUP + lane;
                    const float u = s_u[k * ROW + skewed(p)];
                    const float x = lane_x + (group % 2) * 8, y = lane_y + (group / 2) * 4;  // tile-local centre
                    su += u;
                    sux += u * x;
                    suy += u * y;
                    suxx += u * x * x;
                    suxy += u * x * y;
                    suyy += u * y * y;
                    if (c0 > 0) {
                        const float w = s_w[k * ROW + skewed(p)];
                        const float4 g = *reinterpret_cast<const float4*>(s_g + grad_row(p, rs));
                        swg.x = fmaf(w, g.x, swg.x);
                        swg.y = fmaf(w, g.y, swg.y);
                        swg.z = fmaf(w, g.z, swg.z);
                        swg.w = fmaf(w, g.w, swg.w);
                    }
                }
                const int g = s_gid[k];
                if (c0 > 0) {
                    const float r = warp_sum(swg.x), gr = warp_sum(swg.y), bl = warp_sum(swg.z), d = warp_sum(swg.w);
                    if (lane < 4)
                        atomicAdd(channel_grad(a, b, g, lane), lane == 0 ? r : lane == 1 ? gr : lane == 2 ? bl : d);
                }
                if (!geometry) continue;
                su = warp_sum(su);
                sux = warp_sum(sux);
                suy = warp_sum(suy);
                suxx = warp_sum(suxx);
                suxy = warp_sum(suxy);
                suyy = warp_sum(suyy);
                if (lane == 0) {
                    // sums of u * {dx, dy, dx^2, dx dy, dy^2} with d = pixel - mean, in tile-local coordinates
                    const Splat& s = s_splat[k];
                    const float ox = s.x - tile_x0, oy = s.y - tile_y0;
                    const float sdx = sux - ox * su, sdy = suy - oy * su;
                    const float sdxx = suxx - 2.f * ox * sux + ox * ox * su;
                    const float sdxy = suxy - ox * suy - oy * sux + ox * oy * su;
                    const float sdyy = suyy - 2.f * oy * suy + oy * oy * su;
                    const int64_t i = int64_t(b) * a.N + g;
                    // sigma = (a dx^2 + c dy^2) / 2 + b dx dy, d = pixel - mean
                    const float2 v_mean = make_float2(-(s.a * sdx + s.b * sdy), -(s.b * sdx + s.c * sdy));
#if __CUDA_ARCH__ >= 900
                    atomicAdd(reinterpret_cast<float2*>(a.v_means2d + i * 2), v_mean);  // 8-byte aligned (torch)
#else
                    atomicAdd(a.v_means2d + i * 2 + 0, v_mean.x);
                    atomicAdd(a.v_means2d + i * 2 + 1, v_mean.y);
#endif
                    atomicAdd(a.v_conics + i * 3 + 0, 0.5f * sdxx);
                    atomicAdd(a.v_conics + i * 3 + 1, sdxy);
                    atomicAdd(a.v_conics + i * 3 + 2, 0.5f * sdyy);
                    atomicAdd(a.v_opacities + g, -su / s.opacity);
                }
            }
        }

        // ---- the other channels: V = W G --------------------------------------------------------------------
        if (cc > c0) {
            if (exact_product_grads)
                channel_product<true>(a, b, s_w, s_g, rs, s_gid, s_wmask, mask, c0, cc, warp, lane);
            else
                channel_product<false>(a, b, s_w, s_g, rs, s_gid, s_wmask, mask, c0, cc, warp, lane);
        }
    }
}

cudaError_t launch_rasterize_bwd(const RasterizeArgs& args, cudaStream_t stream) {
    const int n_tiles = args.tiles_x * args.tiles_y;
    if (args.B == 0 || n_tiles == 0 || args.channel_count <= 0) return cudaSuccess;
    static SharedMemoryGrant grant;
    const size_t shared = rasterize_bwd_shared_bytes(args.channel_count, args.first_pass);
    const cudaError_t err = grant.ensure(rasterize_bwd_kernel, shared);
    if (err != cudaSuccess) return err;
    rasterize_bwd_kernel<<<dim3(unsigned(n_tiles), unsigned(args.B)), BLOCK_SIZE, shared, stream>>>(args);
    return cudaGetLastError();
}

}  // namespace fit3d
