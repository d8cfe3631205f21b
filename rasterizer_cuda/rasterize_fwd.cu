// Forward alpha compositing of C channels (rgb, depth, features) in one pass over each tile's list.
//
// One block of 16x16 threads per (tile, camera), one thread per pixel. Gaussians are staged in shared
// memory FWD_BATCH at a time; each thread computes its weights w_k = alpha_k T_k for the batch (the walk),
// then the channel values of the Gaussians some pixel of the tile composited are staged, and the block adds
// the product W C (pixels x Gaussians times Gaussians x channels) to the images on the tensor cores: each warp
// holds its 32 pixels x the launch's channels in mma accumulators across the batches (m16n8k8 TF32, operands
// split in three products, each term within about 1e-6 of float32's: tensor_core.h). With FMAs, one per pixel,
// composited Gaussian and channel, the blend was about half of the kernel's instructions and most of its
// shared-memory traffic. Channel capacities are compiled per launch width; all channels up to
// FWD_MAX_PASS_CHANNELS (72: rgb + depth + 68 features) go in one launch; wider feature maps take further
// launches over the same lists, each recomputing the weights (ext.cpp plans them).
// Twin of fit3d_hf.render._reference._rasterize (forward).
#include <cuda_bf16.h>

#include "common.h"
#include "ops.h"
#include "raster_common.h"
#include "shared_memory_grant.h"
#include "tensor_core.h"

