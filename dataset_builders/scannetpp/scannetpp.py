"""`datasets` builder for preprocessed ScanNet++ scenes (FiT3D layout) and anything laid out the same way.

Expected layout under `data_dir`::

    scenes/<scene_id>/{images/, masks/, [depth/, labels/,] points3D.txt, transforms_train.json}
    metadata/train_samples.txt, metadata/val_samples.txt     # one `<scene_id>_<image_stem>` per line

Configs:

- ``"frames"``: one row per listed sample: `scene_id`, `image_id`, `image`, `mask`, `depth`, `label`, `normals`
  (Image columns, None when the scene has no such file; normals as in `fit3d_hf.scene.scene`: camera-frame,
  8-bit RGB), `K` (3x3), `world_to_camera` (4x4, OpenCV convention,
  COLMAP world frame of `points3D.txt`), `width`, `height`, `is_test` (a ScanNet++ test frame).
- ``"points"``: one row per scene that has listed samples: `scene_id`, `xyz` (M x 3 float32), `rgb`
  (M x 3 uint8).

Loading scripts are gone from `datasets`, so the builder is used as a class::

    builder = ScanNetPP(cache_dir=cache, config_name="frames", data_dir=root)
    builder.download_and_prepare()
    train = builder.as_dataset(split="train")

Fixed-size `List` features hold K and the pose (`Array2D` columns read back by threaded pyarrow can abort
at interpreter exit). Images are stored as file paths: the Arrow cache depends on the scene files, while
`fit3d export-dataset` writes self-contained Parquet shards with the image bytes embedded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from fit3d_hf.errors import UsageError
from fit3d_hf.scene.readers import SCANNETPP_SPLITS, read_scannetpp_scene, read_scannetpp_split
from fit3d_hf.utils import replace_folder

__all__ = [
    "FRAME_FEATURES",
    "POINT_FEATURES",
    "ScanNetPP",
    "ScanNetPPConfig",
    "data_fingerprint",
    "export_parquet",
    "frame_row",
    "group_samples",
]

logger = datasets.logging.get_logger(__name__)

_FLOAT = datasets.Value("float32")
FRAME_FEATURES = datasets.Features(
    {
        "scene_id": datasets.Value("string"),
        "image_id": datasets.Value("string"),
        "image": datasets.Image(),
        "mask": datasets.Image(),
        "depth": datasets.Image(),
        "label": datasets.Image(),
        "normals": datasets.Image(),
        "K": datasets.List(datasets.List(_FLOAT, length=3), length=3),
        "world_to_camera": datasets.List(datasets.List(_FLOAT, length=4), length=4),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "is_test": datasets.Value("bool"),
    }
)
POINT_FEATURES = datasets.Features(
    {
        "scene_id": datasets.Value("string"),
        "xyz": datasets.List(datasets.List(_FLOAT, length=3)),
        "rgb": datasets.List(datasets.List(datasets.Value("uint8"), length=3)),
    }
)
_SCENE_FILES = ("transforms_train.json", "points3D.txt")
_SCENE_FOLDERS = ("images", "masks", "depth", "labels", "normals")


@dataclass
class ScanNetPPConfig(datasets.BuilderConfig):
    """Config of the `ScanNetPP` builder.

    Args:
        data_dir: dataset root holding `scenes/` and `metadata/`.
        scenes_dirname: folder of `data_dir` holding one folder per scene.
        splits: splits to build, each read from `metadata/<split>_samples.txt`; those without a file are
            skipped.
    """

    scenes_dirname: str = "scenes"
    splits: tuple[str, ...] = SCANNETPP_SPLITS


def data_fingerprint(data_dir: Path | str, scenes_dirname: str = "scenes") -> str:
    """A short hash of what the builder reads: the split files, each scene's json and points file (size and
    modification time) and the file names of its image folders. The builder puts it in its cache path, so
    that editing or regenerating the data rebuilds the dataset instead of reusing a stale cache."""
    root = Path(data_dir)
    digest = hashlib.sha256()

    def add_stat(path: Path) -> None:
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())

    for path in sorted((root / "metadata").glob("*.txt")):
        add_stat(path)
    scenes_dir = root / scenes_dirname
    if scenes_dir.is_dir():
        for scene_dir in sorted(p for p in scenes_dir.iterdir() if p.is_dir()):
            for name in _SCENE_FILES:
                add_stat(scene_dir / name)
            for folder in _SCENE_FOLDERS:
                if (scene_dir / folder).is_dir():
                    names = sorted(os.listdir(scene_dir / folder))
                    digest.update(f"{scene_dir.name}/{folder}:{','.join(names)}\n".encode())
    return digest.hexdigest()[:16]


def group_samples(samples: list[str], scene_ids: set[str], source: str) -> dict[str, list[str]]:
    """Splits `<scene_id>_<image_id>` sample ids by scene.

    Scene ids may themselves hold underscores, so each id is split at the underscore that leaves the longest
    existing scene id on its left.

    Args:
        samples: sample ids.
        scene_ids: the scene folders that exist.
        source: the file the ids come from (for error messages).

    Returns:
        scene id -> image ids, in the order listed.
    """
    grouped: dict[str, list[str]] = {}
    for sample in samples:
        positions = [i for i, char in enumerate(sample) if char == "_"]
        for position in reversed(positions):
            if sample[:position] in scene_ids and position + 1 < len(sample):
                grouped.setdefault(sample[:position], []).append(sample[position + 1 :])
                break
        else:
            raise ValueError(
                f"{source}: sample {sample!r} is not '<scene_id>_<image_id>' for any scene folder"
            )
    return grouped


def frame_row(scene, frame) -> dict:
    """The `frames` row of one frame of a `fit3d_hf.scene.Scene` (shared with the `scenes` builder)."""
    camera = frame.camera

    def path(value):
        return None if value is None else str(value)

    return {
        "scene_id": scene.scene_id,
        "image_id": frame.image_id,
        "image": str(frame.image_path),
        "mask": path(frame.mask_path),
        "depth": path(frame.depth_path),
        "label": path(frame.label_path),
        "normals": path(frame.normal_path),
        # nested lists: the same Python values whether the rows come from Arrow or a stream
        "K": camera.K.tolist(),
        "world_to_camera": camera.world_to_camera.tolist(),
        "width": camera.width,
        "height": camera.height,
        "is_test": frame.image_id in scene.test_image_ids,
    }


class ScanNetPP(datasets.GeneratorBasedBuilder):
    """Frames, poses and sparse points of preprocessed ScanNet++ scenes (see the module docstring)."""

    VERSION = datasets.Version("1.1.0")  # 1.1: the normals column
    BUILDER_CONFIG_CLASS = ScanNetPPConfig
    BUILDER_CONFIGS = [
        ScanNetPPConfig(name="frames", version=VERSION, description="one row per posed frame"),
        ScanNetPPConfig(name="points", version=VERSION, description="one row per scene: its sparse points"),
    ]
    DEFAULT_CONFIG_NAME = "frames"

    def __init__(self, *args, **kwargs):
        if kwargs.get("hash") is None and kwargs.get("data_dir") is not None:
            kwargs["hash"] = data_fingerprint(kwargs["data_dir"], kwargs.get("scenes_dirname", "scenes"))
        super().__init__(*args, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        features = POINT_FEATURES if self.config.name == "points" else FRAME_FEATURES
        return datasets.DatasetInfo(description=__doc__.split("\n")[0], features=features)

    def _root(self) -> Path:
        if self.config.data_dir is None:
            raise ValueError("ScanNetPP needs data_dir=<root holding scenes/ and metadata/>")
        root = Path(self.config.data_dir)
        if not (root / self.config.scenes_dirname).is_dir():
            raise FileNotFoundError(f"{root} has no {self.config.scenes_dirname}/ folder of scenes")
        return root

    def _split_generators(self, dl_manager) -> list[datasets.SplitGenerator]:
        root = self._root()
        scenes_dir = root / self.config.scenes_dirname
        scene_ids = {path.name for path in scenes_dir.iterdir() if path.is_dir()}
        generators = []
        for split in self.config.splits:
            split_file = root / "metadata" / f"{split}_samples.txt"
            if not split_file.is_file():
                logger.info("no %s: skipping the %s split", split_file, split)
                continue
            grouped = group_samples(read_scannetpp_split(root, split), scene_ids, str(split_file))
            ordered = sorted(grouped)
            generators.append(
                datasets.SplitGenerator(
                    name=split,
                    gen_kwargs={
                        "scene_ids": ordered,
                        "image_ids": [sorted(grouped[scene_id]) for scene_id in ordered],
                        "split_file": str(split_file),
                    },
                )
            )
        if not generators:
            raise FileNotFoundError(
                f"{root / 'metadata'} holds none of "
                f"{', '.join(f'{split}_samples.txt' for split in self.config.splits)}"
            )
        return generators

    def _generate_examples(self, scene_ids: list[str], image_ids: list[list[str]], split_file: str):
        scenes_dir = self._root() / self.config.scenes_dirname
        # Keys (scene position in this job's sorted scene list, frame position in its sorted image ids) are
        # deterministic; the scene index is the "original shard", as in datasets' own builders.
        for scene_index, (scene_id, wanted) in enumerate(zip(scene_ids, image_ids, strict=True)):
            scene = read_scannetpp_scene(scenes_dir / scene_id)
            if self.config.name == "points":
                yield (
                    datasets.builder.Key(scene_index, 0),
                    {
                        "scene_id": scene_id,
                        "xyz": scene.points.astype(np.float32),
                        "rgb": scene.point_colors,
                    },
                )
                continue
            frames = {frame.image_id: frame for frame in scene.frames}
            missing = [image_id for image_id in wanted if image_id not in frames]
            if missing:
                raise ValueError(
                    f"{split_file} lists {len(missing)} images of scene {scene_id} that its "
                    f"transforms_train.json does not, e.g. {missing[:3]}"
                )
            for frame_index, image_id in enumerate(wanted):
                yield datasets.builder.Key(scene_index, frame_index), frame_row(scene, frames[image_id])


_README = """---
configs:
- config_name: {config}
  data_files:
{data_files}
---
# fit3d-hf scenes ({config})

