"""nerfstudio / instant-ngp / Blender `transforms.json` files: their parsing (frames, intrinsics,
distortion, poses), shared with the ScanNet++ reader, and `read_nerfstudio_scene`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from fit3d_hf.errors import CorruptFileError, InputError, MissingInputError
from fit3d_hf.scene.camera import intrinsics_matrix, opengl_camera_to_world_to_opencv
from fit3d_hf.scene.ply import read_ply_points
from fit3d_hf.scene.readers_common import (
    _image_size,
    _make_scene,
    _MissingFiles,
    _pose,
    _resolve_file,
    _unique_image_ids,
)
from fit3d_hf.scene.scene import Scene
from fit3d_hf.scene.undistort import Distortion, RawFrame

__all__ = ["read_nerfstudio_scene"]

_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "k5", "k6", "p1", "p2")
_TRANSFORMS_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV", "OPENCV_FISHEYE")
# Per-frame files besides the image: (kind, key of its path in a frame).
_FRAME_FILE_KEYS = (
    ("mask", "mask_path"),
    ("depth", "depth_file_path"),
    ("label", "label_path"),
    ("normal", "normal_path"),
)


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
            if (
                not isinstance(frame, dict)
                or not isinstance(frame.get("file_path"), str)
                or not frame["file_path"].strip()
            ):
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
        missing.resolve(root, frame["file_path"], where, "image", try_extensions=True)
        for frame, where in entries
    ]
    for frame, where in entries:
        for kind, key in _FRAME_FILE_KEYS:
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
        for kind, key in _FRAME_FILE_KEYS:
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
