"""`datasets` builder for any scenes fit3d-hf reads: own captures (nerfstudio / instant-ngp `transforms.json`,
COLMAP text models), ScanNet++ scene folders, or a mix, named by a scene spec.

The spec is the one every stage takes (`fit3d_hf.scene.specs`): a scene, a folder of scenes, a text file
listing scenes, or a comma-separated list of these. The configs and columns are the `scannetpp` builder's:

- ``"frames"``: one row per frame (`scene_id`, `image_id`, `image`, `mask`, `depth`, `label`, `normals`, `K`,
  `world_to_camera`, `width`, `height`, `is_test`), cameras undistorted to pinhole by the readers;
- ``"points"``: one row per scene with frames in the split: `scene_id`, `xyz`, `rgb`.

Splits: with `holdout_every` K > 0, `val` holds the views Stage I held out with `--holdout_every K` (view
indices K-1, 2K-1, ... of each scene) and `train` the others; with K = 0 (the default), `val` holds the test
frames the scenes' own files list (ScanNet++ `test_frames`, nerfstudio `test_filenames`). An empty split is
left out. Scene ids (the readers' folder names) must be unique across the spec.

    builder = Scenes(cache_dir=cache, config_name="frames", scenes="captures/kitchen,captures/office", holdout_every=8)
    builder.download_and_prepare()
    train = builder.as_dataset(split="train")

`make_frames_builder` picks this builder or, for a ScanNet++ dataset root with `metadata/<split>_samples.txt`
sample lists, the `scannetpp` builder, which splits by those lists.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from dataset_builders.scannetpp.scannetpp import FRAME_FEATURES, POINT_FEATURES, ScanNetPP, frame_row
from fit3d_hf.errors import InputError, MissingInputError
from fit3d_hf.scene import read_scene, resolve_scene_list, split_views
from fit3d_hf.scene.readers import detect_layout
from fit3d_hf.scene.undistort import AUX_DIRS, UNDISTORT_CACHE_ENV

__all__ = [
    "SPLITS",
    "Scenes",
    "ScenesConfig",
    "is_sample_list_root",
    "load_scenes",
    "make_frames_builder",
    "scenes_fingerprint",
]

logger = datasets.logging.get_logger(__name__)

SPLITS = ("train", "val")


@dataclass
class ScenesConfig(datasets.BuilderConfig):
    """Config of the `Scenes` builder.

    Args:
        scenes: the scene spec (see the module docstring).
        holdout_every: K > 0: `val` = Stage I's held-out views (`--holdout_every K`); 0: the scenes' test frames.
    """

    scenes: str | None = None
    holdout_every: int = 0


def scenes_fingerprint(spec: str) -> str:
    """A short hash of what the builder reads for a spec: the resolved scene paths, the size and modification
    time of each scene's layout files, and the file names of its image folders. The builder puts it in its
    cache path, so that editing a scene rebuilds the dataset instead of reusing a stale cache."""
    digest = hashlib.sha256()
    # The rows hold paths into the undistortion cache, whose place this variable can move.
    digest.update(f"{os.environ.get(UNDISTORT_CACHE_ENV, '')}\n".encode())
    for path in resolve_scene_list(spec):
        layout, target = detect_layout(path)
        digest.update(f"{Path(target).resolve()}|{layout}\n".encode())
        folder = target if target.is_dir() else target.parent
        files = [target] if target.is_file() else [target / name for name in sorted(os.listdir(target))]
        for file in files:
            if file.is_file() and file.suffix in (".json", ".txt", ".ply"):
                stat = file.stat()
                digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        for base in {folder, folder.parent, folder.parent.parent}:  # COLMAP models may sit in sparse/0
            for sub in ("images", *AUX_DIRS.values()):
                if (base / sub).is_dir():
                    digest.update(f"{base / sub}:{','.join(sorted(os.listdir(base / sub)))}\n".encode())
    return digest.hexdigest()[:16]


class Scenes(datasets.GeneratorBasedBuilder):
    """Frames, poses and sparse points of any scenes a scene spec names (see the module docstring)."""

    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIG_CLASS = ScenesConfig
    BUILDER_CONFIGS = [
        ScenesConfig(name="frames", version=VERSION, description="one row per posed frame"),
        ScenesConfig(name="points", version=VERSION, description="one row per scene: its sparse points"),
    ]
    DEFAULT_CONFIG_NAME = "frames"

    def __init__(self, *args, **kwargs):
        if kwargs.get("hash") is None and kwargs.get("scenes") is not None:
            kwargs["hash"] = scenes_fingerprint(kwargs["scenes"])
        super().__init__(*args, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        features = POINT_FEATURES if self.config.name == "points" else FRAME_FEATURES
        return datasets.DatasetInfo(description=__doc__.split("\n")[0], features=features)

    def _split_generators(self, dl_manager) -> list[datasets.SplitGenerator]:
        if not self.config.scenes:
            raise MissingInputError("the Scenes builder needs scenes=<scene spec>")
        paths = resolve_scene_list(self.config.scenes)
        wanted: dict[str, list[tuple[str, list[str]]]] = {split: [] for split in SPLITS}
        sources: dict[str, Path] = {}
        for path in paths:
            scene = read_scene(
                path
            )  # validates the whole scene (and undistorts it, once) before anything is written
            if scene.scene_id in sources:
                raise InputError(
                    f"{path} and {sources[scene.scene_id]} are both scene {scene.scene_id!r} (the readers name a "
                    "scene after its folder); rename one of the folders"
                )
            sources[scene.scene_id] = path
            for split, image_ids in split_views(
                scene.image_ids, scene.test_image_ids, self.config.holdout_every
            ).items():
                if image_ids:
                    wanted[split].append((str(path), image_ids))
        generators = [
            datasets.SplitGenerator(name=split, gen_kwargs={"scenes": scenes})
            for split, scenes in wanted.items()
            if scenes
        ]
        if not generators:
            raise InputError(f"the scenes of {self.config.scenes!r} hold no frames")
        return generators

    def _generate_examples(self, scenes: list[tuple[str, list[str]]]):
        # Keys (scene position in the spec, frame position in the scene's split) are deterministic.
        for scene_index, (path, image_ids) in enumerate(scenes):
            scene = read_scene(path)
            if self.config.name == "points":
                row = {
                    "scene_id": scene.scene_id,
                    "xyz": scene.points.astype(np.float32),
                    "rgb": scene.point_colors,
                }
                yield datasets.builder.Key(scene_index, 0), row
                continue
            frames = {frame.image_id: frame for frame in scene.frames}
            for frame_index, image_id in enumerate(image_ids):
                yield datasets.builder.Key(scene_index, frame_index), frame_row(scene, frames[image_id])


def is_sample_list_root(source: str | os.PathLike) -> bool:
    """Whether `source` is a ScanNet++ dataset root split by sample lists (`scenes/` + `metadata/*_samples.txt`)."""
    path = Path(source)
    return (
        "," not in str(source)
        and (path / "scenes").is_dir()
        and any((path / "metadata").glob("*_samples.txt"))
    )


def make_frames_builder(
    source: str | os.PathLike,
    config_name: str = "frames",
    *,
    holdout_every: int = 0,
    cache_dir: str | os.PathLike | None = None,
    **kwargs,
) -> datasets.GeneratorBasedBuilder:
    """The builder for a frames source: `ScanNetPP` for a dataset root with sample lists (its own splits), else
    `Scenes` for any scene spec.

    Args:
        source: a ScanNet++ dataset root, or a scene spec.
        config_name: "frames" or "points".
        holdout_every: `Scenes` only: split off Stage I's held-out views (see the module docstring).
        cache_dir: the datasets cache (default: HF_DATASETS_CACHE).
        **kwargs: passed to the builder (e.g. `writer_batch_size`).
    """
    cache_dir = None if cache_dir is None else str(cache_dir)
    if is_sample_list_root(source):
        if holdout_every:
            logger.warning("%s is split by its metadata/*_samples.txt: --holdout_every is not used", source)
        return ScanNetPP(cache_dir=cache_dir, config_name=config_name, data_dir=str(source), **kwargs)
    return Scenes(
        cache_dir=cache_dir,
        config_name=config_name,
        scenes=str(source),
        holdout_every=holdout_every,
        **kwargs,
    )


def load_scenes(
    spec: str,
    config_name: str = "frames",
    split: str | None = None,
    *,
    holdout_every: int = 0,
    cache_dir: str | os.PathLike | None = None,
    streaming: bool = False,
):
    """Builds (or reuses from the cache) the dataset of a scene spec and returns it.

    Args:
        spec: the scenes (see the module docstring), or a ScanNet++ dataset root with sample lists.
        config_name: "frames" or "points".
        split: "train", "val", or None for a `DatasetDict` of every split there is.
        holdout_every: K > 0: `val` = Stage I's held-out views; 0: the scenes' own test frames.
        cache_dir: the datasets cache (default: HF_DATASETS_CACHE).
        streaming: return an `IterableDataset` read straight from the scene files (nothing is prepared).
    """
    builder = make_frames_builder(spec, config_name, holdout_every=holdout_every, cache_dir=cache_dir)
    if streaming:
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare()
    return builder.as_dataset(split=split)
