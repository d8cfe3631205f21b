"""Scene readers: ScanNet++ preprocessed scenes, nerfstudio / instant-ngp `transforms.json`, COLMAP text.

`read_scene(path)` tells the layout from the files it finds (override it with `layout=`):

- ``"scannetpp"``: a folder holding `transforms_train.json` *and* `points3D.txt` (FiT3D's preprocessed
  ScanNet++ scene: `images/`, `masks/`, optional `depth/` and `labels/`). Its poses live in ScanNet++'s
  permuted nerfstudio world frame and are mapped back to the COLMAP frame of `points3D.txt`.
- ``"nerfstudio"``: any other `transforms*.json` (nerfstudio, instant-ngp, Blender). Poses are OpenGL
  camera-to-world in the file's own world frame; points come from `ply_file_path` if given.
- ``"colmap"``: a COLMAP text model (`cameras.txt`, `images.txt`, `points3D.txt`), directly in the folder or
  in `sparse/0` / `sparse`; images in an `images/` folder beside it or above it, or given by `images_dir=`.

Every reader validates the whole scene (files exist and are readable, image sizes agree with the
intrinsics, poses are rigid, camera models are known) before it writes anything. Frames with lens
distortion are then undistorted with OpenCV, once, into a pinhole camera of the same image size, with the
principal point at the image centre (as ScanNet++'s and FiT3D's preprocessing do). The undistorted files go
to a cache folder and are reused while their sources are unchanged: `<scene>/.fit3d_undistorted/` when the
scene folder is writable, else the user cache, or the folder `FIT3D_UNDISTORT_CACHE` names (see
`fit3d_hf.scene.undistort.undistort_cache_dir`).

Per-frame extras (validity masks, depth, semantic labels, surface normals) are PNGs in `masks/`, `depth/`,
`labels/`, `normals/` beside `images/`, named like the image with a `.png` suffix (ScanNet++ and COLMAP
layouts), or named per frame in a transforms file (`mask_path`, `depth_file_path`, and fit3d-hf's own
`label_path` and `normal_path`).

The readers live one format a module (`scannetpp_layout`, `transforms_json`, `colmap_text`, `ply`) over
`readers_common`; this module detects the layout and dispatches, and re-exports the readers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fit3d_hf.errors import MissingInputError, UsageError
from fit3d_hf.scene.colmap_text import read_colmap_points, read_colmap_scene
from fit3d_hf.scene.ply import read_ply_points
from fit3d_hf.scene.scannetpp_layout import SCANNETPP_SPLITS, read_scannetpp_scene, read_scannetpp_split
from fit3d_hf.scene.scene import Scene
from fit3d_hf.scene.transforms_json import read_nerfstudio_scene
from fit3d_hf.scene.undistort import UNDISTORTED_DIRNAME

__all__ = [
    "LAYOUTS",
    "SCANNETPP_SPLITS",
    "UNDISTORTED_DIRNAME",
    "detect_layout",
    "read_colmap_points",
    "read_colmap_scene",
    "read_nerfstudio_scene",
    "read_ply_points",
    "read_scannetpp_scene",
    "read_scannetpp_split",
    "read_scene",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("scannetpp", "nerfstudio", "colmap")


def detect_layout(path: Path | str, layout: str | None = None) -> tuple[str, Path]:
    """Finds the layout of a scene and the file or folder its reader takes.

    Args:
        path: a scene folder, a `transforms*.json`, or a COLMAP model folder / file.
        layout: force one of `LAYOUTS` instead of guessing.

    Returns:
        `(layout, target)`: the scene folder for "scannetpp", the json file for "nerfstudio", the model
        folder for "colmap".

    Raises:
        FileNotFoundError: `path` does not exist or holds no known layout.
        ValueError: `layout` is not one of `LAYOUTS`.
    """
    path = Path(path)
    if layout is not None and layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if not path.exists():
        raise MissingInputError(f"scene path {path} does not exist")
    folder = path if path.is_dir() else path.parent

    if layout == "scannetpp":
        return layout, folder
    if layout == "colmap":
        return layout, _find_colmap_model(folder)
    if layout == "nerfstudio":
        if path.is_file():
            return layout, path
        for name in ("transforms.json", "transforms_train.json"):
            if (folder / name).is_file():
                return layout, folder / name
        raise MissingInputError(f"{folder} holds no transforms.json or transforms_train.json")

    if path.is_file():
        if path.name == "transforms_train.json" and (folder / "points3D.txt").is_file():
            return "scannetpp", folder
        if path.suffix == ".json":
            return "nerfstudio", path
        if path.name in ("cameras.txt", "images.txt", "points3D.txt"):
            return "colmap", folder
        raise MissingInputError(f"{path} is not a transforms json or a COLMAP text file")
    if (folder / "transforms_train.json").is_file() and (folder / "points3D.txt").is_file():
        return "scannetpp", folder
    if (folder / "transforms.json").is_file():
        return "nerfstudio", folder / "transforms.json"
    try:
        return "colmap", _find_colmap_model(folder)
    except FileNotFoundError:
        pass
    if (folder / "transforms_train.json").is_file():
        return "nerfstudio", folder / "transforms_train.json"
    raise MissingInputError(
        f"{folder} holds no known scene layout: expected transforms_train.json + points3D.txt (ScanNet++), "
        "transforms.json (nerfstudio / instant-ngp) or cameras.txt + images.txt (COLMAP text, also in "
        "sparse/0 or sparse)"
    )


def _find_colmap_model(folder: Path) -> Path:
    for candidate in (folder, folder / "sparse" / "0", folder / "sparse"):
        if (candidate / "cameras.txt").is_file() and (candidate / "images.txt").is_file():
            return candidate
    for candidate in (folder, folder / "sparse" / "0", folder / "sparse"):
        if (candidate / "cameras.bin").is_file():
            raise MissingInputError(
                f"{candidate} holds a binary COLMAP model; only the text format is read. Convert it with "
                f"`colmap model_converter --input_path {candidate} --output_path {candidate} "
                "--output_type TXT`"
            )
    raise MissingInputError(
        f"no COLMAP text model (cameras.txt + images.txt) in {folder}, sparse/0 or sparse"
    )


def read_scene(
    path: Path | str,
    *,
    layout: str | None = None,
    cache_dir: Path | str | None = None,
    images_dir: Path | str | None = None,
) -> Scene:
    """Reads a scene in any supported layout (see the module docstring).

    Args:
        path: scene folder, `transforms*.json`, or COLMAP model folder.
        layout: force "scannetpp", "nerfstudio" or "colmap" instead of detecting it.
        cache_dir: where undistorted images go (default: see `undistort_cache_dir`).
        images_dir: COLMAP only: the folder the `images.txt` names are relative to.

    Returns:
        The `Scene`, with pinhole OpenCV cameras.
    """
    layout, target = detect_layout(path, layout)
    logger.debug("reading %s as a %s scene", target, layout)
    if layout == "scannetpp":
        return read_scannetpp_scene(target, cache_dir=cache_dir)
    if layout == "nerfstudio":
        return read_nerfstudio_scene(target, cache_dir=cache_dir)
    return read_colmap_scene(target, images_dir=images_dir, cache_dir=cache_dir)
