"""Ground-truth correspondences between views from depth and poses, and the multi-view consistency of
dense features measured at them (how "3D-aware" a backbone's features are): cosine similarity at the
correspondences (`feature_consistency`) and the correspondence probe, the recall of mutual-nearest-neighbour
matches binned by viewpoint change (`correspondence_probe`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "CorrespondenceProbeOptions",
    "Correspondences",
    "angle_bin",
    "angle_bin_labels",
    "correspondence_probe",
    "correspondence_recall",
    "feature_consistency",
    "mutual_nearest_neighbours",
    "parse_floats",
    "patch_centres",
    "patch_correspondences",
    "select_view_pairs",
    "summarize_correspondence",
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
    valid &= (projected[:, 0] >= 0) & (projected[:, 0] < width) & (projected[:, 1] >= 0) & (projected[:, 1] < height)
    if depth_b is not None:
        depth_b = depth_b.to(dtype).cpu()
        px = projected[:, 0].long().clamp(0, width - 1)
        py = projected[:, 1].long().clamp(0, height - 1)
        seen = depth_b[py, px]
        valid &= (seen > 0) & ((seen - z_b).abs() <= depth_tolerance * z_b.abs())
    index = torch.nonzero(valid).squeeze(1)
    return Correspondences(index, projected[index].float(), torch.stack([x, y], -1)[index].float())


def sample_features(features: torch.Tensor, pixels: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------------------
# The correspondence probe: view pairs of a scene, matched by mutual nearest neighbours, binned by angle


@dataclass
class CorrespondenceProbeOptions:
    """Options of `correspondence_probe`.

    Args:
        thresholds: pixel distances of the recall.
        angle_bins: increasing edges (degrees) of the viewpoint-change bins; the last bin includes its end.
        pairs_per_scene: view pairs drawn per scene, spread evenly over the bins.
        min_overlap: least share of A's patches that must be visible in B for a pair to be used.
        max_scenes: use the first N scenes (sorted by id) only; None = all.
        seed: seeds the choice of pairs.
    """

    thresholds: tuple[float, ...] = (5.0, 10.0, 20.0)
    angle_bins: tuple[float, ...] = (0.0, 15.0, 30.0, 60.0, 180.0)
    pairs_per_scene: int = 60
    min_overlap: float = 0.1
    max_scenes: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        edges = list(self.angle_bins)
        if len(edges) < 2 or sorted(edges) != edges or len(set(edges)) != len(edges):
            raise ValueError(f"angle_bins must be at least two increasing edges, got {self.angle_bins}")
        if not self.thresholds or min(self.thresholds) <= 0:
            raise ValueError(f"thresholds must be positive pixel distances, got {self.thresholds}")
        if self.pairs_per_scene < 1 or not 0 <= self.min_overlap <= 1:
            raise ValueError(
                f"need pairs_per_scene >= 1 and min_overlap in [0, 1], got {self.pairs_per_scene}, {self.min_overlap}"
            )


def parse_floats(value: str, name: str) -> list[float]:
    """Comma-separated numbers of an option, e.g. "5,10,20" -> [5.0, 10.0, 20.0]."""
    try:
        numbers = [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError as error:
        raise ValueError(f"--{name} must be comma-separated numbers, got {value!r}") from error
    if not numbers:
        raise ValueError(f"--{name} is empty")
    return numbers


def angle_bin_labels(edges: tuple[float, ...] | list[float]) -> list[str]:
    """Labels "0-15°", ..., ">60°" of viewpoint-change bins with the given edges."""
    labels = [f"{lo:g}-{hi:g}°" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    if edges[-1] >= 180:
        labels[-1] = f">{edges[-2]:g}°"
    return labels


def angle_bin(angle: float, edges: tuple[float, ...] | list[float]) -> int | None:
    """Index of the bin holding `angle` (the last bin includes its upper edge), None outside all bins."""
    for index, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        if lo <= angle < hi or (index == len(edges) - 2 and angle == hi):
            return index
    return None


def select_view_pairs(
    dataset,
    indices: list[int],
    poses: list[torch.Tensor],
    patch_size: int,
    options: CorrespondenceProbeOptions,
    seed: int,
) -> list[tuple[int, int, float]]:
    """Draws view pairs of one scene spread over the viewpoint-change bins.

    Candidate pairs (a < b) are shuffled (seeded) and taken bin by bin until each bin holds its share of
    `options.pairs_per_scene` pairs in which at least `options.min_overlap` of A's patches are visible in B
    (at most 20 x its share of candidates are tried per bin).

    Args:
        dataset: a correspondence `ProbeDataset` (its `view_geometry` reads depth and cameras only).
        indices: rows of one scene.
        poses: `[4, 4]` world-to-camera of every row of `dataset`.
        patch_size: patch side of the features (the overlap is counted on their grid).
        options: the probe options.
        seed: seeds the shuffling.

    Returns:
        `[(index_a, index_b, angle in degrees)]`.
    """
    edges = options.angle_bins
    candidates: list[list[tuple[int, int, float]]] = [[] for _ in edges[:-1]]
    for position, a in enumerate(indices):
        for b in indices[position + 1 :]:
            angle = viewpoint_angle(poses[a], poses[b])
            slot = angle_bin(angle, edges)
            if slot is not None:
                candidates[slot].append((a, b, angle))
    rng = random.Random(seed)
    bins = len(candidates)
    quota = [options.pairs_per_scene // bins + (i < options.pairs_per_scene % bins) for i in range(bins)]
    geometry: dict[int, dict] = {}
    selected = []
    for slot, pairs in enumerate(candidates):
        rng.shuffle(pairs)
        kept = 0
        for a, b, angle in pairs[: 20 * max(quota[slot], 1)]:
            if kept >= quota[slot]:
                break
            for i in (a, b):
                if i not in geometry:
                    geometry[i] = dataset.view_geometry(i)
            ga, gb = geometry[a], geometry[b]
            grid = (ga["depth"].shape[0] // patch_size, ga["depth"].shape[1] // patch_size)
            matches = patch_correspondences(
                ga["depth"],
                ga["K"],
                ga["world_to_camera"],
                gb["K"],
                gb["world_to_camera"],
                grid,
                depth_b=gb["depth"],
            )
            if len(matches) > 0 and len(matches) >= options.min_overlap * grid[0] * grid[1]:
                selected.append((a, b, angle))
                kept += 1
    return selected


@torch.no_grad()
def correspondence_probe(
    extract,
    variants: list[str],
    patch_size: int,
    dataset,
    options: CorrespondenceProbeOptions,
    accelerator=None,
) -> dict:
    """Mutual-nearest-neighbour recall of dense features between views of each scene, by viewpoint change.

    For every scene, view pairs are drawn (`select_view_pairs`); each chosen view's features are extracted
    once (kept on the CPU in float16); every variant's features of A and B are matched (`correspondence_recall`)
    against the ground truth from A's depth and both poses, visibility-checked with B's depth. Scenes are
    split over the accelerator's processes and the per-pair counts gathered.

    Args:
        extract: `images [1, 3, H, W] in [0, 1] -> {variant: features [1, C, h, w]}`.
        variants: the variants `extract` returns, in table order.
        patch_size: patch side p of the features (h = H // p).
        dataset: a correspondence `ProbeDataset` (items with image, depth, K, world_to_camera, scene_id).
        options: thresholds, angle bins, pairs per scene, ...
        accelerator: an `accelerate.Accelerator` to split the scenes over processes; None = this process only.

    Returns:
        `summarize_correspondence` of the gathered per-pair counts.
    """
    by_scene: dict[str, list[int]] = {}
    for index, scene_id in enumerate(dataset.scene_ids()):
        by_scene.setdefault(scene_id, []).append(index)
    scenes = sorted(by_scene)[: options.max_scenes] if options.max_scenes else sorted(by_scene)
    poses = dataset.view_poses()
    rows: list[dict] = []

    def run(own_scenes: list[str], show_progress: bool) -> None:
        for scene_id in tqdm(
            own_scenes, desc="correspondence probe", unit="scene", disable=not show_progress
        ):
            scene_seed = options.seed * 1_000_003 + scenes.index(scene_id)
            pairs = select_view_pairs(dataset, by_scene[scene_id], poses, patch_size, options, scene_seed)
            views: dict[int, dict] = {}
            for index in sorted({i for a, b, _ in pairs for i in (a, b)}):
                sample = dataset[index]
                features = extract(sample["image"][None])
                views[index] = {
                    "features": {v: features[v][0].to("cpu", torch.float16) for v in variants},
                    "depth": sample["depth"], "K": sample["K"], "world_to_camera": sample["world_to_camera"],
                    "size": tuple(sample["image"].shape[-2:]),
                }  # fmt: skip
            for a, b, angle in pairs:
                va, vb = views[a], views[b]
                grid = tuple(va["features"][variants[0]].shape[-2:])  # every variant shares the patch grid
                matches = patch_correspondences(
                    va["depth"],
                    va["K"],
                    va["world_to_camera"],
                    vb["K"],
                    vb["world_to_camera"],
                    grid,
                    depth_b=vb["depth"],
                )
                for variant in variants:
                    counts = correspondence_recall(
                        va["features"][variant].float(),
                        vb["features"][variant].float(),
                        matches,
                        va["size"],
                        tuple(options.thresholds),
                    )
                    rows.append(
                        {"scene_id": scene_id, "view_a": a, "view_b": b, "angle": angle, "variant": variant,
                         "correspondences": counts["correspondences"], "mutual": counts["mutual"], "hits": counts["hits"]}
                    )  # fmt: skip

    if accelerator is None:
        run(scenes, True)
        return summarize_correspondence(rows, variants, options.thresholds, options.angle_bins)
    from accelerate.utils import gather_object

    with accelerator.split_between_processes(scenes) as own_scenes:
        run(list(own_scenes), accelerator.is_local_main_process)
    return summarize_correspondence(gather_object(rows), variants, options.thresholds, options.angle_bins)


def summarize_correspondence(
    rows: list[dict], variants: list[str], thresholds: tuple[float, ...], edges: tuple[float, ...]
) -> dict:
    """Recall per variant, overall and per viewpoint bin, from per-pair counts (micro-averaged: the hits of all
    pairs over all their correspondences).

    Args:
        rows: per pair and variant: `{"scene_id", "view_a", "view_b", "angle", "variant", "correspondences",
            "mutual", "hits": [per threshold]}`.
        variants: variants to summarise, in table order.
        thresholds: the pixel thresholds of `hits`.
        edges: the viewpoint bin edges (degrees).

    Returns:
        `{"rows": {variant: {"recall@Tpx": ..., "pairs", "correspondences", "mutual" (share with a mutual
        neighbour)}}, "curves": {variant: {"bins": labels, "recall@Tpx": [per bin], "pairs": [per bin]}},
        "thresholds", "angle_bins", "bin_labels", "pairs": [(scene_id, view_a, view_b, angle)]}`; recall is NaN
        where there is no correspondence.
    """
    labels = angle_bin_labels(edges)
    names = [f"recall@{t:g}px" for t in thresholds]

    def recall(selected: list[dict]) -> dict:
        total = sum(r["correspondences"] for r in selected)
        out = {
            name: (sum(r["hits"][i] for r in selected) / total if total else math.nan)
            for i, name in enumerate(names)
        }
        out["pairs"] = len(selected)
        out["correspondences"] = total
        out["mutual"] = sum(r["mutual"] for r in selected) / total if total else math.nan
        return out

    summary: dict = {
        "rows": {},
        "curves": {},
        "thresholds": list(thresholds),
        "angle_bins": list(edges),
        "bin_labels": labels,
    }
    for variant in variants:
        own = [r for r in rows if r["variant"] == variant]
        summary["rows"][variant] = recall(own)
        per_bin = [
            recall([r for r in own if angle_bin(r["angle"], edges) == slot]) for slot in range(len(labels))
        ]
        summary["curves"][variant] = {
            "bins": labels,
            **{name: [b[name] for b in per_bin] for name in names},
            "pairs": [b["pairs"] for b in per_bin],
        }
    summary["pairs"] = sorted({(r["scene_id"], r["view_a"], r["view_b"], round(r["angle"], 3)) for r in rows})
    return summary
