"""Pure-PyTorch twin of every compiled op of the rasterizer: the specification, differentiable by autograd.

Each `_<op>` here has the signature and the semantics of the op of the same name in `_wrapper.py`
(and of `<op>_fwd`/`<op>_bwd` in `rasterizer_cuda/ext.cpp` and `cpu/ext_cpu.cpp`); the tests compare both,
forward values and gradients. It runs on any device and dtype (float64 too, for `torch.autograd.gradcheck`).

Conventions (those of 3DGS/gsplat): OpenCV cameras, pixel (col, row) centred at (col + 0.5, row + 0.5);
EWA splatting with a 0.3 px^2 low-pass; alpha = min(0.99, o * exp(-d^T conic d / 2)), skipped below 1/255;
front-to-back compositing by camera depth, stopping before a Gaussian would drop the transmittance under
1e-4. The compositing is stated pixel by pixel in `spec.py`; `_rasterize` computes the same values with
bounded memory (`_reference_compositing.py`). The tile binning of the compiled ops has its twin
`_isect_tiles` (`_reference_binning.py`); the geometry maths (rotations, SH basis) is `fit3d_hf.geometry`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fit3d_hf.geometry import covariance_from_scale_rotation, sh_basis
from fit3d_hf.render._constants import ALPHA_THRESHOLD, COV2D_BLUR, FRUSTUM_MARGIN, RADIUS_SIGMAS
from fit3d_hf.render._reference_binning import _isect_tiles, pixel_box, pixel_extents
from fit3d_hf.render._reference_compositing import rasterize_camera

__all__ = [
    "_feature_l1",
    "_isect_tiles",
    "_project",
    "_rasterize",
    "_spherical_harmonics",
    "pixel_extents",
]


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

    cov_world = covariance_from_scale_rotation(quats, scales)  # [N, 3, 3]
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
        col0, col1, row0, row1 = pixel_box(means2d, conics, opacities.expand_as(z))
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
    features_bf16: bool = False,
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
        features_bf16: return the features rounded to bfloat16, channels-last.

    Returns:
        rgb `[B, 3, H, W]`, depth `[B, 1, H, W]` (sum of w_i z_i, not normalised), features
        `[B, F, H, W]`, alpha `[B, 1, H, W]` (= 1 - T_final).
    """
    batch, n = means2d.shape[:2]
    colors = colors.expand(batch, n, 3)
    rgb, depth, feats, alpha = [], [], [], []
    for b in range(batch):
        geo, feat, final_t = rasterize_camera(
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
    features = torch.stack(feats)
    if features_bf16:
        features = features.to(torch.bfloat16, memory_format=torch.channels_last)
    return torch.stack(rgb), torch.stack(depth), features, torch.stack(alpha)


def _feature_l1(decoded: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Pytorch implementation of `fit3d_hf.render._wrapper.feature_l1()`.

    Stage I's feature loss: mean over channels and pixels of |decoded - up(target)|, where up() is bilinear
    upsampling (align_corners=False) of the patch-resolution target to the decoded map's size (as FiT3D), and
    pixels where `mask` is False count 0 (the mean still divides by all pixels, as the original's masking by
    copying the prediction into the target does).

    Args:
        decoded: `[B, D, H, W]` decoded feature render.
        target: `[B, D, h, w]` backbone features.
        mask: `[B, 1, H, W]` bool, or None.

    Returns:
        The loss, a float32 scalar (computed in the dtype of `decoded`).
    """
    upsampled = F.interpolate(
        target.to(decoded.dtype), size=decoded.shape[-2:], mode="bilinear", align_corners=False
    )
    if mask is not None:
        upsampled = torch.where(mask, upsampled, decoded.detach())
    return (decoded - upsampled).abs().mean().float()
