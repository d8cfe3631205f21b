// Backward of the alpha compositing on the CPU: gradients of channel values, 2D means, conics and opacities.
//
// One (camera, tile) at a time on torch's threads, walking the tile's list back to front from the last
// Gaussian any of its pixels composited. Per pixel, with g = dL/d(image) and q_k = c_k . g over the channels
// routed to geometry, two running scalars give the alpha gradient (as in rasterize_bwd.cu): T, and the
// suffix S = sum_{j > k} w_j q_j seeded with the background and alpha-image terms:
//     dL/dalpha_k = T_k q_k - S / (1 - alpha_k).
// Alpha comes from splat_alpha (raster_common.h), the forward's function, over the same pixel boxes, so the
// backward composites exactly the forward's pairs.
//
// Determinism: a Gaussian's gradients are sums over the tiles (and cameras) it reaches, which run in parallel.
// Each (tile, Gaussian) pair therefore writes its own slot (6 geometry values + the channel gradients), and the
// slots are then summed Gaussian by Gaussian in pair order (camera, tile): no float atomics, and the result is
// independent of the thread count.
#include <algorithm>
#include <memory>
#include <vector>

#include "cpu/ops_cpu.h"
#include "raster_common.h"

namespace fit3d::cpu {

namespace {

constexpr int GEO = 6;  // per pair: dL/d(mean x, mean y, conic a, conic b, conic c, opacity)

// Tile `job` (camera * tiles + tile): writes the slots ([GEO + C] floats each) of the pairs that composited some
// pixel and marks them in `used`. grads: [BLOCK_SIZE * C], values: [R] scratch.
FIT3D_CPU_HOT void backward_tile(const RasterizeArgs& a, int64_t job, float* slots, uint8_t* used, float* grads,
                                 float* values) {
    const int C = a.channel_count, R = a.routed_count, stride = GEO + C;
    const int n_tiles = a.tiles_x * a.tiles_y;
    const int64_t hw = int64_t(a.width) * a.height;
    const int b = int(job / n_tiles), tile = int(job % n_tiles);
    const int x0 = (tile % a.tiles_x) * TILE_SIZE, y0 = (tile / a.tiles_x) * TILE_SIZE;
    const int x1 = std::min(x0 + TILE_SIZE, a.width) - 1, y1 = std::min(y0 + TILE_SIZE, a.height) - 1;
    const int start = a.tile_ranges[job * 2], stop = a.tile_ranges[job * 2 + 1];
    if (start == stop) return;
    // the pixels' image gradients, as the CUDA kernel reads them (image_grad: planar or channels-last features)
    for (int row = y0; row <= y1; ++row)
        for (int col = x0; col <= x1; ++col) {
            float* gp = grads + size_t((row - y0) * TILE_SIZE + (col - x0)) * C;
            for (int c = 0; c < C; ++c) gp[c] = image_grad(a, b, c, int64_t(row) * a.width + col);
        }
    float T[BLOCK_SIZE], S[BLOCK_SIZE];
    int32_t last[BLOCK_SIZE];
    int walk_end = start;  // one past the last entry any pixel composited
    for (int row = y0; row <= y1; ++row)
        for (int col = x0; col <= x1; ++col) {
            const int p = (row - y0) * TILE_SIZE + (col - x0);
            const int64_t pix = int64_t(b) * hw + int64_t(row) * a.width + col;
            T[p] = a.final_t[pix];
            last[p] = a.last_ids[pix];
            walk_end = std::max(walk_end, last[p] + 1);
            // S starts with the terms of the background (rgb += T_final bg) and the alpha image (1 - T_final)
            const float* gp = grads + size_t(p) * C;
            float bg_dot = 0.f;
            if (a.background != nullptr)
                for (int c = 0; c < 3; ++c) bg_dot += a.background[c] * gp[c];
            const float v_alpha_image = a.v_alpha != nullptr ? a.v_alpha[pix] : 0.f;
            S[p] = T[p] * (bg_dot - v_alpha_image);
        }
    std::fill(used + walk_end, used + stop, uint8_t(0));

    for (int idx = walk_end - 1; idx >= start; --idx) {
        used[idx] = 0;
        const int g = a.gaussian_ids[idx];
        const Splat s = load_splat(a, b, g);
        int c0, c1, r0, r1;
        if (!pixel_box(s.x, s.y, s.a, s.b, s.c, s.opacity, a.width, a.height, c0, c1, r0, r1)) continue;
        c0 = std::max(c0, x0), c1 = std::min(c1, x1), r0 = std::max(r0, y0), r1 = std::min(r1, y1);
        float* slot = slots + size_t(idx) * stride;
        float* v_channels = slot + GEO;
        float geo[GEO] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        bool loaded = false;
        for (int row = r0; row <= r1; ++row) {
            const float py = row + 0.5f;
            for (int col = c0; col <= c1; ++col) {
                const int p = (row - y0) * TILE_SIZE + (col - x0);
                if (idx > last[p]) continue;
                float dx, dy, sigma, gauss, raw;
                const float alpha = splat_alpha(s, col + 0.5f, py, dx, dy, sigma, gauss, raw);
                if (!(sigma >= 0.f && alpha >= ALPHA_THRESHOLD)) continue;
                if (!loaded) {
                    for (int c = 0; c < R; ++c) values[c] = channel_value(a, b, g, c);
                    std::fill(v_channels, v_channels + C, 0.f);
                    loaded = true;
                }
                const float* gp = grads + size_t(p) * C;
                const float one_minus = 1.f - alpha;
                const float t_before = T[p] / one_minus;
                const float w = alpha * t_before;
                float q = 0.f;
                for (int c = 0; c < R; ++c) q += values[c] * gp[c];
                const float v_alpha = t_before * q - S[p] / one_minus;
                S[p] += w * q;
                // 3DGS differentiates alpha = o G through the min(0.99, .) clamp; gsplat stops there. No channel
                // routed (R = 0): the geometry needs no gradient.
                if (R > 0 && (a.alpha_clamp_grad || raw <= MAX_ALPHA)) {
                    const float v_sigma = -raw * v_alpha;  // sigma = (a dx^2 + c dy^2) / 2 + b dx dy
                    geo[0] -= v_sigma * (s.a * dx + s.b * dy);
                    geo[1] -= v_sigma * (s.b * dx + s.c * dy);
                    geo[2] += 0.5f * v_sigma * dx * dx;
                    geo[3] += v_sigma * dx * dy;
                    geo[4] += 0.5f * v_sigma * dy * dy;
                    geo[5] += gauss * v_alpha;
                }
                T[p] = t_before;
                for (int c = 0; c < C; ++c) v_channels[c] += w * gp[c];
            }
        }
        if (loaded) {
            std::copy(geo, geo + GEO, slot);
            used[idx] = 1;
        }
    }
}

}  // namespace

void rasterize_bwd(const RasterizeArgs& a, int64_t n_pairs) {
    const int C = a.channel_count, R = a.routed_count, stride = GEO + C;
    const int64_t n_tiles = int64_t(a.tiles_x) * a.tiles_y;
    // only the slots of used pairs are written, and only they are read
    std::unique_ptr<float[]> slots(new float[size_t(n_pairs) * stride]);
    std::vector<uint8_t> used(size_t(n_pairs), 0);
    parallel_for(int64_t(a.B) * n_tiles, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> grads(size_t(BLOCK_SIZE) * C), values(R);
        for (int64_t job = begin; job < end; ++job)
            backward_tile(a, job, slots.get(), used.data(), grads.data(), values.data());
    });

