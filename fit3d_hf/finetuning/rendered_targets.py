"""Stage II's regression targets: scenes' Gaussians kept on the device (`GaussianCache`), their feature
renders decoded on the backbone's patch grid, and the flipped images, targets and masks of a training step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..gaussians.cache import GaussianCache
from ..targets import decode_at_patch_grid

__all__ = ["GaussianCache", "flip_table", "render_targets", "training_step_inputs"]


@torch.no_grad()
def render_targets(
    batch: dict, cache: GaussianCache, grid_size: tuple[int, int], device, near_plane: float = 0.2
) -> torch.Tensor:
    """`[B, D, h, w]` targets: each frame's decoded feature render sampled on the patch grid. Frames of
    the same scene are rendered together, all their cameras in one rasterizer launch."""
    from ..render import render

    height, width = batch["image"].shape[-2:]
    targets = [None] * len(batch["scene_id"])
    by_scene: dict[str, list[int]] = {}
    for i, scene_id in enumerate(batch["scene_id"]):
        by_scene.setdefault(scene_id, []).append(i)
    for scene_id, indices in by_scene.items():
        bundle = cache.get(scene_id)
        index = torch.tensor(indices)
        out = render(
            bundle.means, bundle.quats, bundle.scales, bundle.opacities, bundle.metadata["colors"], bundle.features,
            batch["K"][index].to(device), batch["world_to_camera"][index].to(device), width, height, render_depth=False,
            near_plane=near_plane,
        )  # fmt: skip
        decoded = decode_at_patch_grid(out.features, bundle.decoder_weight, grid_size)
        for row, i in enumerate(indices):
            targets[i] = decoded[row]
    return torch.stack(targets)


def flip_table(num_frames: int, probability: float, seed: int, epoch: int) -> torch.Tensor:
    """Which frames are flipped in an epoch: a fixed function of (seed, epoch, frame index), so that a
    resumed run flips exactly as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.rand(num_frames, generator=generator) < probability


def training_step_inputs(batch, cache, extractor, flips: torch.Tensor, device, near_plane: float = 0.2):
    """Images `[B, 3, H, W]` in [0, 1], targets `[B, D, h, w]` and soft masks `[B, 1, h, w]`, flipped."""
    images = batch["image"].to(device).float() / 255.0
    height, width = images.shape[-2:]
    grid = (height // extractor.patch_size, width // extractor.patch_size)
    targets = render_targets(batch, cache, grid, device, near_plane)
    masks = F.interpolate(batch["mask"].to(device), size=grid, mode="bilinear", align_corners=False)
    flip = flips[batch["index"].cpu()].to(device)[:, None, None, None]
    images = torch.where(flip, images.flip(-1), images)
    targets = torch.where(flip, targets.flip(-1), targets)
    masks = torch.where(flip, masks.flip(-1), masks)
    return images, targets, masks
