"""FiT3D's preprocessed ScanNet++ layout: one scene (`read_scannetpp_scene`) and the sample lists of
the dataset's splits (`read_scannetpp_split`)."""

from __future__ import annotations

from pathlib import Path

from fit3d_hf.errors import CorruptFileError, InputError, MissingInputError
from fit3d_hf.scene.camera import scannetpp_nerfstudio_to_colmap
from fit3d_hf.scene.colmap_text import read_colmap_points
from fit3d_hf.scene.readers_common import _aux_path, _make_scene, _MissingFiles, _pose, _unique_image_ids
from fit3d_hf.scene.scene import Scene
from fit3d_hf.scene.transforms_json import (
    _frame_entries,
    _load_json,
    _relative_path,
    _transform_matrix,
    _transforms_intrinsics,
)
from fit3d_hf.scene.undistort import RawFrame

__all__ = ["SCANNETPP_SPLITS", "read_scannetpp_scene", "read_scannetpp_split"]

SCANNETPP_SPLITS = ("train", "val")


def _scannetpp_frame_files(
    scene_dir: Path, frame: dict, where: str, missing: _MissingFiles
) -> tuple[Path | None, Path | None, bool]:
    """A frame's image and listed mask (`None` where missing, collected in `missing`), and whether it lists
    a mask. ScanNet++ names them relative to `images/` and `masks/`; paths relative to the scene folder work
    too."""
    images_dir = scene_dir / "images"
    relative = frame["file_path"]
    base = (
        scene_dir
        if (scene_dir / relative).is_file() and not (images_dir / relative).is_file()
        else images_dir
    )
    image_path = missing.resolve(base, relative, where, "image")
    mask_path = None
    relative_mask = _relative_path(frame, "mask_path", where)
    if relative_mask:
        mask_base = scene_dir / "masks"
        if not (mask_base / relative_mask).is_file() and (scene_dir / relative_mask).is_file():
            mask_base = scene_dir
        mask_path = missing.resolve(mask_base, relative_mask, where, "mask")
    return image_path, mask_path, bool(relative_mask)


def read_scannetpp_scene(scene_dir: Path | str, *, cache_dir: Path | str | None = None) -> Scene:
    """Reads a preprocessed ScanNet++ scene (FiT3D layout).

    The folder holds `transforms_train.json` (undistorted nerfstudio file of ScanNet++'s toolkit: `frames` +
    `test_frames`, `file_path` relative to `images/`, optional `mask_path` relative to `masks/`),
    `points3D.txt` (COLMAP sparse points, required) and `images/`, `masks/`, optional `depth/`, `labels/`.

    Args:
        scene_dir: the scene folder; its name is the scene id.
        cache_dir: where distorted frames (if any) are undistorted to.

    Returns:
        The scene, cameras and points in the COLMAP world frame of `points3D.txt`.
    """
    scene_dir = Path(scene_dir)
    json_path = scene_dir / "transforms_train.json"
    points_path = scene_dir / "points3D.txt"
    if not points_path.is_file():
        raise MissingInputError(
            f"ScanNet++ scene {scene_dir} has no points3D.txt (its sparse points are required)"
        )
    meta = _load_json(json_path)
    entries, test_paths = _frame_entries(meta, json_path)
    images_dir = scene_dir / "images"
    relative_paths = [frame["file_path"] for frame, _ in entries]
    image_ids = _unique_image_ids(relative_paths)
    raw_frames, test_ids = [], set()
    missing = _MissingFiles(json_path, len(entries))
    for (frame, where), image_id in zip(entries, image_ids, strict=True):
        relative = frame["file_path"]
        image_path, mask_path, lists_mask = _scannetpp_frame_files(scene_dir, frame, where, missing)
        if image_path is None or (lists_mask and mask_path is None):
            continue
        K, width, height, distortion = _transforms_intrinsics(meta, frame, where, image_path)
        if not lists_mask:
            mask_path = _aux_path(images_dir, Path(relative).name, "mask")
        raw_frames.append(
            RawFrame(
                image_id,
                image_path,
                K,
                _pose(scannetpp_nerfstudio_to_colmap, _transform_matrix(frame, where), where),
                width,
                height,
                distortion,
                where,
                mask_path=mask_path,
                depth_path=_aux_path(images_dir, Path(relative).name, "depth"),
                label_path=_aux_path(images_dir, Path(relative).name, "label"),
                normal_path=_aux_path(images_dir, Path(relative).name, "normal"),
            )
        )
        if relative in test_paths:
            test_ids.add(image_id)
    missing.check()
    points = read_colmap_points(points_path)
    if len(points[0]) == 0:
        raise InputError(f"{points_path} holds no points; a ScanNet++ scene needs its sparse points")
    return _make_scene(scene_dir.name, scene_dir, raw_frames, points, test_ids, cache_dir)


def read_scannetpp_split(root: Path | str, split: str) -> list[str]:
    """Sample ids of a split: the lines of `<root>/metadata/<split>_samples.txt`.

    Each id is `<scene_id>_<image_stem>` (e.g. `0a5c013435_DSC00123`), as FiT3D's `gen_sample_list.py`
    writes them.

    Args:
        root: dataset root holding `scenes/` and `metadata/`.
        split: "train" or "val" (any name with a `<split>_samples.txt` file works).
    """
    path = Path(root) / "metadata" / f"{split}_samples.txt"
    if not path.is_file():
        raise MissingInputError(f"split file {path} does not exist (expected one sample id per line)")
    try:
        samples = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise CorruptFileError(f"{path} is not a text file of sample ids ({error})") from error
    if len(set(samples)) != len(samples):
        raise InputError(f"{path} lists some samples more than once")
    return samples
