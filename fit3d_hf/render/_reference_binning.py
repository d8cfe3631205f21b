"""Where a projected Gaussian reaches alpha >= 1/255, in the PyTorch reference: its exact pixel box, and the
tile lists of `_isect_tiles`, the twin of the compiled binning op (`isect_tiles` of `rasterizer_cuda/ext.cpp`
and `cpu/ext_cpu.cpp`).

The compiled rasterizers bin Gaussians into tiles of `TILE_SIZE` x `TILE_SIZE` pixels and composite each
tile's list; the reference composites (Gaussian, pixel) pairs directly and needs no tiles, so `_isect_tiles`
exists to state and test the binning: the same tiles (`rasterizer_cuda/isect_math.h`, step by step) and the
same order (front to back by camera depth, ties by index).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fit3d_hf.render._constants import ALPHA_THRESHOLD, TILE_SIZE

__all__ = ["_isect_tiles", "pixel_box", "pixel_extents", "sorted_visible"]

# The binning widens the alpha ellipse a little so that float rounding in the rasterizer's alpha never drops a
# pair it composites: level * (1 + 1e-4) + 1e-4, and 0.01 px on each side (rasterizer_cuda/isect_math.h).
_LEVEL_SCALE, _LEVEL_OFFSET = 1e-4, 1e-4


def pixel_extents(conics: Tensor, opacities: Tensor) -> tuple[Tensor, Tensor]:
    """Half-widths (px) of the axis-aligned box outside which a Gaussian's alpha is below 1/255.

    alpha >= 1/255 needs d^T conic d <= 2 ln(255 o); over that ellipse |dx| is at most
    sqrt(2 ln(255 o) * cov_xx). Exact, so binning by this box changes no pixel value.

    Args:
        conics: `[..., 3]` inverse 2D covariances (a, b, c) of [[a, b], [b, c]].
        opacities: `[...]` opacities.

    Returns:
        `(rx, ry)`, each `[...]`; zero where the opacity is below 1/255.
    """
    a, b, c = conics.unbind(-1)
    det = (a * c - b * b).clamp_min(1e-30)
    level = 2.0 * torch.log((opacities / ALPHA_THRESHOLD).clamp_min(1.0))
    return torch.sqrt(level * c / det), torch.sqrt(level * a / det)


def pixel_box(means2d: Tensor, conics: Tensor, opacities: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inclusive column and row ranges of the pixel centres a Gaussian can reach with alpha >= 1/255."""
    rx, ry = pixel_extents(conics, opacities)
    x, y = means2d[..., 0], means2d[..., 1]
    return (
        torch.ceil(x - rx - 0.5),
        torch.floor(x + rx - 0.5),
        torch.ceil(y - ry - 0.5),
        torch.floor(y + ry - 0.5),
    )


def sorted_visible(depths: Tensor, radii: Tensor) -> Tensor:
    """Ids of the Gaussians with radius > 0, front to back (ties by index)."""
    ids = torch.nonzero(radii > 0)[:, 0]
    return ids[torch.argsort(depths[ids], stable=True)]


def _tile_footprints(means2d: Tensor, conics: Tensor, opacities: Tensor, width: int, height: int):
    """Per Gaussian: whether it reaches the image, its pixel box clipped to the image, and the quantities
    of the exact per-tile-row extent (`tile_rows` of isect_math.h), all `[G]`.

    `fmax`/`fmin` (not `clamp`) where isect_math.h has fmaxf/fminf: they ignore a NaN operand in the same way.
    """
    col0, col1, row0, row1 = pixel_box(means2d, conics, opacities)
    col0, row0 = torch.fmax(col0, col0.new_tensor(0.0)), torch.fmax(row0, row0.new_tensor(0.0))
    col1, row1 = (
        torch.fmin(col1, col1.new_tensor(width - 1.0)),
        torch.fmin(row1, row1.new_tensor(height - 1.0)),
    )
    reaches = (opacities >= ALPHA_THRESHOLD) & (col0 <= col1) & (row0 <= row1)  # False for NaN too
    a, b, c = conics.unbind(-1)
    level = 2.0 * torch.log(torch.fmax(opacities / ALPHA_THRESHOLD, opacities.new_tensor(1.0)))
    level = level * (1.0 + _LEVEL_SCALE) + _LEVEL_OFFSET
    det = a * c - b * b
    exact = (a > 0) & (det > 0)  # otherwise the whole box is used
    dy_right = torch.where(exact, (-b / det) * torch.sqrt(level / (c / det)), 0.0)  # y of the rightmost point
    return reaches, (col0, col1, row0, row1), (a, b, level, det, exact, dy_right)


