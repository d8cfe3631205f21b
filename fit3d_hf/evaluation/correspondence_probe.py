"""The correspondence probe (`fit3d evaluate --probe correspondence`, no training): view pairs of each scene drawn
over viewpoint-change bins (`select_view_pairs`), their dense features matched by mutual nearest neighbours, and
the recall within 5/10/20 px of the ground truth from depth and poses, per feature variant, overall and per bin
(`correspondence_probe`, `summarize_correspondence`); `evaluate_correspondence` runs it on the frozen models of a
comparison."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .arguments import ProbeArguments, parse_floats
from .correspondence import correspondence_recall, patch_correspondences, viewpoint_angle
from .features import FrozenFeatures
from .heads import variant_inputs
from .samples import ProbeDataset

__all__ = [
    "CorrespondenceProbeOptions",
    "angle_bin",
    "angle_bin_labels",
    "correspondence_probe",
    "evaluate_correspondence",
    "select_view_pairs",
    "summarize_correspondence",
]


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

    def run(own_scenes: list[str], show_progress: bool) -> list[dict]:
        rows: list[dict] = []
        for scene_id in tqdm(
            own_scenes, desc="correspondence probe", unit="scene", disable=not show_progress
        ):
            scene_seed = options.seed * 1_000_003 + scenes.index(scene_id)
            pairs = select_view_pairs(dataset, by_scene[scene_id], poses, patch_size, options, scene_seed)
            views = _extract_views(extract, variants, dataset, pairs)
            rows += _pair_rows(views, variants, scene_id, pairs, options.thresholds)
        return rows

    if accelerator is None:
        return summarize_correspondence(run(scenes, True), variants, options.thresholds, options.angle_bins)
    from accelerate.utils import gather_object

    with accelerator.split_between_processes(scenes) as own_scenes:
        rows = run(list(own_scenes), accelerator.is_local_main_process)
    return summarize_correspondence(gather_object(rows), variants, options.thresholds, options.angle_bins)


def _extract_views(
    extract, variants: list[str], dataset, pairs: list[tuple[int, int, float]]
) -> dict[int, dict]:
    """Every view of the pairs, its features extracted once (kept on the CPU in float16) beside its geometry."""
    views: dict[int, dict] = {}
    for index in sorted({i for a, b, _ in pairs for i in (a, b)}):
        sample = dataset[index]
        features = extract(sample["image"][None])
        views[index] = {
            "features": {v: features[v][0].to("cpu", torch.float16) for v in variants},
            "depth": sample["depth"], "K": sample["K"], "world_to_camera": sample["world_to_camera"],
            "size": tuple(sample["image"].shape[-2:]),
        }  # fmt: skip
    return views


def _pair_rows(
    views: dict[int, dict],
    variants: list[str],
    scene_id: str,
    pairs: list[tuple[int, int, float]],
    thresholds,
) -> list[dict]:
    """Per pair and variant, the counts of `correspondence_recall` against the ground truth from A's depth and both
    poses, visibility-checked with B's depth (the rows `summarize_correspondence` reads)."""
    rows = []
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
                tuple(thresholds),
            )
            rows.append(
                {"scene_id": scene_id, "view_a": a, "view_b": b, "angle": angle, "variant": variant,
                 "correspondences": counts["correspondences"], "mutual": counts["mutual"], "hits": counts["hits"]}
            )  # fmt: skip
    return rows


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


@torch.no_grad()
def evaluate_correspondence(
    features: FrozenFeatures, dataset: ProbeDataset, args: ProbeArguments, accelerator
) -> dict:
    """The correspondence probe for every variant of `features` (see `correspondence_probe`)."""
    features.to(accelerator.device)
    variants = features.variants

    def extract(images: torch.Tensor) -> dict[str, torch.Tensor]:
        # resized, not padded: the correspondence geometry maps patch cells onto the whole image
        raw = features(images.to(accelerator.device), patch_fit="resize")
        return {variant: variant_inputs(raw, variant)[0] for variant in variants}

    options = CorrespondenceProbeOptions(
        thresholds=tuple(parse_floats(args.thresholds, "thresholds")), angle_bins=tuple(parse_floats(args.angle_bins, "angle_bins")),
        pairs_per_scene=args.pairs_per_scene, min_overlap=args.min_overlap, max_scenes=args.max_scenes, seed=args.seed,
    )  # fmt: skip
    return correspondence_probe(extract, variants, features.patch_size, dataset, options, accelerator)
