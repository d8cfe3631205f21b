"""COLMAP text models: cameras (every COLMAP camera model mapped to K and an OpenCV distortion), images
and poses, sparse points (`read_colmap_points`), and `read_colmap_scene`."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from fit3d_hf.errors import CorruptFileError, InputError, MissingInputError
from fit3d_hf.scene.camera import intrinsics_matrix, qvec_to_rotmat
from fit3d_hf.scene.readers_common import _aux_path, _make_scene, _MissingFiles, _unique_image_ids
from fit3d_hf.scene.scene import Scene
from fit3d_hf.scene.undistort import Distortion, RawFrame

__all__ = ["read_colmap_points", "read_colmap_scene"]

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
            return [
                (number, line.rstrip("\r\n"))
                for number, line in enumerate(handle, 1)
                if not line.startswith("#")
            ]
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


def _colmap_images_dir(model_dir: Path, images_dir: Path | str | None) -> Path:
    """The folder `images.txt` names are relative to: `images_dir`, else an `images/` folder in the model
    folder or one or two levels above it."""
    if images_dir is None:
        candidates = [model_dir / "images", model_dir.parent / "images", model_dir.parent.parent / "images"]
        images_dir = next((c for c in candidates if c.is_dir()), None)
        if images_dir is None:
            raise MissingInputError(
                f"no images folder for the COLMAP model {model_dir}: looked in "
                f"{', '.join(str(c) for c in candidates)}; pass images_dir="
            )
    return Path(images_dir)


def _colmap_image_headers(images_path: Path) -> list[tuple[int, list[str]]]:
    """The image header lines of `images.txt` as (line number, tokens), their POINTS2D lines skipped."""
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
    return headers


def _colmap_image_names(images_path: Path, headers: list[tuple[int, list[str]]]) -> list[str]:
    """The image name of every header; refuses a short header and a name listed twice."""
    names, seen = [], {}
    for number, tokens in headers:
        if len(tokens) < 10:
            raise InputError(f"{images_path}, image line {number}: expected 10 fields, got {len(tokens)}")
        name = " ".join(tokens[9:])
        if name in seen:
            raise InputError(
                f"{images_path}, image line {number}: image {name!r} is listed twice (also line {seen[name]})"
            )
        seen[name] = number
        names.append(name)
    return names


def _colmap_image_pose(
    tokens: list[str], where: str, cameras: dict, cameras_path: Path
) -> tuple[tuple, np.ndarray]:
    """The camera entry (of `_read_colmap_cameras`) and the `[4, 4]` world-to-camera pose of an image line."""
    try:
        qvec = np.array([float(v) for v in tokens[1:5]])
        tvec = np.array([float(v) for v in tokens[5:8]])
        camera_id = int(tokens[8])
    except ValueError as error:
        raise InputError(f"{where}: not an image line ({error})") from error
    if camera_id not in cameras:
        raise InputError(f"{where}: camera {camera_id} is not in {cameras_path}")
    world_to_camera = np.eye(4)
    try:
        if not (np.isfinite(qvec).all() and np.isfinite(tvec).all()):
            raise InputError("pose contains NaN or infinite values")
        world_to_camera[:3, :3] = qvec_to_rotmat(qvec)
    except ValueError as error:
        raise InputError(f"{where}: invalid camera: {error}") from error
    world_to_camera[:3, 3] = tvec
    return cameras[camera_id], world_to_camera


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
    images_dir = _colmap_images_dir(model_dir, images_dir)
    cameras_path, images_path = model_dir / "cameras.txt", model_dir / "images.txt"
    cameras = _read_colmap_cameras(cameras_path)
    headers = _colmap_image_headers(images_path)
    names = _colmap_image_names(images_path, headers)
    image_ids = _unique_image_ids(names)

    raw_frames = []
    missing = _MissingFiles(images_path, len(headers))
    for (number, tokens), name, image_id in zip(headers, names, image_ids, strict=True):
        where = f"{images_path}, image line {number} ({name})"
        (_, width, height, K, distortion), world_to_camera = _colmap_image_pose(
            tokens, where, cameras, cameras_path
        )
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
