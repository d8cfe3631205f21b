// Binning: for every camera and tile, the list of Gaussians whose alpha can reach 1/255 in it, front to back.
//
// 1. sort all (camera, Gaussian) entries by depth (the depths' own bits as keys: depths are >= near_plane > 0,
//    or 0 when culled, and such floats order as their bits; stable, so ties keep index order);
// 2. count, in that order, the tiles each visible Gaussian touches: the tiles of its exact alpha >= 1/255
//    pixel box (pixel_box in common.h, the box the Python reference uses) that its alpha ellipse meets
//    (found per row of tiles, see tile_rows);
// 3. emit (camera * tiles + tile, Gaussian) pairs at the prefix-sum offsets, so equal tiles appear in depth
//    order, and 4. sort them by tile with a stable radix sort over only the tile bits (16-bit keys where all
//    fit: fewer than 2^16 tiles over the cameras, as with one 4000 x 4000 px camera); 5. find each tile's range
//    of the sorted pairs by a search of the sorted keys.
// Binning is conservative, so it never changes a pixel value.
#include <algorithm>
#include <cub/cub.cuh>

#include "common.h"
#include "isect_math.h"
#include "ops.h"

namespace fit3d {

__global__ void isect_count_kernel(IsectArgs a) {
    const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (s >= int64_t(a.B) * a.N) return;
    int count = 0;
    TileRows r;
    if (tile_rows(a, a.depth_order[s], r)) {
        for (int ty = r.ty0; ty <= r.ty1; ++ty) {
            int tx0, tx1;
            tile_row_span(r, ty, tx0, tx1);
            count += max(tx1 - tx0 + 1, 0);
        }
    }
    a.counts[s] = count;
}

// Writes the `count` pairs of the Gaussian `index` (rows `r`, valid when `ok`) to keys/values, by one thread.
// Should fewer tiles be found than were counted, the remaining slots get the "no tile" key, which sorts last
// and is in no range. Only the first `room` slots are written (the rest lies past the buffer's capacity).
template <typename Key>
__device__ inline void emit_pairs(const IsectArgs& a, int64_t index, bool ok, const TileRows& r, int count, Key* keys,
                                  int32_t* values, int64_t room) {
    count = int(min(int64_t(count), max(room, int64_t(0))));
    const int g = int(index % a.N);
    const uint32_t tiles = uint32_t(a.tiles_x * a.tiles_y);
    const uint32_t camera_tile0 = uint32_t(index / a.N) * tiles;
    int emitted = 0;
    for (int ty = r.ty0; ok && ty <= r.ty1; ++ty) {
        int tx0, tx1;
        tile_row_span(r, ty, tx0, tx1);
        for (int tx = tx0; tx <= tx1; ++tx) {
            const int j = emitted + tx - tx0;
            if (j < count) {
                keys[j] = Key(camera_tile0 + uint32_t(ty * a.tiles_x + tx));
                values[j] = g;
            }
        }
        emitted += max(tx1 - tx0 + 1, 0);
    }
    for (int j = emitted; j < count; ++j) {
        keys[j] = Key(tiles * uint32_t(a.B));
        values[j] = 0;
    }
}

// The same for a large entry, by the 32 lanes of a warp (all must call it with the same arguments): up to 32 tile
// rows at a time, a lane computes one row's span; a prefix sum over the lanes gives each row's first pair, and
// each lane then writes every 32nd pair, finding its row by a binary search over the lanes' sums. So the square
// roots of a row are taken once, and the stores of a round are consecutive, whatever the rows' widths.
template <typename Key>
__device__ inline void emit_pairs_warp(const IsectArgs& a, int64_t index, bool ok, const TileRows& r, int count,
                                       Key* keys, int32_t* values, int64_t room, int lane) {
    count = int(min(int64_t(count), max(room, int64_t(0))));
    const int g = int(index % a.N);
    const uint32_t tiles = uint32_t(a.tiles_x * a.tiles_y);
    const uint32_t camera_tile0 = uint32_t(index / a.N) * tiles;
    int emitted = 0;
    for (int row0 = r.ty0; ok && row0 <= r.ty1; row0 += 32) {
        int tx0 = 0, tx1 = -1;
        if (row0 + lane <= r.ty1) tile_row_span(r, row0 + lane, tx0, tx1);
        const int width = max(tx1 - tx0 + 1, 0);
        int end = width;  // inclusive prefix sum of the widths over the lanes
        for (int d = 1; d < 32; d *= 2) {
            const int v = __shfl_up_sync(FULL_MASK, end, d);
            if (lane >= d) end += v;
        }
        const int chunk = __shfl_sync(FULL_MASK, end, 31);
        for (int round = 0; round < chunk; round += 32) {
            const int j = round + lane;
            int row = 0;  // lanes whose rows end at or before pair j
            for (int step = 16; step > 0; step /= 2) {
                const int v = __shfl_sync(FULL_MASK, end, row + step - 1);
                if (v <= j) row += step;
            }
            const int row_tx0 = __shfl_sync(FULL_MASK, tx0, row);
            const int row_start = __shfl_sync(FULL_MASK, end - width, row);
            const int slot = emitted + j;
            if (j < chunk && slot < count) {
                keys[slot] = Key(camera_tile0 + uint32_t((row0 + row) * a.tiles_x + row_tx0 + (j - row_start)));
                values[slot] = g;
            }
        }
        emitted += chunk;
    }
    for (int j = emitted + lane; j < count; j += 32) {
        keys[j] = Key(tiles * uint32_t(a.B));
        values[j] = 0;
    }
}

__device__ inline TileRows shuffle_rows(const TileRows& r, int source) {
    TileRows o;
    o.mx = __shfl_sync(FULL_MASK, r.mx, source);
    o.my = __shfl_sync(FULL_MASK, r.my, source);
    o.ca = __shfl_sync(FULL_MASK, r.ca, source);
    o.cb = __shfl_sync(FULL_MASK, r.cb, source);
    o.cc = __shfl_sync(FULL_MASK, r.cc, source);
    o.level = __shfl_sync(FULL_MASK, r.level, source);
    o.det = __shfl_sync(FULL_MASK, r.det, source);
    o.dy_right = __shfl_sync(FULL_MASK, r.dy_right, source);
    o.col0 = __shfl_sync(FULL_MASK, r.col0, source);
    o.col1 = __shfl_sync(FULL_MASK, r.col1, source);
    o.row0 = __shfl_sync(FULL_MASK, r.row0, source);
    o.row1 = __shfl_sync(FULL_MASK, r.row1, source);
    o.ty0 = __shfl_sync(FULL_MASK, r.ty0, source);
    o.ty1 = __shfl_sync(FULL_MASK, r.ty1, source);
    o.exact = __shfl_sync(FULL_MASK, int(r.exact), source) != 0;
    return o;
}

// A thread emits the pairs of its own entry; entries with more than WARP_EMIT tiles (large Gaussians close to
// the camera) are emitted by the whole warp instead, their rows handed over by shuffles, so that they neither
// serialise a thread nor wait on memory one after another. The pairs of a block's entries are contiguous; when
// they fit, they are assembled in shared memory and written out with coalesced stores.
constexpr int WARP_EMIT = 32;
constexpr int EMIT_STAGE = 4096;  // pairs staged per block (32 KB)

template <typename Key>
__global__ void __launch_bounds__(256) isect_emit_kernel(IsectArgs a, Key* keys) {
    __shared__ Key s_keys[EMIT_STAGE];
    __shared__ int32_t s_values[EMIT_STAGE];
    const int64_t total = int64_t(a.B) * a.N;
    // slots past the pair count, when the buffers were sized ahead (a capacity), get the "no tile" key, which
    // sorts last and is in no range: spread over all blocks here rather than a launch of their own
    const Key no_tile = Key(uint32_t(a.tiles_x * a.tiles_y) * uint32_t(a.B));
    for (int64_t i = a.ends[total - 1] + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.capacity;
         i += int64_t(gridDim.x) * blockDim.x) {
        keys[i] = no_tile;
        a.values[i] = 0;
    }
    const int64_t first = int64_t(blockIdx.x) * blockDim.x;
    const int64_t last = min(first + int64_t(blockDim.x), total) - 1;
    const int64_t base = a.ends[first] - a.counts[first];
    const int64_t span = a.ends[last] - base;  // the block's pairs: [base, base + span)
    const bool staged = span <= EMIT_STAGE;    // uniform over the block
    // destination of the pairs at global position `pos`
    auto keys_at = [&](int64_t pos) { return staged ? s_keys + (pos - base) : keys + pos; };
    auto values_at = [&](int64_t pos) { return staged ? s_values + (pos - base) : a.values + pos; };
    auto room_at = [&](int64_t pos) { return staged ? int64_t(EMIT_STAGE) : a.capacity - pos; };

    const int64_t s = first + threadIdx.x;
    const int lane = threadIdx.x % 32;
    const int count = s < total ? int(a.counts[s]) : 0;
    const int64_t offset = s < total ? a.ends[s] - count : 0;
    const int64_t index = count > 0 ? a.depth_order[s] : 0;
    TileRows r = {};
    const bool ok = count > 0 && tile_rows(a, index, r);
    if (count > 0 && count <= WARP_EMIT)
        emit_pairs(a, index, ok, r, count, keys_at(offset), values_at(offset), room_at(offset));
    for (unsigned large = __ballot_sync(FULL_MASK, count > WARP_EMIT); large != 0; large &= large - 1) {
        const int source = __ffs(large) - 1;
        const int64_t src_offset = __shfl_sync(FULL_MASK, offset, source);
        emit_pairs_warp(a, __shfl_sync(FULL_MASK, index, source), __shfl_sync(FULL_MASK, int(ok), source) != 0,
                        shuffle_rows(r, source), __shfl_sync(FULL_MASK, count, source), keys_at(src_offset),
                        values_at(src_offset), room_at(src_offset), lane);
    }
    if (!staged) return;
    __syncthreads();
    const int64_t kept = min(span, a.capacity - base);
    for (int i = threadIdx.x; i < kept; i += blockDim.x) {
        keys[base + i] = s_keys[i];
        a.values[base + i] = s_values[i];
    }
}

// The first of the n sorted keys that is not below `key` (n if none), found by 16 lanes together: each step reads
// 16 pivots that split the interval left, so a search takes about log16(n) dependent reads (6 for 4.4M pairs)
// rather than log2(n) (23). Each half of the warp (`half`) searches its own key; all 32 lanes take every step.
template <typename Key>
__device__ inline int first_not_below_16(const Key* keys, int n, uint32_t key, int half) {
    const int lane16 = threadIdx.x % 16;
    int low = 0, high = n;  // keys before low are below key, keys from high on are not
    while (__any_sync(FULL_MASK, low < high)) {
        const int64_t step = max(int64_t(1), (int64_t(high) - low + 15) / 16);  // 64-bit: n may near INT_MAX
        const int64_t pivot = low + lane16 * step;
        const bool below = low < high && pivot < high && keys[pivot] < key;
        // sorted keys: the lanes whose pivot is below come first, so their count locates the answer
        const int count = __popc((__ballot_sync(FULL_MASK, below) >> (16 * half)) & 0xffffu);
        if (low < high) {
            const int next_low = count == 0 ? low : int(low + (count - 1) * step + 1);
            high = int(min(int64_t(high), low + count * step));
            low = next_low;
        }
    }
    return low;
}

// One warp per tile (of every camera): its range of the sorted pairs, where its key starts (lanes 0-15) and where
// the next tile's starts (lanes 16-31), rather than a pass over all n pairs after a fill of every range with zeros
// (1M Gaussians on an H100: 4.4M pairs, a 17 us kernel and a memset). An empty tile gets [0, 0), as the CPU
// binning's and the reference's; the "no tile" key of unused slots sorts after every tile.
template <typename Key>
__global__ void tile_ranges_kernel(const Key* keys, int n, uint32_t n_tiles, int32_t* ranges) {
    const uint64_t tile = (uint64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;  // the same for the whole warp
    if (tile >= n_tiles) return;
    const int half = (threadIdx.x % 32) / 16;
    const int bound = first_not_below_16(keys, n, uint32_t(tile) + half, half);
    const int start = __shfl_sync(FULL_MASK, bound, 0), end = __shfl_sync(FULL_MASK, bound, 16);
    if (threadIdx.x % 32 == 0) {
        ranges[int64_t(tile) * 2] = start < end ? start : 0;
        ranges[int64_t(tile) * 2 + 1] = start < end ? end : 0;
    }
}

cudaError_t launch_isect_count(const IsectArgs& args, cudaStream_t stream) {
    const int64_t total = int64_t(args.B) * args.N;
    if (total == 0) return cudaSuccess;
    isect_count_kernel<<<unsigned((total + 255) / 256), 256, 0, stream>>>(args);
    return cudaGetLastError();
}

cudaError_t inclusive_sum(void* temp, size_t& temp_bytes, const int64_t* counts, int64_t* ends, int64_t n,
                          cudaStream_t stream) {
    return cub::DeviceScan::InclusiveSum(temp, temp_bytes, counts, ends, n, stream);
}

cudaError_t sort_pairs(void* temp, size_t& temp_bytes, const uint32_t* keys_in, uint32_t* keys_out,
                       const int32_t* values_in, int32_t* values_out, int64_t n, int end_bit, cudaStream_t stream) {
    return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, values_in, values_out, n, 0, end_bit,
                                           stream);
}

namespace {

// Bits of a tile key (camera * tiles + tile, or B * tiles for "no tile") for B cameras of `tiles` tiles: the pair
// sort passes over only these.
int tile_key_bits(int B, int tiles) {
    const uint64_t max_id = uint64_t(B) * uint64_t(tiles);  // one past the last tile: the "no tile" key
    int bits = 1;
    while (bits < 32 && (max_id >> bits) != 0) ++bits;
    return bits;
}

// Steps 4-6 with keys of type Key (see bin_pairs).
template <typename Key>
cudaError_t bin_pairs_with(const IsectArgs& a, Key* sorted_keys, int32_t* sorted_values, int32_t* ranges, void* temp,
                           size_t& temp_bytes, cudaStream_t stream) {
    const uint32_t n_tiles = uint32_t(a.B) * uint32_t(a.tiles_x * a.tiles_y);
    Key* keys = static_cast<Key*>(a.keys);
    const int key_bits = tile_key_bits(a.B, a.tiles_x * a.tiles_y);
    if (temp == nullptr)
        return cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys, sorted_keys, a.values, sorted_values,
                                               a.capacity, 0, key_bits, stream);
    const int64_t total = int64_t(a.B) * a.N;
    isect_emit_kernel<<<unsigned((total + 255) / 256), 256, 0, stream>>>(a, keys);
    cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
    error = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, sorted_keys, a.values, sorted_values, a.capacity, 0,
                                            key_bits, stream);
    if (error != cudaSuccess) return error;
    // a warp per tile, 8 to a block
    tile_ranges_kernel<<<unsigned((uint64_t(n_tiles) + 7) / 8), 256, 0, stream>>>(sorted_keys, int(a.capacity), n_tiles,
                                                                                  ranges);
    return cudaGetLastError();
}

}  // namespace

size_t tile_key_bytes(int B, int tiles) {
    // every key, "no tile" (B * tiles) included, must fit
    return uint64_t(B) * uint64_t(tiles) <= UINT16_MAX ? sizeof(uint16_t) : sizeof(uint32_t);
}

cudaError_t bin_pairs(const IsectArgs& args, void* sorted_keys, int32_t* sorted_values, int32_t* ranges, void* temp,
                      size_t& temp_bytes, cudaStream_t stream) {
    if (tile_key_bytes(args.B, args.tiles_x * args.tiles_y) == sizeof(uint16_t))
        return bin_pairs_with(args, static_cast<uint16_t*>(sorted_keys), sorted_values, ranges, temp, temp_bytes,
                              stream);
    return bin_pairs_with(args, static_cast<uint32_t*>(sorted_keys), sorted_values, ranges, temp, temp_bytes, stream);
}

}  // namespace fit3d
