"""The scene data model shared by every reader, writer, builder and training stage.

A `Scene` is a set of posed frames (`Frame`: an image file, its `Camera`, optional mask / depth / label
files) plus a sparse coloured point cloud in the same world frame. File contents are loaded on demand with
`load_image`, `load_mask`, `load_depth` and `load_labels`, so a scene of thousands of frames is cheap to hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fit3d_hf.errors import CorruptFileError, InputError, MissingInputError
from fit3d_hf.scene.camera import Camera

__all__ = ["Frame", "Scene", "load_depth", "load_image", "load_labels", "load_mask"]


@dataclass
class Frame:
    """One posed image of a scene.

    Args:
        image_id: identifier unique within the scene (ScanNet++: the image stem, e.g. `DSC00123`).
        image_path: the RGB image file.
        camera: pinhole camera (OpenCV convention) whose `width`/`height` equal the image's size.
        mask_path: optional validity mask (white = valid, black = anonymised / invalid).
        depth_path: optional 16-bit depth PNG in millimetres (0 = unknown).
        label_path: optional semantic label PNG (one class id per pixel).
    """

    image_id: str
    image_path: Path
    camera: Camera
    mask_path: Path | None = None
    depth_path: Path | None = None
    label_path: Path | None = None


@dataclass
class Scene:
    """Posed frames plus a sparse point cloud, all in one world frame.

    Args:
        scene_id: scene identifier (ScanNet++: the scene folder name).
        root: folder the scene was read from.
        frames: the frames, in file order.
        points: `[M, 3]` float64 world points (M may be 0).
        point_colors: `[M, 3]` uint8 RGB colours of `points`.
        test_image_ids: ids of the frames the source lists as test frames (they are also in `frames`).
    """

    scene_id: str
    root: Path
    frames: list[Frame]
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    point_colors: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.uint8))
    test_image_ids: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 3)
        self.point_colors = np.asarray(self.point_colors, dtype=np.uint8).reshape(-1, 3)
        if len(self.points) != len(self.point_colors):
            raise InputError(
                f"scene {self.scene_id} ({self.root}): {len(self.points)} points but {len(self.point_colors)} point colours"
            )
        ids = [frame.image_id for frame in self.frames]
        if len(set(ids)) != len(ids):
            duplicates = sorted({image_id for image_id in ids if ids.count(image_id) > 1})
            raise InputError(f"scene {self.scene_id} ({self.root}): duplicate image ids {duplicates[:5]}")
        unknown = set(self.test_image_ids) - set(ids)
        if unknown:
            raise InputError(f"scene {self.scene_id} ({self.root}): test image ids {sorted(unknown)[:5]} are not frames")

    def frame(self, image_id: str) -> Frame:
        """The frame with id `image_id` (KeyError if absent)."""
        for candidate in self.frames:
            if candidate.image_id == image_id:
                return candidate
        raise KeyError(f"scene {self.scene_id} has no frame {image_id!r}")

    @property
    def image_ids(self) -> list[str]:
        return [frame.image_id for frame in self.frames]


def _open(path: Path | str, what: str):
    import struct

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} {path} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError) as error:
        # Pillow's decoders raise any of these for damaged files (truncated data, broken chunks)
        raise CorruptFileError(f"{what} {path} cannot be read as an image: {error}") from error
    return image


def load_image(path: Path | str) -> np.ndarray:
    """Reads an RGB image.

    Args:
        path: image file (any format Pillow reads; grey or RGBA images are converted to RGB).

    Returns:
        `[H, W, 3]` float32 array in [0, 1].

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image.
    """
    from fit3d_hf.images import to_float_rgb

    # 16-bit grey pictures are scaled by their bit depth (Pillow's convert("RGB") would clip them at 255).
    return to_float_rgb(_open(path, "image"))


def load_mask(path: Path | str) -> np.ndarray:
    """Reads a validity mask (ScanNet++ anonymisation masks: 255 valid, 0 anonymised).

    Returns:
        `[H, W]` bool array, True where the pixel is valid (grey value >= 128).
    """
    image = _open(path, "mask")
    return np.asarray(image.convert("L")) >= 128


def load_depth(path: Path | str, scale: float = 1000.0) -> np.ndarray:
    """Reads a 16-bit depth PNG (ScanNet++ convention: millimetres, 0 = unknown).

    Args:
        path: depth image file.
        scale: stored units per metre.

    Returns:
        `[H, W]` float32 depth in metres along the camera z axis (0 where unknown).
    """
    image = _open(path, "depth map")
    depth = np.asarray(image)
    if depth.ndim != 2:
        raise InputError(f"depth map {path} must have a single channel, got shape {depth.shape}")
    return depth.astype(np.float32) / scale


def load_labels(path: Path | str) -> np.ndarray:
    """Reads a semantic label PNG.

    Returns:
        `[H, W]` int64 class ids.
    """
    image = _open(path, "label map")
    labels = np.asarray(image)
    if labels.ndim != 2:
        raise InputError(f"label map {path} must have a single channel, got shape {labels.shape}")
    return labels.astype(np.int64)
