// Forward alpha compositing on the CPU, one (camera, tile) at a time on torch's threads.
//
// Per tile, the Gaussians of its list front to back, and for each the pixels of the tile inside its 1/255
// pixel box (pixel_box of common.h, the box the reference pairs by): alpha by splat_alpha (raster_common.h,
// the CUDA kernels' own function), 3DGS's stopping rule, and the weighted channel values added to the
// pixel's accumulators, all 4 + F channels at once (a [256, C] block per tile, pixel-major so that the
// update of one pixel is a contiguous, vectorisable loop over channels).
// Twin of fit3d_hf.render._reference._rasterize (forward).
#include <algorithm>
#include <vector>

#include "cpu/ops_cpu.h"
#include "raster_common.h"

namespace fit3d::cpu {

namespace {

// Tile `job` (camera * tiles + tile); acc: [BLOCK_SIZE * C], values: [C] scratch.
FIT3D_CPU_HOT void forward_tile(const RasterizeArgs& a, int64_t job, float* acc, float* values) {
    const int C = a.channel_count;
    const int n_tiles = a.tiles_x * a.tiles_y;
    const int b = int(job / n_tiles), tile = int(job % n_tiles);
    const int x0 = (tile % a.tiles_x) * TILE_SIZE, y0 = (tile / a.tiles_x) * TILE_SIZE;
    const int x1 = std::min(x0 + TILE_SIZE, a.width) - 1, y1 = std::min(y0 + TILE_SIZE, a.height) - 1;
    float T[BLOCK_SIZE];
    int32_t last[BLOCK_SIZE];
    bool done[BLOCK_SIZE];
    std::fill(acc, acc + size_t(BLOCK_SIZE) * C, 0.f);
    std::fill(T, T + BLOCK_SIZE, 1.f);
    std::fill(last, last + BLOCK_SIZE, -1);
    std::fill(done, done + BLOCK_SIZE, false);
    int alive = (x1 - x0 + 1) * (y1 - y0 + 1);
    const int start = a.tile_ranges[job * 2], stop = a.tile_ranges[job * 2 + 1];
    for (int idx = start; idx < stop && alive > 0; ++idx) {
        const int g = a.gaussian_ids[idx];
        const Splat s = load_splat(a, b, g);
        int c0, c1, r0, r1;
        if (!pixel_box(s.x, s.y, s.a, s.b, s.c, s.opacity, a.width, a.height, c0, c1, r0, r1)) continue;
        c0 = std::max(c0, x0), c1 = std::min(c1, x1), r0 = std::max(r0, y0), r1 = std::min(r1, y1);
        bool loaded = false;
        for (int row = r0; row <= r1; ++row) {
            const float py = row + 0.5f;
            for (int col = c0; col <= c1; ++col) {
                const int p = (row - y0) * TILE_SIZE + (col - x0);
                if (done[p]) continue;
                float dx, dy, sigma, gauss, raw;
                const float alpha = splat_alpha(s, col + 0.5f, py, dx, dy, sigma, gauss, raw);
                if (!(sigma >= 0.f && alpha >= ALPHA_THRESHOLD)) continue;
                const float next_t = T[p] * (1.f - alpha);
                if (next_t < TRANSMITTANCE_THRESHOLD) {  // 3DGS: not composited, and nothing after it
                    done[p] = true;
                    --alive;
                    continue;
                }
                const float w = alpha * T[p];
                T[p] = next_t;
                last[p] = idx;
                if (!loaded) {
                    for (int c = 0; c < C; ++c) values[c] = channel_value(a, b, g, c);
                    loaded = true;
                }
                float* out = acc + size_t(p) * C;
                for (int c = 0; c < C; ++c) out[c] += w * values[c];
            }
        }
    }

    const int64_t hw = int64_t(a.width) * a.height;
    for (int c = 0; c < std::min(C, 4); ++c) {
        float* plane = output_plane(a, b, c);
        const float bg = (c < 3 && a.background != nullptr) ? a.background[c] : 0.f;
        for (int row = y0; row <= y1; ++row)
            for (int col = x0; col <= x1; ++col) {
                const int p = (row - y0) * TILE_SIZE + (col - x0);
                plane[int64_t(row) * a.width + col] = acc[size_t(p) * C + c] + T[p] * bg;
            }
    }
    if (C > 4)  // features, channels-last (ext_cpu.cpp): each pixel's row of the accumulator, as it is
        for (int row = y0; row <= y1; ++row)
            for (int col = x0; col <= x1; ++col) {
                const int p = (row - y0) * TILE_SIZE + (col - x0);
                float* out = a.out_features + (int64_t(b) * hw + int64_t(row) * a.width + col) * a.F;
                std::copy(acc + size_t(p) * C + 4, acc + size_t(p) * C + C, out);
            }
    for (int row = y0; row <= y1; ++row)
        for (int col = x0; col <= x1; ++col) {
            const int p = (row - y0) * TILE_SIZE + (col - x0);
            const int64_t pix = int64_t(b) * hw + int64_t(row) * a.width + col;
            a.out_alpha[pix] = 1.f - T[p];
            a.final_t[pix] = T[p];
            a.last_ids[pix] = last[p];
        }
}

}  // namespace

void rasterize_fwd(const RasterizeArgs& a) {
    const int C = a.channel_count;
    parallel_for(int64_t(a.B) * a.tiles_x * a.tiles_y, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(size_t(BLOCK_SIZE) * C), values(C);
        for (int64_t job = begin; job < end; ++job) forward_tile(a, job, acc.data(), values.data());
    });
}

}  // namespace fit3d::cpu
