// Backward of the SH colour: one thread per Gaussian, looping over the cameras (no atomics).
// Gradients reach the SH coefficients and, through the view direction, the means.
//
// A block's Gaussians own one contiguous stretch of the [N, K, 3] coefficients and of their gradients, so the
// block reads and writes it through shared memory with consecutive threads on consecutive floats; a thread
// reading its own 48 floats straight from global memory touches a different cache line per lane and
// instruction (the kernel took 0.85 ms for 1M Gaussians on an H100 that way).
#include "common.h"
#include "ops.h"
#include "sh_math.h"
#include "shared_memory_grant.h"

namespace fit3d {

constexpr int SH_BWD_THREADS = 128;
constexpr int STAGE = 8;  // loads in flight per thread while staging

// Floats per Gaussian in shared memory: K * 3 rounded up to an odd count, so that the 32 lanes reading
// coefficient k of 32 consecutive Gaussians hit 32 different banks.
__host__ __device__ inline int sh_shared_stride(int K) { return (K * 3) | 1; }

// Element (i, j) of `width`-float rows that a thread visits, the block's threads on consecutive elements: one
// division when it starts, then steps of SH_BWD_THREADS elements by addition (a division per element, twice,
// took a third of the kernel's time).
struct RowCursor {
    int i, j, di, dj, width;
    __device__ explicit RowCursor(int width_)
        : i(int(threadIdx.x) / width_),
          j(int(threadIdx.x) % width_),
          di(SH_BWD_THREADS / width_),
          dj(SH_BWD_THREADS % width_),
          width(width_) {}
    __device__ void advance() {
        i += di;
        j += dj;
        if (j >= width) {
            j -= width;
            ++i;
        }
    }
};

// Rows of `width` floats (a tensor's values of `count` consecutive Gaussians, `src_stride` floats apart) into
// columns [first, first + width) of the shared rows (`stride` floats apart), and back.
__device__ inline void stage_rows(const float* src, int64_t src_stride, int count, int first, int width, float* s_rows,
                                  int stride) {
    if (width == 0) return;
    for (RowCursor at(width); at.i < count;) {
        float v[STAGE];
        RowCursor c = at;
#pragma unroll
        for (int u = 0; u < STAGE; ++u, c.advance()) v[u] = c.i < count ? src[c.i * src_stride + c.j] : 0.f;
        c = at;
#pragma unroll
        for (int u = 0; u < STAGE; ++u, c.advance())
            if (c.i < count) s_rows[c.i * stride + first + c.j] = v[u];
        at = c;
    }
}
__device__ inline void unstage_rows(const float* s_rows, int stride, int count, int first, int width, float* dst,
                                    int64_t dst_stride) {
    if (width == 0) return;
    for (RowCursor c(width); c.i < count; c.advance()) dst[c.i * dst_stride + c.j] = s_rows[c.i * stride + first + c.j];
}

template <int DEG>
__global__ void __launch_bounds__(SH_BWD_THREADS) sh_bwd_kernel(ShArgs a) {
    constexpr int n_basis = (DEG + 1) * (DEG + 1);
    extern __shared__ float s_coeffs[];  // [SH_BWD_THREADS][stride]: coefficients in, then their gradients out
    const int row = a.K * 3, stride = sh_shared_stride(a.K);
    const int g0 = int(blockIdx.x) * SH_BWD_THREADS;
    const int count = min(SH_BWD_THREADS, a.N - g0);
    // The block's coefficients: its stretch of each tensor, consecutive threads on consecutive floats, the DC
    // terms' (3 floats per Gaussian, at offset 0 of a row) then the rest's; a thread's loads go out before its
    // stores (element by element, through a branch between the two tensors, the kernel took 0.63 ms for 1M
    // Gaussians on an H100; 0.39 ms so, with two divisions per element)
    stage_rows(a.sh_dc + int64_t(g0) * a.dc_stride, a.dc_stride, count, 0, 3, s_coeffs, stride);
    stage_rows(a.sh_rest + int64_t(g0) * a.rest_stride, a.rest_stride, count, 3, row - 3, s_coeffs, stride);
    __syncthreads();
    float* mine = s_coeffs + threadIdx.x * stride;
    if (int(threadIdx.x) < count) {
        sh_bwd_core<DEG>(a, g0 + int(threadIdx.x), mine, mine);
        for (int j = n_basis * 3; j < row; ++j) mine[j] = 0.f;  // coefficients past the degree
    }
    __syncthreads();
    unstage_rows(s_coeffs, stride, count, 0, 3, a.v_dc + int64_t(g0) * a.dc_stride, a.dc_stride);
    unstage_rows(s_coeffs, stride, count, 3, row - 3, a.v_rest + int64_t(g0) * a.rest_stride, a.rest_stride);
}

cudaError_t launch_sh_bwd(const ShArgs& args, cudaStream_t stream) {
    if (args.N == 0) return cudaSuccess;
    const size_t shared = sizeof(float) * SH_BWD_THREADS * size_t(sh_shared_stride(args.K));
    const unsigned blocks = unsigned(ceil_div(args.N, SH_BWD_THREADS));
    cudaError_t err = cudaSuccess;
    with_sh_degree(args.degree, [&](auto deg) {
        constexpr int DEG = decltype(deg)::value;
        static SharedMemoryGrant grant;  // one per degree's kernel
        err = grant.ensure(sh_bwd_kernel<DEG>, shared);
        if (err == cudaSuccess) sh_bwd_kernel<DEG><<<blocks, SH_BWD_THREADS, shared, stream>>>(args);
    });
    return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace fit3d
