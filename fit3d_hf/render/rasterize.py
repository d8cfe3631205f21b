"""`render()`: differentiable rendering of RGB, depth, alpha and feature maps from 3D Gaussians.

One API over three backends with the same semantics: the CUDA extension (for CUDA tensors), the CPU
extension (for float32 CPU tensors; both compiled from the same maths headers, see rasterizer_cuda/) and the
pure-PyTorch reference (the specification: float64, other devices, or where no extension could be built).
`backend(device)` says which one a device's tensors get.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fit3d_hf.render import _reference, _wrapper
from fit3d_hf.render._backend import cpu_extension_error, extension_error, load_cpu_extension, load_extension
from fit3d_hf.render._checks import check_image_and_planes, check_sh_coefficients, check_tensor

__all__ = ["RenderOutput", "backend", "render"]

logger = logging.getLogger(__name__)

_BACKENDS = ("cuda", "cpu", "reference")


@dataclass
class RenderOutput:
    """What `render()` returns (B cameras, N Gaussians, F feature channels, H x W pixels).

    Attributes:
        rgb: `[B, 3, H, W]` composited colour plus T_final * background.
        features: `[B, F, H, W]` composited features (no background term); channels-last in memory from the
            CPU backend, which accumulates them pixel by pixel (the values do not depend on the layout), and
            bfloat16 channels-last with `feature_dtype=torch.bfloat16`.
        depth: `[B, 1, H, W]` expected depth sum_i w_i z_i (not divided by alpha); None when
            `render_depth=False`.
        alpha: `[B, 1, H, W]` accumulated opacity 1 - T_final.
        radii: `[B, N]` int32 screen-space radius (3 sigma, px) of each Gaussian, 0 where it is culled
            (behind the near plane, beyond the far plane, or unable to reach alpha 1/255 on the image).
        means2d: `[B, N, 2]` projected centres (px). After `backward()`, `means2d.grad` holds the
            screen-space gradient used by densification (it has `retain_grad()` when it requires grad).
        depths: `[B, N]` camera-space depth of each centre (0 where culled).
        backend: "cuda", "cpu" or "reference", the backend that rendered.
    """

    rgb: Tensor
    features: Tensor
    depth: Tensor | None
    alpha: Tensor
    radii: Tensor
    means2d: Tensor
    depths: Tensor
    backend: str


def backend(device: str | torch.device = "cuda") -> str:
    """The backend `render()` uses for float32 tensors on `device` (default: CUDA tensors).

    Returns:
        "cuda" for CUDA devices and "cpu" for the CPU when their compiled extension loads, else "reference"
        (which float64 tensors always get). The first call for a device may compile its extension (JIT) when
        no prebuilt one is installed.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda" if load_extension() is not None else "reference"
    if device.type == "cpu":
        return "cpu" if load_cpu_extension() is not None else "reference"
    return "reference"


@functools.lru_cache(maxsize=1)
def _warn_fallback() -> None:
    logger.warning("Rendering CUDA tensors with the (slow) PyTorch reference: %s", extension_error())


@functools.lru_cache(maxsize=1)
def _warn_cpu_fallback() -> None:
    logger.warning("Rendering CPU tensors with the (slow) PyTorch reference: %s", cpu_extension_error())


def _choose_backend(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    if requested is not None and requested not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} or None, got {requested!r}")
    if requested == "reference":
        return "reference"
    if requested == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, but the Gaussians are on {device}")
        if load_cpu_extension() is None:
            raise RuntimeError(
                f"backend='cpu' was requested but the CPU rasterizer is unavailable: {cpu_extension_error()}"
            )
        return "cpu"
    if requested == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, but the Gaussians are on {device}")
        if load_extension() is None:
            raise RuntimeError(
                f"backend='cuda' was requested but the CUDA rasterizer is unavailable: {extension_error()}"
            )
        return "cuda"
    if device.type == "cuda":
        if load_extension() is not None:
            return "cuda"
        _warn_fallback()
    if device.type == "cpu" and dtype == torch.float32:  # float64 is the reference's alone, without a warning
        if load_cpu_extension() is not None:
            return "cpu"
        _warn_cpu_fallback()
    return "reference"


