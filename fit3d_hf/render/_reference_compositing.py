"""The pair-list compositing of the PyTorch reference (`_reference._rasterize`), one camera at a time.

The maths is that of the literal per-pixel loop in `fit3d_hf/render/spec.py`; this module computes it with
tensor ops and bounded memory: each Gaussian is paired only with the pixels where its alpha can reach 1/255
(its exact pixel box, `_reference_binning.pixel_box`), the pairs are processed in bands of image rows, only
the composited pairs enter the differentiable computation, and when an image needs several bands each band
is recomputed in the backward pass (activation checkpointing) rather than stored.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fit3d_hf.render._constants import ALPHA_THRESHOLD, MAX_ALPHA, TRANSMITTANCE_THRESHOLD
from fit3d_hf.render._reference_binning import pixel_box, sorted_visible

__all__ = ["rasterize_camera"]

# About this many (Gaussian, pixel) pairs are composited at once (memory bound of the reference).
_CHUNK_PAIRS = 1 << 20


def _pixel_pairs(
    boxes: tuple[Tensor, ...], width: int, row_start: int, row_end: int
) -> tuple[Tensor, Tensor]:
    """(Gaussian slot, pixel) pairs of the rows [row_start, row_end), sorted by pixel, then slot.

    Args:
        boxes: inclusive `(col0, col1, row0, row1)` per slot, already clipped to the image, `[S]` each.

    Returns:
        `(slots [P], pixels [P])`, pixels as `row * width + col`.
    """
    col0, col1, row0, row1 = boxes
    row0, row1 = row0.clamp_min(row_start), row1.clamp_max(row_end - 1)
    ncols = (col1 - col0 + 1).clamp_min(0)
    counts = ncols * (row1 - row0 + 1).clamp_min(0)
    slot = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    local = torch.arange(len(slot), device=counts.device) - (torch.cumsum(counts, 0) - counts)[slot]
    pixels = (row0[slot] + local // ncols[slot]) * width + col0[slot] + local % ncols[slot]
    pixels, order = torch.sort(pixels, stable=True)  # stable: slots (front to back) stay in order
    return slot[order], pixels


def _segment_exclusive_cumsum(values: Tensor, pixels: Tensor) -> Tensor:
    """Sum of the earlier entries of the same pixel, for `values` grouped by (sorted) `pixels`."""
    starts = torch.ones_like(pixels, dtype=torch.bool)
    starts[1:] = pixels[1:] != pixels[:-1]
    exclusive = torch.cumsum(values, 0) - values
    segment = torch.cumsum(starts, 0) - 1
    return exclusive - exclusive[torch.nonzero(starts)[:, 0]][segment]


def _pair_alpha(gids, pixels, width, means2d, conics, opacities, clamp_grad=True) -> tuple[Tensor, Tensor]:
    """sigma = d^T conic d / 2 and alpha = min(0.99, o exp(-sigma)) of (Gaussian, pixel) pairs, `[P]` each.

    With `clamp_grad` (3DGS) the gradient of alpha is that of o exp(-sigma) even where the clamp holds it at
    0.99; without (gsplat) it is zero there.
    """
    m = means2d[gids]  # [P, 2]
    con = conics[gids]  # [P, 3]
    dx = (pixels % width).to(m.dtype) + 0.5 - m[:, 0]
    dy = (pixels // width).to(m.dtype) + 0.5 - m[:, 1]
    sigma = 0.5 * (con[:, 0] * dx * dx + con[:, 2] * dy * dy) + con[:, 1] * dx * dy
    raw = opacities[gids] * torch.exp(-sigma)
    if clamp_grad:  # the value of the clamp, the gradient of the identity
        return sigma, raw - (raw - MAX_ALPHA).clamp_min(0.0).detach()
    return sigma, torch.clamp(raw, max=MAX_ALPHA)


@torch.no_grad()
def _composited_pairs(gids, pixels, width, means2d, conics, opacities) -> Tensor:
    """Mask of the pairs that are composited: alpha >= 1/255, and before the pixel's transmittance stops.

    Pairs are grouped by pixel, front to back. 3DGS stops *before* the Gaussian that would bring T below
    the threshold, so the composited pairs of a pixel are a prefix of its alpha-passing ones.
    """
    sigma, alpha = _pair_alpha(gids, pixels, width, means2d, conics, opacities)
    live = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
    log_one_minus = torch.log1p(-(alpha * live).double())
    log_after = _segment_exclusive_cumsum(log_one_minus, pixels) + log_one_minus
    return live & (log_after >= math.log(TRANSMITTANCE_THRESHOLD))


def _composite(
    gids,
    pixels,
    row_start,
    row_end,
    width,
    means2d,
    conics,
    opacities,
    geo_channels,
    features,
    route,
    clamp_grad,
):
    """Front-to-back compositing of the composited (Gaussian, pixel) pairs of a band of rows.

    The per-pixel product of (1 - alpha) is taken as exp of a segmented cumulative sum of log(1 - alpha),
    in float64 so that the running sum over many pixels loses no precision.

    Returns:
        geometry-routed channels `[n, 4]` (rgb, depth), features `[n, F]` and final transmittance `[n]` of
        the n = (row_end - row_start) * width pixels of the band.
    """
    n = (row_end - row_start) * width
    local = pixels - row_start * width
    _, alpha = _pair_alpha(gids, pixels, width, means2d, conics, opacities, clamp_grad)
    log_one_minus = torch.log1p(-alpha.double())
    before = torch.exp(_segment_exclusive_cumsum(log_one_minus, pixels)).to(alpha.dtype)
    weights = (alpha * before)[:, None]  # [P, 1]
    geo = means2d.new_zeros(n, geo_channels.shape[1]).index_add(0, local, weights * geo_channels[gids])
    feature_weights = weights if route else weights.detach()
    feats = means2d.new_zeros(n, features.shape[1]).index_add(0, local, feature_weights * features[gids])
    final_t = torch.exp(log_one_minus.new_zeros(n).index_add(0, local, log_one_minus)).to(alpha.dtype)
    return geo, feats, final_t


def _row_bands(boxes: tuple[Tensor, ...], height: int) -> list[tuple[int, int]]:
    """Splits the image rows into bands of at most about _CHUNK_PAIRS (Gaussian, pixel) pairs each."""
    col0, col1, row0, row1 = boxes
    ncols = (col1 - col0 + 1).clamp_min(0)
    has_rows = row1 >= row0
    per_row = torch.zeros(height + 1, dtype=torch.long, device=ncols.device)
    per_row.index_add_(0, row0[has_rows], ncols[has_rows])
    per_row.index_add_(0, row1[has_rows] + 1, -ncols[has_rows])
    per_row = torch.cumsum(per_row, 0)[:height].tolist()
    bands, start, total = [], 0, 0
    for row, count in enumerate(per_row):
        if total + count > _CHUNK_PAIRS and row > start:
            bands.append((start, row))
            start, total = row, 0
        total += count
    bands.append((start, height))
    return bands


def rasterize_camera(
    means2d, conics, depths, colors, opacities, features, radii, width, height, route, clamp_grad
):
    """One camera: returns geometry channels `[4, H, W]`, features `[F, H, W]`, final T `[H, W]`."""
    geo_channels = torch.cat([colors, depths[:, None]], dim=1)  # [N, 4]
    with torch.no_grad():
        ids = sorted_visible(depths, radii)
        col0, col1, row0, row1 = pixel_box(means2d[ids], conics[ids], opacities[ids])
        boxes = tuple(
            v.clamp(0, limit - 1).long()
            for v, limit in ((col0, width), (col1, width), (row0, height), (row1, height))
        )
    geo, feats, final_t = [], [], []
    bands = _row_bands(boxes, height)
    for row_start, row_end in bands:
        with torch.no_grad():
            slots, pixels = _pixel_pairs(boxes, width, row_start, row_end)
            gids = ids[slots]
            keep = _composited_pairs(gids, pixels, width, means2d, conics, opacities)
            gids, pixels = gids[keep], pixels[keep]
        args = (
            gids,
            pixels,
            row_start,
            row_end,
            width,
            means2d,
            conics,
            opacities,
            geo_channels,
            features,
            route,
            clamp_grad,
        )
        if torch.is_grad_enabled() and len(bands) > 1:  # recompute in the backward pass, don't store
            band = checkpoint(_composite, *args, use_reentrant=False)
        else:
            band = _composite(*args)
        geo.append(band[0])
        feats.append(band[1])
        final_t.append(band[2])
    geo = torch.cat(geo).T.reshape(-1, height, width)
    feats = torch.cat(feats).T.reshape(-1, height, width)
    return geo, feats, torch.cat(final_t).reshape(height, width)
