// Fused SSIM of Stage I's RGB loss (see ssim.h). Composed from torch ops, the loss took two depthwise
// convolutions and about 30 elementwise kernels each way (H100, 3 x 584 x 876: 0.9 ms of GPU time forward and
// backward); here each direction is one launch (25 + 19 us there), one block per 32 x 32 output tile of a plane:
//  * forward: the tile and its 5-pixel halo of p and t go to shared memory (zeros outside the image: the zero
//    padding), a row pass blurs p, t, pp, tt, pt over the 42 halo rows, a column pass finishes the five local
//    means at the tile's pixels. Each pixel's S adds to the block's partial sum (torch adds the partials up:
//    a fixed order, so the loss is the same on every run); its derivatives dS/dmu_p, dS/dE[pp], dS/dE[pt] go
//    to the buffer that the backward reads.
//  * backward: dL/dp(x) = g / n * sum_y w(y - x) (D_mu(y) + 2 p(x) D_pp(y) + t(x) D_pt(y)) over the pixels y
//    of the image, the D maps being those derivatives: the same two passes blur the three maps (zeros outside
//    the image; the window is symmetric), then each pixel combines them with its p and t.
#include <climits>
#include <cmath>

#include "common.h"
#include "ssim.h"

namespace fit3d {

namespace {

constexpr int HALO = SSIM_TAPS / 2;
constexpr int TILE = 32;  // output tile side: a warp spans one row of it
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int IN = TILE + 2 * HALO;  // 42 rows and columns of tile + halo
// Odd row strides: in the row pass a warp's lanes take one row each, so they hit 32 distinct banks.
constexpr int IN_STRIDE = IN + 1;
constexpr int MID_STRIDE = TILE + 1;
constexpr int ROW_OUT = 4;                        // adjacent outputs per row-pass item: 14 loads serve 44 taps
constexpr int ROW_ITEMS = IN * (TILE / ROW_OUT);  // 42 rows x 8 column groups
constexpr int COL_OUT = TILE / WARPS;             // adjacent rows per thread in the column pass
static_assert(TILE == 32 && TILE % ROW_OUT == 0 && TILE % WARPS == 0, "a warp must span one tile row");

// losses.py's constants: Python floats, rounded to float32 where they meet the float32 maps
constexpr float C1 = float(0.01 * 0.01);
constexpr float C2 = float(0.03 * 0.03);

struct Tile {
    int64_t offset;  // of the image plane's first pixel
    int y0, x0;      // the tile's first output pixel
};

// Blocks in the order (plane, tile row, tile column): a flat grid, so no dimension limit binds B * C.
__device__ __forceinline__ Tile tile_of(const SsimArgs& a) {
    const int tiles_x = ceil_div(a.W, TILE), tiles_y = ceil_div(a.H, TILE);
    const int64_t block = blockIdx.x;
    Tile t;
    t.x0 = int(block % tiles_x) * TILE;
    t.y0 = int(block / tiles_x % tiles_y) * TILE;
    t.offset = block / tiles_x / tiles_y * (int64_t(a.H) * a.W);
    return t;
}

// N planes' tile + halo into s_in [N][IN][IN_STRIDE], zeros outside the image (the zero padding). All of a
// thread's global loads are issued before its first shared store, so their latencies overlap.
template <int N>
__device__ __forceinline__ void load_tile(const SsimArgs& a, const Tile& tile, const float* const (&src)[N],
                                          float* s_in) {
    constexpr int STEPS = (IN * IN + THREADS - 1) / THREADS;
    float v[STEPS][N];
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
        const int i = threadIdx.x + s * THREADS, r = i / IN, c = i - r * IN;
        const int y = tile.y0 - HALO + r, x = tile.x0 - HALO + c;
        const bool inside = i < IN * IN && y >= 0 && y < a.H && x >= 0 && x < a.W;
        const int64_t index = tile.offset + int64_t(y) * a.W + x;
#pragma unroll
        for (int m = 0; m < N; ++m) v[s][m] = inside ? __ldg(src[m] + index) : 0.f;
    }
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
        const int i = threadIdx.x + s * THREADS, r = i / IN, c = i - r * IN;
        if (i >= IN * IN) break;
#pragma unroll
        for (int m = 0; m < N; ++m) s_in[(m * IN + r) * IN_STRIDE + c] = v[s][m];
    }
}

