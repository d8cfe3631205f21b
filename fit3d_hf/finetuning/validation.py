"""What Stage II measures on the validation frames: the masked L1 to the rendered targets (every frame once,
whatever the number of processes) and the multi-view consistency of the backbone's features."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .frames import FrameDataset, collate_frames
from .rendered_targets import GaussianCache, training_step_inputs

__all__ = ["multiview_consistency", "per_frame_masked_l1", "validation_loss"]


@torch.no_grad()
def multiview_consistency(
    extractor, frames, cache: GaussianCache, pairs_per_scene: int, device, near_plane: float = 0.2
) -> float:
    """Mean cosine similarity of the backbone's features at ground-truth correspondences between nearby
    views of each validation scene. Depth comes from the frames' `depth` column when they have one
    (synthetic scenes), otherwise from the scene's Gaussians (expected depth / alpha)."""
    from ..evaluation import feature_consistency, patch_correspondences
    from ..evaluation.rendered_depth import render_depth
    from ..row_decoding import depth_to_tensor, image_to_tensor

    by_scene: dict[str, list[int]] = {}
    for index, scene_id in enumerate(frames["scene_id"]):
        by_scene.setdefault(scene_id, []).append(index)
    scores = []
    for scene_id, indices in tqdm(
        sorted(by_scene.items()), desc="multi-view consistency", unit="scene", leave=False
    ):
        for a, b in list(zip(indices, indices[1:], strict=False))[:pairs_per_scene]:
            rows = [frames[a], frames[b]]
            images = torch.stack([image_to_tensor(r["image"]) for r in rows]).to(device)
            Ks = [torch.tensor(r["K"], dtype=torch.float64) for r in rows]
            poses = [torch.tensor(r["world_to_camera"], dtype=torch.float64) for r in rows]
            depths = []
            for r, K, pose in zip(rows, Ks, poses, strict=False):
                if r.get("depth") is not None:
                    depths.append(
                        depth_to_tensor(r["depth"], "depth", depth_scale=1000.0)
                    )  # uint16 millimetres
                else:
                    depths.append(
                        render_depth(
                            cache.get(scene_id), K, pose, images.shape[-1], images.shape[-2], near_plane
                        )
                    )
            features = extractor(images)
            matches = patch_correspondences(
                depths[0], Ks[0], poses[0], Ks[1], poses[1], tuple(features.shape[-2:]), depth_b=depths[1]
            )
            if len(matches):
                scores.append(
                    feature_consistency(features[0], features[1], matches, tuple(images.shape[-2:]))
                )
    if not scores:
        return float("nan")
    return float(torch.cat(scores).mean())


def per_frame_masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[B]`: `masked_l1` of each frame on its own (the validation loss averages frames, not batches)."""
    error = (prediction - target).abs() * mask.to(prediction.dtype)
    return error.sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * prediction.shape[1]).clamp_min(1e-8)


@torch.no_grad()
def validation_loss(extractor, frames, cache, accelerator, args) -> float:
    """Mean over the validation frames of each frame's masked L1: every frame counted once, whatever the
    number of processes (`gather_for_metrics` drops the duplicates that pad the last batches), summed in
    frame order in float64 so that any process count gives the same value."""
    loader = torch.utils.data.DataLoader(
        FrameDataset(frames), batch_size=args.train_batch_size, collate_fn=collate_frames
    )
    loader = accelerator.prepare_data_loader(loader)
    no_flips = torch.zeros(len(frames), dtype=torch.bool)
    losses, indices = [], []
    for batch in tqdm(
        loader, desc="validation loss", leave=False, disable=not accelerator.is_local_main_process
    ):
        images, targets, masks = training_step_inputs(
            batch, cache, extractor, no_flips, accelerator.device, args.near_plane
        )
        with accelerator.autocast():
            predictions = extractor(images)
        frame_losses = per_frame_masked_l1(predictions.float(), targets, masks)
        frame_losses, frame_indices = accelerator.gather_for_metrics(
            (frame_losses, batch["index"].to(accelerator.device))
        )
        losses.append(frame_losses.cpu())
        indices.append(frame_indices.cpu())
    if not losses:
        return float("nan")
    losses, indices = torch.cat(losses).double(), torch.cat(indices)
    if len(indices) != len(frames) or len(set(indices.tolist())) != len(frames):  # an internal invariant
        raise RuntimeError(f"validation saw frames {sorted(indices.tolist())} of {len(frames)}")
    return float(losses[torch.argsort(indices)].sum() / len(frames))
