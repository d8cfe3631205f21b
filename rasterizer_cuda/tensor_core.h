// Float32-accurate matrix products on the tensor cores, for the blending kernels (rasterize_fwd.cu,
// rasterize_bwd.cu): m16n8k8 TF32 mma.sync with each operand split into a TF32 part and the rest.
#pragma once

#include <cstdint>

namespace fit3d {

// x = hi + lo with hi the TF32 value of x (its 10 leading mantissa bits, by truncation) and lo the exact
// float32 rest; the tensor core reads the 10 leading mantissa bits of lo too. Two instructions, where
// cvt.rna.tf32.f32 takes several on sm_90.
__device__ inline void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
    hi = __float_as_uint(x) & 0xffffe000u;
    lo = __float_as_uint(x - __uint_as_float(hi));
}

__device__ inline void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += a b to nearly float32 accuracy from TF32 products: with a = a_hi + a_lo and b = b_hi + b_lo, the three terms
// a_hi b_hi + a_hi b_lo + a_lo b_hi miss a_lo b_lo and the bits of the lo parts past TF32 (each about 2^-20 of
// a b), where one TF32 product would be off by about 2^-11. Small terms first.
__device__ inline void mma_3xtf32(float (&d)[4], const uint32_t (&a_hi)[4], const uint32_t (&a_lo)[4],
                                  const uint32_t (&b_hi)[2], const uint32_t (&b_lo)[2]) {
    mma_tf32(d, a_lo, b_hi);
    mma_tf32(d, a_hi, b_lo);
    mma_tf32(d, a_hi, b_hi);
}

// The same from float32 operands, split here.
__device__ inline void mma_3xtf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
    uint32_t a_hi[4], a_lo[4], b_hi[2], b_lo[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) split_tf32(a[i], a_hi[i], a_lo[i]);
#pragma unroll
    for (int i = 0; i < 2; ++i) split_tf32(b[i], b_hi[i], b_lo[i]);
    mma_3xtf32(d, a_hi, a_lo, b_hi, b_lo);
}

// The same where every b is exact in TF32 (a bfloat16 value, say): b's rest is 0, so its product is skipped and d
// comes out exactly as from the three products above, with two.
__device__ inline void mma_2xtf32_exact_b(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
    uint32_t a_hi[4], a_lo[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) split_tf32(a[i], a_hi[i], a_lo[i]);
    const uint32_t b_exact[2] = {__float_as_uint(b[0]), __float_as_uint(b[1])};
    mma_tf32(d, a_lo, b_exact);
    mma_tf32(d, a_hi, b_exact);
}

}  // namespace fit3d
