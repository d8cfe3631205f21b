// Stage I's feature loss in one pass: mean over channels and pixels of |decoded - up(target)|, masked
// pixels counting 0, where up() is bilinear upsampling (align_corners=False, PyTorch's formula) of the
// backbone's patch-resolution target to the decoded map's size.
//
// Composed from PyTorch ops this takes an upsampled copy of the target, a where(), a difference, abs, mean
// and their backward: about ten passes over a D x H x W map (D = 384 at 876 x 584: 196M values), which
// cost more than the rasterizer itself. Here the forward reads the decoded map once (the small target
// stays in L2) and the backward reads it once more and writes the gradient; or, where the forward kept the
// signs of the differences (2 bits per value, the 8-channel kernel), the backward reads only those. Layout: channels
// last (NHWC) for both tensors, so a warp reads consecutive channels of one pixel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "feature_loss_math.h"
#include "ops.h"

namespace fit3d {

namespace {

constexpr int LOSS_BLOCK = 256;
constexpr int PIXELS_PER_BLOCK = 32;

__device__ inline float to_float(float v) { return v; }
__device__ inline float to_float(__half v) { return __half2float(v); }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ inline T from_float(float v);
template <>
__device__ inline float from_float<float>(float v) {
    return v;
}
template <>
__device__ inline __half from_float<__half>(float v) {
    return __float2half(v);
}
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16(v);
}

// The upsampled target at pixel (b, y, x), channel c, and whether the pixel counts.
struct PixelSource {
    int64_t t00, t01, t10, t11;  // element offsets of the 4 neighbours (channel 0)
    float w00, w01, w10, w11;
};

__device__ inline PixelSource pixel_source(const FeatureL1Args& a, int64_t pixel) {
    const int x = int(pixel % a.W), y = int((pixel / a.W) % a.H), b = int(pixel / (int64_t(a.W) * a.H));
    int y0, y1, x0, x1;
    float ly, lx;
    source_index(y, a.scale_y, a.h, y0, y1, ly);
    source_index(x, a.scale_x, a.w, x0, x1, lx);
    const int64_t row0 = (int64_t(b) * a.h + y0) * a.w, row1 = (int64_t(b) * a.h + y1) * a.w;
    PixelSource s;
    s.t00 = (row0 + x0) * a.D;
    s.t01 = (row0 + x1) * a.D;
    s.t10 = (row1 + x0) * a.D;
    s.t11 = (row1 + x1) * a.D;
    s.w00 = (1.f - ly) * (1.f - lx);
    s.w01 = (1.f - ly) * lx;
    s.w10 = ly * (1.f - lx);
    s.w11 = ly * lx;
    return s;
}

// VEC consecutive channels of one pixel, loaded and stored as one aligned vector.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Channels {
    T v[VEC];
};

// One block per PIXELS_PER_BLOCK pixels; each thread takes VEC consecutive channels of a pixel at a time, in
// memory order. Forward (grad == nullptr): per-block sums of |d - t| into partials. Backward: grad =
// sign(d - t) * g / n (0 where the pixel is masked or d == t, as the gradient of abs).
template <typename TD, typename TT, int VEC>
__global__ void __launch_bounds__(LOSS_BLOCK)
    feature_l1_kernel(FeatureL1Args a, const TD* decoded, const TT* target, TD* grad) {
    __shared__ PixelSource s_source[PIXELS_PER_BLOCK];
    __shared__ float s_sum[LOSS_BLOCK / 32];
    const int64_t n_pixels = int64_t(a.B) * a.H * a.W;
    const int64_t first = int64_t(blockIdx.x) * PIXELS_PER_BLOCK;
    const int pixels = int(min(int64_t(PIXELS_PER_BLOCK), n_pixels - first));
    if (threadIdx.x < pixels) s_source[threadIdx.x] = pixel_source(a, first + threadIdx.x);
    __syncthreads();
    const float scale = grad != nullptr ? *a.grad_output * a.inv_count : 0.f;
    const int groups = a.D / VEC;  // channel groups per pixel
    float sum = 0.f;
    for (int item = threadIdx.x; item < pixels * groups; item += LOSS_BLOCK) {
        const int p = item / groups, c = (item - p * groups) * VEC;
        const int64_t index = (first + p) * a.D + c;
        if (a.mask != nullptr && !a.mask[first + p]) {
            if (VEC == 8 && a.signs != nullptr) a.signs[index / 8] = 0;
            if (grad != nullptr) {
                Channels<TD, VEC> zero;
#pragma unroll
                for (int k = 0; k < VEC; ++k) zero.v[k] = from_float<TD>(0.f);
                *reinterpret_cast<Channels<TD, VEC>*>(grad + index) = zero;
            }
            continue;
        }
        const PixelSource& src = s_source[p];
        const auto d = *reinterpret_cast<const Channels<TD, VEC>*>(decoded + index);
        const auto t00 = *reinterpret_cast<const Channels<TT, VEC>*>(target + src.t00 + c);
        const auto t01 = *reinterpret_cast<const Channels<TT, VEC>*>(target + src.t01 + c);
        const auto t10 = *reinterpret_cast<const Channels<TT, VEC>*>(target + src.t10 + c);
        const auto t11 = *reinterpret_cast<const Channels<TT, VEC>*>(target + src.t11 + c);
        Channels<TD, VEC> out;
        uint32_t code = 0;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            // same association as PyTorch: h0 * (w0 * t00 + w1 * t01) + h1 * (w0 * t10 + w1 * t11)
            const float up = (src.w00 * to_float(t00.v[k]) + src.w01 * to_float(t01.v[k])) +
                             (src.w10 * to_float(t10.v[k]) + src.w11 * to_float(t11.v[k]));
            const float diff = to_float(d.v[k]) - up;
            sum += fabsf(diff);
            out.v[k] = from_float<TD>(diff > 0.f ? scale : (diff < 0.f ? -scale : 0.f));
            code |= (diff > 0.f ? 1u : (diff < 0.f ? 2u : 0u)) << (2 * k);
        }
        if (grad != nullptr) *reinterpret_cast<Channels<TD, VEC>*>(grad + index) = out;
        if (VEC == 8 && a.signs != nullptr) a.signs[index / 8] = uint16_t(code);
    }
    if (grad != nullptr) return;
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (threadIdx.x % 32 == 0) s_sum[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (int w = 0; w < LOSS_BLOCK / 32; ++w) total += s_sum[w];
        a.partials[blockIdx.x] = total;
    }
}