namespace fit3d {

// Channel capacities the kernel is compiled for; a launch of `count` channels uses the smallest that fits.
constexpr int FWD_CAPACITIES[] = {4, 8, 12, 16, 24, 32, 48, 64, 72};
static_assert(FWD_CAPACITIES[sizeof(FWD_CAPACITIES) / sizeof(int) - 1] == FWD_MAX_PASS_CHANNELS,
              "the largest capacity must be the pass width planned by ext.cpp");
static_assert(FWD_BATCH % 8 == 0, "whole k-steps of the tensor-core product per batch");

int fwd_capacity(int channel_count) {
    for (int cap : FWD_CAPACITIES)
        if (channel_count <= cap) return cap;
    return -1;
}

// Floats per Gaussian row of the staged channel values: whole 8-channel column blocks, and = 8 or 24 (mod 32) so
// that a B-fragment load (rows k and k + 4, 8 consecutive channels) hits 32 different banks.
__host__ __device__ constexpr int fwd_channel_stride(int capacity) {
    int stride = (capacity + 7) / 8 * 8;
    while (stride % 32 != 8 && stride % 32 != 24) stride += 8;
    return stride;
}
// Floats per Gaussian row of the weights: = 8 (mod 32), so that an A-fragment load (pixels r and r + 8 of rows
// k, k + 4) hits 32 different banks.
constexpr int W_STRIDE = BLOCK_SIZE + 8;

size_t rasterize_fwd_shared_bytes(int channel_count) {
    const size_t cs = size_t(fwd_channel_stride(fwd_capacity(channel_count)));
    return sizeof(float) * (2 * size_t(FWD_BATCH) * cs + size_t(FWD_BATCH) * W_STRIDE) + sizeof(Splat) * FWD_BATCH +
           sizeof(int) * FWD_BATCH + sizeof(unsigned);
}

template <int CP>
__global__ void __launch_bounds__(BLOCK_SIZE, 2) rasterize_fwd_kernel(RasterizeArgs a) {
    constexpr int NB = (CP + 7) / 8;            // 8-channel column blocks of the product
    constexpr int CS = fwd_channel_stride(CP);  // floats per staged Gaussian row
    constexpr int M_TILES = 32 / 16;            // 16-pixel row blocks of a warp
    extern __shared__ float4 shared[];
    const int cc = a.channel_count;
    float* s_hi = reinterpret_cast<float*>(shared);                         // [FWD_BATCH][CS] channel values: TF32
    float* s_lo = s_hi + FWD_BATCH * CS;                                    // ... and the rest
    float* s_w = s_lo + FWD_BATCH * CS;                                     // [FWD_BATCH][W_STRIDE] weights
    Splat* s_splat = reinterpret_cast<Splat*>(s_w + FWD_BATCH * W_STRIDE);  // [FWD_BATCH]
    int* s_gid = reinterpret_cast<int*>(s_splat + FWD_BATCH);               // [FWD_BATCH] Gaussian ids
    unsigned* s_mask = reinterpret_cast<unsigned*>(s_gid + FWD_BATCH);      // slots some pixel composited

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int tile = blockIdx.x, b = blockIdx.y;
    const int n_tiles = a.tiles_x * a.tiles_y;
    const int tile_x0 = (tile % a.tiles_x) * TILE_SIZE, tile_y0 = (tile / a.tiles_x) * TILE_SIZE;
    const int col = tile_x0 + pixel_x(tid);
    const int row = tile_y0 + pixel_y(tid);
    const bool inside = col < a.width && row < a.height;
    const float px = col + 0.5f, py = row + 0.5f;
    const int64_t range_index = (int64_t(b) * n_tiles + tile) * 2;
    const int start = a.tile_ranges[range_index], end = a.tile_ranges[range_index + 1];
    // mma fragments: lane = 4 frag_row + frag_col. A (W, 16 pixels x 8 Gaussians): pixels frag_row (+ 8), Gaussians
    // frag_col (+ 4); B (C, 8 Gaussians x 8 channels): Gaussians frag_col (+ 4), channel frag_row; D: pixels
    // frag_row (+ 8), channels 2 frag_col (+ 1)
    const int frag_row = lane / 4, frag_col = lane % 4;

    // channels of the last column block past the capacity are never staged: zero them once
    constexpr int PAD = NB * 8 - CP;
    if constexpr (PAD > 0) {
        for (int e = tid; e < FWD_BATCH * PAD; e += BLOCK_SIZE) {
            const int k = e / PAD, c = CP + e % PAD;
            s_hi[k * CS + c] = s_lo[k * CS + c] = 0.f;
        }
    }
    float acc[M_TILES][NB][4];
#pragma unroll
    for (int m = 0; m < M_TILES; ++m)
#pragma unroll
        for (int n = 0; n < NB; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[m][n][i] = 0.f;
    float T = 1.f;
    bool done = !inside;
    int last = -1;
    for (int batch = start; batch < end; batch += FWD_BATCH) {
        // also the barrier that lets the previous batch's shared memory be overwritten
        if (__syncthreads_count(done) == BLOCK_SIZE) break;
        const int count = min(FWD_BATCH, end - batch);
        if (tid < count) {
            const int g = a.gaussian_ids[batch + tid];
            s_gid[tid] = g;
            s_splat[tid] = load_splat(a, b, g);
        }
        if (tid == 0) *s_mask = 0u;
        __syncthreads();

        // weights of this pixel; slots past the batch's end weigh 0 (the product reads all FWD_BATCH rows)
        unsigned composited = 0;
        for (int k = 0; k < FWD_BATCH; ++k) {
            float w = 0.f;
            if (!done && k < count) {
                float dx, dy, sigma, gauss, raw;
                const float alpha = splat_alpha(s_splat[k], px, py, dx, dy, sigma, gauss, raw);
                if (sigma >= 0.f && alpha >= ALPHA_THRESHOLD) {
                    const float next_t = T * (1.f - alpha);
                    if (next_t < TRANSMITTANCE_THRESHOLD) {
                        done = true;  // 3DGS: this Gaussian is not composited, and nothing after it
                    } else {
                        w = alpha * T;
                        T = next_t;
                        last = batch + k;
                        composited |= 1u << k;
                    }
                }
            }
            s_w[k * W_STRIDE + tid] = w;
        }
        const unsigned warp_composited = __reduce_or_sync(FULL_MASK, composited);
        if (lane == 0 && warp_composited != 0) atomicOr(s_mask, warp_composited);
        __syncthreads();

        // channel values, only of the Gaussians some pixel of the tile composited (0 for the others: their
        // weights are 0 but stale values could be NaN), split for the product once here rather than per warp
        const unsigned mask = *s_mask;
        if (mask == 0) continue;
        // (all loads of a thread first, then the stores: one at a time, each waited for, they took an eighth of
        // the kernel's time)
        constexpr int LOADS = (FWD_BATCH * CP + BLOCK_SIZE - 1) / BLOCK_SIZE;
        float v[LOADS];
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
            const int e = tid + i * BLOCK_SIZE, k = e / CP, c = e - k * CP;
            v[i] = e < count * CP && (mask & (1u << k)) && c < cc ? *channel_source(a, b, s_gid[k], a.channel_begin + c)
                                                                  : 0.f;
        }
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
            const int e = tid + i * BLOCK_SIZE, k = e / CP, c = e - k * CP;
            if (e < FWD_BATCH * CP) {
                uint32_t hi, lo;
                split_tf32(v[i], hi, lo);
                s_hi[k * CS + c] = __uint_as_float(hi);
                s_lo[k * CS + c] = __uint_as_float(lo);
            }
        }
        __syncthreads();

        // images += W C over the 8-Gaussian steps some lane of this warp composited (warp-uniform)
#pragma unroll
        for (int k0 = 0; k0 < FWD_BATCH; k0 += 8) {
            if (((warp_composited >> k0) & 0xffu) == 0u) continue;
            const float* w_col = s_w + (k0 + frag_col) * W_STRIDE + warp * 32 + frag_row;
            const int b_at = (k0 + frag_col) * CS + frag_row;
#pragma unroll
            for (int m = 0; m < M_TILES; ++m) {
                const float* w_m = w_col + m * 16;
                const float w[4] = {w_m[0], w_m[8], w_m[4 * W_STRIDE], w_m[4 * W_STRIDE + 8]};
                uint32_t a_hi[4], a_lo[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) split_tf32(w[i], a_hi[i], a_lo[i]);
#pragma unroll
                for (int n = 0; n < NB; ++n) {
                    const int at = b_at + n * 8;
                    const uint32_t b_hi[2] = {__float_as_uint(s_hi[at]), __float_as_uint(s_hi[at + 4 * CS])};
                    const uint32_t b_lo[2] = {__float_as_uint(s_lo[at]), __float_as_uint(s_lo[at + 4 * CS])};
                    mma_3xtf32(acc[m][n], a_hi, a_lo, b_hi, b_lo);
                }
            }
        }
    }

