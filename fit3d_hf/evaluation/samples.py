"""Probe samples: the rows of a `datasets.Dataset` as tensors (`ProbeDataset`, decoded by `fit3d_hf.row_decoding`),
batched (`collate_probe_samples`), and the cache of frozen features that trains heads without running the
backbones again (`CachedFeatureDataset`, `collate_cached`).

`ProbeDataset` maps the columns (`ColumnMapping`) to

- ``image``: `[3, H, W]` float in [0, 1];
- ``target``: `[H, W]` int64 class ids (segmentation, `ignore_index` where unknown), float depth in metres
  (depth, 0 where unknown) or `[3, H, W]` unit surface normals (normals, 0 where unknown; see
  `fit3d_hf.evaluation.normals` for the convention);
- for the correspondence probe: ``depth`` (metres), ``K`` `[3, 3]`, ``world_to_camera`` `[4, 4]` (OpenCV) and
  ``scene_id``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..row_decoding import (
    depth_to_tensor,
    image_to_tensor,
    label_to_tensor,
    mask_to_tensor,
    normals_to_tensor,
)
from .columns import ColumnMapping
from .transforms import resize_sample, resize_tensor

__all__ = [
    "CachedFeatureDataset",
    "ProbeDataset",
    "collate_cached",
    "collate_probe_samples",
    "infer_num_classes",
]


class ProbeDataset(torch.utils.data.Dataset):
    """Rows of a `datasets.Dataset` as probe samples (see the module docstring for the keys).

    Args:
        dataset: the split.
        task: "segmentation", "depth", "correspondence" or "normals".
        columns: the column mapping.
        depth_scale: stored depth / depth_scale = metres (1000 for millimetre PNGs, 1 for metres).
        reduce_zero_label: ADE20k-style labels (0 = ignore, ids shifted down by one).
        ignore_index: label of pixels without ground truth.
        image_size: (H, W) every sample is resized to first (None: native size).
        transform: training augmentation `(image, target) -> (image, target)`, e.g. `RandomScaleCropFlip`.
        normals_axes: how stored normals' axes map to fit3d-hf's (see `fit3d_hf.row_decoding.parse_axes`).
    """

    def __init__(
        self,
        dataset,
        task: str,
        columns: ColumnMapping | None = None,
        *,
        depth_scale: float = 1000.0,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        image_size: tuple[int, int] | None = None,
        transform=None,
        normals_axes: str = "x,y,z",
    ):
        self.columns = columns or ColumnMapping()
        needed = self.columns.required(task)
        missing = [c for c in needed if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"the dataset has no column(s) {missing} needed by the {task} probe; its columns are "
                f"{dataset.column_names} (map them with --image_column, --label_column, --depth_column, ...)"
            )
        if depth_scale <= 0:
            raise ValueError(f"depth_scale must be positive, got {depth_scale}")
        # Reading only the needed columns skips decoding the others (images are decoded lazily per column).
        self.dataset = dataset.select_columns(list(dict.fromkeys(needed)))
        self.task = task
        self.depth_scale = depth_scale
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.image_size = tuple(image_size) if image_size else None
        self.transform = transform
        self.normals_axes = normals_axes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[int(index)]
        columns = self.columns
        sample: dict = {"index": int(index), "image": image_to_tensor(row[columns.image], columns.image)}
        if self.task == "segmentation":
            target = label_to_tensor(
                row[columns.label],
                columns.label,
                reduce_zero_label=self.reduce_zero_label,
                ignore_index=self.ignore_index,
            )
        elif self.task == "normals":
            target = normals_to_tensor(row[columns.normals], columns.normals, axes=self.normals_axes)
        else:
            target = depth_to_tensor(row[columns.depth], columns.depth, depth_scale=self.depth_scale)
        if tuple(target.shape[-2:]) != tuple(sample["image"].shape[-2:]):
            raise ValueError(
                f"row {index}: the {self.task} map is {tuple(target.shape)} but the image is "
                f"{tuple(sample['image'].shape[-2:])}; they must have the same size"
            )
        if columns.mask and row[columns.mask] is not None:  # a frame without a mask file is valid everywhere
            valid = mask_to_tensor(row[columns.mask], columns.mask)
            target = torch.where(
                valid,
                target,
                torch.full_like(target, self.ignore_index if self.task == "segmentation" else 0),
            )
        if self.task == "correspondence":
            sample["depth"] = target
            sample["K"] = torch.as_tensor(np.asarray(row[columns.intrinsics], dtype=np.float64))
            sample["world_to_camera"] = torch.as_tensor(np.asarray(row[columns.pose], dtype=np.float64))
            sample["scene_id"] = str(row[columns.scene])
        else:
            sample["target"] = target
        if self.image_size:
            sample = resize_sample(sample, self.image_size)
        if self.transform is not None:
            sample["image"], sample["target"] = self.transform(sample["image"], sample["target"])
        return sample

    def _require_views(self) -> None:
        if self.task != "correspondence":
            raise ValueError("scene ids and view geometry are read for the correspondence probe only")

    def scene_ids(self) -> list[str]:
        """Scene id of every row (read without decoding any image)."""
        self._require_views()
        return [str(s) for s in self.dataset[self.columns.scene]]

    def view_poses(self) -> list[torch.Tensor]:
        """`[4, 4]` float64 world-to-camera of every row (no image decoded)."""
        self._require_views()
        return [torch.as_tensor(np.asarray(p, dtype=np.float64)) for p in self.dataset[self.columns.pose]]

    def view_geometry(self, index: int) -> dict:
        """`{"depth" [H, W] metres, "K" [3, 3], "world_to_camera" [4, 4]}` of a row, without decoding its image
        (resized like the samples when `image_size` is set)."""
        self._require_views()
        columns = self.columns
        wanted = [columns.depth, columns.intrinsics, columns.pose] + ([columns.mask] if columns.mask else [])
        row = self.dataset.select_columns(wanted)[int(index)]
        depth = depth_to_tensor(row[columns.depth], columns.depth, depth_scale=self.depth_scale)
        if columns.mask and row[columns.mask] is not None:
            depth = torch.where(
                mask_to_tensor(row[columns.mask], columns.mask), depth, torch.zeros_like(depth)
            )
        K = torch.as_tensor(np.asarray(row[columns.intrinsics], dtype=np.float64))
        if self.image_size and tuple(depth.shape) != self.image_size:
            scale = torch.tensor(
                [self.image_size[1] / depth.shape[1], self.image_size[0] / depth.shape[0], 1.0], dtype=K.dtype
            )
            depth, K = resize_tensor(depth, self.image_size, "nearest"), K * scale[:, None]
        return {
            "depth": depth,
            "K": K,
            "world_to_camera": torch.as_tensor(np.asarray(row[columns.pose], dtype=np.float64)),
        }


def collate_probe_samples(samples: list[dict]) -> dict:
    """Stacks samples of one size into a batch; refuses mixed sizes with a hint."""
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) > 1:
        raise ValueError(
            f"images of one batch must share their size, got {sorted(sizes)}: turn augmentation on (random "
            "crops), pass --image_size H,W, or use a batch size of 1"
        )
    batch: dict = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def infer_num_classes(dataset: ProbeDataset, ignore_index: int = 255) -> int:
    """Number of classes = largest class id in the labels + 1 (reads every label once, with a progress bar)."""
    from tqdm.auto import tqdm

    column = dataset.columns.label
    largest = -1
    for value in tqdm(
        _iter_column(dataset.dataset, column), total=len(dataset), desc="reading labels", unit="image"
    ):
        label = label_to_tensor(
            value, column, reduce_zero_label=dataset.reduce_zero_label, ignore_index=ignore_index
        )
        label = label[label != ignore_index]
        if label.numel():
            largest = max(largest, int(label.max()))
    if largest < 0:
        raise ValueError(f"column {column!r} holds no label other than the ignore index {ignore_index}")
    return largest + 1


def _iter_column(dataset, column: str):
    for row in dataset.select_columns([column]):
        yield row[column]


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Precomputed frozen outputs with their targets: items `{"raw": {key: tensor}, "target": tensor}`."""

    def __init__(self, raw: list[dict[str, torch.Tensor]], targets: list[torch.Tensor]):
        if len(raw) != len(targets):
            raise ValueError(f"{len(raw)} feature entries for {len(targets)} targets")
        self.raw, self.targets = raw, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict:
        return {"raw": self.raw[index], "target": self.targets[index]}


def collate_cached(samples: list[dict]) -> dict:
    """Stacks `CachedFeatureDataset` items (targets and feature grids must share their size)."""
    sizes = {tuple(s["target"].shape) for s in samples}
    if len(sizes) > 1:
        raise ValueError(
            f"cached samples of one batch differ in size {sorted(sizes)}: pass --image_size H,W or a batch size of 1"
        )
    return {
        "raw": {key: torch.stack([s["raw"][key] for s in samples]) for key in samples[0]["raw"]},
        "target": torch.stack([s["target"] for s in samples]),
    }
