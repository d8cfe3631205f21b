"""Ground-truth correspondences between views from depth and poses, and the multi-view consistency of
dense features measured at them (how "3D-aware" a backbone's features are): cosine similarity at the
correspondences (`feature_consistency`) and the recall of mutual-nearest-neighbour matches
(`correspondence_recall`), which the correspondence probe (`fit3d_hf.evaluation.correspondence_probe`) bins by
viewpoint change (`viewpoint_angle`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "Correspondences",
    "correspondence_recall",
    "feature_consistency",
    "mutual_nearest_neighbours",
    "patch_centres",
    "patch_correspondences",
    "sample_features",
    "viewpoint_angle",
]


@dataclass
class Correspondences:
    """Patch centres of view A that are visible in view B.

    Attributes:
        source_index: `[M]` flat indices (row * w + col) into A's `h x w` patch grid.
        target_pixels: `[M, 2]` (x, y) pixel coordinates in B where those points land.
        source_pixels: `[M, 2]` (x, y) pixel coordinates of the patch centres in A.
    """

    source_index: torch.Tensor
    target_pixels: torch.Tensor
    source_pixels: torch.Tensor

    def __len__(self) -> int:
        return int(self.source_index.numel())


def patch_correspondences(
    depth_a: torch.Tensor,
    K_a: torch.Tensor,
    world_to_camera_a: torch.Tensor,
    K_b: torch.Tensor,
    world_to_camera_b: torch.Tensor,
    grid_size: tuple[int, int],
    depth_b: torch.Tensor | None = None,
    depth_tolerance: float = 0.05,
) -> Correspondences:
    """Projects the centres of A's patch grid into B using A's depth.

    Args:
        depth_a: `[H, W]` depth (camera z, metres) of view A; 0 where unknown.
        K_a, K_b: `[3, 3]` intrinsics; world_to_camera_a, world_to_camera_b: `[4, 4]` poses.
        grid_size: (h, w) of the patch grid; patch (i, j) is centred at ((j + 0.5) W / w, (i + 0.5) H / h).
        depth_b: `[H, W]` depth of view B; when given, points hidden in B (B's depth there differs by more
            than `depth_tolerance` relative) are dropped.

    Returns:
        The correspondences (points behind B or outside its image are dropped).
    """
    height, width = depth_a.shape
    h, w = grid_size
    dtype = torch.float64
    rows = (torch.arange(h, dtype=dtype) + 0.5) * height / h
    cols = (torch.arange(w, dtype=dtype) + 0.5) * width / w
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    x, y = x.reshape(-1), y.reshape(-1)
    depth = depth_a.to(dtype).cpu()[y.long().clamp_max(height - 1), x.long().clamp_max(width - 1)]
    pixels = torch.stack([x, y, torch.ones_like(x)], dim=-1)
    camera_a = (torch.linalg.inv(K_a.to(dtype).cpu()) @ pixels.T).T * depth[:, None]
    camera_to_world_a = torch.linalg.inv(world_to_camera_a.to(dtype).cpu())
    world = camera_a @ camera_to_world_a[:3, :3].T + camera_to_world_a[:3, 3]
    w2c_b = world_to_camera_b.to(dtype).cpu()
    camera_b = world @ w2c_b[:3, :3].T + w2c_b[:3, 3]
    z_b = camera_b[:, 2]
    projected = (camera_b @ K_b.to(dtype).cpu().T)[:, :2] / z_b.clamp_min(1e-9)[:, None]
    valid = (depth > 0) & (z_b > 1e-6)
    valid &= (
        (projected[:, 0] >= 0)
        & (projected[:, 0] < width)
        & (projected[:, 1] >= 0)
        & (projected[:, 1] < height)
    )
    if depth_b is not None:
        depth_b = depth_b.to(dtype).cpu()
        px = projected[:, 0].long().clamp(0, width - 1)
        py = projected[:, 1].long().clamp(0, height - 1)
        seen = depth_b[py, px]
        valid &= (seen > 0) & ((seen - z_b).abs() <= depth_tolerance * z_b.abs())
    index = torch.nonzero(valid).squeeze(1)
    return Correspondences(index, projected[index].float(), torch.stack([x, y], -1)[index].float())


def sample_features(
    features: torch.Tensor, pixels: torch.Tensor, image_size: tuple[int, int]
) -> torch.Tensor:
    """Bilinearly samples a `[D, h, w]` patch-feature map at `[M, 2]` pixel positions of an image of
    `image_size` = (H, W); returns `[M, D]`."""
    height, width = image_size
    grid = torch.stack([pixels[:, 0] / width * 2 - 1, pixels[:, 1] / height * 2 - 1], dim=-1)
    grid = grid.to(features.device, features.dtype)[None, None]
    return F.grid_sample(features[None], grid, mode="bilinear", align_corners=False)[0, :, 0].T


def feature_consistency(
    features_a: torch.Tensor, features_b: torch.Tensor, matches: Correspondences, image_size: tuple[int, int]
) -> torch.Tensor:
    """Cosine similarity `[M]` between A's patch features and B's features at the corresponding points.

    Args:
        features_a, features_b: `[D, h, w]` dense features of the two views.
        matches: from `patch_correspondences`.
        image_size: (H, W) of the images the pixel coordinates refer to.
    """
    source = features_a.flatten(1).T[matches.source_index.to(features_a.device)]
    target = sample_features(features_b, matches.target_pixels, image_size)
    return F.cosine_similarity(source.float(), target.float(), dim=-1)


def patch_centres(grid_size: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """`[h * w, 2]` (x, y) pixel centres of a patch grid, row-major, in the convention of
    `patch_correspondences`: patch (i, j) is centred at ((j + 0.5) W / w, (i + 0.5) H / h)."""
    (h, w), (height, width) = grid_size, image_size
    rows = (torch.arange(h, dtype=torch.float32) + 0.5) * height / h
    cols = (torch.arange(w, dtype=torch.float32) + 0.5) * width / w
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


def mutual_nearest_neighbours(
    features_a: torch.Tensor, features_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbours under cosine similarity between two sets of dense features.

    Args:
        features_a: `[D, h_a, w_a]` (or `[D, N_a]`) features of view A.
        features_b: `[D, h_b, w_b]` (or `[D, N_b]`) features of view B.

    Returns:
        `(index_a [M], index_b [M])`: flat indices of the pairs that are each other's nearest neighbour.
    """
    a = F.normalize(features_a.flatten(1).T.float(), dim=-1)
    b = F.normalize(features_b.flatten(1).T.float(), dim=-1)
    similarity = a @ b.T
    nearest_in_b = similarity.argmax(dim=1)
    nearest_in_a = similarity.argmax(dim=0)
    index_a = torch.nonzero(nearest_in_a[nearest_in_b] == torch.arange(len(a), device=a.device)).squeeze(1)
    return index_a, nearest_in_b[index_a]


