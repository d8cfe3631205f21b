"""Probe data sets: the data options of `fit3d evaluate` (`ProbeDataArguments`) and opening a data set with its
splits.

`load_probe_dataset` opens a Hub id, a local folder (Parquet shards, an imagefolder, a `save_to_disk`
folder), a single Parquet file, preprocessed ScanNet++-layout scenes through the `scannetpp` builder
(`scannetpp:<data_dir>`), or scenes as `fit3d lift` takes them through the `scenes` builder; `resolve_split`
picks a split by name or alias. Its rows become probe samples in `fit3d_hf.evaluation.samples`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .arguments import parse_size
from .columns import ColumnMapping

__all__ = [
    "ProbeDataArguments",
    "check_local_path",
    "first_rows",
    "load_probe_dataset",
    "parse_class_names",
    "resolve_split",
]

logger = logging.getLogger(__name__)

_SPLIT_ALIASES = {
    "val": ("validation", "valid", "dev"),
    "validation": ("val", "valid", "dev"),
    "test": ("testing",),
}
_EVAL_SPLIT_PREFERENCE = ("validation", "val", "test")


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

    dataset_format, dataset = _dataset_format(dataset, dataset_format)
    path = Path(dataset)
    if dataset_format == "scenes":
        from dataset_builders.scenes import load_scenes

        loaded = load_scenes(dataset, "frames", holdout_every=holdout_every, cache_dir=cache_dir)
        logger.info("loaded scenes %s: %s", dataset, {k: len(v) for k, v in loaded.items()})
        return loaded
    if dataset_format in ("scannetpp", "parquet", "disk") and not path.exists():
        raise FileNotFoundError(f"--dataset {dataset}: no such file or folder (read as {dataset_format!r})")
    check_local_path(dataset, "--dataset")

    if dataset_format == "scannetpp":
        loaded = _load_scannetpp_splits(path, cache_dir)
    elif dataset_format == "parquet":
        loaded = _load_parquet(path, cache_dir)
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


def _dataset_format(dataset: str, dataset_format: str | None) -> tuple[str, str]:
    """`(format, dataset)`: the format a "scannetpp:" or "scenes:" prefix names (the prefix taken off), else the
    one given, else the one the path looks like ("hub" when it looks like none)."""
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
    return dataset_format, dataset


def _load_scannetpp_splits(path: Path, cache_dir: str | None):
    """A ScanNet++ root's splits through the `scannetpp` builder, one per non-empty metadata/<split>_samples.txt."""
    import datasets

    from dataset_builders.scannetpp import load_scannetpp

    # Split by split: the builder cannot build a split whose sample list is empty.
    split_files = sorted((path / "metadata").glob("*_samples.txt"))
    names = [f.name[: -len("_samples.txt")] for f in split_files if f.read_text().strip()]
    if not names:
        raise FileNotFoundError(f"{path / 'metadata'} holds no non-empty <split>_samples.txt")
    return datasets.DatasetDict(
        {
            name: load_scannetpp(str(path), config_name="frames", split=name, cache_dir=cache_dir)
            for name in names
        }
    )


def _load_parquet(path: Path, cache_dir: str | None):
    """A .parquet file (as the "train" split) or a folder of Parquet shards (split by `load_dataset`'s rules)."""
    import datasets

    files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("**/*.parquet"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .parquet files")
    if path.is_file():
        return datasets.load_dataset("parquet", data_files={"train": files}, cache_dir=cache_dir)
    return datasets.load_dataset(str(path), cache_dir=cache_dir)


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


def first_rows(split, limit: int | None):
    """The first `limit` rows of a split (--max_train_samples, --max_eval_samples); all of them without a limit."""
    if limit:
        return split.select(range(min(limit, len(split))))
    return split


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