def _resolve_sh_degree(colors: Tensor | tuple[Tensor, Tensor], sh_degree: int | None) -> int | None:
    """None for plain colours `[N, 3]`; the SH degree for coefficients `[N, K, 3]` (or their two parts)."""
    if isinstance(colors, Tensor) and colors.dim() == 2:
        if sh_degree is not None:
            raise ValueError(
                f"sh_degree={sh_degree} needs SH coefficients colors [N, K, 3], got {tuple(colors.shape)}"
            )
        return None
    n_coeffs = 1 + colors[1].shape[1] if isinstance(colors, tuple | list) else colors.shape[1]
    if sh_degree is None:
        sh_degree = math.isqrt(n_coeffs) - 1
        if (sh_degree + 1) ** 2 != n_coeffs:
            raise ValueError(
                f"colors has {n_coeffs} SH coefficients, not a square (1, 4, 9, 16); pass sh_degree"
            )
    if not 0 <= sh_degree <= 3:
        raise ValueError(f"sh_degree must be in 0..3, got {sh_degree}")
    if (sh_degree + 1) ** 2 > n_coeffs:
        raise ValueError(
            f"sh_degree={sh_degree} needs {(sh_degree + 1) ** 2} SH coefficients, colors has {n_coeffs}"
        )
    return sh_degree


def _well_formed(
    means, quats, scales, opacities, colors, features, K, world_to_camera, width, height, background, near_plane,
    far_plane,
) -> bool:  # fmt: skip
    """Whether `render()`'s arguments have its common form: float32/float64 tensors of one dtype on one device with
    consistent shapes, colours `[N, 3]`, `[N, K, 3]` or the SH pair, valid sizes and planes. A fast test (under
    half of `_validate`'s time, which render() pays per call); anything else goes to `_validate`, whose
    detailed checks accept or explain."""
    try:
        n, dtype, device = means.shape[0], means.dtype, means.device
        b = K.shape[0]
        tensors = [means, quats, scales, opacities, K, world_to_camera]
        if (
            means.shape != (n, 3)
            or quats.shape != (n, 4)
            or scales.shape != (n, 3)
            or opacities.shape != (n,)
        ):
            return False
        if K.shape != (b, 3, 3) or world_to_camera.shape != (b, 4, 4):
            return False
        if isinstance(colors, tuple):
            dc, rest = colors
            if dc.shape != (n, 1, 3) or rest.dim() != 3 or rest.shape[0] != n or rest.shape[2] != 3:
                return False
            tensors += [dc, rest]
        elif colors.shape != (n, 3) and (colors.dim() != 3 or colors.shape[0] != n or colors.shape[2] != 3):
            return False
        else:
            tensors.append(colors)
        if features is not None:
            if features.dim() != 2 or features.shape[0] != n:
                return False
            tensors.append(features)
        if background is not None:
            if background.shape != (3,):
                return False
            tensors.append(background)
        if dtype not in (torch.float32, torch.float64):
            return False
        if any(not isinstance(t, Tensor) or t.dtype != dtype or t.device != device for t in tensors):
            return False
        return (
            type(width) is int
            and type(height) is int
            and width > 0
            and height > 0
            and 0 < near_plane < far_plane
        )
    except (AttributeError, TypeError, ValueError, IndexError):  # not tensors, or not of this form
        return False


