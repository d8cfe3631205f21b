// Which tiles a projected Gaussian reaches (the binning's geometry), shared by isect_tiles.cu and the CPU
// binning (cpu/isect_cpu.cpp).
#pragma once

#include "common.h"
#include "ops.h"

namespace fit3d {

// The tiles a Gaussian reaches, row of tiles by row of tiles. Per row, the columns come from the x-extent
// of the alpha ellipse {d : d^T conic d <= level} within the row's band of pixel centres: the ellipse's left
// boundary is convex in y, so its minimum over the band is at the band point nearest to the ellipse's
// leftmost point (likewise on the right). That is exact for "the ellipse meets the tile's rectangle of pixel
// centres", at O(rows) cost. The count and the emit kernels run this same code; should the compiler round
// them differently (fused multiply-adds), the emit kernel still writes exactly the counted number of pairs.
// shuffle_rows (isect_tiles.cu) hands every field from lane to lane: a field added here must be added there too
// (one left out renders the warp-emitted Gaussians wrongly, which only the CUDA tests can tell).
struct TileRows {
    float mx, my, ca, cb, cc, level, det, dy_right;
    int col0, col1, row0, row1, ty0, ty1;
    bool exact;
};

__host__ __device__ inline bool tile_rows(const IsectArgs& a, int64_t index, TileRows& r) {
    if (a.radii[index] <= 0) return false;
    r.mx = a.means2d[index * 2];
    r.my = a.means2d[index * 2 + 1];
    r.ca = a.conics[index * 3];
    r.cb = a.conics[index * 3 + 1];
    r.cc = a.conics[index * 3 + 2];
    const float opacity = a.opacities[index % a.N];
    if (!pixel_box(r.mx, r.my, r.ca, r.cb, r.cc, opacity, a.width, a.height, r.col0, r.col1, r.row0, r.row1))
        return false;
    // slack: conservative against float rounding in the rasterizer's alpha
    r.level = 2.f * logf(fmaxf(opacity / ALPHA_THRESHOLD, 1.f)) * (1.f + 1e-4f) + 1e-4f;
    r.det = r.ca * r.cc - r.cb * r.cb;
    r.exact = r.ca > 0.f && r.det > 0.f;                                             // otherwise the whole box is used
    r.dy_right = r.exact ? (-r.cb / r.det) * sqrtf(r.level / (r.cc / r.det)) : 0.f;  // y of the rightmost point
    r.ty0 = r.row0 / TILE_SIZE;
    r.ty1 = r.row1 / TILE_SIZE;
    return true;
}

// Tile columns [tx0, tx1] of tile row ty (empty when tx0 > tx1).
__host__ __device__ inline void tile_row_span(const TileRows& r, int ty, int& tx0, int& tx1) {
    int c_lo = r.col0, c_hi = r.col1;
    if (r.exact) {
        const float ya = fmaxf(float(ty * TILE_SIZE), float(r.row0)) + 0.5f - r.my;
        const float yb = fminf(float(ty * TILE_SIZE + TILE_SIZE - 1), float(r.row1)) + 0.5f - r.my;
        const float dr = fminf(fmaxf(r.dy_right, ya), yb), dl = fminf(fmaxf(-r.dy_right, ya), yb);
        const float xr = (-r.cb * dr + sqrtf(fmaxf(r.ca * r.level - r.det * dr * dr, 0.f))) / r.ca;
        const float xl = (-r.cb * dl - sqrtf(fmaxf(r.ca * r.level - r.det * dl * dl, 0.f))) / r.ca;
        // pixel columns whose centres lie in [mx + xl, mx + xr], widened by 0.01 px (clamped in float first
        // so that no far-off value overflows an int)
        c_lo = int(fminf(fmaxf(ceilf(r.mx + xl - 0.51f), float(r.col0)), float(r.col1 + 1)));
        c_hi = int(fmaxf(fminf(floorf(r.mx + xr - 0.49f), float(r.col1)), float(r.col0 - 1)));
    }
    tx0 = c_lo / TILE_SIZE;
    tx1 = c_lo <= c_hi ? c_hi / TILE_SIZE : tx0 - 1;
}

}  // namespace fit3d
