"""Pure-PyTorch twin of every CUDA op of the rasterizer: the specification, differentiable by autograd.

Each `_<op>` here has the signature and the semantics of the op of the same name in `_wrapper.py`
(and of `<op>_fwd`/`<op>_bwd` in `rasterizer_cuda/ext.cpp`); the CUDA tests compare both, forward values
and gradients. It runs on any device and dtype (float64 too, for `torch.autograd.gradcheck`).

Conventions (those of 3DGS/gsplat): OpenCV cameras, pixel (col, row) centred at (col + 0.5, row + 0.5);
EWA splatting with a 0.3 px^2 low-pass; alpha = min(0.99, o * exp(-d^T conic d / 2)), skipped below 1/255;
front-to-back compositing by camera depth, stopping before a Gaussian would drop the transmittance under
1e-4. Memory stays bounded: each Gaussian is paired only with the pixels where its alpha can reach 1/255
(an exact box), the pairs are processed in bands of image rows, only the composited pairs enter the
differentiable computation, and when an image needs several bands each band is recomputed in the
backward pass (activation checkpointing) rather than stored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fit3d_hf.render._constants import (
    ALPHA_THRESHOLD,
    COV2D_BLUR,
    FRUSTUM_MARGIN,
    MAX_ALPHA,
    RADIUS_SIGMAS,
    SH_C0,
    TRANSMITTANCE_THRESHOLD,
)

__all__ = ["_project", "_rasterize", "_spherical_harmonics", "pixel_extents", "quat_to_rotmat", "sh_basis"]

# Real spherical-harmonic basis constants (degrees 1-3), in the order used by 3DGS and gsplat.
_SH_C1 = 0.4886025119029199
_SH_C2 = (
    1.0925484305920792,
    -1.0925484305920792,
    0.31539156525252005,
    -1.0925484305920792,
    0.5462742152960396,
)
_SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)
# About this many (Gaussian, pixel) pairs are composited at once (memory bound of the reference).
_CHUNK_PAIRS = 1 << 20


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices of quaternions.

    Args:
        quats: `[..., 4]` quaternions (w, x, y, z), any non-zero norm.

    Returns:
        `[..., 3, 3]` rotation matrices of the normalised quaternions.
    """
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = (
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    )
    return torch.stack(rows, -2)


def sh_basis(dirs: Tensor, degree: int) -> Tensor:
    """Real spherical-harmonic basis up to `degree` (0-3), evaluated at unit directions.

    Args:
        dirs: `[..., 3]` unit vectors.
        degree: highest degree.

    Returns:
        `[..., (degree + 1) ** 2]` basis values.
    """
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-_SH_C1 * y, _SH_C1 * z, -_SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            _SH_C2[0] * x * y,
            _SH_C2[1] * y * z,
            _SH_C2[2] * (2 * zz - xx - yy),
            _SH_C2[3] * x * z,
            _SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            _SH_C3[0] * y * (3 * xx - yy),
            _SH_C3[1] * x * y * z,
            _SH_C3[2] * y * (4 * zz - xx - yy),
            _SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            _SH_C3[4] * x * (4 * zz - xx - yy),
            _SH_C3[5] * z * (xx - yy),
            _SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, -1)


def _spherical_harmonics(sh: Tensor, means: Tensor, world_to_camera: Tensor, sh_degree: int) -> Tensor:
    """Pytorch implementation of `fit3d_hf.render._wrapper.spherical_harmonics()`.

    Colour of each Gaussian seen from each camera centre, as in 3DGS: SH evaluated along the unit
    direction from the camera centre to the mean, plus 0.5, clamped at 0.

    Args:
        sh: `[N, K, 3]` coefficients, K >= (sh_degree + 1) ** 2 (extra ones are ignored).
        means: `[N, 3]` world positions.
        world_to_camera: `[B, 4, 4]`.
        sh_degree: degree used (0-3).

    Returns:
        `[B, N, 3]` colours.
    """
    rotation = world_to_camera[:, :3, :3]
    centres = -(rotation.transpose(-1, -2) @ world_to_camera[:, :3, 3:4])[..., 0]  # [B, 3]
    dirs = F.normalize(means[None] - centres[:, None], dim=-1)  # [B, N, 3]
    basis = sh_basis(dirs, sh_degree)  # [B, N, K']
    rgb = torch.einsum("bnk,nkc->bnc", basis, sh[:, : basis.shape[-1]]) + 0.5
    return torch.clamp_min(rgb, 0.0)


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