def _validate(
    means,
    quats,
    scales,
    opacities,
    colors,
    features,
    K,
    world_to_camera,
    width,
    height,
    background,
    near_plane,
    far_plane,
):
    """Checks every argument of `render()` (features may be None)."""
    dtypes = (torch.float32, torch.float64)
    dims: dict[str, int] = {}
    check_tensor(means, "means", ("N", 3), dims, dtypes)
    device = means.device
    dtypes = (means.dtype,)  # everything else must match the Gaussians' dtype
    check_tensor(quats, "quats", ("N", 4), dims, dtypes, device)
    check_tensor(scales, "scales", ("N", 3), dims, dtypes, device)
    check_tensor(opacities, "opacities", ("N",), dims, dtypes, device)
    if isinstance(colors, Tensor) and colors.dim() == 2:
        check_tensor(colors, "colors", ("N", 3), dims, dtypes, device)
    elif isinstance(colors, tuple | list) or (isinstance(colors, Tensor) and colors.dim() == 3):
        check_sh_coefficients(colors, dims, dtypes, device)
    else:
        shape = tuple(colors.shape) if isinstance(colors, Tensor) else type(colors).__name__
        raise ValueError(
            f"colors must have shape (N, 3), SH coefficients (N, K, 3) or the pair (N, 1, 3), (N, K - 1, 3); "
            f"got {shape}"
        )
    if features is not None:
        check_tensor(features, "features", ("N", "F"), dims, dtypes, device)
    check_tensor(K, "K", ("B", 3, 3), dims, dtypes, device)
    check_tensor(world_to_camera, "world_to_camera", ("B", 4, 4), dims, dtypes, device)
    if background is not None:
        check_tensor(background, "background", (3,), dims, dtypes, device)
    check_image_and_planes(width, height, near_plane, far_plane)


