// Forward alpha compositing of C channels (rgb, depth, features) in one pass over each tile's list.
//
// One block of 16x16 threads per (tile, camera), one thread per pixel. Gaussians are staged in shared
// memory FWD_BATCH at a time; each thread computes its weights w_k = alpha_k T_k for the batch once, then
// the channel values of the Gaussians some pixel of the tile composited are staged, and each warp blends the
// Gaussians its lanes composited into all channels of the launch, held in registers (the kernel is compiled
// for a few channel capacities; a launch pads up to the next one). All channels up to FWD_MAX_PASS_CHANNELS
// (72: rgb + depth + 68 features) go in one launch; wider feature maps take further launches over the same
// lists, each recomputing the weights (ext.cpp plans them).
// Twin of fit3d_hf.render._reference._rasterize (forward).
#include "common.h"
#include "ops.h"
#include "raster_common.h"

namespace fit3d {

// Channel capacities the kernel is compiled for; a launch of `count` channels uses the smallest that fits.
constexpr int FWD_CAPACITIES[] = {4, 8, 12, 16, 24, 32, 48, 64, 72};
static_assert(FWD_CAPACITIES[sizeof(FWD_CAPACITIES) / sizeof(int) - 1] == FWD_MAX_PASS_CHANNELS,
              "the largest capacity must be the pass width planned by ext.cpp");

int fwd_capacity(int channel_count) {
    for (int cap : FWD_CAPACITIES)
        if (channel_count <= cap) return cap;
    return -1;
}

size_t rasterize_fwd_shared_bytes(int channel_count) {
    const size_t cp = size_t(fwd_capacity(channel_count));
    return sizeof(float) * (size_t(FWD_BATCH) * cp + size_t(FWD_BATCH) * BLOCK_SIZE) + sizeof(Splat) * FWD_BATCH +
           sizeof(int) * FWD_BATCH + sizeof(unsigned);
}

template <int CP>
__global__ void __launch_bounds__(BLOCK_SIZE, 2) rasterize_fwd_kernel(RasterizeArgs a) {
    extern __shared__ float4 shared[];
    const int cc = a.channel_count;
    float* s_chan = reinterpret_cast<float*>(shared);                         // [FWD_BATCH][CP] channel values
    float* s_w = s_chan + FWD_BATCH * CP;                                     // [FWD_BATCH][BLOCK_SIZE] weights
    Splat* s_splat = reinterpret_cast<Splat*>(s_w + FWD_BATCH * BLOCK_SIZE);  // [FWD_BATCH]
    int* s_gid = reinterpret_cast<int*>(s_splat + FWD_BATCH);                 // [FWD_BATCH] Gaussian ids
    unsigned* s_mask = reinterpret_cast<unsigned*>(s_gid + FWD_BATCH);        // slots some pixel composited

    const int tid = threadIdx.x;
    const int tile = blockIdx.x, b = blockIdx.y;
    const int n_tiles = a.tiles_x * a.tiles_y;
    const int col = (tile % a.tiles_x) * TILE_SIZE + pixel_x(tid);
    const int row = (tile / a.tiles_x) * TILE_SIZE + pixel_y(tid);
    const bool inside = col < a.width && row < a.height;
    const float px = col + 0.5f, py = row + 0.5f;
    const int64_t range_index = (int64_t(b) * n_tiles + tile) * 2;
    const int start = a.tile_ranges[range_index], end = a.tile_ranges[range_index + 1];

    float acc[CP];
#pragma unroll
    for (int c = 0; c < CP; ++c) acc[c] = 0.f;
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

        // weights of this pixel (each thread reads back only its own column of s_w: no barrier needed)
        unsigned composited = 0;
        for (int k = 0; k < count; ++k) {
            float w = 0.f;
            if (!done) {
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
            s_w[k * BLOCK_SIZE + tid] = w;
        }
        const unsigned warp_composited = __reduce_or_sync(FULL_MASK, composited);
        if (tid % 32 == 0 && warp_composited != 0) atomicOr(s_mask, warp_composited);
        __syncthreads();

        // channel values, only of the Gaussians some pixel of the tile composited
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
        for (int i = 0; i < LOADS; ++i)
            if (tid + i * BLOCK_SIZE < count * CP) s_chan[tid + i * BLOCK_SIZE] = v[i];
        __syncthreads();

        // blend the Gaussians some lane of this warp composited (warp-uniform loop)
        for (unsigned todo = warp_composited; todo != 0; todo &= todo - 1) {
            const int k = __ffs(todo) - 1;
            const float w = s_w[k * BLOCK_SIZE + tid];
            const float4* chan = reinterpret_cast<const float4*>(s_chan + k * CP);
#pragma unroll
            for (int j = 0; j < CP / 4; ++j) {
                const float4 v = chan[j];
                acc[4 * j + 0] = fmaf(w, v.x, acc[4 * j + 0]);
                acc[4 * j + 1] = fmaf(w, v.y, acc[4 * j + 1]);
                acc[4 * j + 2] = fmaf(w, v.z, acc[4 * j + 2]);
                acc[4 * j + 3] = fmaf(w, v.w, acc[4 * j + 3]);
            }
        }
    }

    if (!inside) return;
    const int64_t hw = int64_t(a.width) * a.height;
    const int64_t pix = int64_t(row) * a.width + col;
#pragma unroll
    for (int c = 0; c < CP; ++c) {
        if (c >= cc) break;
        const int channel = a.channel_begin + c;
        float v = acc[c];
        if (channel < 3 && a.background != nullptr) v += T * a.background[channel];
        output_plane(a, b, channel)[pix] = v;
    }
    if (a.first_pass) {
        a.out_alpha[int64_t(b) * hw + pix] = 1.f - T;
        a.final_t[int64_t(b) * hw + pix] = T;
        a.last_ids[int64_t(b) * hw + pix] = last;
    }
}

template <int CP>
cudaError_t launch_fwd(const RasterizeArgs& args, cudaStream_t stream) {
    const size_t shared = rasterize_fwd_shared_bytes(args.channel_count);
    cudaError_t err =
        cudaFuncSetAttribute(rasterize_fwd_kernel<CP>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
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