def _pixel_box(means2d: Tensor, conics: Tensor, opacities: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inclusive column and row ranges of the pixel centres a Gaussian can reach with alpha >= 1/255."""
    rx, ry = pixel_extents(conics, opacities)
    x, y = means2d[..., 0], means2d[..., 1]
    return (
        torch.ceil(x - rx - 0.5),
        torch.floor(x + rx - 0.5),
        torch.ceil(y - ry - 0.5),
        torch.floor(y + ry - 0.5),
    )


def _project(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    world_to_camera: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pytorch implementation of `fit3d_hf.render._wrapper.project()`.

    EWA projection of 3D Gaussians into each camera.

    Args:
        means: `[N, 3]` world positions.
        quats: `[N, 4]` rotations (w, x, y, z), any non-zero norm.
        scales: `[N, 3]` standard deviations along the rotated axes.
        opacities: `[N]` opacities in [0, 1] (only for culling: a Gaussian that cannot reach alpha 1/255
            at any pixel centre of the image gets radius 0).
        world_to_camera: `[B, 4, 4]`.
        K: `[B, 3, 3]` intrinsics.
        width: image width.
        height: image height.
        near_plane: Gaussians with camera depth below this are culled.
        far_plane: Gaussians with camera depth above this are culled.

    Returns:
        means2d `[B, N, 2]` (px), conics `[B, N, 3]` (a, b, c of the inverse 2D covariance
        [[a, b], [b, c]]), depths `[B, N]` (camera z), radii `[B, N]` int32 (3-sigma radius in px, 0 for
        culled Gaussians; culled entries of the other outputs are 0).
    """
    rotation = world_to_camera[:, :3, :3]  # [B, 3, 3]
    cam = torch.einsum("bij,nj->bni", rotation, means) + world_to_camera[:, None, :3, 3]  # [B, N, 3]
    x, y, z = cam.unbind(-1)
    in_range = (z >= near_plane) & (z <= far_plane)
    z = torch.where(in_range, z, torch.ones_like(z))  # keeps culled entries finite (and their grads zero)

    m = quat_to_rotmat(quats) * scales[:, None, :]  # [N, 3, 3] = R(q) diag(s)
    cov_world = m @ m.transpose(-1, -2)
    cov_cam = rotation[:, None] @ cov_world[None] @ rotation.transpose(-1, -2)[:, None]  # [B, N, 3, 3]

    fx, fy, cx, cy = (K[:, 0, 0, None], K[:, 1, 1, None], K[:, 0, 2, None], K[:, 1, 2, None])  # [B, 1]
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    tx = z * torch.clamp(
        x / z, -(cx / fx + FRUSTUM_MARGIN * tan_x), (width - cx) / fx + FRUSTUM_MARGIN * tan_x
    )
    ty = z * torch.clamp(
        y / z, -(cy / fy + FRUSTUM_MARGIN * tan_y), (height - cy) / fy + FRUSTUM_MARGIN * tan_y
    )
    zeros = torch.zeros_like(z)
    jac = torch.stack(
        [
            torch.stack([fx / z, zeros, -fx * tx / (z * z)], -1),
            torch.stack([zeros, fy / z, -fy * ty / (z * z)], -1),
        ],
        -2,
    )  # [B, N, 2, 3]
    cov2d = jac @ cov_cam @ jac.transpose(-1, -2)
    a = cov2d[..., 0, 0] + COV2D_BLUR
    b = cov2d[..., 0, 1]
    c = cov2d[..., 1, 1] + COV2D_BLUR
    det = a * c - b * b
    valid = in_range & (det > 0)
    det = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det, -b / det, a / det], -1)
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)

    with torch.no_grad():
        mid = 0.5 * (a + c)
        lambda_max = mid + torch.sqrt(torch.clamp_min(mid * mid - det, 0.1))
        radius = torch.ceil(RADIUS_SIGMAS * torch.sqrt(lambda_max))
        col0, col1, row0, row1 = _pixel_box(means2d, conics, opacities.expand_as(z))
        on_screen = (col0.clamp_min(0) <= col1.clamp_max(width - 1)) & (
            row0.clamp_min(0) <= row1.clamp_max(height - 1)
        )
        visible = valid & on_screen & (opacities >= ALPHA_THRESHOLD)
        radii = torch.where(visible, radius, torch.zeros_like(radius)).to(torch.int32)

    keep = visible[..., None]
    return (
        torch.where(keep, means2d, 0.0),
        torch.where(keep, conics, 0.0),
        torch.where(visible, cam[..., 2], 0.0),
        radii,
    )