def render(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor | tuple[Tensor, Tensor],  # [N, 3], [N, K, 3] or ([N, 1, 3], [N, K - 1, 3])
    features: Tensor | None,  # [N, F]
    K: Tensor,  # [B, 3, 3]
    world_to_camera: Tensor,  # [B, 4, 4]
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    background: Tensor | None = None,  # [3]
    feature_grad_to_geometry: bool = False,
    alpha_clamp_grad: bool = True,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    render_depth: bool = True,
    feature_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> RenderOutput:
    """Renders RGB, features, depth and alpha of 3D Gaussians for a batch of cameras.

    Conventions are those of 3DGS/gsplat: OpenCV cameras, pixel (col, row) centred at (col + 0.5,
    row + 0.5); EWA projection with the Jacobian's x/z, y/z clamped to the image edge + 0.3 tan(fov/2)
    and a 0.3 px^2 low-pass; alpha = min(0.99, o exp(-d^T Sigma^-1 d / 2)), skipped below 1/255;
    front-to-back compositing by camera depth, stopping before a Gaussian would drop the transmittance
    below 1e-4.

    The compositing is specified pixel by pixel, literally, by `fit3d_hf.render.spec.rasterize_per_pixel`;
    every backend is tested against it (the projection is `_reference._project`, the geometry maths
    `fit3d_hf.geometry`).

    Args:
        means: `[N, 3]` centres (world).
        quats: `[N, 4]` rotations (w, x, y, z), need not be normalised.
        scales: `[N, 3]` activated scales (standard deviations).
        opacities: `[N]` activated opacities in [0, 1].
        colors: `[N, 3]` RGB, or `[N, K, 3]` SH coefficients (colour = SH along the view direction from the
            camera centre, + 0.5, clamped at 0), or those coefficients as 3DGS's two parameters, the pair
            (DC terms `[N, 1, 3]`, the rest `[N, K - 1, 3]`), which the compiled backends read without
            concatenating them.
        features: `[N, F]` features (F chosen at run time; may be 0) or None.
        K: `[B, 3, 3]` intrinsics.
        world_to_camera: `[B, 4, 4]` poses; all B cameras share `width` x `height`.
        width: image width (px).
        height: image height (px).
        sh_degree: SH degree (0-3) when `colors` holds SH coefficients; default: from K = (degree + 1)^2.
        background: optional `[3]` colour added to `rgb` as T_final * background.
        feature_grad_to_geometry: False (FiT3D semantics): a loss on `features` reaches only `features`;
            True: it also reaches the geometry (means, quats, scales, opacities), as RGB and depth always do.
        alpha_clamp_grad: True (3DGS's rasterizer, which FiT3D forks): alpha = min(0.99, o G) is
            differentiated as o G even where the clamp holds it at 0.99; False (gsplat): no gradient there.
        near_plane: Gaussians closer than this (camera z) are culled.
        far_plane: Gaussians farther than this are culled.
        render_depth: return the depth image (it is composited in the same pass either way).
        feature_dtype: None (the Gaussians' dtype) or torch.bfloat16: the feature images rounded to bfloat16
            and channels-last, as a bf16 convolution reads them (Stage I's decoder); the CUDA kernels write them
            so and read their gradient so, without converting copies of the whole map.
        backend: "cuda", "cpu", "reference" or None: the compiled extension of the tensors' device for
            float32 tensors when it is available (else the reference, with a one-time warning naming the
            cause), the reference for float64 tensors.

    Returns:
        A `RenderOutput`. Gradients reach means, quats, scales, opacities, colors, features, background
        and `means2d`; cameras receive gradients only from the reference backend.

    Raises:
        TypeError: an argument is not a tensor or has the wrong dtype (float32; the reference also takes
            float64).
        ValueError: wrong shapes, mismatched N or B, tensors on different devices, bad sizes or planes.
        RuntimeError: `backend="cuda"` or `"cpu"` while that extension is unavailable (the message says how
            to fix).
    """
    arguments = (means, quats, scales, opacities, colors, features, K, world_to_camera, width, height, background,
                 near_plane, far_plane)  # fmt: skip
    if not _well_formed(*arguments):
        _validate(*arguments)  # raises, naming the argument and the problem, or accepts
    if features is None:
        features = means.new_zeros(means.shape[0], 0)
    if feature_dtype not in (None, means.dtype, torch.bfloat16):
        raise ValueError(f"feature_dtype must be None, {means.dtype} or torch.bfloat16, got {feature_dtype}")
    sh_degree = _resolve_sh_degree(colors, sh_degree)
    chosen = _choose_backend(backend, means.device, means.dtype)
    if chosen != "reference" and means.dtype != torch.float32:
        raise TypeError(
            f"the {chosen.upper()} backend renders float32 Gaussians, got {means.dtype}; use backend='reference'"
        )
    # the compiled and the reference ops are twins with identical signatures (the compiled ones without
    # re-checking)
    compiled = chosen != "reference"
    project = _wrapper._apply_project if compiled else _reference._project
    spherical_harmonics = _wrapper._apply_spherical_harmonics if compiled else _reference._spherical_harmonics
    rasterize = _wrapper._apply_rasterize if compiled else _reference._rasterize

    means2d, conics, depths, radii = project(
        means, quats, scales, opacities, world_to_camera, K, width, height, near_plane, far_plane
    )
    if not compiled and isinstance(colors, tuple | list):
        colors = torch.cat(tuple(colors), dim=1)  # the reference takes one [N, K, 3] tensor
    rgb = colors if sh_degree is None else spherical_harmonics(colors, means, world_to_camera, sh_degree)
    images = rasterize(
        means2d,
        conics,
        depths,
        rgb,
        opacities,
        features,
        radii,
        width,
        height,
        background,
        feature_grad_to_geometry,
        alpha_clamp_grad,
        feature_dtype == torch.bfloat16,
    )
    if means2d.requires_grad:
        means2d.retain_grad()
    image_rgb, depth, feats, alpha = images
    return RenderOutput(
        rgb=image_rgb,
        features=feats,
        depth=depth if render_depth else None,
        alpha=alpha,
        radii=radii,
        means2d=means2d,
        depths=depths,
        backend=chosen,
    )
