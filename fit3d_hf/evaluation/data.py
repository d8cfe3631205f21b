"""Probe data: any Hugging Face dataset with image and label / depth columns, as tensors.

`load_probe_dataset` opens a Hub id, a local folder (Parquet shards, an imagefolder, a `save_to_disk`
folder), a single Parquet file, or preprocessed ScanNet++-layout scenes through the `scannetpp` builder
(`scannetpp:<data_dir>`). `ProbeDataset` maps its columns (`ColumnMapping`) to

- ``image``: `[3, H, W]` float in [0, 1];
- ``target``: `[H, W]` int64 class ids (segmentation, `ignore_index` where unknown), float depth in metres
  (depth, 0 where unknown) or `[3, H, W]` unit surface normals (normals, 0 where unknown; see
  `fit3d_hf.evaluation.normals` for the convention);
- for the correspondence probe: ``depth`` (metres), ``K`` `[3, 3]`, ``world_to_camera`` `[4, 4]` (OpenCV) and
  ``scene_id``.

`RandomScaleCropFlip` is the training augmentation of the reference protocol (random rescale, random crop
that avoids crops dominated by one class, horizontal flip), written on tensors so it needs no torchvision;
the segmentation protocol follows it with `PhotoMetricDistortion` (random brightness, contrast, saturation and
hue of the image), chained by `ComposeTransforms`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CachedFeatureDataset",
    "ColumnMapping",
    "ComposeTransforms",
    "PhotoMetricDistortion",
    "ProbeDataArguments",
    "ProbeDataset",
    "RandomScaleCropFlip",
    "check_local_path",
    "collate_cached",
    "collate_probe_samples",
    "hsv_to_rgb",
    "infer_num_classes",
    "load_probe_dataset",
    "parse_class_names",
    "parse_size",
    "resolve_split",
    "rgb_to_hsv",
]

logger = logging.getLogger(__name__)

TASKS = ("segmentation", "depth", "correspondence", "normals")
_SPLIT_ALIASES = {
    "val": ("validation", "valid", "dev"),
    "validation": ("val", "valid", "dev"),
    "test": ("testing",),
}
_EVAL_SPLIT_PREFERENCE = ("validation", "val", "test")


@dataclass
class ColumnMapping:
    """Which dataset columns hold what (None: the column is not used).

    Args:
        image: RGB image column (a datasets `Image`, an array or nested lists, `[H, W, 3]`).
        label: class-id map column (an `L`/`P` mode image or an integer array, `[H, W]`).
        depth: depth map column (a 16-bit or float image, or an array); values / `depth_scale` = metres.
        normals: surface-normal column (an 8-bit RGB image `(n + 1) / 2 * 255` or a float array `[H, W, 3]`).
        mask: optional validity mask column (non-zero = valid); masked-out pixels get no ground truth.
        scene: scene id column (correspondence probe: views are paired within a scene).
        intrinsics: `[3, 3]` pinhole intrinsics column (pixel centres at half-integers).
        pose: `[4, 4]` world-to-camera column, OpenCV axes (x right, y down, z forward).
    """

    image: str = "image"
    label: str | None = "label"
    depth: str | None = "depth"
    mask: str | None = None
    scene: str | None = "scene_id"
    intrinsics: str | None = "K"
    pose: str | None = "world_to_camera"
    normals: str | None = "normals"

    def required(self, task: str) -> list[str]:
        """The columns a task reads."""
        if task == "segmentation":
            columns = [self.image, self.label]
        elif task == "depth":
            columns = [self.image, self.depth]
        elif task == "correspondence":
            columns = [self.image, self.depth, self.scene, self.intrinsics, self.pose]
        elif task == "normals":
            columns = [self.image, self.normals]
        else:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if any(column is None for column in columns):
            raise ValueError(f"the {task} probe needs these columns set, got {columns}")
        return columns + ([self.mask] if self.mask else [])


# ----------------------------------------------------------------------------------------------------
# Options (one line per option: the help strings are the documentation of `fit3d evaluate --help`)


# fmt: off
@dataclass
class ProbeDataArguments:
    dataset: str = field(metadata={"help": "Data set: a Hub id (NYUv2, ADE20k, VOC, ScanNet++ probe sets, ...), a local folder (Parquet shards, imagefolder, save_to_disk), a .parquet file, 'scannetpp:<data_dir>' for a ScanNet++ root split by metadata/<split>_samples.txt, or scenes as `fit3d lift` takes them ('scenes:<spec>' or just the spec: a scene in any layout, a folder of scenes, a list file, or a comma-separated list; e.g. the synthetic ones, which carry labels, depth and normals)."})
    dataset_format: str | None = field(default=None, metadata={"help": "Force how --dataset is read: hub, scannetpp, scenes, parquet or disk (default: guessed)."})
    holdout_every: int = field(default=0, metadata={"help": "Scenes: the 'val' split is every K-th view of each scene, as `fit3d lift --holdout_every K` held them out (0: the scenes' own test frames)."})
    gaussians: str | None = field(default=None, metadata={"help": "Correspondence: Stage I's output folder (<scene_id>/gaussians.safetensors); frames without a depth map (own captures) get the depth rendered from their scene's Gaussians."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    train_split: str | None = field(default=None, metadata={"help": "Split the probe trains on (default: train)."})
    split: str | None = field(default=None, metadata={"help": "Split evaluated (default: the first of validation, val, test)."})
    image_column: str = field(default="image", metadata={"help": "Column holding the RGB images."})
    label_column: str = field(default="label", metadata={"help": "Column holding class-id maps (segmentation)."})
    depth_column: str = field(default="depth", metadata={"help": "Column holding depth maps (depth, correspondence)."})
    normals_column: str = field(default="normals", metadata={"help": "Column holding surface normals (normals): 8-bit RGB (n + 1) / 2 * 255 or float [H, W, 3]."})
    normals_axes: str = field(default="x,y,z", metadata={"help": "How the stored normals' axes map to fit3d-hf's (camera frame, x right, y down, z forward, towards the camera), e.g. 'x,-y,-z' for OpenGL-style axes."})
    mask_column: str | None = field(default=None, metadata={"help": "Column of validity masks (0 = no ground truth); 'mask' by default for scannetpp data."})
    scene_column: str = field(default="scene_id", metadata={"help": "Column of scene ids (correspondence: pairs within a scene)."})
    intrinsics_column: str = field(default="K", metadata={"help": "Column of 3x3 intrinsics (correspondence)."})
    pose_column: str = field(default="world_to_camera", metadata={"help": "Column of 4x4 OpenCV world-to-camera poses (correspondence)."})
    preset: str | None = field(default=None, metadata={"help": "Settings of FiT3D's config for a data set, for every option not given: nyuv2, ade20k, scannetpp or kitti (label reduction and classes; depth scale, range, crops and ColorAug brightness). See fit3d_hf/evaluation/protocol.py.", "choices": ["nyuv2", "ade20k", "scannetpp", "kitti"]})
    depth_scale: float | None = field(default=None, metadata={"help": "Stored depth / depth_scale = metres (1000: mm PNGs, the default; 256: KITTI; 1: metres)."})
    reduce_zero_label: bool | None = field(default=None, metadata={"help": "Labels with 0 = unlabelled (ADE20k, NYUv2 and ScanNet++ as FiT3D uses them: set by --preset): 0 is ignored, ids shift down by one. Default: off."})
    num_classes: int | None = field(default=None, metadata={"help": "Number of classes (default: from --class_names, else read from the labels)."})
    class_names: str | None = field(default=None, metadata={"help": "Class names: 'a,b,c', a .txt (one per line) or .json (list or id2label)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N samples only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N samples only."})
    image_size: str | None = field(default=None, metadata={"help": "Resize every image (and its maps) to 'H,W' first (default: native size)."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder."})

    def __post_init__(self) -> None:
        if self.depth_scale is not None and self.depth_scale <= 0:
            raise ValueError(f"--depth_scale must be positive, got {self.depth_scale}")
        parse_size(self.image_size)  # fails early on a malformed size

    def columns(self, mask_column: str | None = None) -> ColumnMapping:
        """The column mapping these options name (`mask_column` overrides --mask_column when it is unset)."""
        return ColumnMapping(
            image=self.image_column, label=self.label_column, depth=self.depth_column, mask=self.mask_column or mask_column,
            scene=self.scene_column, intrinsics=self.intrinsics_column, pose=self.pose_column, normals=self.normals_column,
        )
# fmt: on


# ----------------------------------------------------------------------------------------------------
# Loading


def check_local_path(name_or_path: str, option: str) -> None:
    """Raises FileNotFoundError for a name that can only be a local path (absolute, ./, ../, ~ or more than
    one "/") but does not exist; Hub ids ("namespace/name") pass through to the Hub clients."""
    if Path(name_or_path).expanduser().exists():
        return
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"{option} {name_or_path}: no such file or folder")


def load_probe_dataset(
    dataset: str,
    *,
    dataset_format: str | None = None,
    config_name: str | None = None,
    cache_dir: str | None = None,
    holdout_every: int = 0,
):
    """Opens a data set with all its splits.

    Args:
        dataset: a Hub id (`datasets.load_dataset`), a local folder or Parquet file, `scannetpp:<data_dir>` for a
            ScanNet++ root split by sample lists, or a scene spec (`scenes:<spec>`, or the spec alone), read by the
            `scenes` builder.
        dataset_format: force how `dataset` is read: "hub" (load_dataset, also local folders), "scannetpp",
            "scenes", "parquet", "disk" (`save_to_disk` folder); None guesses from the path.
        config_name: the Hub dataset's configuration name, if it has several.
        cache_dir: datasets cache folder.
        holdout_every: scenes: `val` = every K-th view of each scene (Stage I's held-out views; 0: test frames).

    Returns:
        A `datasets.DatasetDict`.
    """
    import datasets

    if dataset.startswith("scannetpp:"):
        dataset_format, dataset = "scannetpp", dataset[len("scannetpp:") :]
    if dataset.startswith("scenes:"):
        dataset_format, dataset = "scenes", dataset[len("scenes:") :]
    if dataset_format is None and _is_scene_spec(dataset):
        dataset_format = "scenes"
    path = Path(dataset)
    if dataset_format is None:
        if path.is_file() and path.suffix == ".parquet":
            dataset_format = "parquet"
        elif path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            dataset_format = "disk"
        elif path.is_dir() and (path / "scenes").is_dir() and (path / "metadata").is_dir():
            dataset_format = "scannetpp"
        else:
            dataset_format = "hub"
    if dataset_format == "scenes":
        from dataset_builders.scenes import load_scenes

        loaded = load_scenes(dataset, "frames", holdout_every=holdout_every, cache_dir=cache_dir)
        logger.info("loaded scenes %s: %s", dataset, {k: len(v) for k, v in loaded.items()})
        return loaded
    if dataset_format in ("scannetpp", "parquet", "disk") and not path.exists():
        raise FileNotFoundError(f"--dataset {dataset}: no such file or folder (read as {dataset_format!r})")
    check_local_path(dataset, "--dataset")

    if dataset_format == "scannetpp":
        from dataset_builders.scannetpp import load_scannetpp

        # Split by split: the builder cannot build a split whose sample list is empty.
        split_files = sorted((path / "metadata").glob("*_samples.txt"))
        names = [f.name[: -len("_samples.txt")] for f in split_files if f.read_text().strip()]
        if not names:
            raise FileNotFoundError(f"{path / 'metadata'} holds no non-empty <split>_samples.txt")
        loaded = datasets.DatasetDict(
            {
                name: load_scannetpp(str(path), config_name="frames", split=name, cache_dir=cache_dir)
                for name in names
            }
        )
    elif dataset_format == "parquet":
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("**/*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .parquet files")
        if path.is_file():
            loaded = datasets.load_dataset("parquet", data_files={"train": files}, cache_dir=cache_dir)
        else:
            loaded = datasets.load_dataset(str(path), cache_dir=cache_dir)
    elif dataset_format == "disk":
        loaded = datasets.load_from_disk(str(path))
    elif dataset_format == "hub":
        loaded = datasets.load_dataset(dataset, name=config_name, cache_dir=cache_dir)
    else:
        raise ValueError(
            f"dataset_format must be 'hub', 'scannetpp', 'scenes', 'parquet' or 'disk', got {dataset_format!r}"
        )
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    logger.info("loaded %s (%s): %s", dataset, dataset_format, {k: len(v) for k, v in loaded.items()})
    return loaded


def _is_scene_spec(dataset: str) -> bool:
    """Whether a --dataset is a scene spec (scenes `fit3d lift` reads) rather than a Hub id or a data folder."""
    from ..scene import resolve_scene_list

    local = [Path(part.strip()).expanduser() for part in dataset.split(",") if part.strip()]
    if not local or not all(part.exists() for part in local):
        return False
    if len(local) == 1 and (local[0] / "metadata").is_dir() and (local[0] / "scenes").is_dir():
        return False  # a ScanNet++ root split by sample lists: the scannetpp builder reads it
    if any(part.is_file() and part.suffix.lower() not in (".txt", ".json", "") for part in local):
        return False  # a .parquet file, an image, ...: not a scene or a list of scenes
    try:
        resolve_scene_list(dataset)
    except (FileNotFoundError, ValueError):
        return False
    return True


def resolve_split(splits, name: str | None, role: str):
    """Picks a split of a `DatasetDict` by name, accepting the usual aliases ("val" <-> "validation").

    Args:
        splits: the `DatasetDict`.
        name: the split wanted; None = "train" for role "train", else the first of validation/val/test.
        role: "train" or "eval" (for the default and the error message).

    Returns:
        `(split_name, dataset)`.
    """
    available = list(splits.keys())
    if name is None:
        candidates = ("train",) if role == "train" else _EVAL_SPLIT_PREFERENCE
    else:
        candidates = (name, *_SPLIT_ALIASES.get(name, ()))
    for candidate in candidates:
        if candidate in splits:
            return candidate, splits[candidate]
    wanted = name or " / ".join(candidates)
    raise ValueError(
        f"the dataset has no {role} split {wanted!r}; its splits are {available} (pass --{'train_split' if role == 'train' else 'split'})"
    )


def parse_class_names(value: str | None) -> list[str] | None:
    """Class names from a comma-separated list, a `.txt` file (one per line) or a `.json` file (a list or
    an `id2label` mapping)."""
    if not value:
        return None
    path = Path(value)
    if path.suffix in (".json", ".txt") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"--class_names file {path} does not exist")
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                data = data.get("id2label", data)
                return [str(data[key]) for key in sorted(data, key=int)]
            return [str(name) for name in data]
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [name.strip() for name in value.split(",")]


# ----------------------------------------------------------------------------------------------------
# Value conversion


def _as_array(value, column: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"column {column!r} holds None for this row")
    if hasattr(value, "mode") and hasattr(value, "size"):  # PIL image
        if value.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(value).astype(np.int32)
        return np.asarray(value)
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return np.asarray(value)


def image_to_tensor(value, column: str = "image") -> torch.Tensor:
    """An RGB image value -> `[3, H, W]` float in [0, 1] (16-bit grey pictures scaled by their bit depth)."""
    if hasattr(value, "mode") and value.mode != "RGB":
        from fit3d_hf.images import to_8bit

        value = to_8bit(value).convert("RGB")
    array = _as_array(value, column)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:  # channel-first arrays
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"column {column!r}: expected an RGB image [H, W, 3], got shape {array.shape}")
    image = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)  # PIL arrays are read-only
    return image.float() / 255.0 if not image.is_floating_point() else image.float().clamp(0, 1)


def label_to_tensor(
    value, column: str, *, reduce_zero_label: bool = False, ignore_index: int = 255
) -> torch.Tensor:
    """A class-id map value -> `[H, W]` int64.

    With `reduce_zero_label` (ADE20k's convention), 0 ("other") becomes `ignore_index` and every other id
    moves down by one.
    """
    array = _as_array(value, column)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise ValueError(
            f"column {column!r}: expected a class-id map [H, W] (an L/P-mode image), got shape {array.shape}; "
            "colour-coded label images must be converted to class ids first"
        )
    label = torch.from_numpy(array.astype(np.int64))
    if reduce_zero_label:
        label = torch.where(label == 0, ignore_index, label - 1)
        label[label == ignore_index - 1] = ignore_index
    return label


def depth_to_tensor(value, column: str, *, depth_scale: float = 1000.0) -> torch.Tensor:
    """A depth map value -> `[H, W]` float32 metres (stored value / depth_scale; 0 and NaN = unknown)."""
    array = _as_array(value, column)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise ValueError(f"column {column!r}: expected a depth map [H, W], got shape {array.shape}")
    depth = torch.from_numpy(array.astype(np.float32)) / float(depth_scale)
    return torch.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)


def _resize(tensor: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resizes `[C, H, W]` or `[H, W]`; "nearest" for labels and depth, "bilinear" (antialiased) for images."""
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    squeeze = tensor.ndim == 2
    batch = tensor[None, None] if squeeze else tensor[None]
    dtype = batch.dtype
    if mode == "nearest":
        out = F.interpolate(batch.float(), size=size, mode="nearest-exact")
    else:
        out = F.interpolate(batch.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    out = out.to(dtype) if not dtype.is_floating_point else out
    return out[0, 0] if squeeze else out[0]


def resize_sample(sample: dict, size: tuple[int, int]) -> dict:
    """Resizes a sample's image (bilinear), target and depth (nearest) to `size` = (H, W) and scales K."""
    height, width = sample["image"].shape[-2:]
    out = dict(sample)
    out["image"] = _resize(sample["image"], size, "bilinear").clamp(0, 1)
    for key in ("target", "depth"):
        if key in sample:
            out[key] = _resize(sample[key], size, "nearest")
    if "K" in sample:
        scale = torch.tensor([size[1] / width, size[0] / height, 1.0], dtype=sample["K"].dtype)
        out["K"] = sample["K"] * scale[:, None]
    return out


# ----------------------------------------------------------------------------------------------------
# Datasets


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
        normals_axes: how stored normals' axes map to fit3d-hf's (see `fit3d_hf.evaluation.normals.parse_axes`).
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
            from .normals import normals_to_tensor

            target = normals_to_tensor(row[columns.normals], columns.normals, axes=self.normals_axes)
        else:
            target = depth_to_tensor(row[columns.depth], columns.depth, depth_scale=self.depth_scale)
        if tuple(target.shape[-2:]) != tuple(sample["image"].shape[-2:]):
            raise ValueError(
                f"row {index}: the {self.task} map is {tuple(target.shape)} but the image is "
                f"{tuple(sample['image'].shape[-2:])}; they must have the same size"
            )
        if columns.mask and row[columns.mask] is not None:  # a frame without a mask file is valid everywhere
            valid = torch.from_numpy(_as_array(row[columns.mask], columns.mask).astype(np.float32)) > 0
            if valid.ndim == 3:
                valid = valid[..., 0]
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
            valid = torch.from_numpy(_as_array(row[columns.mask], columns.mask).astype(np.float32)) > 0
            depth = torch.where(valid[..., 0] if valid.ndim == 3 else valid, depth, torch.zeros_like(depth))
        K = torch.as_tensor(np.asarray(row[columns.intrinsics], dtype=np.float64))
        if self.image_size and tuple(depth.shape) != self.image_size:
            scale = torch.tensor(
                [self.image_size[1] / depth.shape[1], self.image_size[0] / depth.shape[0], 1.0], dtype=K.dtype
            )
            depth, K = _resize(depth, self.image_size, "nearest"), K * scale[:, None]
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


# ----------------------------------------------------------------------------------------------------
# Augmentation


class RandomScaleCropFlip:
    """The reference's training augmentation on tensors: random rescale, random crop, horizontal flip.

    The image is first scaled so that its shorter side is `short_side` (if given) times a factor drawn
    uniformly from `scale_range`, then a `crop_size` window is cut at a random position (images smaller than
    the crop are padded: image with 0, target with `fill`); for segmentation up to 10 windows are tried to
    find one where no class covers more than `cat_max_ratio` of the labelled pixels (mmseg's RandomCrop).
    Labels and depth are resampled with nearest neighbours, so depth values stay metric.

    Args:
        crop_size: (H, W) of the crops.
        scale_range: (min, max) rescale factor; (1, 1) disables rescaling (the depth protocol).
        short_side: shorter side before the random factor (512 in the segmentation protocol); None = native.
        flip_probability: probability of a horizontal flip.
        fill: target value of padded pixels (the ignore index for labels, 0 for depth).
        cat_max_ratio: largest share of one class in a crop (segmentation; 1 disables the check).
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        short_side: int | None = None,
        flip_probability: float = 0.5,
        fill: float = 255,
        cat_max_ratio: float = 1.0,
    ):
        if min(crop_size) < 1 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"bad augmentation settings: crop_size={crop_size}, scale_range={scale_range}")
        self.crop_size = tuple(int(v) for v in crop_size)
        self.scale_range = tuple(float(v) for v in scale_range)
        self.short_side = short_side
        self.flip_probability = flip_probability
        self.fill = fill
        self.cat_max_ratio = cat_max_ratio

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`image [3, H, W]`, `target [H, W]` -> augmented `[3, h, w]`, `[h, w]` with (h, w) = crop_size."""
        height, width = image.shape[-2:]
        scale = (
            float(torch.empty(()).uniform_(*self.scale_range))
            if self.scale_range[0] < self.scale_range[1]
            else self.scale_range[0]
        )
        if self.short_side:
            scale *= self.short_side / min(height, width)
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            image, target = _resize(image, size, "bilinear").clamp(0, 1), _resize(target, size, "nearest")
        crop_h, crop_w = self.crop_size
        pad_h, pad_w = max(crop_h - image.shape[-2], 0), max(crop_w - image.shape[-1], 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            target = F.pad(target[None], (0, pad_w, 0, pad_h), value=self.fill)[0]
        for _attempt in range(10):
            top = int(torch.randint(0, image.shape[-2] - crop_h + 1, ()))
            left = int(torch.randint(0, image.shape[-1] - crop_w + 1, ()))
            crop = target[top : top + crop_h, left : left + crop_w]
            if self.cat_max_ratio >= 1.0 or self._balanced(crop):
                break
        image = image[:, top : top + crop_h, left : left + crop_w]
        target = crop
        if float(torch.rand(())) < self.flip_probability:
            image, target = image.flip(-1), target.flip(-1)
        return image.contiguous(), target.contiguous()

    def _balanced(self, crop: torch.Tensor) -> bool:
        labelled = crop[crop != self.fill]
        if labelled.numel() == 0:
            return False
        counts = torch.bincount(labelled.long().flatten().clamp_min(0))
        counts = counts[counts > 0]
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio


# Written by hand: torchvision/kornia would be new dependencies for these few lines, and OpenCV works on
# uint8/float32 HWC arrays (a round trip through numpy per sample).
def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, every channel in [0, 1] (hue in turns: OpenCV's 0-180 hue / 180).

    Args:
        image: `[..., 3, H, W]` float RGB in [0, 1].

    Returns:
        `[..., 3, H, W]` (hue, saturation, value); grey pixels get hue 0 and black ones saturation 0.
    """
    red, green, blue = image.unbind(-3)
    value, largest = image.max(dim=-3)
    chroma = value - image.min(dim=-3).values
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        largest == 0,
        ((green - blue) / safe_chroma) % 6,
        torch.where(largest == 1, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4),
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), 0)
    return torch.stack([hue, saturation, value], dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV -> RGB, the inverse of `rgb_to_hsv` (`[..., 3, H, W]`, channels in [0, 1], hue taken modulo 1)."""
    hue, saturation, value = hsv.unbind(-3)
    # Channel n (5 = red, 3 = green, 1 = blue) = V - V S clamp(min(k, 4 - k), 0, 1) with k = (n + 6 H) mod 6.
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device).view(3, 1, 1)
    k = (offsets + 6 * hue.unsqueeze(-3)) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value.unsqueeze(-3) * (1 - saturation.unsqueeze(-3) * ramp)


class PhotoMetricDistortion:
    """mmseg's (0.x) PhotoMetricDistortion on `[3, H, W]` float images in [0, 1]; the target is left alone.

    Each step happens with probability `probability`, in this order: brightness (add a delta drawn from
    [-brightness_delta, brightness_delta] / 255), contrast (multiply by a factor from `contrast_range`) either
    here or last (a coin flip), saturation (multiply HSV saturation by a factor from `saturation_range`), hue
    (shift by a delta from [-hue_delta, hue_delta] in OpenCV's 0-180 hue units, i.e. delta / 180 of a turn),
    and contrast if not done before. Values are clipped to [0, 1] after every step, as mmseg clips to [0, 255].

    Differences from mmseg, which works on uint8 BGR arrays: no rounding to 8 bits between steps, and the hue
    delta is drawn continuously (mmseg draws an integer in [-hue_delta, hue_delta - 1]).

    Args:
        brightness_delta: largest brightness change, on the 0-255 scale (mmseg: 32).
        contrast_range: (min, max) contrast factor (mmseg: 0.5, 1.5).
        saturation_range: (min, max) saturation factor (mmseg: 0.5, 1.5).
        hue_delta: largest hue change in OpenCV hue units, 180 = a full turn (mmseg: 18).
        probability: chance of applying each of the four steps (mmseg: 0.5).
        generator: random numbers for the draws; None uses torch's global generator, which `set_seed` and
            the DataLoader's per-worker seeding make reproducible (a generator of its own would be copied
            unchanged into every worker, which would then repeat the same distortions).
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18.0,
        probability: float = 0.5,
        generator: torch.Generator | None = None,
    ):
        for name, (low, high) in (("contrast_range", contrast_range), ("saturation_range", saturation_range)):
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be (min, max) with 0 <= min <= max, got {(low, high)}")
        if brightness_delta < 0 or hue_delta < 0 or not 0 <= probability <= 1:
            raise ValueError(
                f"need brightness_delta >= 0, hue_delta >= 0 and 0 <= probability <= 1, got {brightness_delta}, "
                f"{hue_delta} and {probability}"
            )
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = tuple(float(v) for v in contrast_range)
        self.saturation_range = tuple(float(v) for v in saturation_range)
        self.hue_delta = float(hue_delta)
        self.probability = float(probability)
        self.generator = generator

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def _happens(self) -> bool:
        return float(torch.rand((), generator=self.generator)) < self.probability

    def sample_parameters(self) -> dict:
        """Draws one distortion: `{"brightness", "contrast", "saturation", "hue", "contrast_first"}` (a step that
        does not happen is None; brightness in [0, 1] units, hue in OpenCV units)."""
        # Every value is drawn whether or not its step happens, so each image uses the same count of numbers.
        params: dict = {}
        brightness = self.brightness_delta / 255.0
        for name, low, high in (
            ("brightness", -brightness, brightness),
            ("contrast", *self.contrast_range),
            ("saturation", *self.saturation_range),
            ("hue", -self.hue_delta, self.hue_delta),
        ):
            happens = self._happens()
            value = self._uniform(low, high)
            params[name] = value if happens else None
        params["contrast_first"] = float(torch.rand((), generator=self.generator)) < 0.5
        return params

    @staticmethod
    def apply(
        image: torch.Tensor,
        brightness: float | None = None,
        contrast: float | None = None,
        saturation: float | None = None,
        hue: float | None = None,
        contrast_first: bool = True,
    ) -> torch.Tensor:
        """One given distortion (None skips a step).

        Args:
            image: `[3, H, W]` float RGB in [0, 1].
            brightness: added value, in [0, 1] units.
            contrast: multiplying factor of all channels.
            saturation: multiplying factor of the HSV saturation.
            hue: hue shift in OpenCV units (180 = a full turn).
            contrast_first: contrast before saturation and hue (else after them).

        Returns:
            `[3, H, W]` in [0, 1].
        """
        if brightness is not None:
            image = (image + brightness).clamp(0, 1)
        if contrast is not None and contrast_first:
            image = (image * contrast).clamp(0, 1)
        if saturation is not None or hue is not None:
            hsv = rgb_to_hsv(image)
            hue_turns, saturation_channel, value = hsv.unbind(-3)
            if saturation is not None:
                saturation_channel = (saturation_channel * saturation).clamp(0, 1)
            if hue is not None:
                hue_turns = (hue_turns + hue / 180.0) % 1.0
            image = hsv_to_rgb(torch.stack([hue_turns, saturation_channel, value], dim=-3)).clamp(0, 1)
        if contrast is not None and not contrast_first:
            image = (image * contrast).clamp(0, 1)
        return image

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`image [3, H, W]`, `target [H, W]` -> distorted image, the same target."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"PhotoMetricDistortion expects an RGB image [3, H, W], got shape {tuple(image.shape)}"
            )
        return self.apply(image, **self.sample_parameters()), target


class ComposeTransforms:
    """Applies `(image, target) -> (image, target)` transforms one after the other."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target


def parse_size(value: str | int | None) -> tuple[int, int] | None:
    """ "512" -> (512, 512); "416,544" -> (416, 544); None -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return (value, value)
    parts = [int(v) for v in str(value).replace("x", ",").split(",") if v.strip()]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1 or math.prod(parts) <= 0:
        raise ValueError(f"a size must be 'N' or 'H,W' with positive integers, got {value!r}")
    return parts[0], parts[1]