def _tile_row_columns(means2d: Tensor, box: tuple, shape: tuple, tile_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Tile columns `[tx0, tx1]` (empty when tx0 > tx1) that each (Gaussian, tile row) pair reaches: the
    x-extent of the alpha ellipse over the row's band of pixel centres (`tile_row_span` of isect_math.h).

    The ellipse's left boundary is convex in y, so its leftmost point over the band is the band point nearest
    to the ellipse's leftmost point (likewise on the right).
    """
    col0, col1, row0, row1 = box
    a, b, level, det, exact, dy_right = shape
    mx, my = means2d.unbind(-1)
    zero = means2d.new_tensor(0.0)
    ya = torch.fmax(tile_rows * TILE_SIZE, row0) + 0.5 - my
    yb = torch.fmin(tile_rows * TILE_SIZE + (TILE_SIZE - 1), row1) + 0.5 - my
    dr = torch.fmin(torch.fmax(dy_right, ya), yb)
    dl = torch.fmin(torch.fmax(-dy_right, ya), yb)
    xr = (-b * dr + torch.sqrt(torch.fmax(a * level - det * dr * dr, zero))) / a
    xl = (-b * dl - torch.sqrt(torch.fmax(a * level - det * dl * dl, zero))) / a
    # pixel columns whose centres lie in [mx + xl, mx + xr], widened by 0.01 px on each side
    c_lo = torch.fmin(torch.fmax(torch.ceil(mx + xl - 0.51), col0), col1 + 1)
    c_hi = torch.fmax(torch.fmin(torch.floor(mx + xr - 0.49), col1), col0 - 1)
    c_lo, c_hi = torch.where(exact, c_lo, col0).long(), torch.where(exact, c_hi, col1).long()
    tx0 = c_lo // TILE_SIZE
    return tx0, torch.where(c_lo <= c_hi, c_hi // TILE_SIZE, tx0 - 1)


def _expand(starts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """(run index, value) of every element of the runs `starts[i], ..., starts[i] + counts[i] - 1`."""
    run = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    offset = torch.arange(len(run), device=counts.device) - (torch.cumsum(counts, 0) - counts)[run]
    return run, starts[run] + offset


def _camera_tiles(means2d, conics, opacities, depths, radii, width: int, height: int) -> Tensor:
    """One camera's (tile, Gaussian) pairs, `[P, 2]` as (tile index, Gaussian id), grouped by tile with each
    tile's Gaussians front to back (ties by index)."""
    ids = sorted_visible(depths, radii)
    reaches, box, shape = _tile_footprints(means2d[ids], conics[ids], opacities[ids], width, height)
    ids, box, shape = ids[reaches], tuple(v[reaches] for v in box), tuple(v[reaches] for v in shape)
    # (Gaussian, tile row) pairs, then (Gaussian, tile) pairs, in the Gaussians' order
    ty0, ty1 = (box[2] // TILE_SIZE).long(), (box[3] // TILE_SIZE).long()
    slot, ty = _expand(ty0, ty1 - ty0 + 1)
    tx0, tx1 = _tile_row_columns(
        means2d[ids][slot], tuple(v[slot] for v in box), tuple(v[slot] for v in shape), ty.to(means2d.dtype)
    )
    pair, tx = _expand(tx0, (tx1 - tx0 + 1).clamp_min(0))
    tiles = ty[pair] * math.ceil(width / TILE_SIZE) + tx
    tiles, order = torch.sort(tiles, stable=True)  # stable: each tile's Gaussians stay front to back
    return torch.stack([tiles, ids[slot[pair]][order]], -1)


def _isect_tiles(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
) -> tuple[Tensor, Tensor]:
    """Pytorch implementation of `fit3d_hf.render._wrapper.isect_tiles()`.

    Bins the Gaussians of each camera into the tiles of `TILE_SIZE` x `TILE_SIZE` pixels where their alpha can
    reach 1/255 (a slightly widened ellipse, exact per row of tiles), front to back in each tile.

    Args:
        means2d: `[B, N, 2]` pixel positions.
        conics: `[B, N, 3]` inverse 2D covariances (a, b, c).
        opacities: `[N]` in [0, 1].
        depths: `[B, N]` camera z (the sort key).
        radii: `[B, N]` int; Gaussians with radius 0 are skipped.
        width: image width.
        height: image height.

    Returns:
        tile_ranges `[B * tiles_y * tiles_x, 2]` int32 (camera-major, then row-major tiles): the range
        `[start, end)` of each tile's Gaussians in gaussian_ids, `[0, 0]` for an empty tile;
        gaussian_ids `[P]` int32, the Gaussian index of every (tile, Gaussian) pair.
    """
    n_tiles = math.ceil(width / TILE_SIZE) * math.ceil(height / TILE_SIZE)
    pairs = []
    with torch.no_grad():
        for b in range(means2d.shape[0]):
            tiles_and_ids = _camera_tiles(
                means2d[b], conics[b], opacities, depths[b], radii[b], width, height
            )
            pairs.append(tiles_and_ids + torch.tensor([b * n_tiles, 0], device=means2d.device))
        pairs = torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.long, device=means2d.device)
        counts = torch.bincount(pairs[:, 0], minlength=means2d.shape[0] * n_tiles)
        ends = torch.cumsum(counts, 0)
        ranges = torch.stack([ends - counts, ends], -1) * (counts > 0)[:, None]
    return ranges.to(torch.int32), pairs[:, 1].to(torch.int32)
