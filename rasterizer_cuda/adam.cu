// Adam over many tensors in one launch (Stage I's optimizer step, fit3d_hf/optim.py).
//
// torch's fused Adam takes one learning rate per call, so Stage I's eight parameter groups (one per Gaussian
// attribute, 3DGS's learning rates) cost eight calls and 13 launches; on an H100 the step moved its 3.4 GB at
// about 1.8 TB/s (session 8). Here every tensor's step size comes with it, and one launch streams them all:
// a block takes ADAM_BLOCK_ELEMENTS consecutive elements of one tensor, four per 16-byte load where the
// tensor's pointers allow (H100, Stage I at 1M Gaussians: 1.89 -> 1.19 ms, 2.89 TB/s, session 9). The update is
// torch's Adam (no weight decay, no amsgrad) term by term, with the scalars that involve beta (1 - beta, the bias
// corrections) computed in double by the caller, as torch's per-tensor Adam has them.
#include <algorithm>

#include "common.h"
#include "ops.h"

namespace fit3d {

namespace {

constexpr int ADAM_THREADS = 256;
constexpr int ADAM_VECTORS_PER_THREAD = 2;
constexpr int64_t ADAM_BLOCK_ELEMENTS = int64_t(ADAM_THREADS) * ADAM_VECTORS_PER_THREAD * 4;

struct AdamLaunch {
    AdamTensor tensors[ADAM_MAX_TENSORS];
    int64_t first_block[ADAM_MAX_TENSORS + 1];  // blocks of tensor i: [first_block[i], first_block[i + 1])
    int count;
};

__device__ __forceinline__ void adam_update(const AdamTensor& t, float& param, float grad, float& m, float& v) {
    m = t.beta1 * m + t.one_minus_beta1 * grad;
    v = t.beta2 * v + t.one_minus_beta2 * grad * grad;
    const float denom = sqrtf(v) / t.bias_correction2_sqrt + t.eps;
    param -= t.step_size * m / denom;
}

__global__ void __launch_bounds__(ADAM_THREADS) adam_kernel(const __grid_constant__ AdamLaunch launch) {
    const int64_t block = blockIdx.x;
    int i = 0;
    while (i + 1 < launch.count && launch.first_block[i + 1] <= block) ++i;  // at most ADAM_MAX_TENSORS steps
    const AdamTensor& t = launch.tensors[i];
    const int64_t begin = (block - launch.first_block[i]) * ADAM_BLOCK_ELEMENTS;
    const int64_t end = begin + ADAM_BLOCK_ELEMENTS < t.n ? begin + ADAM_BLOCK_ELEMENTS : t.n;
    const bool vectorised = t.row == 0 && is_aligned(t.param, 16) && is_aligned(t.grad, 16) &&
                            is_aligned(t.exp_avg, 16) && is_aligned(t.exp_avg_sq, 16);
    if (vectorised && end - begin == ADAM_BLOCK_ELEMENTS) {
        // loads first, then the arithmetic: the block's 2 x 4 loads per thread are in flight together
        float4 p[ADAM_VECTORS_PER_THREAD], g[ADAM_VECTORS_PER_THREAD], m[ADAM_VECTORS_PER_THREAD],
            v[ADAM_VECTORS_PER_THREAD];
#pragma unroll
        for (int k = 0; k < ADAM_VECTORS_PER_THREAD; ++k) {
            const int64_t e = begin + 4 * (int64_t(k) * ADAM_THREADS + threadIdx.x);
            p[k] = *reinterpret_cast<const float4*>(t.param + e);
            g[k] = __ldcs(reinterpret_cast<const float4*>(t.grad + e));  // read once: stream past the caches
            m[k] = *reinterpret_cast<const float4*>(t.exp_avg + e);
            v[k] = *reinterpret_cast<const float4*>(t.exp_avg_sq + e);
        }
#pragma unroll
        for (int k = 0; k < ADAM_VECTORS_PER_THREAD; ++k) {
            const int64_t e = begin + 4 * (int64_t(k) * ADAM_THREADS + threadIdx.x);
            adam_update(t, p[k].x, g[k].x, m[k].x, v[k].x);
            adam_update(t, p[k].y, g[k].y, m[k].y, v[k].y);
            adam_update(t, p[k].z, g[k].z, m[k].z, v[k].z);
            adam_update(t, p[k].w, g[k].w, m[k].w, v[k].w);
            *reinterpret_cast<float4*>(t.param + e) = p[k];
            *reinterpret_cast<float4*>(t.exp_avg + e) = m[k];
            *reinterpret_cast<float4*>(t.exp_avg_sq + e) = v[k];
        }
        return;
    }
    // a tensor's last, partial block, unaligned pointers or a live prefix per row: one element per thread at a time
    for (int64_t e = begin + threadIdx.x; e < end; e += ADAM_THREADS) {
        // the live element e of a row-prefix tensor (n < 2^31 then) is in row e / live
        const int64_t at =
            t.row == 0 ? e : int64_t(unsigned(e) / unsigned(t.live)) * t.row + int64_t(unsigned(e) % unsigned(t.live));
        float p = t.param[at], m = t.exp_avg[at], v = t.exp_avg_sq[at];
        adam_update(t, p, t.grad[at], m, v);
        t.param[at] = p;
        t.exp_avg[at] = m;
        t.exp_avg_sq[at] = v;
    }
}

}  // namespace

cudaError_t launch_adam(const AdamTensor* tensors, int count, cudaStream_t stream) {
    // ADAM_MAX_TENSORS per launch: the launch's argument block (1.4 KB of the 4 KB allowed) holds their pointers
    for (int first = 0; first < count; first += ADAM_MAX_TENSORS) {
        AdamLaunch launch = {};
        launch.count = std::min(count - first, ADAM_MAX_TENSORS);
        int64_t blocks = 0;
        for (int i = 0; i < launch.count; ++i) {
            launch.tensors[i] = tensors[first + i];
            launch.first_block[i] = blocks;
            blocks += (tensors[first + i].n + ADAM_BLOCK_ELEMENTS - 1) / ADAM_BLOCK_ELEMENTS;
        }
        launch.first_block[launch.count] = blocks;
        if (blocks == 0) continue;
        if (blocks > int64_t(INT32_MAX)) return cudaErrorInvalidValue;
        adam_kernel<<<unsigned(blocks), ADAM_THREADS, 0, stream>>>(launch);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
}

}  // namespace fit3d
