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
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np

from fit3d_hf.errors import CorruptFileError, InputError, MissingInputError, UsageError
from fit3d_hf.scene.camera import (
    Camera,
    intrinsics_matrix,
    opengl_camera_to_world_to_opencv,
    qvec_to_rotmat,
    scannetpp_nerfstudio_to_colmap,
)
from fit3d_hf.scene.ply import read_ply_points
from fit3d_hf.scene.scene import Frame, Scene
from fit3d_hf.scene.undistort import (
    AUX_DIRS,
    UNDISTORTED_DIRNAME,
    Distortion,
    RawFrame,
    undistort_cache_dir,
    undistort_frames,
)

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
SCANNETPP_SPLITS = ("train", "val")

# Extensions tried when a nerfstudio/Blender `file_path` has none (Blender's transforms omit it).
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".JPG", ".PNG", ".JPEG")


# --------------------------------------------------------------------------------------------------------
# Layout detection


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


# --------------------------------------------------------------------------------------------------------
# Frames before validation


def _image_size(path: Path, where: str, what: str = "image") -> tuple[int, int]:
    import struct

    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise MissingInputError(f"{where}: {what} {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError) as error:
        raise CorruptFileError(f"{where}: {what} {path} cannot be read as an image: {error}") from error


def _validate(raw_frames: list[RawFrame]) -> list[Camera]:
    """Checks every file and pose of the scene; returns the (still distorted) cameras."""
    cameras = []
    for raw in raw_frames:
        width, height = _image_size(raw.image_path, raw.where)
        if (width, height) != (raw.width, raw.height):
            raise InputError(
                f"{raw.where}: image {raw.image_path} is {width}x{height} but the intrinsics say "
                f"{raw.width}x{raw.height} (w x h)"
            )
        for kind in AUX_DIRS:
            aux_path = getattr(raw, f"{kind}_path")
            if aux_path is not None:
                aux_size = _image_size(aux_path, raw.where, kind)
                if aux_size != (width, height):
                    raise InputError(
                        f"{raw.where}: {kind} {aux_path} is {aux_size[0]}x{aux_size[1]} but its image "
                        f"{raw.image_path} is {width}x{height}"
                    )
        try:
            cameras.append(Camera(raw.K, raw.world_to_camera, raw.width, raw.height))
        except ValueError as error:
            raise InputError(f"{raw.where}: invalid camera: {error}") from error
    return cameras


def _make_scene(
    scene_id: str,
    root: Path,
    raw_frames: list[RawFrame],
    points: tuple[np.ndarray, np.ndarray],
    test_image_ids: set[str],
    cache_dir: Path | str | None,
) -> Scene:
    cameras = _validate(raw_frames)
    distorted = [
        index
        for index, raw in enumerate(raw_frames)
        if raw.distortion is not None and not raw.distortion.is_identity
    ]
    frames = [
        Frame(raw.image_id, raw.image_path, camera, raw.mask_path, raw.depth_path, raw.label_path, raw.normal_path)
        for raw, camera in zip(raw_frames, cameras, strict=True)
    ]
    if distorted:
        cache = undistort_cache_dir(root, cache_dir)
        undistorted = undistort_frames(
            [raw_frames[i] for i in distorted], [cameras[i] for i in distorted], cache
        )
        for index, frame in zip(distorted, undistorted, strict=True):
            frames[index] = frame
    return Scene(scene_id, root, frames, points[0], points[1], test_image_ids)


def _unique_image_ids(relative_paths: list[str]) -> list[str]:
    """Image stems when they are unique (ScanNet++ sample ids use them), else the paths without suffix."""
    stems = [Path(p).stem for p in relative_paths]
    if len(set(stems)) == len(stems):
        return stems
    return [Path(os.path.normpath(p)).with_suffix("").as_posix() for p in relative_paths]


def _aux_path(images_dir: Path, relative_image: str, kind: str) -> Path | None:
    """`<images_dir>/../<masks|depth|labels>/<stem>.png` (or `<name>.png`, COLMAP's mask naming), if any."""
    folder = images_dir.parent / AUX_DIRS[kind]
    for name in (Path(relative_image).with_suffix(".png"), Path(relative_image + ".png")):
        if (folder / name).is_file():
            return folder / name
    return None


# --------------------------------------------------------------------------------------------------------
# nerfstudio / instant-ngp / ScanNet++ transforms files

_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "k5", "k6", "p1", "p2")
_TRANSFORMS_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV", "OPENCV_FISHEYE")


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingInputError(f"transforms file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise CorruptFileError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list):
        raise InputError(f"{path} has no 'frames' list; it is not a nerfstudio / instant-ngp transforms file")
    return data


def _number(value, key: str, where: str) -> float:
    if isinstance(value, str):  # "3.5" would pass float(); a transforms file stores numbers as numbers
        raise InputError(f"{where}: '{key}' must be a number, got the string {value[:40]!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError) as error:
        raise InputError(f"{where}: '{key}' must be a number, got {_short(value)}") from error
    if not math.isfinite(number):
        raise InputError(f"{where}: '{key}' is {number}")
    return number


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _relative_path(frame: dict, key: str, where: str) -> str | None:
    """A file path key of a frame (or of the file's top level): a non-empty string, or None when absent."""
    value = frame.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InputError(f"{where}: '{key}' must be a file path string, got {_short(value)}")
    if "\0" in value:
        raise InputError(f"{where}: '{key}' holds a NUL character")
    return value


def _transforms_intrinsics(
    meta: dict, frame: dict, where: str, image_path: Path
) -> tuple[np.ndarray, int, int, Distortion | None]:
    """K, size and distortion of one frame: per-frame keys override the file's top-level ones."""

    def get(key):
        return frame.get(key, meta.get(key))

    if get("w") is not None and get("h") is not None:
        width, height = int(_number(get("w"), "w", where)), int(_number(get("h"), "h", where))
    else:  # instant-ngp / Blender files may omit the size: take it from the image
        width, height = _image_size(image_path, where)
    if get("fl_x") is not None:
        fx = _number(get("fl_x"), "fl_x", where)
    elif get("camera_angle_x") is not None:
        fx = 0.5 * width / math.tan(0.5 * _number(get("camera_angle_x"), "camera_angle_x", where))
    else:
        raise InputError(f"{where}: no focal length (fl_x or camera_angle_x)")
    if get("fl_y") is not None:
        fy = _number(get("fl_y"), "fl_y", where)
    elif get("camera_angle_y") is not None:
        fy = 0.5 * height / math.tan(0.5 * _number(get("camera_angle_y"), "camera_angle_y", where))
    else:
        fy = fx
    cx = _number(get("cx"), "cx", where) if get("cx") is not None else width / 2.0
    cy = _number(get("cy"), "cy", where) if get("cy") is not None else height / 2.0
    coefficients = {key: _number(get(key) or 0.0, key, where) for key in _DISTORTION_KEYS}

    model = get("camera_model")
    if model is None:  # instant-ngp: distortion keys and an `is_fisheye` flag, no model name
        model = "OPENCV_FISHEYE" if get("is_fisheye") else "OPENCV"
    model = str(model).upper()
    if model not in _TRANSFORMS_MODELS:
        raise InputError(
            f"{where}: unknown camera_model {model!r}; supported: {', '.join(_TRANSFORMS_MODELS)}"
        )
    c = coefficients
    if model == "OPENCV_FISHEYE":
        distortion = Distortion("fisheye", (c["k1"], c["k2"], c["k3"], c["k4"]))
    else:
        # nerfstudio keeps k1..k4 + p1, p2 whatever the model (and applies them to PINHOLE too); k4..k6
        # follow OpenCV's rational model, which every file seen in practice leaves at zero.
        radial = (c["k1"], c["k2"], c["p1"], c["p2"], c["k3"])
        if c["k4"] or c["k5"] or c["k6"]:
            radial += (c["k4"], c["k5"], c["k6"])
        distortion = Distortion("radial", radial)
    return intrinsics_matrix(fx, fy, cx, cy), width, height, distortion


def _transform_matrix(frame: dict, where: str) -> np.ndarray:
    try:
        matrix = np.asarray(frame["transform_matrix"], dtype=np.float64)
    except KeyError as error:
        raise InputError(f"{where}: no 'transform_matrix'") from error
    except (TypeError, ValueError) as error:
        raise InputError(f"{where}: 'transform_matrix' is not a numeric matrix") from error
    if matrix.shape == (3, 4):
        matrix = np.vstack([matrix, [0.0, 0.0, 0.0, 1.0]])
    if matrix.shape != (4, 4):
        raise InputError(f"{where}: 'transform_matrix' must be 4x4 (or 3x4), got shape {matrix.shape}")
    return matrix


def _resolve_file(base: Path, relative: str, where: str, what: str, try_extensions: bool = False) -> Path:
    path = base / relative
    if path.is_file():
        return path
    if try_extensions and not path.suffix:
        for extension in _IMAGE_EXTENSIONS:
            if path.with_suffix(extension).is_file():
                return path.with_suffix(extension)
    raise MissingInputError(f"{where}: {what} {path} does not exist")


class _MissingFiles:
    """Resolves the files a scene's listing names, collecting those that do not exist, so that one error
    counts them all and names the first few (a scene copied without half its images should not take a run
    per missing file to find out)."""

    SHOWN = 5

    def __init__(self, listing: Path, num_frames: int):
        self.listing, self.num_frames = listing, num_frames
        self.missing: list[tuple[str, Path]] = []  # (message, path)

    def resolve(self, base: Path, relative: str, where: str, what: str, try_extensions: bool = False) -> Path | None:
        try:
            return _resolve_file(base, relative, where, what, try_extensions)
        except FileNotFoundError as error:
            self.missing.append((str(error), base / relative))
            return None

    def check(self) -> None:
        """Raises `MissingInputError` when any file was missing: its own message for one, else a count."""
        if len(self.missing) == 1:
            raise MissingInputError(self.missing[0][0])
        if self.missing:
            shown = ", ".join(str(path) for _, path in self.missing[: self.SHOWN])
            more = f" and {len(self.missing) - self.SHOWN} more" if len(self.missing) > self.SHOWN else ""
            raise MissingInputError(
                f"{self.listing}: {len(self.missing)} files it lists for its {self.num_frames} frames do not "
                f"exist: {shown}{more}"
            )


def _frame_entries(meta: dict, json_path: Path) -> tuple[list[tuple[dict, str]], set[str]]:
    """`frames` + `test_frames` (ScanNet++), deduplicated by file path (ScanNet++'s downscaling step left
    the test frames in `frames` too). Returns `(frame, where)` pairs and the test file paths."""
    entries, seen, test_paths = [], set(), set()
    for key in ("frames", "test_frames"):
        frames = meta.get(key) or []
        if not isinstance(frames, list):
            raise InputError(f"{json_path}: '{key}' must be a list")
        for index, frame in enumerate(frames):
            where = f"{json_path}, {key}[{index}]"
            if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str) or not frame["file_path"].strip():
                raise InputError(f"{where}: frame has no 'file_path' string")
            if "\0" in frame["file_path"]:
                raise InputError(f"{where}: 'file_path' holds a NUL character")
            file_path = frame["file_path"]
            if key == "test_frames":
                test_paths.add(file_path)
            if file_path in seen:
                continue
            seen.add(file_path)
            entries.append((frame, f"{where} ({file_path})"))
    if not entries:
        raise InputError(f"{json_path} lists no frames")
    return entries, test_paths


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
        # ScanNet++ names images relative to images/; accept paths relative to the scene folder too.
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
        if image_path is None or (relative_mask and mask_path is None):
            continue
        K, width, height, distortion = _transforms_intrinsics(meta, frame, where, image_path)
        if not relative_mask:
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


def _pose(convert, matrix: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(matrix).all():
        raise InputError(f"{where}: invalid camera: pose contains NaN or infinite values")
    try:
        return convert(matrix)
    except ValueError as error:
        raise InputError(f"{where}: invalid camera: {error}") from error


def read_nerfstudio_scene(transforms_path: Path | str, *, cache_dir: Path | str | None = None) -> Scene:
    """Reads a nerfstudio / instant-ngp / Blender `transforms.json`.

    Intrinsics come from the top level or each frame (`fl_x`/`fl_y` or `camera_angle_x`/`camera_angle_y`,
    `cx`, `cy`, `w`, `h`; size from the image when absent), `transform_matrix` is an OpenGL camera-to-world
    pose, file paths are relative to the json. OPENCV (k1, k2, p1, p2[, k3]) and OPENCV_FISHEYE (k1..k4)
    frames are undistorted. Test frames: `test_filenames` (nerfstudio) or `test_frames` (ScanNet++).
    Points come from `ply_file_path` if present, else the scene has none.

    Args:
        transforms_path: the json file; its folder name is the scene id.
        cache_dir: where distorted frames are undistorted to (default: see `undistort_cache_dir`).
    """
    json_path = Path(transforms_path)
    root = json_path.parent
    meta = _load_json(json_path)
    entries, test_paths = _frame_entries(meta, json_path)
    test_filenames = meta.get("test_filenames") or []
    if not isinstance(test_filenames, list) or not all(isinstance(name, str) for name in test_filenames):
        raise InputError(f"{json_path}: 'test_filenames' must be a list of file path strings")
    test_paths |= {os.path.normpath(name) for name in test_filenames}
    missing = _MissingFiles(json_path, len(entries))
    image_paths = [
        missing.resolve(root, frame["file_path"], where, "image", try_extensions=True) for frame, where in entries
    ]
    for frame, where in entries:
        for kind, key in (
            ("mask", "mask_path"), ("depth", "depth_file_path"), ("label", "label_path"), ("normal", "normal_path")
        ):  # fmt: skip
            relative = _relative_path(frame, key, where)
            if relative:
                missing.resolve(root, relative, where, kind)
    missing.check()
    relative_paths = [os.path.relpath(path, root) for path in image_paths]
    image_ids = _unique_image_ids(relative_paths)
    raw_frames, test_ids = [], set()
    for (frame, where), image_path, image_id in zip(entries, image_paths, image_ids, strict=True):
        K, width, height, distortion = _transforms_intrinsics(meta, frame, where, image_path)
        extras = {}
        for kind, key in (
            ("mask", "mask_path"), ("depth", "depth_file_path"), ("label", "label_path"), ("normal", "normal_path")
        ):  # fmt: skip
            relative = _relative_path(frame, key, where)
            if relative:
                extras[f"{kind}_path"] = _resolve_file(root, relative, where, kind)
        raw_frames.append(
            RawFrame(
                image_id,
                image_path,
                K,
                _pose(opengl_camera_to_world_to_opencv, _transform_matrix(frame, where), where),
                width,
                height,
                distortion,
                where,
                **extras,
            )
        )
        if frame["file_path"] in test_paths or os.path.normpath(frame["file_path"]) in test_paths:
            test_ids.add(image_id)
    ply_file = _relative_path(meta, "ply_file_path", str(json_path))
    if ply_file:
        ply_path = _resolve_file(root, ply_file, str(json_path), "point cloud (ply_file_path)")
        points = read_ply_points(ply_path)
    else:
        points = (np.zeros((0, 3)), np.zeros((0, 3), dtype=np.uint8))
    return _make_scene(root.name, root, raw_frames, points, test_ids, cache_dir)


# --------------------------------------------------------------------------------------------------------
# COLMAP text models

# COLMAP camera model -> number of parameters (`_colmap_camera` maps them to K and an OpenCV distortion).
_COLMAP_MODELS = {
    "SIMPLE_PINHOLE": 3,
    "PINHOLE": 4,
    "SIMPLE_RADIAL": 4,
    "RADIAL": 5,
    "OPENCV": 8,
    "FULL_OPENCV": 12,
    "SIMPLE_RADIAL_FISHEYE": 4,
    "RADIAL_FISHEYE": 5,
    "OPENCV_FISHEYE": 8,
}


def _colmap_camera(model: str, params: list[float]) -> tuple[np.ndarray, Distortion | None]:
    p = params
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE"):
        K = intrinsics_matrix(p[0], p[0], p[1], p[2])
    else:
        K = intrinsics_matrix(p[0], p[1], p[2], p[3])
    if model in ("SIMPLE_PINHOLE", "PINHOLE"):
        distortion = None
    elif model == "SIMPLE_RADIAL":
        distortion = Distortion("radial", (p[3], 0.0, 0.0, 0.0))
    elif model == "RADIAL":
        distortion = Distortion("radial", (p[3], p[4], 0.0, 0.0))
    elif model in ("OPENCV", "FULL_OPENCV"):
        # FULL_OPENCV is OpenCV's rational model: k1 k2 p1 p2 k3 k4 k5 k6, in OpenCV's order.
        distortion = Distortion("radial", tuple(p[4:]))
    elif model == "SIMPLE_RADIAL_FISHEYE":
        # COLMAP's radial fisheye models are OpenCV's fisheye model with the higher terms at zero.
        distortion = Distortion("fisheye", (p[3], 0.0, 0.0, 0.0))
    elif model == "RADIAL_FISHEYE":
        distortion = Distortion("fisheye", (p[3], p[4], 0.0, 0.0))
    else:  # OPENCV_FISHEYE
        distortion = Distortion("fisheye", tuple(p[4:8]))
    return K, distortion


def _colmap_lines(path: Path) -> list[tuple[int, str]]:
    """The lines of a COLMAP text file that are not comments, each with its line number in the file."""
    if not path.is_file():
        raise MissingInputError(f"COLMAP file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            return [(number, line.rstrip("\r\n")) for number, line in enumerate(handle, 1) if not line.startswith("#")]
    except UnicodeDecodeError as error:
        raise CorruptFileError(f"{path} is not a COLMAP text file (not UTF-8 text: {error})") from error


def _read_colmap_cameras(path: Path) -> dict[int, tuple[str, int, int, np.ndarray, Distortion | None]]:
    cameras = {}
    for number, line in _colmap_lines(path):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{path}, camera line {number}"
        model = tokens[1] if len(tokens) > 1 else ""
        if model not in _COLMAP_MODELS:
            raise InputError(
                f"{where}: unknown camera model {model!r}; supported: {', '.join(_COLMAP_MODELS)}"
            )
        expected = _COLMAP_MODELS[model]
        if len(tokens) != 4 + expected:
            raise InputError(f"{where}: {model} takes {expected} parameters, got {len(tokens) - 4}")
        try:
            camera_id, width, height = int(tokens[0]), int(tokens[2]), int(tokens[3])
            params = [float(value) for value in tokens[4:]]
        except ValueError as error:
            raise InputError(f"{where}: not a camera line ({error})") from error
        cameras[camera_id] = (model, width, height, *_colmap_camera(model, params))
    return cameras


def _is_points2d_line(line: str) -> bool:
    try:
        [float(token) for token in line.split()]
    except ValueError:
        return False
    return True


def read_colmap_points(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Reads a COLMAP `points3D.txt` (`POINT3D_ID X Y Z R G B ERROR TRACK[]`).

    Returns:
        `([M, 3] float64 xyz, [M, 3] uint8 rgb)`; M = 0 for a file without points.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"point file {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy warns on a file without data rows
            table = np.loadtxt(path, usecols=range(1, 7), comments="#", ndmin=2, dtype=np.float64)
    except ValueError as error:
        raise InputError(f"{path} is not a COLMAP points3D.txt: {error}") from error
    if not np.isfinite(table).all():
        raise InputError(f"{path} holds NaN or infinite point coordinates")
    return table[:, :3].copy(), np.clip(np.rint(table[:, 3:6]), 0, 255).astype(np.uint8)


def read_colmap_scene(
    model_dir: Path | str, *, images_dir: Path | str | None = None, cache_dir: Path | str | None = None
) -> Scene:
    """Reads a COLMAP text model (`cameras.txt`, `images.txt`, optional `points3D.txt`).

    Images are looked for in `images_dir`, else in an `images/` folder in the model folder or one or two
    levels above it (`<scene>/sparse/0`). Masks, depth and labels come from `masks/`, `depth/`, `labels/`
    beside that folder when present.

    Args:
        model_dir: the folder holding the text files.
        images_dir: the folder `images.txt` names are relative to.
        cache_dir: where distorted frames are undistorted to (default: see `undistort_cache_dir`).
    """
    model_dir = Path(model_dir)
    if images_dir is None:
        candidates = [model_dir / "images", model_dir.parent / "images", model_dir.parent.parent / "images"]
        images_dir = next((c for c in candidates if c.is_dir()), None)
        if images_dir is None:
            raise MissingInputError(
                f"no images folder for the COLMAP model {model_dir}: looked in "
                f"{', '.join(str(c) for c in candidates)}; pass images_dir="
            )
    images_dir = Path(images_dir)
    cameras_path, images_path = model_dir / "cameras.txt", model_dir / "images.txt"
    cameras = _read_colmap_cameras(cameras_path)

    headers = []
    lines = _colmap_lines(images_path)
    index = 0
    while index < len(lines):
        number, line = lines[index]
        index += 1
        if not line.strip():
            continue
        headers.append((number, line.split()))
        # Each record is a header and a POINTS2D line, which is empty for an image without points; a
        # hand-written file may leave it out, so only a blank or all-numeric line is taken as one.
        if index < len(lines) and _is_points2d_line(lines[index][1]):
            index += 1
    names, seen = [], {}
    for number, tokens in headers:
        if len(tokens) < 10:
            raise InputError(f"{images_path}, image line {number}: expected 10 fields, got {len(tokens)}")
        name = " ".join(tokens[9:])
        if name in seen:
            raise InputError(f"{images_path}, image line {number}: image {name!r} is listed twice (also line {seen[name]})")
        seen[name] = number
        names.append(name)
    image_ids = _unique_image_ids(names)

    raw_frames = []
    missing = _MissingFiles(images_path, len(headers))
    for (number, tokens), name, image_id in zip(headers, names, image_ids, strict=True):
        where = f"{images_path}, image line {number} ({name})"
        try:
            qvec = np.array([float(v) for v in tokens[1:5]])
            tvec = np.array([float(v) for v in tokens[5:8]])
            camera_id = int(tokens[8])
        except ValueError as error:
            raise InputError(f"{where}: not an image line ({error})") from error
        if camera_id not in cameras:
            raise InputError(f"{where}: camera {camera_id} is not in {cameras_path}")
        _, width, height, K, distortion = cameras[camera_id]
        world_to_camera = np.eye(4)
        try:
            if not (np.isfinite(qvec).all() and np.isfinite(tvec).all()):
                raise InputError("pose contains NaN or infinite values")
            world_to_camera[:3, :3] = qvec_to_rotmat(qvec)
        except ValueError as error:
            raise InputError(f"{where}: invalid camera: {error}") from error
        world_to_camera[:3, 3] = tvec
        image_path = missing.resolve(images_dir, name, where, "image")
        if image_path is None:
            continue
        raw_frames.append(
            RawFrame(
                image_id,
                image_path,
                K,
                world_to_camera,
                width,
                height,
                distortion,
                where,
                mask_path=_aux_path(images_dir, name, "mask"),
                depth_path=_aux_path(images_dir, name, "depth"),
                label_path=_aux_path(images_dir, name, "label"),
                normal_path=_aux_path(images_dir, name, "normal"),
            )
        )
    missing.check()
    if not raw_frames:
        raise InputError(f"{images_path} lists no images")
    points_path = model_dir / "points3D.txt"
    if points_path.is_file():
        points = read_colmap_points(points_path)
    else:
        points = (np.zeros((0, 3)), np.zeros((0, 3), dtype=np.uint8))
    scene_id = images_dir.parent.name
    return _make_scene(scene_id, model_dir, raw_frames, points, set(), cache_dir)


# --------------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------------
# ScanNet++ dataset splits


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