// Row pass: s_mid[m][r][c] = sum_k taps[k] v_m(r, c + k) for the IN rows and the tile's columns, where
// v = expand(the NIN inputs at a point) are the NOUT maps to blur. An item takes ROW_OUT adjacent outputs of
// one row, so each loaded value serves up to ROW_OUT taps from registers.
template <int NIN, int NOUT, typename Expand>
__device__ __forceinline__ void row_pass(const SsimArgs& a, const float* s_in, float* s_mid, Expand expand) {
    for (int item = threadIdx.x; item < ROW_ITEMS; item += THREADS) {
        const int r = item % IN, c0 = item / IN * ROW_OUT;
        float acc[NOUT][ROW_OUT] = {};
#pragma unroll
        for (int k = 0; k < ROW_OUT + 2 * HALO; ++k) {
            float in[NIN], v[NOUT];
#pragma unroll
            for (int m = 0; m < NIN; ++m) in[m] = s_in[(m * IN + r) * IN_STRIDE + c0 + k];
            expand(in, v);
#pragma unroll
            for (int j = 0; j < ROW_OUT; ++j) {
                if (k - j < 0 || k - j >= SSIM_TAPS) continue;
#pragma unroll
                for (int m = 0; m < NOUT; ++m) acc[m][j] = fmaf(a.taps[k - j], v[m], acc[m][j]);
            }
        }
#pragma unroll
        for (int m = 0; m < NOUT; ++m)
#pragma unroll
            for (int j = 0; j < ROW_OUT; ++j) s_mid[(m * IN + r) * MID_STRIDE + c0 + j] = acc[m][j];
    }
}

// Column pass: the blurred maps at this thread's COL_OUT pixels (column lane, rows row0..row0 + COL_OUT - 1
// of the tile); a warp reads one s_mid row at a time, conflict-free.
template <int N>
__device__ __forceinline__ void column_pass(const SsimArgs& a, const float* s_mid, float (&out)[N][COL_OUT]) {
    const int lane = threadIdx.x % 32, row0 = threadIdx.x / 32 * COL_OUT;
#pragma unroll
    for (int m = 0; m < N; ++m) {
#pragma unroll
        for (int j = 0; j < COL_OUT; ++j) out[m][j] = 0.f;
#pragma unroll
        for (int k = 0; k < COL_OUT + 2 * HALO; ++k) {
            const float v = s_mid[(m * IN + row0 + k) * MID_STRIDE + lane];
#pragma unroll
            for (int j = 0; j < COL_OUT; ++j)
                if (k - j >= 0 && k - j < SSIM_TAPS) out[m][j] = fmaf(a.taps[k - j], v, out[m][j]);
        }
    }
}

struct SsimPoint {
    float value, d_mu, d_pp, d_pt;  // S, dS/dmu_p, dS/dE[pp], dS/dE[pt]
};

// S and its derivatives from the five local means (mu_t and E[tt] are constants: the target has no gradient).
// S follows losses.py's operations in order, unfused (the _rn intrinsics forbid FMA contraction), so that
// equal local means give torch's value; var_p = E[pp] - mu_p^2 and cov = E[pt] - mu_p mu_t enter the
// derivatives through the chain rule.
__device__ __forceinline__ SsimPoint ssim_point(float mu_p, float mu_t, float e_pp, float e_tt, float e_pt) {
    const float mu_pp = __fmul_rn(mu_p, mu_p), mu_tt = __fmul_rn(mu_t, mu_t);
    const float var_p = __fsub_rn(e_pp, mu_pp), var_t = __fsub_rn(e_tt, mu_tt);
    const float cov = __fsub_rn(e_pt, __fmul_rn(mu_p, mu_t));
    const float a = __fadd_rn(__fmul_rn(2.f * mu_p, mu_t), C1);  // S = (a b) / (c d)
    const float b = __fadd_rn(2.f * cov, C2);
    const float c = __fadd_rn(__fadd_rn(mu_pp, mu_tt), C1);
    const float d = __fadd_rn(__fadd_rn(var_p, var_t), C2);
    SsimPoint s;
    s.value = __fdiv_rn(__fmul_rn(a, b), __fmul_rn(c, d));
    // c >= C1 > 0 always; d = var_p + var_t + C2 > 0 up to rounding, as the forward's own division needs
    const float rc = 1.f / c, rd = 1.f / d;
    const float ds_da = b * rc * rd, ds_db = a * rc * rd, ds_dc = -s.value * rc, ds_dd = -s.value * rd;
    // da/dmu_p = 2 mu_t, db/dmu_p = -2 mu_t (cov), dc/dmu_p = 2 mu_p, dd/dmu_p = -2 mu_p (var_p)
    s.d_mu = 2.f * (mu_t * (ds_da - ds_db) + mu_p * (ds_dc - ds_dd));
    s.d_pp = ds_dd;        // dd/dE[pp] = 1
    s.d_pt = 2.f * ds_db;  // db/dE[pt] = 2
    return s;
}