    // The used pairs of each Gaussian in pair order, by a counting sort; pairs are sorted by (camera, tile), so
    // camera b's pairs are [camera_first[b], camera_first[b + 1]).
    std::vector<int64_t> camera_first(size_t(a.B) + 1, 0);
    for (int b = 0; b < a.B; ++b) {
        int64_t count = 0;
        for (int64_t t = 0; t < n_tiles; ++t) {
            const int32_t* r = a.tile_ranges + (int64_t(b) * n_tiles + t) * 2;
            count += r[1] - r[0];
        }
        camera_first[b + 1] = camera_first[b] + count;
    }
    std::vector<int64_t> first(size_t(a.N) + 1, 0);
    for (int64_t i = 0; i < n_pairs; ++i)
        if (used[i]) ++first[size_t(a.gaussian_ids[i]) + 1];
    for (int g = 0; g < a.N; ++g) first[g + 1] += first[g];
    std::vector<int64_t> pairs(size_t(first[a.N])), cursor(first.begin(), first.end() - 1);
    for (int64_t i = 0; i < n_pairs; ++i)
        if (used[i]) pairs[cursor[a.gaussian_ids[i]]++] = i;

    parallel_for(a.N, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g) {
            int b = 0;
            for (int64_t k = first[g]; k < first[g + 1]; ++k) {
                const int64_t i = pairs[k];
                while (i >= camera_first[b + 1]) ++b;
                const float* slot = slots.get() + size_t(i) * stride;
                const int64_t entry = int64_t(b) * a.N + g;
                a.v_means2d[entry * 2 + 0] += slot[0];
                a.v_means2d[entry * 2 + 1] += slot[1];
                a.v_conics[entry * 3 + 0] += slot[2];
                a.v_conics[entry * 3 + 1] += slot[3];
                a.v_conics[entry * 3 + 2] += slot[4];
                a.v_opacities[g] += slot[5];
                float* v_color = a.v_colors + b * a.colors_camera_stride + g * 3;
                for (int c = 0; c < 3; ++c) v_color[c] += slot[GEO + c];
                a.v_depths[entry] += slot[GEO + 3];
                float* v_feat = a.v_feats + g * a.F;
                for (int c = 4; c < C; ++c) v_feat[c - 4] += slot[GEO + c];
            }
        }
    });
}

}  // namespace fit3d::cpu