def _sorted_visible(depths: Tensor, radii: Tensor) -> Tensor:
    """Ids of the Gaussians with radius > 0, front to back (ties by index)."""
    ids = torch.nonzero(radii > 0)[:, 0]
    return ids[torch.argsort(depths[ids], stable=True)]


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
    gids, pixels, row_start, row_end, width, means2d, conics, opacities, geo_channels, features, route, clamp_grad
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


def _rasterize_camera(
    means2d, conics, depths, colors, opacities, features, radii, width, height, route, clamp_grad
):
    """One camera: returns geometry channels `[4, H, W]`, features `[F, H, W]`, final T `[H, W]`."""
    geo_channels = torch.cat([colors, depths[:, None]], dim=1)  # [N, 4]
    with torch.no_grad():
        ids = _sorted_visible(depths, radii)
        col0, col1, row0, row1 = _pixel_box(means2d[ids], conics[ids], opacities[ids])
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


def _rasterize(
    means2d: Tensor,
    conics: Tensor,
    depths: Tensor,
    colors: Tensor,
    opacities: Tensor,
    features: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    background: Tensor | None = None,
    feature_grad_to_geometry: bool = False,
    alpha_clamp_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pytorch implementation of `fit3d_hf.render._wrapper.rasterize()`.

    Alpha-composites RGB, depth and features of projected Gaussians, front to back.

    Args:
        means2d: `[B, N, 2]` pixel positions.
        conics: `[B, N, 3]` inverse 2D covariances (a, b, c).
        depths: `[B, N]` camera z (sort key and the depth channel).
        colors: `[N, 3]` or `[B, N, 3]` RGB.
        opacities: `[N]` in [0, 1].
        features: `[N, F]` (F may be 0).
        radii: `[B, N]` int; Gaussians with radius 0 are skipped.
        width: image width.
        height: image height.
        background: optional `[3]` colour added to RGB as T_final * background.
        feature_grad_to_geometry: if False, the gradient of the feature image reaches only `features`
            (the blending weights are constants for it); if True it reaches the geometry too.
        alpha_clamp_grad: if True (3DGS, which FiT3D forks), alpha = min(0.99, o G) is differentiated as
            o G, also where the clamp holds it; if False (gsplat) its gradient is zero there.

    Returns:
        rgb `[B, 3, H, W]`, depth `[B, 1, H, W]` (sum of w_i z_i, not normalised), features
        `[B, F, H, W]`, alpha `[B, 1, H, W]` (= 1 - T_final).
    """
    batch, n = means2d.shape[:2]
    colors = colors.expand(batch, n, 3)
    rgb, depth, feats, alpha = [], [], [], []
    for b in range(batch):
        geo, feat, final_t = _rasterize_camera(
            means2d[b],
            conics[b],
            depths[b],
            colors[b],
            opacities,
            features,
            radii[b],
            width,
            height,
            feature_grad_to_geometry,
            alpha_clamp_grad,
        )
        image = geo[:3]
        if background is not None:
            image = image + final_t[None] * background[:, None, None]
        rgb.append(image)
        depth.append(geo[3:4])
        feats.append(feat)
        alpha.append(1.0 - final_t[None])
    return torch.stack(rgb), torch.stack(depth), torch.stack(feats), torch.stack(alpha)
