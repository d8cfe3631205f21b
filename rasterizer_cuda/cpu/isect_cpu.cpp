// Binning on the CPU: for every camera and tile, the Gaussians whose alpha can reach 1/255 in it, front to back.
//
// The tiles of a Gaussian are those of the CUDA binning (tile_rows / tile_row_span of isect_math.h), and each
// tile's list has the same order (depth, ties by Gaussian index). Instead of the GPU's sort of all pairs by
// tile, a stable counting sort: the visible entries are split into fixed chunks (of depth-sorted entries);
// each chunk counts its pairs per tile, a prefix sum over (tile, chunk) gives every chunk its slots in every
// tile, and the chunks then write their pairs in parallel. The chunking does not depend on the thread count,
// so neither does the result.
#include <algorithm>
#include <cstring>

#include "cpu/ops_cpu.h"
#include "isect_math.h"

namespace fit3d::cpu {

namespace {

constexpr int64_t CHUNK = 2048;  // visible entries per chunk of the counting sort

// Stable LSD radix sort of `values` by 32-bit `keys` (three passes of 11 bits).
void radix_sort(std::vector<uint32_t>& keys, std::vector<int32_t>& values) {
    const size_t n = keys.size();
    std::vector<uint32_t> keys_tmp(n);
    std::vector<int32_t> values_tmp(n);
    for (int shift = 0; shift < 32; shift += 11) {
        int64_t offsets[2049] = {};
        for (size_t i = 0; i < n; ++i) ++offsets[((keys[i] >> shift) & 2047u) + 1];
        for (int d = 0; d < 2048; ++d) offsets[d + 1] += offsets[d];
        for (size_t i = 0; i < n; ++i) {
            const int64_t slot = offsets[(keys[i] >> shift) & 2047u]++;
            keys_tmp[slot] = keys[i];
            values_tmp[slot] = values[i];
        }
        keys.swap(keys_tmp);
        values.swap(values_tmp);
    }
}

// Calls emit(tile) for every tile (camera * tiles + tile) that the entry reaches, row by row.
template <typename Emit>
inline void for_each_tile(const IsectArgs& a, int64_t entry, Emit&& emit) {
    TileRows r;
    if (!tile_rows(a, entry, r)) return;
    const int64_t camera_tile0 = (entry / a.N) * int64_t(a.tiles_x) * a.tiles_y;
    for (int ty = r.ty0; ty <= r.ty1; ++ty) {
        int tx0, tx1;
        tile_row_span(r, ty, tx0, tx1);
        for (int tx = tx0; tx <= tx1; ++tx) emit(camera_tile0 + int64_t(ty) * a.tiles_x + tx);
    }
}

}  // namespace

IsectPlan isect_count(const IsectArgs& a, const float* depths) {
    IsectPlan plan;
    const int64_t n_tiles = int64_t(a.B) * a.tiles_x * a.tiles_y;
    // 1. each camera's visible entries by depth; depths of visible entries are >= near_plane > 0, so their
    //    bits sort like the floats, and the stable sort keeps index order among equal depths
    for (int b = 0; b < a.B; ++b) {
        std::vector<uint32_t> keys;
        std::vector<int32_t> entries;
        for (int g = 0; g < a.N; ++g) {
            const int64_t i = int64_t(b) * a.N + g;
            if (a.radii[i] <= 0) continue;
            uint32_t bits;
            std::memcpy(&bits, depths + i, sizeof(bits));
            keys.push_back(bits);
            entries.push_back(int32_t(i));
        }
        radix_sort(keys, entries);
        plan.order.insert(plan.order.end(), entries.begin(), entries.end());
    }
    // 2. pairs per (chunk, tile)
    const int64_t n_chunks = (int64_t(plan.order.size()) + CHUNK - 1) / CHUNK;
    plan.chunk_tile_counts.assign(size_t(n_chunks * n_tiles), 0);
    parallel_for(n_chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
            int64_t* counts = plan.chunk_tile_counts.data() + c * n_tiles;
            const int64_t last = std::min<int64_t>((c + 1) * CHUNK, plan.order.size());
            for (int64_t s = c * CHUNK; s < last; ++s) for_each_tile(a, plan.order[s], [&](int64_t t) { ++counts[t]; });
        }
    });
    // 3. per tile, the chunks' first slots (in place of their counts), and the tile ranges' sizes
    plan.tile_counts.assign(size_t(n_tiles), 0);
    for (int64_t t = 0; t < n_tiles; ++t) {
        int64_t sum = 0;
        for (int64_t c = 0; c < n_chunks; ++c) {
            int64_t& v = plan.chunk_tile_counts[size_t(c * n_tiles + t)];
            const int64_t count = v;
            v = sum;
            sum += count;
        }
        plan.tile_counts[size_t(t)] = sum;
        plan.total += sum;
    }
    return plan;
}

void isect_fill(const IsectArgs& a, const IsectPlan& plan, int32_t* ranges, int32_t* gaussian_ids) {
    const int64_t n_tiles = int64_t(plan.tile_counts.size());
    std::vector<int64_t> tile_start(n_tiles);
    int64_t start = 0;
    for (int64_t t = 0; t < n_tiles; ++t) {
        tile_start[size_t(t)] = start;
        ranges[t * 2] = int32_t(start);
        start += plan.tile_counts[size_t(t)];
        ranges[t * 2 + 1] = int32_t(start);
        if (ranges[t * 2] == ranges[t * 2 + 1]) ranges[t * 2] = ranges[t * 2 + 1] = 0;  // as the CUDA binning
    }
    const int64_t n_chunks = n_tiles == 0 ? 0 : int64_t(plan.chunk_tile_counts.size()) / n_tiles;
    parallel_for(n_chunks, 1, [&](int64_t begin, int64_t end) {
        std::vector<int64_t> cursor(n_tiles);
        for (int64_t c = begin; c < end; ++c) {
            const int64_t* first = plan.chunk_tile_counts.data() + c * n_tiles;
            for (int64_t t = 0; t < n_tiles; ++t) cursor[size_t(t)] = tile_start[size_t(t)] + first[t];
            const int64_t last = std::min<int64_t>((c + 1) * CHUNK, plan.order.size());
            for (int64_t s = c * CHUNK; s < last; ++s) {
                const int32_t entry = plan.order[s];
                const int32_t g = int32_t(entry % a.N);
                for_each_tile(a, entry, [&](int64_t t) { gaussian_ids[cursor[size_t(t)]++] = g; });
            }
        }
    });
}

}  // namespace fit3d::cpu
