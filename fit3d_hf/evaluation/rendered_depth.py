"""Depth rendered from Stage I's Gaussians, for frames that have none.

Own captures (COLMAP, `ns-process-data` from photos or a video) carry poses but no depth, while ground-truth
correspondences need depth. The Gaussians Stage I fitted to a scene give it: the expected depth of the render
divided by its opacity, where the opacity passes 0.5 (as Stage II's consistency measure does). The result is
only as good as the reconstruction, so held-out PSNR of the scene (Stage I's `metrics.json`) is worth a look.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import MissingInputError

__all__ = ["fill_depth_from_gaussians", "render_depth"]

logger = logging.getLogger(__name__)

# Pixels whose accumulated opacity is below this have no depth: the Gaussians do not cover them.
_MIN_ALPHA = 0.5


def _png_bytes(depth: np.ndarray) -> bytes:
    """A 16-bit grey PNG of a uint16 map (encoded here: datasets would warn about the array's dtype)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(depth).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def render_depth(
    bundle, K: torch.Tensor, world_to_camera: torch.Tensor, width: int, height: int, near_plane: float = 0.2
) -> torch.Tensor:
    """`[H, W]` float32 depth (metres, camera z) of one view rendered from a scene's Gaussians; 0 where their
    accumulated opacity is at most 0.5.

    Args:
        bundle: a `GaussianBundle` on the device to render on (its `metadata["colors"]` may hold dummy colours).
        K: `[3, 3]` intrinsics.
        world_to_camera: `[4, 4]` OpenCV pose.
        width: image width.
        height: image height.
        near_plane: Gaussians nearer than this (camera z) are not rendered (FiT3D's 0.2, as Stage I and II).
    """
    from ..render import render

    device = bundle.means.device
    colors = bundle.metadata.get("colors")
    if colors is None:
        colors = torch.zeros(len(bundle), 3, device=device)
    out = render(
        bundle.means, bundle.quats, bundle.scales, bundle.opacities, colors, None,
        K[None].float().to(device), world_to_camera[None].float().to(device), width, height,
        near_plane=near_plane,
    )  # fmt: skip
    alpha = out.alpha[0, 0]
    return torch.where(alpha > _MIN_ALPHA, out.depth[0, 0] / alpha.clamp_min(1e-6), 0).float().cpu()


def fill_depth_from_gaussians(
    frames,
    gaussians_dir: str | Path,
    *,
    depth_column: str = "depth",
    depth_scale: float = 1000.0,
    device="cpu",
):
    """Fills a frames dataset's missing depth maps with depth rendered from each scene's Stage I bundle.

    Args:
        frames: a `datasets.Dataset` of frames (`scene_id`, `K`, `world_to_camera`, `width`, `height` columns).
        gaussians_dir: Stage I's output folder, holding `<scene_id>/gaussians.safetensors`.
        depth_column: the depth column (added if missing); rows that have a depth map keep it.
        depth_scale: stored value per metre of the written 16-bit maps (1000: millimetres).
        device: where to render.

    Returns:
        The dataset with every row's depth set (kept in memory).

    Raises:
        MissingInputError: a scene of the frames has no bundle in `gaussians_dir`.
    """
    import datasets

    from ..gaussians.cache import GaussianCache, bundle_path

    missing = sorted({s for s in frames["scene_id"] if not bundle_path(gaussians_dir, s).is_file()})
    if missing:
        raise MissingInputError(
            f"--gaussians {gaussians_dir} has no bundle for scene(s) {missing[:5]}; lift them first (`fit3d lift`)"
        )
    if depth_column not in frames.column_names:
        frames = frames.add_column(depth_column, [None] * len(frames)).cast_column(
            depth_column, datasets.Image()
        )
    cache = GaussianCache(gaussians_dir, torch.device(device), 2e9)
    rendered = 0

    def fill(scene_id, K, world_to_camera, width, height, depth):
        nonlocal rendered
        if depth is not None:
            return {depth_column: depth}
        metres = render_depth(
            cache.get(scene_id), torch.tensor(K), torch.tensor(world_to_camera), width, height
        )
        rendered += 1
        stored = np.clip(np.round(metres.numpy() * depth_scale), 0, np.iinfo(np.uint16).max).astype(np.uint16)
        return {depth_column: {"bytes": _png_bytes(stored), "path": None}}

    features = frames.features.copy()
    features[depth_column] = datasets.Image()
    filled = frames.map(
        fill, input_columns=["scene_id", "K", "world_to_camera", "width", "height", depth_column], features=features,
        keep_in_memory=True, load_from_cache_file=False, desc="rendering depth from the Gaussians",
    )  # fmt: skip
    logger.info("rendered the depth of %d frames from the Gaussians in %s", rendered, gaussians_dir)
    return filled
