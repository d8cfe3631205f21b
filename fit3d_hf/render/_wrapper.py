"""The compiled ops: one public function per op (checks, then an autograd Function that calls the extension).

The ops: `project`, `spherical_harmonics`, `isect_tiles` (the tile binning, from `_binning.py`), `rasterize`
(which bins and composites) and `feature_l1` (Stage I's fused feature loss). The autograd Functions serve
both compiled backends: they call the extension of the tensors' device (`_backend.extension_for`: the CUDA
extension for CUDA tensors, the CPU extension for CPU tensors), which expose the same functions with the
same signatures.

Each op has a pure-PyTorch twin of the same name and signature in `_reference.py` (`project` <->
`_reference._project`, ...); `tests/test_render_cuda.py` and `tests/test_render_cpu.py` compare forward
values and gradients of both. Gradients are named `v_<input>`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fit3d_hf.render._backend import extension_for
from fit3d_hf.render._binning import isect_and_rasterize, isect_and_rasterize_exact, isect_tiles
from fit3d_hf.render._checks import (
    check_compiled_device,
    check_feature_l1_inputs,
    check_image_and_planes,
    check_sh_coefficients,
    check_tensor,
    sh_parts,
)

__all__ = ["FEATURE_L1_DTYPES", "feature_l1", "isect_tiles", "project", "rasterize", "spherical_harmonics"]

# `render()` and `feature_l1()` of the render package validate their arguments once and then call the
# unchecked `_apply_*` functions below; the public op functions check their own arguments first.

_F32 = (torch.float32,)
# dtypes the fused feature loss reads (it accumulates in float32)
FEATURE_L1_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _feature_grad(t: Tensor | None) -> Tensor | None:
    """The feature images' gradient as the extensions read it: planar or channels-last (the layout a convolution
    of the features, Stage I's decoder, passes back), which saves a transposing copy of the whole map."""
    if t is not None and t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t
    return _contiguous(t)


def _needs_graph(tensors) -> bool:
    """Whether autograd must record an op: gradients are on and an input requires one. Renders without
    gradients (evaluation, Stage II's targets) call the extension directly, as an autograd Function's
    bookkeeping is a large share of a small render's host time."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _project_fwd(means, quats, scales, opacities, world_to_camera, K, config):
    """config: (width, height, near_plane, far_plane), one tuple: autograd's bookkeeping is per argument."""
    return extension_for(means.device).project_fwd(
        means, quats, scales, opacities, world_to_camera, K, *config
    )


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, opacities, world_to_camera, K, config):
        means2d, conics, depths, radii = _project_fwd(
            means, quats, scales, opacities, world_to_camera, K, config
        )
        ctx.save_for_backward(means, quats, scales, world_to_camera, K, radii)
        ctx.image_size = config[:2]
        ctx.mark_non_differentiable(radii)
        return means2d, conics, depths, radii

    @staticmethod
    def backward(ctx, v_means2d, v_conics, v_depths, v_radii):
        means, quats, scales, world_to_camera, K, radii = ctx.saved_tensors
        v_means, v_quats, v_scales = extension_for(means.device).project_bwd(
            means,
            quats,
            scales,
            world_to_camera,
            K,
            radii,
            *ctx.image_size,
            v_means2d.contiguous(),
            v_conics.contiguous(),
            v_depths.contiguous(),
        )
        return v_means, v_quats, v_scales, None, None, None, None


