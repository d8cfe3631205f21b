"""Lens undistortion of scene frames into pinhole cameras, cached on disk (used by the scene readers).

Frames with radial/tangential (cv2.undistort model) or fisheye (cv2.fisheye) distortion become pinhole frames
of the same image size with the principal point at the image centre, as ScanNet++'s and FiT3D's preprocessing
do. The undistorted images and their masks/depth/labels go to a cache folder and are reused while their
sources are unchanged.

Where the cache goes (`undistort_cache_dir`): the `cache_dir` a caller passes, else the folder named by the
`FIT3D_UNDISTORT_CACHE` environment variable (one subfolder per scene), else `<scene>/.fit3d_undistorted` when
the scene folder is writable, else the user cache (`$XDG_CACHE_HOME/fit3d/undistorted`, default
`~/.cache/fit3d/undistorted`), so that read-only dataset folders work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fit3d_hf.errors import InputError
from fit3d_hf.scene.camera import Camera
from fit3d_hf.scene.scene import Frame, _open
from fit3d_hf.utils import atomic_path, atomic_write_text

__all__ = [
    "AUX_DIRS",
    "UNDISTORT_CACHE_ENV",
    "UNDISTORTED_DIRNAME",
    "Distortion",
    "RawFrame",
    "UNDISTORT_VERSION",
    "undistort_cache_dir",
    "undistort_frames",
]

logger = logging.getLogger(__name__)

# Folders beside a scene's `images/` folder that hold per-frame extras named `<image stem>.png`.
AUX_DIRS = {"mask": "masks", "depth": "depth", "label": "labels", "normal": "normals"}
# The cache folder inside a writable scene folder, and the variable naming a cache folder for all scenes.
UNDISTORTED_DIRNAME = ".fit3d_undistorted"
UNDISTORT_CACHE_ENV = "FIT3D_UNDISTORT_CACHE"
# Bumped whenever the undistortion output changes, so that stale caches are rebuilt.
UNDISTORT_VERSION = 1


@dataclass(frozen=True)
class Distortion:
    """Lens distortion in OpenCV's order: `radial` = (k1, k2, p1, p2[, k3[, k4, k5, k6]]) for cv2.undistort,
    `fisheye` = (k1, k2, k3, k4) for cv2.fisheye (COLMAP's OPENCV_FISHEYE and RADIAL_FISHEYE models)."""

    model: str
    coefficients: tuple[float, ...]

    @property
    def is_identity(self) -> bool:
        return not any(self.coefficients)


@dataclass
class RawFrame:
    """A frame as the file describes it, before validation and undistortion."""

    image_id: str
    image_path: Path
    K: np.ndarray
    world_to_camera: np.ndarray
    width: int
    height: int
    distortion: Distortion | None
    where: str
    mask_path: Path | None = None
    depth_path: Path | None = None
    label_path: Path | None = None
    normal_path: Path | None = None


def _writable(folder: Path) -> bool:
    """Whether `folder` exists writable, or could be created (its nearest existing parent is writable)."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def _user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fit3d" / "undistorted"


def undistort_cache_dir(scene_root: Path | str, cache_dir: Path | str | None = None) -> Path:
    """Where the undistorted frames of the scene read from `scene_root` go (see the module docstring).

    Args:
        scene_root: the folder the scene was read from.
        cache_dir: an explicit cache folder for this scene (used as given).

    Raises:
        InputError: no candidate is writable; the message names the scene folder's cache and the user cache.
    """
    if cache_dir is not None:
        return Path(cache_dir)
    root = Path(scene_root)
    # One subfolder per scene folder: its name and a hash of its absolute path (two captures may share a name).
    key = f"{root.resolve().name}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]}"
    if os.environ.get(UNDISTORT_CACHE_ENV):
        return Path(os.environ[UNDISTORT_CACHE_ENV]).expanduser() / key
    candidates = [root / UNDISTORTED_DIRNAME, _user_cache_root() / key]
    for candidate in candidates:
        if _writable(candidate):
            if candidate != candidates[0]:
                logger.info("%s is not writable: undistorting into %s", root, candidate)
            return candidate
    raise InputError(
        f"{root}: its frames need undistorting but neither {candidates[0]} (the scene folder) nor {candidates[1]} "
        f"(the user cache) is writable; set {UNDISTORT_CACHE_ENV} to a writable folder"
    )


def _undistortion_maps(K: np.ndarray, distortion: Distortion, width: int, height: int):
    """OpenCV remap tables and the pinhole K of the undistorted image (same size, centred principal point).

    OpenCV puts pixel centres at integer coordinates; the library at half-integers. K is shifted by half a
    pixel on the way in and out.
    """
    import cv2

    half = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    K_cv = half @ K
    coefficients = np.asarray(distortion.coefficients, dtype=np.float64)
    size = (width, height)
    if distortion.model == "fisheye":
        new_K = cv2.fisheye.estimateNewCameraMatrixForUndistortRectify(
            K_cv, coefficients, size, np.eye(3), balance=0.0
        )
    else:
        new_K, _ = cv2.getOptimalNewCameraMatrix(
            K_cv, coefficients, size, 0.0, size, centerPrincipalPoint=True
        )
    new_K = np.array(new_K, dtype=np.float64)
    new_K[0, 2], new_K[1, 2] = (width - 1) / 2.0, (height - 1) / 2.0
    if distortion.model == "fisheye":
        map_x, map_y = cv2.fisheye.initUndistortRectifyMap(
            K_cv, coefficients, np.eye(3), new_K, size, cv2.CV_32FC1
        )
    else:
        map_x, map_y = cv2.initUndistortRectifyMap(K_cv, coefficients, None, new_K, size, cv2.CV_32FC1)
    return map_x, map_y, np.linalg.inv(half) @ new_K


def _signature(raw: RawFrame) -> str:
    """Fingerprint of everything an undistorted frame depends on."""
    parts = [str(UNDISTORT_VERSION), raw.distortion.model, repr(raw.distortion.coefficients)]
    parts += [repr(raw.K.tolist()), str(raw.width), str(raw.height)]
    for path in (raw.image_path, raw.mask_path, raw.depth_path, raw.label_path, raw.normal_path):
        if path is None:
            parts.append("-")
        else:
            stat = path.stat()
            parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _save_atomic(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")


def _undistort_frame(raw: RawFrame, outputs: dict[str, Path]) -> tuple[np.ndarray, list[str]]:
    """Writes the undistorted files of one frame; returns the new K and the kinds of files written."""
    import cv2

    map_x, map_y, new_K = _undistortion_maps(raw.K, raw.distortion, raw.width, raw.height)
    written = {}
    rgb = np.asarray(_open(raw.image_path, "image").convert("RGB"))
    written["image"] = cv2.remap(rgb, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    # Pixels that sample outside the source (or an invalid source pixel) become invalid; the bilinear
    # interpolation of a 0/255 mask is thresholded strictly, like ScanNet++'s undistortion.
    if raw.mask_path is not None:
        source_mask = np.where(np.asarray(_open(raw.mask_path, "mask").convert("L")) >= 128, 255, 0).astype(
            np.uint8
        )
    else:
        source_mask = np.full((raw.height, raw.width), 255, dtype=np.uint8)
    mask = cv2.remap(
        source_mask, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    mask = np.where(mask >= 255, 255, 0).astype(np.uint8)
    if raw.mask_path is not None or not mask.all():
        written["mask"] = mask
    # Depth (z along the unchanged optical axis), labels and normals (camera-frame vectors: the camera does not
    # rotate) are sampled, never blended.
    for kind in ("depth", "label", "normal"):
        source = getattr(raw, f"{kind}_path")
        if source is not None:
            values = np.asarray(_open(source, kind))
            written[kind] = cv2.remap(
                values, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0
            )
    # A file of a kind this version of the frame lacks is left alone (the manifest says which files are current):
    # a dataset built from another reading of the scene (another transforms file in the folder) may use it.
    for kind, path in outputs.items():
        if kind in written:
            _save_atomic(written[kind], path)
    return new_K, sorted(written)


def _cached_entry(entry: dict) -> tuple[np.ndarray | None, list | None]:
    """K and files of a manifest entry, or (None, None) when the entry is damaged (the frame is redone)."""
    try:
        K = np.asarray(entry["K"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None, None
    if K.shape != (3, 3) or not np.isfinite(K).all():
        return None, None
    return K, entry["files"]


def undistort_frames(raw_frames: list[RawFrame], cameras: list[Camera], cache: Path) -> list[Frame]:
    """Undistorts the frames into `cache` (reusing up-to-date outputs); returns pinhole frames."""
    from tqdm.auto import tqdm

    manifest_path = cache / "manifest.json"
    manifest = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            logger.warning("ignoring the unreadable undistortion manifest %s", manifest_path)
        if not isinstance(manifest, dict):  # a damaged cache is rebuilt, never trusted
            manifest = {}
    frames, reused = [], 0
    pairs = list(zip(raw_frames, cameras, strict=True))
    try:
        for raw, camera in tqdm(pairs, desc=f"Undistorting into {cache}", unit="image", leave=False):
            outputs = {"image": cache / "images" / f"{raw.image_id}.png"}
            outputs.update(
                {kind: cache / folder / f"{raw.image_id}.png" for kind, folder in AUX_DIRS.items()}
            )
            signature = _signature(raw)
            entry = manifest.get(raw.image_id)
            new_K, kinds = None, None
            if (
                isinstance(entry, dict)
                and entry.get("signature") == signature
                and isinstance(entry.get("files"), list)
                and all(kind in outputs and outputs[kind].is_file() for kind in entry["files"])
            ):
                new_K, kinds = _cached_entry(entry)
            if new_K is not None:
                reused += 1
            else:
                new_K, kinds = _undistort_frame(raw, outputs)
                manifest[raw.image_id] = {"signature": signature, "K": new_K.tolist(), "files": kinds}
            paths = {kind: (outputs[kind] if kind in kinds else None) for kind in outputs}
            frames.append(
                Frame(
                    raw.image_id,
                    paths["image"],
                    Camera(new_K, camera.world_to_camera, camera.width, camera.height),
                    paths["mask"],
                    paths["depth"],
                    paths["label"],
                    paths["normal"],
                )
            )
    finally:  # record what was done, also when interrupted, so that the next read resumes
        if len(frames) > reused:
            atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    logger.info("undistorted %d frames into %s (%d reused)", len(frames) - reused, cache, reused)
    return frames
