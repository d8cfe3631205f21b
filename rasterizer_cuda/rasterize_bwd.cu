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
//    one atomic each per tile;
//  * channels: dL/dc_k = sum_p w_kp g_p, a small product W (Gaussians x pixels) G (pixels x channels),
//    4 x 4 outputs per thread, skipping 32-pixel groups (warps) where none of the 4 Gaussians landed, then
//    one atomic per (Gaussian, channel, tile).
// Twin of fit3d_hf.render._reference._rasterize (backward, through autograd).
#include "common.h"
#include "ops.h"
#include "raster_common.h"

namespace fit3d {

constexpr int GROUP = 32;                   // pixels per warp (an 8 x 4 pixel group of the tile)
constexpr int GROUPS = BLOCK_SIZE / GROUP;  // 8
// Pixel p's slot in a per-pixel row: one float4 of skew per 32-pixel group, so that the eight lanes of a
// quarter-warp reading the same offset in eight different groups hit eight different bank groups.
__host__ __device__ inline int skewed(int p) { return p + (p / GROUP) * 4; }
constexpr int ROW = BLOCK_SIZE + (GROUPS - 1) * 4;  // floats per (Gaussian) row of s_w/s_u: 71 float4s, odd
static_assert((ROW / 4) % 2 == 1, "rows must start in alternating bank groups");
// Pixel p's row of the pixel-major gradient matrix starts here (the same skew, per group).
__host__ __device__ inline int grad_row(int p, int rs) { return p * rs + (p / GROUP) * 4; }

__host__ __device__ inline int bwd_channel_stride(int channel_count) { return round_up(channel_count, 4); }

// Floats per pixel row of the gradient matrix: a multiple of 4 with an odd number of float4s, so that
// consecutive pixels' rows start in different bank groups.
__host__ __device__ inline int bwd_pixel_stride(int cp) { return (cp / 4) % 2 == 1 ? cp : cp + 4; }

size_t rasterize_bwd_shared_bytes(int channel_count) {
    const size_t cp = size_t(bwd_channel_stride(channel_count));
    const size_t rs = size_t(bwd_pixel_stride(int(cp)));
    const size_t floats = BLOCK_SIZE * rs + GROUPS * 4 + 2 * size_t(BWD_BATCH) * ROW + size_t(BWD_BATCH) * cp;
    return sizeof(float) * floats + sizeof(Splat) * BWD_BATCH + sizeof(int) * (2 * BWD_BATCH + GROUPS + 2);
}

__global__ void __launch_bounds__(BLOCK_SIZE, 2) rasterize_bwd_kernel(RasterizeArgs a) {
    extern __shared__ float4 shared[];
    const int cc = a.channel_count;
    const int cp = bwd_channel_stride(cc);
    const int rs = bwd_pixel_stride(cp);
    float* s_g = reinterpret_cast<float*>(shared);    // pixel p's gradients at grad_row(p, rs)
    float* s_w = s_g + BLOCK_SIZE * rs + GROUPS * 4;  // [BWD_BATCH][ROW] weights w
    float* s_u = s_w + BWD_BATCH * ROW;               // [BWD_BATCH][ROW] dL/dsigma
    float* s_chan = s_u + BWD_BATCH * ROW;            // [BWD_BATCH][rc] routed channel values
    Splat* s_splat = reinterpret_cast<Splat*>(s_chan + BWD_BATCH * cp);
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

    float* my_g = s_g + grad_row(tid, rs);
    for (int c = 0; c < cp; ++c) my_g[c] = (inside && c < cc) ? image_grad(a, b, a.channel_begin + c, pix) : 0.f;
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
    const int rc = round_up(a.routed_count, 4);  // only routed channels are needed (for q); <= cp
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
                    const float one_minus = 1.f - alpha;
                    const float t_before = T / one_minus;
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
                        const float v_alpha = t_before * q - S / one_minus;
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

        // ---- geometry: per Gaussian, 6 pixel moments summed by one warp, then 6 atomics -----------------
        if (geometry) {
            for (int kk = warp; kk < nk; kk += WARPS_PER_BLOCK) {
                const int k = s_klist[kk];
                float su = 0.f, sux = 0.f, suy = 0.f, suxx = 0.f, suxy = 0.f, suyy = 0.f;
                for (int group = 0; group < GROUPS; ++group) {
                    if (!(s_wmask[group] & (1u << k))) continue;  // uniform over the warp
                    const int p = group * GROUP + lane;
                    const float u = s_u[k * ROW + skewed(p)];
                    const float x = pixel_x(p) + 0.5f, y = pixel_y(p) + 0.5f;  // tile-local centre
                    su += u;
                    sux += u * x;
                    suy += u * y;
                    suxx += u * x * x;
                    suxy += u * x * y;
                    suyy += u * y * y;
                }
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
                    const int64_t i = int64_t(b) * a.N + s_gid[k];
                    // sigma = (a dx^2 + c dy^2) / 2 + b dx dy, d = pixel - mean
                    atomicAdd(a.v_means2d + i * 2 + 0, -(s.a * sdx + s.b * sdy));
                    atomicAdd(a.v_means2d + i * 2 + 1, -(s.b * sdx + s.c * sdy));
                    atomicAdd(a.v_conics + i * 3 + 0, 0.5f * sdxx);
                    atomicAdd(a.v_conics + i * 3 + 1, sdxy);
                    atomicAdd(a.v_conics + i * 3 + 2, 0.5f * sdyy);
                    atomicAdd(a.v_opacities + s_gid[k], -su / s.opacity);
                }
            }
        }

