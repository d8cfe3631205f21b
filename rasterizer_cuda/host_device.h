// Lets the maths headers of the rasterizer compile for both backends, so the CUDA kernels and the CPU
// extension (rasterizer_cuda/cpu/) share one statement of the maths:
//  * CUDA: nvcc, or the host compiler beside the CUDA runtime headers (ext.cpp): the real CUDA types;
//  * CPU: a plain C++ compiler, with FIT3D_CPU_ONLY defined by rasterizer_cuda/build.py: `__host__` and
//    `__device__` qualify nothing, and the few CUDA types the maths and ops.h name get plain stand-ins.
#pragma once

#if defined(__CUDACC__) || !defined(FIT3D_CPU_ONLY)
#include <cuda_runtime.h>
#else
#include <math.h>

#ifndef __host__
#define __host__
#endif
#ifndef __device__
#define __device__
#endif

struct float3 {
    float x, y, z;
};
struct float4 {
    float x, y, z, w;
};
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
// Only named by the declarations of the CUDA launchers in ops.h, which the CPU extension neither defines nor
// calls.
using cudaError_t = int;
using cudaStream_t = struct CUstream_st*;
#endif

#include <cstddef>
#include <cstdint>

namespace fit3d {

// Whether `p` lies on a multiple of `bytes` (for vector loads).
__host__ __device__ inline bool is_aligned(const void* p, size_t bytes) {
    return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// exp(x) as the kernels take it: the GPU's fast __expf (within a few ulp), libm's expf on the CPU. A forward
// and its backward always run on the same device, so both round alpha the same way.
__host__ __device__ inline float fast_expf(float x) {
#ifdef __CUDA_ARCH__
    return __expf(x);
#else
    return expf(x);
#endif
}

}  // namespace fit3d