    // each lane writes the channels 2 frag_col (+ 1) of its D fragments' pixels, whose transmittance (for the
    // background) its owner lane in the warp holds
    const int64_t hw = int64_t(a.width) * a.height;
#pragma unroll
    for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int owner = m * 16 + half * 8 + frag_row;  // lane of the pixel in this warp
            const float t_pixel = __shfl_sync(FULL_MASK, T, owner);
            const int p = warp * 32 + owner;
            const int p_col = tile_x0 + pixel_x(p), p_row = tile_y0 + pixel_y(p);
            if (p_col >= a.width || p_row >= a.height) continue;
            const int64_t pix = int64_t(p_row) * a.width + p_col;
#pragma unroll
            for (int n = 0; n < NB; ++n) {
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int c = n * 8 + 2 * frag_col + j;
                    if (c >= cc) continue;
                    const int channel = a.channel_begin + c;
                    float value = acc[m][n][2 * half + j];
                    if (channel < 3 && a.background != nullptr) value += t_pixel * a.background[channel];
                    if (channel >= 4 && a.out_features_bf16 != nullptr)
                        reinterpret_cast<__nv_bfloat16*>(
                            a.out_features_bf16)[(int64_t(b) * hw + pix) * a.F + channel - 4] =
                            __float2bfloat16(value);  // round to nearest even, as torch's .to(torch.bfloat16)
                    else
                        output_plane(a, b, channel)[pix] = value;
                }
            }
        }
    }
    if (a.first_pass && inside) {
        const int64_t pix = int64_t(row) * a.width + col;
        a.out_alpha[int64_t(b) * hw + pix] = 1.f - T;
        a.final_t[int64_t(b) * hw + pix] = T;
        a.last_ids[int64_t(b) * hw + pix] = last;
    }
}

template <int CP>
cudaError_t launch_fwd(const RasterizeArgs& args, cudaStream_t stream) {
    static SharedMemoryGrant grant;
    const size_t shared = rasterize_fwd_shared_bytes(args.channel_count);
    const cudaError_t err = grant.ensure(rasterize_fwd_kernel<CP>, shared);
    if (err != cudaSuccess) return err;
    const dim3 grid(unsigned(args.tiles_x * args.tiles_y), unsigned(args.B));
    rasterize_fwd_kernel<CP><<<grid, BLOCK_SIZE, shared, stream>>>(args);
    return cudaGetLastError();
}

cudaError_t launch_rasterize_fwd(const RasterizeArgs& args, cudaStream_t stream) {
    if (args.B == 0 || args.tiles_x * args.tiles_y == 0 || args.channel_count <= 0) return cudaSuccess;
    switch (fwd_capacity(args.channel_count)) {
        case 4:
            return launch_fwd<4>(args, stream);
        case 8:
            return launch_fwd<8>(args, stream);
        case 12:
            return launch_fwd<12>(args, stream);
        case 16:
            return launch_fwd<16>(args, stream);
        case 24:
            return launch_fwd<24>(args, stream);
        case 32:
            return launch_fwd<32>(args, stream);
        case 48:
            return launch_fwd<48>(args, stream);
        case 64:
            return launch_fwd<64>(args, stream);
        case 72:
            return launch_fwd<72>(args, stream);
        default:
            return cudaErrorInvalidValue;  // ext.cpp never plans more than FWD_MAX_PASS_CHANNELS
    }
}

}  // namespace fit3d