def project(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    world_to_camera: Tensor,  # [B, 4, 4]
    K: Tensor,  # [B, 3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EWA projection by the compiled extension (CUDA or CPU); see `_reference._project` for the semantics.

    Returns:
        means2d `[B, N, 2]`, conics `[B, N, 3]`, depths `[B, N]`, radii `[B, N]` int32. Gradients reach
        means, quats and scales (not the cameras).
    """
    dims: dict[str, int] = {}
    for name, t, shape in (
        ("means", means, ("N", 3)),
        ("quats", quats, ("N", 4)),
        ("scales", scales, ("N", 3)),
        ("opacities", opacities, ("N",)),
        ("world_to_camera", world_to_camera, ("B", 4, 4)),
        ("K", K, ("B", 3, 3)),
    ):
        check_tensor(t, name, shape, dims, _F32, means.device)
        check_compiled_device(name, t)
    check_image_and_planes(width, height, near_plane, far_plane)
    return _apply_project(
        means, quats, scales, opacities, world_to_camera, K, width, height, near_plane, far_plane
    )


def _apply_project(means, quats, scales, opacities, world_to_camera, K, width, height, near_plane, far_plane):
    args = [t.contiguous() for t in (means, quats, scales, opacities, world_to_camera, K)]
    config = (int(width), int(height), float(near_plane), float(far_plane))
    return _Project.apply(*args, config) if _needs_graph(args) else _project_fwd(*args, config)


def _spherical_harmonics_fwd(sh_dc, sh_rest, means, world_to_camera, sh_degree):
    return extension_for(means.device).spherical_harmonics_fwd(
        sh_dc, sh_rest, means, world_to_camera, sh_degree
    )


class _SphericalHarmonics(torch.autograd.Function):
    """The coefficients come as one `[N, K, 3]` tensor (`sh_rest` None) or as 3DGS's two parameters, which the
    extensions read in place: concatenating them at every Stage I iteration, and splitting the gradient back,
    took 0.55 ms at 1M Gaussians on an H100."""

    @staticmethod
    def forward(ctx, sh_dc, sh_rest, means, world_to_camera, sh_degree):
        colors = _spherical_harmonics_fwd(sh_dc, sh_rest, means, world_to_camera, sh_degree)
        ctx.save_for_backward(sh_dc, sh_rest, means, world_to_camera)
        ctx.sh_degree = sh_degree
        return colors

    @staticmethod
    def backward(ctx, v_colors):
        sh_dc, sh_rest, means, world_to_camera = ctx.saved_tensors
        v_dc, v_rest, v_means = extension_for(means.device).spherical_harmonics_bwd(
            sh_dc, sh_rest, means, world_to_camera, ctx.sh_degree, v_colors.contiguous()
        )
        return v_dc, v_rest, v_means, None, None


def spherical_harmonics(
    sh: Tensor | tuple[Tensor, Tensor],  # [N, K, 3], or ([N, 1, 3], [N, K - 1, 3])
    means: Tensor,  # [N, 3]
    world_to_camera: Tensor,  # [B, 4, 4]
    sh_degree: int,
) -> Tensor:
    """View-dependent colours `[B, N, 3]` by the compiled extension; see `_reference._spherical_harmonics`.

    `sh` may also be the pair (DC terms `[N, 1, 3]`, the rest `[N, K - 1, 3]`), as 3DGS keeps them: the same
    colours as from their concatenation, without making it."""
    dims: dict[str, int] = {}
    check_tensor(means, "means", ("N", 3), dims, _F32)
    check_sh_coefficients(sh, dims, _F32, means.device)
    check_tensor(world_to_camera, "world_to_camera", ("B", 4, 4), dims, _F32, means.device)
    for name, t in (("means", means), ("colors", sh_parts(sh)[0]), ("world_to_camera", world_to_camera)):
        check_compiled_device(name, t)
    if not 0 <= sh_degree <= 3 or (sh_degree + 1) ** 2 > dims["K"]:
        raise ValueError(f"sh_degree must be in 0..3 with (sh_degree + 1)^2 <= {dims['K']}, got {sh_degree}")
    return _apply_spherical_harmonics(sh, means, world_to_camera, sh_degree)


def _apply_spherical_harmonics(sh, means, world_to_camera, sh_degree):
    sh_dc, sh_rest = sh_parts(sh)
    args = (sh_dc.contiguous(), _contiguous(sh_rest), means.contiguous(), world_to_camera.contiguous())
    if _needs_graph(args):
        return _SphericalHarmonics.apply(*args, sh_degree)
    return _spherical_harmonics_fwd(*args, sh_degree)


def _rasterize_fwd(means2d, conics, depths, colors, opacities, features, background, radii, config):
    """Bins and composites; returns (tile_ranges, gaussian_ids, the images of the extension's rasterize_fwd)."""
    width, height, _, _, features_bf16 = config
    binning = isect_and_rasterize if means2d.is_cuda else isect_and_rasterize_exact
    return binning(
        extension_for(means2d.device), means2d, conics, depths, colors, opacities, features, background, radii,
        width, height, features_bf16,
    )  # fmt: skip


class _Rasterize(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        means2d,
        conics,
        depths,
        colors,
        opacities,
        features,
        background,
        radii,
        config,  # (width, height, feature_grad_to_geometry, alpha_clamp_grad, features_bf16)
    ):
        tile_ranges, gaussian_ids, images = _rasterize_fwd(
            means2d, conics, depths, colors, opacities, features, background, radii, config
        )
        rgb, depth, feats, alpha, final_t, last_ids = images
        ctx.save_for_backward(
            means2d,
            conics,
            depths,
            colors,
            opacities,
            features,
            background,
            tile_ranges,
            gaussian_ids,
            final_t,
            last_ids,
        )
        ctx.config = config
        ctx.set_materialize_grads(False)  # an unused image costs no gradient work
        return rgb, depth, feats, alpha

    @staticmethod
    def backward(ctx, v_rgb, v_depth, v_feats, v_alpha):
        (
            means2d,
            conics,
            depths,
            colors,
            opacities,
            features,
            background,
            tile_ranges,
            gaussian_ids,
            final_t,
            last_ids,
        ) = ctx.saved_tensors
        width, height, route, clamp_grad, _ = ctx.config
        # with no 2D mean, conic or opacity to differentiate (geometry held fixed), the kernels skip the alpha
        # gradient and the geometry's sums (Stage I's refinement of the compressed colours: its backward kernel
        # 1.62 -> 1.21 ms at 1M Gaussians on an H100)
        geometry_grad = any(ctx.needs_input_grad[i] for i in (0, 1, 4))
        ext = extension_for(means2d.device)
        v_means2d, v_conics, v_opacities, v_colors, v_depths, v_features = ext.rasterize_bwd(
            means2d,
            conics,
            opacities,
            colors,
            depths,
            features,
            background,
            tile_ranges,
            gaussian_ids,
            final_t,
            last_ids,
            width,
            height,
            _contiguous(v_rgb),
            _contiguous(v_depth),
            _feature_grad(v_feats),
            _contiguous(v_alpha),
            route,
            clamp_grad,
            geometry_grad,
        )
        v_background = None
        if background is not None and ctx.needs_input_grad[6] and v_rgb is not None:
            v_background = (final_t[:, None] * v_rgb).sum(dim=(0, 2, 3))
        if v_feats is None:
            v_features = None
        if not geometry_grad:
            v_means2d = v_conics = v_opacities = None
        return (
            v_means2d,
            v_conics,
            v_depths,
            v_colors,
            v_opacities,
            v_features,
            v_background,
            None,
            None,
        )


def rasterize(
    means2d: Tensor,  # [B, N, 2]
    conics: Tensor,  # [B, N, 3]
    depths: Tensor,  # [B, N]
    colors: Tensor,  # [N, 3] or [B, N, 3]
    opacities: Tensor,  # [N]
    features: Tensor,  # [N, F]
    radii: Tensor,  # [B, N] int32
    width: int,
    height: int,
    background: Tensor | None = None,  # [3]
    feature_grad_to_geometry: bool = False,
    alpha_clamp_grad: bool = True,
    features_bf16: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Alpha compositing of rgb, depth and F feature channels by the compiled extension (CUDA or CPU), in one
    pass over the tile lists; with `features_bf16`, the feature images come as bfloat16, channels-last.

    See `_reference._rasterize` for the semantics.

    Returns:
        rgb `[B, 3, H, W]`, depth `[B, 1, H, W]`, features `[B, F, H, W]`, alpha `[B, 1, H, W]`.
    """
    dims: dict[str, int] = {}
    device = means2d.device
    check_tensor(means2d, "means2d", ("B", "N", 2), dims, _F32)
    check_tensor(conics, "conics", ("B", "N", 3), dims, _F32, device)
    check_tensor(depths, "depths", ("B", "N"), dims, _F32, device)
    check_tensor(colors, "colors", ("B", "N", 3) if colors.dim() == 3 else ("N", 3), dims, _F32, device)
    check_tensor(opacities, "opacities", ("N",), dims, _F32, device)
    check_tensor(features, "features", ("N", "F"), dims, _F32, device)
    check_tensor(radii, "radii", ("B", "N"), dims, (torch.int32,), device)
    if background is not None:
        check_tensor(background, "background", (3,), dims, _F32, device)
    for name, t in (("means2d", means2d), ("features", features)):
        check_compiled_device(name, t)
    return _apply_rasterize(
        means2d,
        conics,
        depths,
        colors,
        opacities,
        features,
        radii,
        width,
        height,
        background,
        feature_grad_to_geometry,
        alpha_clamp_grad,
        features_bf16,
    )


def _apply_rasterize(
    means2d,
    conics,
    depths,
    colors,
    opacities,
    features,
    radii,
    width,
    height,
    background,
    feature_grad_to_geometry,
    alpha_clamp_grad=True,
    features_bf16=False,
):
    args = [t.contiguous() for t in (means2d, conics, depths, colors, opacities, features)]
    args += [_contiguous(background), radii.contiguous()]
    config = (
        int(width),
        int(height),
        bool(feature_grad_to_geometry),
        bool(alpha_clamp_grad),
        bool(features_bf16),
    )
    if _needs_graph(args):
        return _Rasterize.apply(*args, config)
    rgb, depth, feats, alpha = _rasterize_fwd(*args, config)[2][:4]
    return rgb, depth, feats, alpha


class _FeatureL1(torch.autograd.Function):
    """The fused kernel of `feature_l1`: rasterizer_cuda/feature_loss.cu (channels-last inputs) or its CPU
    twin rasterizer_cuda/cpu/feature_loss_cpu.cpp (any layout), by the tensors' device."""

    @staticmethod
    def forward(ctx, decoded, target, mask):
        ext = extension_for(decoded.device)
        ctx.sizes = None
        if ctx.needs_input_grad[0] and hasattr(ext, "feature_l1_fwd_signs"):
            # CUDA: the forward keeps 2 bits per value, the signs its gradient needs, so the backward reads those
            # instead of the decoded map and the target (and the map need not be kept for it)
            loss, signs = ext.feature_l1_fwd_signs(decoded, target, mask)
            if signs is not None:
                ctx.sizes, ctx.like = list(decoded.shape), decoded.new_empty(0)
                ctx.save_for_backward(signs)
                return loss
        ctx.save_for_backward(decoded, target, mask)
        return ext.feature_l1_fwd(decoded, target, mask)

    @staticmethod
    def backward(ctx, v_loss):
        v_loss = v_loss.float().reshape(1).contiguous()
        if ctx.sizes is not None:
            (signs,) = ctx.saved_tensors
            grad = extension_for(signs.device).feature_l1_bwd_from_signs(signs, v_loss, ctx.sizes, ctx.like)
            return grad, None, None
        decoded, target, mask = ctx.saved_tensors
        return extension_for(decoded.device).feature_l1_bwd(decoded, target, mask, v_loss), None, None


def feature_l1(
    decoded: Tensor,  # [B, D, H, W]
    target: Tensor,  # [B, D, h, w]
    mask: Tensor | None = None,  # [B, 1, H, W] bool
) -> Tensor:
    """Stage I's feature loss by the compiled extension (CUDA or CPU), in one pass over `decoded` (the
    composed ops take about ten, see rasterizer_cuda/feature_loss.cu); see `_reference._feature_l1` for the
    semantics.

    Returns:
        The loss, a float32 scalar. The gradient reaches `decoded` only (a `target` that requires grad is
        refused).
    """
    check_feature_l1_inputs(decoded, target, mask, FEATURE_L1_DTYPES)
    check_compiled_device("decoded", decoded)
    if target.requires_grad:
        raise ValueError("target requires grad, but the fused feature loss differentiates decoded only")
    return _apply_feature_l1(decoded, target, mask)


def _apply_feature_l1(decoded, target, mask):
    if decoded.is_cuda:  # the CUDA kernel reads channels last; the CPU one takes any layout
        decoded = decoded.contiguous(memory_format=torch.channels_last)
        target = target.contiguous(memory_format=torch.channels_last)
    return _FeatureL1.apply(decoded, target, _contiguous(mask))