def correspondence_recall(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    matches: Correspondences,
    image_size: tuple[int, int],
    thresholds: tuple[float, ...] = (5.0, 10.0, 20.0),
) -> dict:
    """How many of A's patches with a ground-truth correspondence find it by mutual-nearest-neighbour matching.

    A patch of A counts as a hit at threshold t when its mutual nearest neighbour in B (cosine similarity of
    the dense features) is a patch whose centre lies within t pixels of the ground-truth point; patches
    without a mutual neighbour are misses. Recall@t = hits / correspondences.

    Args:
        features_a: `[D, h, w]` features of view A.
        features_b: `[D, h_b, w_b]` features of view B.
        matches: ground truth from `patch_correspondences` on A's grid (visibility-checked).
        image_size: (H, W) of the images the pixel coordinates refer to (both views).
        thresholds: distances in pixels.

    Returns:
        `{"correspondences": int, "mutual": int (of those, patches with a mutual neighbour),
        "hits": [int per threshold], "errors": [M] float tensor (pixel error per correspondence, inf without
        a mutual neighbour)}`.
    """
    index_a, index_b = mutual_nearest_neighbours(features_a, features_b)
    partner = torch.full((features_a.shape[-2] * features_a.shape[-1],), -1, dtype=torch.long)
    partner[index_a.cpu()] = index_b.cpu()
    centres_b = patch_centres(tuple(features_b.shape[-2:]), image_size)
    matched = partner[matches.source_index.cpu()]
    errors = torch.full((len(matches),), math.inf)
    has_partner = matched >= 0
    errors[has_partner] = (centres_b[matched[has_partner]] - matches.target_pixels.cpu()[has_partner]).norm(
        dim=-1
    )
    return {
        "correspondences": len(matches),
        "mutual": int(has_partner.sum()),
        "hits": [int((errors <= t).sum()) for t in thresholds],
        "errors": errors,
    }


def viewpoint_angle(world_to_camera_a: torch.Tensor, world_to_camera_b: torch.Tensor) -> float:
    """Angle in degrees between the optical axes (camera z) of two views given their `[4, 4]` poses."""
    axis_a = torch.as_tensor(world_to_camera_a, dtype=torch.float64)[2, :3]  # camera z in world coordinates
    axis_b = torch.as_tensor(world_to_camera_b, dtype=torch.float64)[2, :3]
    cosine = torch.dot(axis_a, axis_b) / (axis_a.norm() * axis_b.norm())
    return math.degrees(math.acos(float(cosine.clamp(-1.0, 1.0))))