Exported by `fit3d export-dataset` (fit3d-hf) from `{source}`. The images are embedded in the Parquet
shards, so the files stand alone. Load them with `datasets.load_dataset("<this folder>")` or
`load_dataset("parquet", data_files={{"train": "data/train-*.parquet"}})`.

{columns}
"""


# ScanNet++'s "val" is exported as "validation": datasets infers that name from files named val-*, so the split
# gets the same name whether it is loaded through the README's configs, a data_dir or a glob of the files.
EXPORTED_SPLIT_NAMES = {"val": "validation"}


def export_parquet(
    data_dir: Path | str,
    output_dir: Path | str,
    config_name: str = "frames",
    *,
    max_shard_size: str | int = "500MB",
    writer_batch_size: int | None = None,
    overwrite: bool = False,
    holdout_every: int = 0,
) -> dict[str, list[Path]]:
    """Writes one config of the dataset as self-contained Parquet shards, images embedded as bytes.

    Layout (the Hub's): `<output_dir>/data/<split>-00000-of-0000N.parquet` plus a `README.md` whose
    `configs` header lets `load_dataset(output_dir)` find the splits. The "val" split is written as "validation"
    (`EXPORTED_SPLIT_NAMES`), the name `datasets` gives it however the files are loaded. Everything is built in a temporary
    folder beside `output_dir` and renamed into place at the end.

    Args:
        data_dir: a dataset root holding `scenes/` and `metadata/<split>_samples.txt` (this builder), or any scene
            spec (the `scenes` builder: own captures, folders of scenes, list files, comma-separated lists).
        output_dir: folder to create.
        config_name: "frames" or "points".
        max_shard_size: shard size limit ("500MB", or bytes).
        writer_batch_size: rows per Parquet row group (datasets' default when None).
        overwrite: replace an existing non-empty `output_dir`.
        holdout_every: scene specs: `val` holds every K-th view of each scene, as Stage I held them out.

    Returns:
        split -> its shard files.
    """
    from dataset_builders.scenes import make_frames_builder

    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise UsageError(f"{output_dir} already exists and is not empty; pass overwrite=True (--overwrite)")
    if config_name not in ("frames", "points"):
        raise UsageError(f"unknown config {config_name!r}; expected 'frames' or 'points'")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        builder = make_frames_builder(
            data_dir, config_name, holdout_every=holdout_every, cache_dir=staging / "cache",
            writer_batch_size=writer_batch_size,
        )  # fmt: skip
        build_dir = staging / "build"
        # The builder's Parquet writer embeds the image files' bytes (datasets.table.embed_table_storage).
        builder.download_and_prepare(
            output_dir=str(build_dir), file_format="parquet", max_shard_size=max_shard_size
        )
        export = staging / "export"
        (export / "data").mkdir(parents=True)
        shards: dict[str, list[Path]] = {}
        for split in builder.info.splits:
            prefix = f"{builder.dataset_name}-{split}"
            found = sorted(build_dir.glob(f"{prefix}.parquet")) + sorted(
                build_dir.glob(f"{prefix}-*-of-*.parquet")
            )
            name = EXPORTED_SPLIT_NAMES.get(split, split)
            shards[name] = [
                export / "data" / f"{name}-{index:05d}-of-{len(found):05d}.parquet"
                for index in range(len(found))
            ]
            for source, target in zip(found, shards[name], strict=True):
                os.replace(source, target)
        data_files = "\n".join(f"  - split: {split}\n    path: data/{split}-*.parquet" for split in shards)
        columns = "\n".join(f"- `{name}`: `{feature}`" for name, feature in builder.info.features.items())
        readme = _README.format(
            config=config_name,
            data_files=data_files,
            source=data_dir if "," in str(data_dir) else Path(data_dir).resolve(),
            columns=columns,
        )
        (export / "README.md").write_text(readme)
        replace_folder(
            export, output_dir
        )  # overwrite: the old folder moved aside, the new one in, the old deleted
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {split: [output_dir / "data" / path.name for path in paths] for split, paths in shards.items()}