__global__ void __launch_bounds__(THREADS) ssim_fwd_kernel(const SsimArgs a) {
    __shared__ float s_in[2 * IN * IN_STRIDE];
    __shared__ float s_mid[5 * IN * MID_STRIDE];
    __shared__ float s_sum[WARPS];
    const Tile tile = tile_of(a);
    const float* const src[2] = {a.prediction, a.target};
    load_tile<2>(a, tile, src, s_in);
    __syncthreads();
    row_pass<2, 5>(a, s_in, s_mid, [](const float* in, float* v) {
        v[0] = in[0];
        v[1] = in[1];
        v[2] = in[0] * in[0];
        v[3] = in[1] * in[1];
        v[4] = in[0] * in[1];
    });
    __syncthreads();
    float mean[5][COL_OUT];
    column_pass<5>(a, s_mid, mean);
    const int64_t n = int64_t(a.B) * a.C * a.H * a.W;
    const int x = tile.x0 + threadIdx.x % 32, row0 = tile.y0 + threadIdx.x / 32 * COL_OUT;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < COL_OUT; ++j) {
        const int y = row0 + j;
        if (x >= a.W || y >= a.H) continue;  // the map exists inside the image only
        const SsimPoint s = ssim_point(mean[0][j], mean[1][j], mean[2][j], mean[3][j], mean[4][j]);
        const int64_t index = tile.offset + int64_t(y) * a.W + x;
        sum += s.value;
        a.derivatives[index] = s.d_mu;
        a.derivatives[n + index] = s.d_pp;
        a.derivatives[2 * n + index] = s.d_pt;
    }
    sum = warp_sum(sum);
    if (threadIdx.x % 32 == 0) s_sum[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (int w = 0; w < WARPS; ++w) total += s_sum[w];
        a.partials[blockIdx.x] = total;
    }
}

__global__ void __launch_bounds__(THREADS) ssim_bwd_kernel(const SsimArgs a) {
    __shared__ float s_in[3 * IN * IN_STRIDE];
    __shared__ float s_mid[3 * IN * MID_STRIDE];
    const Tile tile = tile_of(a);
    const int64_t n = int64_t(a.B) * a.C * a.H * a.W;
    const int x = tile.x0 + threadIdx.x % 32, row0 = tile.y0 + threadIdx.x / 32 * COL_OUT;
    // this thread's p and t (and g), loaded ahead so that their latency hides behind the blur
    float p[COL_OUT], t[COL_OUT];
#pragma unroll
    for (int j = 0; j < COL_OUT; ++j) {
        const bool inside = x < a.W && row0 + j < a.H;
        const int64_t index = tile.offset + int64_t(row0 + j) * a.W + x;
        p[j] = inside ? a.prediction[index] : 0.f;
        t[j] = inside ? a.target[index] : 0.f;
    }
    const float scale = *a.grad_output * a.inv_count;
    const float* const src[3] = {a.derivatives, a.derivatives + n, a.derivatives + 2 * n};
    load_tile<3>(a, tile, src, s_in);
    __syncthreads();
    row_pass<3, 3>(a, s_in, s_mid, [](const float* in, float* v) {
        v[0] = in[0];
        v[1] = in[1];
        v[2] = in[2];
    });
    __syncthreads();
    float blurred[3][COL_OUT];
    column_pass<3>(a, s_mid, blurred);
#pragma unroll
    for (int j = 0; j < COL_OUT; ++j) {
        const int y = row0 + j;
        if (x >= a.W || y >= a.H) continue;
        a.grad[tile.offset + int64_t(y) * a.W + x] =
            scale * (blurred[0][j] + 2.f * p[j] * blurred[1][j] + t[j] * blurred[2][j]);
    }
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, const SsimArgs& a, cudaStream_t stream) {
    const int64_t blocks = ssim_blocks(a);
    if (blocks == 0) return cudaSuccess;
    if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    kernel<<<unsigned(blocks), THREADS, 0, stream>>>(a);
    return cudaGetLastError();
}

}  // namespace

void ssim_gaussian_taps(double sigma, float taps[SSIM_TAPS]) {
    double weights[SSIM_TAPS], sum = 0.0;
    for (int k = 0; k < SSIM_TAPS; ++k) {
        const double x = k - (SSIM_TAPS - 1) / 2.0;
        weights[k] = std::exp(-(x * x) / (2.0 * sigma * sigma));
        sum += weights[k];
    }
    for (int k = 0; k < SSIM_TAPS; ++k) taps[k] = float(weights[k] / sum);
}

int64_t ssim_blocks(const SsimArgs& a) { return int64_t(a.B) * a.C * ceil_div(a.H, TILE) * ceil_div(a.W, TILE); }

cudaError_t launch_ssim_fwd(const SsimArgs& a, cudaStream_t stream) { return launch(ssim_fwd_kernel, a, stream); }

cudaError_t launch_ssim_bwd(const SsimArgs& a, cudaStream_t stream) { return launch(ssim_bwd_kernel, a, stream); }

}  // namespace fit3d
