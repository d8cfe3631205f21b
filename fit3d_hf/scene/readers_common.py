"""What every scene reader shares: resolving the files a listing names (collecting the missing ones),
image sizes, per-frame extras beside `images/`, image ids, pose checks, and the last step of every
reader: validating the frames and undistorting them into a `Scene`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fit3d_hf.errors import CorruptFileError, InputError, MissingInputError
from fit3d_hf.scene.camera import Camera
from fit3d_hf.scene.scene import Frame, Scene, image_decode_errors
from fit3d_hf.scene.undistort import AUX_DIRS, RawFrame, undistort_cache_dir, undistort_frames

__all__: list[str] = []

# Extensions tried when a nerfstudio/Blender `file_path` has none (Blender's transforms omit it).
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".JPG", ".PNG", ".JPEG")


def _image_size(path: Path, where: str, what: str = "image") -> tuple[int, int]:
    from PIL import Image

    if not path.is_file():
        raise MissingInputError(f"{where}: {what} {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.size
    except image_decode_errors() as error:
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
        Frame(
            raw.image_id,
            raw.image_path,
            camera,
            raw.mask_path,
            raw.depth_path,
            raw.label_path,
            raw.normal_path,
        )
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

    def resolve(
        self, base: Path, relative: str, where: str, what: str, try_extensions: bool = False
    ) -> Path | None:
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


def _pose(convert, matrix: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(matrix).all():
        raise InputError(f"{where}: invalid camera: pose contains NaN or infinite values")
    try:
        return convert(matrix)
    except ValueError as error:
        raise InputError(f"{where}: invalid camera: {error}") from error