// The backward from the forward's signs: one thread per 8 channels, one 2-byte read and one vector store, instead of
// reading the decoded map and the target again.
template <typename TD>
__global__ void __launch_bounds__(LOSS_BLOCK)
    feature_l1_from_signs_kernel(const uint16_t* signs, int64_t items, const float* grad_output, float inv_count,
                                 TD* grad) {
    const float scale = *grad_output * inv_count;
    for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
         item += int64_t(gridDim.x) * blockDim.x) {
        const uint32_t code = signs[item];
        Channels<TD, 8> out;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const uint32_t s = (code >> (2 * k)) & 3u;
            out.v[k] = from_float<TD>(s == 1u ? scale : (s == 2u ? -scale : 0.f));
        }
        *reinterpret_cast<Channels<TD, 8>*>(grad + 8 * item) = out;
    }
}

// 8 channels at a time where every pixel's channels start on a vector boundary
bool vector_path(const FeatureL1Args& a, size_t decoded_bytes, size_t target_bytes) {
    return a.D % 8 == 0 && is_aligned(a.decoded, 8 * decoded_bytes) && is_aligned(a.target, 8 * target_bytes) &&
           (a.grad == nullptr || is_aligned(a.grad, 8 * decoded_bytes));
}

size_t type_bytes(ScalarType t) { return t == ScalarType::Float32 ? 4 : 2; }

template <typename TD, typename TT>
cudaError_t launch_typed(const FeatureL1Args& a, cudaStream_t stream) {
    const int64_t blocks = feature_l1_blocks(a);
    if (blocks == 0) return cudaSuccess;
    const auto decoded = static_cast<const TD*>(a.decoded);
    const auto target = static_cast<const TT*>(a.target);
    const auto grad = static_cast<TD*>(a.grad);
    if (vector_path(a, sizeof(TD), sizeof(TT)))
        feature_l1_kernel<TD, TT, 8><<<unsigned(blocks), LOSS_BLOCK, 0, stream>>>(a, decoded, target, grad);
    else
        feature_l1_kernel<TD, TT, 1><<<unsigned(blocks), LOSS_BLOCK, 0, stream>>>(a, decoded, target, grad);
    return cudaGetLastError();
}

template <typename TD>
cudaError_t launch_decoded(const FeatureL1Args& a, cudaStream_t stream) {
    switch (a.target_type) {
        case ScalarType::Float32:
            return launch_typed<TD, float>(a, stream);
        case ScalarType::Float16:
            return launch_typed<TD, __half>(a, stream);
        case ScalarType::BFloat16:
            return launch_typed<TD, __nv_bfloat16>(a, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace

bool feature_l1_keeps_signs(const FeatureL1Args& a) {
    return vector_path(a, type_bytes(a.decoded_type), type_bytes(a.target_type));
}

cudaError_t launch_feature_l1_from_signs(const uint16_t* signs, int64_t count, ScalarType grad_type,
                                         const float* grad_output, float inv_count, void* grad, cudaStream_t stream) {
    const int64_t items = count / 8;
    if (items == 0) return cudaSuccess;
    const unsigned blocks = unsigned(std::min<int64_t>((items + LOSS_BLOCK - 1) / LOSS_BLOCK, 65535));
    switch (grad_type) {
        case ScalarType::Float32:
            feature_l1_from_signs_kernel<<<blocks, LOSS_BLOCK, 0, stream>>>(signs, items, grad_output, inv_count,
                                                                            static_cast<float*>(grad));
            break;
        case ScalarType::Float16:
            feature_l1_from_signs_kernel<<<blocks, LOSS_BLOCK, 0, stream>>>(signs, items, grad_output, inv_count,
                                                                            static_cast<__half*>(grad));
            break;
        case ScalarType::BFloat16:
            feature_l1_from_signs_kernel<<<blocks, LOSS_BLOCK, 0, stream>>>(signs, items, grad_output, inv_count,
                                                                            static_cast<__nv_bfloat16*>(grad));
            break;
    }
    return cudaGetLastError();
}

int64_t feature_l1_blocks(const FeatureL1Args& a) {
    return (int64_t(a.B) * a.H * a.W + PIXELS_PER_BLOCK - 1) / PIXELS_PER_BLOCK;
}

cudaError_t launch_feature_l1(const FeatureL1Args& a, cudaStream_t stream) {
    switch (a.decoded_type) {
        case ScalarType::Float32:
            return launch_decoded<float>(a, stream);
        case ScalarType::Float16:
            return launch_decoded<__half>(a, stream);
        case ScalarType::BFloat16:
            return launch_decoded<__nv_bfloat16>(a, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace fit3d