        // ---- channels: V[kk][c] = sum_p W[klist[kk]][p] G[p][c], 4 Gaussians x 4 channels per item --------
        // An item is (Gaussian group, channel group, pixel group); the 8 pixel groups of an output block are
        // adjacent lanes, summed with shuffles; lanes run the loop in lockstep (uniform trip count).
        const int nkg = (nk + 3) / 4, ncg = cp / 4;
        const int items = nkg * ncg * GROUPS;
        for (int base = 0; base < items; base += BLOCK_SIZE) {
            const int item = base + tid;
            const int group = item % GROUPS, rest = item / GROUPS;
            const int cg = rest % ncg, kg = rest / ncg;
            float acc[4][4] = {};
            if (item < items) {
                int rows[4];
                unsigned slots = 0;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int kk = kg * 4 + j;
                    rows[j] = s_klist[kk < nk ? kk : 0];
                    if (kk < nk) slots |= 1u << rows[j];
                }
                if (s_wmask[group] & slots) {
                    const int p0 = group * GROUP;
#pragma unroll 2
                    for (int q4 = 0; q4 < GROUP / 4; ++q4) {
                        const int p = p0 + q4 * 4;
                        float4 wv[4];
#pragma unroll
                        for (int j = 0; j < 4; ++j)
                            wv[j] = *reinterpret_cast<const float4*>(s_w + rows[j] * ROW + skewed(p));
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            const float4 gv = *reinterpret_cast<const float4*>(s_g + grad_row(p + i, rs) + cg * 4);
#pragma unroll
                            for (int j = 0; j < 4; ++j) {
                                const float wji = i == 0 ? wv[j].x : i == 1 ? wv[j].y : i == 2 ? wv[j].z : wv[j].w;
                                acc[j][0] = fmaf(wji, gv.x, acc[j][0]);
                                acc[j][1] = fmaf(wji, gv.y, acc[j][1]);
                                acc[j][2] = fmaf(wji, gv.z, acc[j][2]);
                                acc[j][3] = fmaf(wji, gv.w, acc[j][3]);
                            }
                        }
                    }
                }
            }
#pragma unroll
            for (int offset = 1; offset < GROUPS; offset <<= 1)
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int i = 0; i < 4; ++i) acc[j][i] += __shfl_xor_sync(FULL_MASK, acc[j][i], offset);
            if (item < items && group == 0) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int kk = kg * 4 + j;
                    if (kk >= nk) continue;
                    const int g = s_gid[s_klist[kk]];
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const int c = cg * 4 + i;
                        if (c < cc) atomicAdd(channel_grad(a, b, g, a.channel_begin + c), acc[j][i]);
                    }
                }
            }
        }
    }
}

cudaError_t launch_rasterize_bwd(const RasterizeArgs& args, cudaStream_t stream) {
    const int n_tiles = args.tiles_x * args.tiles_y;
    if (args.B == 0 || n_tiles == 0 || args.channel_count <= 0) return cudaSuccess;
    const size_t shared = rasterize_bwd_shared_bytes(args.channel_count);
    cudaError_t err =
        cudaFuncSetAttribute(rasterize_bwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
    if (err != cudaSuccess) return err;
    rasterize_bwd_kernel<<<dim3(unsigned(n_tiles), unsigned(args.B)), BLOCK_SIZE, shared, stream>>>(args);
    return cudaGetLastError();
}

}  // namespace fit3d
