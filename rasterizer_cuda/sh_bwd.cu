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

namespace fit3d {

constexpr int SH_BWD_THREADS = 128;

// Floats per Gaussian in shared memory: K * 3 rounded up to an odd count, so that the 32 lanes reading
// coefficient k of 32 consecutive Gaussians hit 32 different banks.
__host__ __device__ inline int sh_shared_stride(int K) { return (K * 3) | 1; }

template <int DEG>
__global__ void __launch_bounds__(SH_BWD_THREADS) sh_bwd_kernel(ShArgs a) {
    extern __shared__ float s_coeffs[];  // [SH_BWD_THREADS][stride]: coefficients in, then their gradients out
    const int row = a.K * 3, stride = sh_shared_stride(a.K);
    const int g0 = int(blockIdx.x) * SH_BWD_THREADS;
    const int count = min(SH_BWD_THREADS, a.N - g0);
    const int64_t base = int64_t(g0) * row;
    for (int e = threadIdx.x; e < count * row; e += SH_BWD_THREADS)
        s_coeffs[(e / row) * stride + e % row] = a.sh[base + e];
    __syncthreads();
    float* mine = s_coeffs + threadIdx.x * stride;
    if (int(threadIdx.x) < count) sh_bwd_core<DEG>(a, g0 + int(threadIdx.x), mine, mine);
    __syncthreads();
    for (int e = threadIdx.x; e < count * row; e += SH_BWD_THREADS)
        a.v_sh[base + e] = s_coeffs[(e / row) * stride + e % row];
}

cudaError_t launch_sh_bwd(const ShArgs& args, cudaStream_t stream) {
    if (args.N == 0) return cudaSuccess;
    const size_t shared = sizeof(float) * SH_BWD_THREADS * size_t(sh_shared_stride(args.K));
    const unsigned blocks = unsigned(ceil_div(args.N, SH_BWD_THREADS));
    cudaError_t err = cudaSuccess;
    with_sh_degree(args.degree, [&](auto deg) {
        constexpr int DEG = decltype(deg)::value;
        err = cudaFuncSetAttribute(sh_bwd_kernel<DEG>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
        if (err == cudaSuccess) sh_bwd_kernel<DEG><<<blocks, SH_BWD_THREADS, shared, stream>>>(args);
    });
    return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace fit3d
