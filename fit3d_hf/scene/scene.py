"""The scene data model shared by every reader, writer, builder and training stage.

A `Scene` is a set of posed frames (`Frame`: an image file, its `Camera`, optional mask / depth / label /
surface-normal files) plus a sparse coloured point cloud in the same world frame. File contents are loaded on
demand with `load_image`, `load_mask`, `load_depth`, `load_labels` and `load_normals`, so a scene of thousands
of frames is cheap to hold.

Surface normals, everywhere in fit3d-hf, are unit vectors in the *camera frame* of their view with OpenCV axes
(x right, y down, z forward), pointing out of the surface towards the camera that sees it (so a normal `n` at
the camera-frame point `p` has `n . p < 0`). Files store them as 8-bit RGB PNGs, `round((n + 1) / 2 * 255)`
per axis (`encode_normals` / `decode_normals`); black (0, 0, 0), which decodes to no unit vector, marks pixels
without a normal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fit3d_hf.errors import CorruptFileError, InputError, MissingInputError
from fit3d_hf.scene.camera import Camera

__all__ = [
    "Frame",
    "Scene",
    "decode_normals",
    "encode_normals",
    "load_depth",
    "load_image",
    "load_image_pixels",
    "load_labels",
    "load_mask",
    "load_normals",
]


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
        normal_path: optional surface-normal PNG (see the module docstring for the convention).
    """

    image_id: str
    image_path: Path
    camera: Camera
    mask_path: Path | None = None
    depth_path: Path | None = None
    label_path: Path | None = None
    normal_path: Path | None = None


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
            raise InputError(
                f"scene {self.scene_id} ({self.root}): test image ids {sorted(unknown)[:5]} are not frames"
            )

    def frame(self, image_id: str) -> Frame:
        """The frame with id `image_id` (KeyError if absent)."""
        for candidate in self.frames:
            if candidate.image_id == image_id:
                return candidate
        raise KeyError(f"scene {self.scene_id} has no frame {image_id!r}")

    @property
    def image_ids(self) -> list[str]:
        return [frame.image_id for frame in self.frames]


def image_decode_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a damaged image file: its decoders raise any of these for truncated data or
    broken chunks, and a decompression bomb has its own error."""
    import struct

    from PIL import Image, UnidentifiedImageError

    return (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        struct.error,
        Image.DecompressionBombError,
    )


def _open(path: Path | str, what: str):
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} {path} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except image_decode_errors() as error:
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


def load_image_pixels(path: Path | str) -> np.ndarray:
    """Reads an RGB image without loss: `[H, W, 3]` uint8 for 8-bit pictures, float32 in [0, 1] for deeper grey
    ones; `load_image` is this in float32 (uint8 values / 255). Raises as `load_image`."""
    from fit3d_hf.images import to_rgb_array

    # writable, as torch.from_numpy wants (copied only when it is not)
    return np.require(to_rgb_array(_open(path, "image")), requirements="W")


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


# A decoded 8-bit normal is a unit vector up to quantisation (|n| within 1 +- 0.02); anything farther, such as
# the black (0, 0, 0) of pixels without a normal (|n| = sqrt(3)), is invalid.
_NORMAL_NORM_TOLERANCE = 0.1


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """Camera-frame unit normals `[H, W, 3]` -> the 8-bit RGB image fit3d-hf stores (`round((n + 1) / 2 * 255)`).

    Pixels whose vector is not unit length (e.g. all zeros: no surface) become black, the "no normal" value.
    """
    normals = np.asarray(normals, dtype=np.float64)
    if normals.ndim != 3 or normals.shape[2] != 3:
        raise ValueError(f"normals must be [H, W, 3], got shape {normals.shape}")
    valid = np.abs(np.linalg.norm(normals, axis=2) - 1.0) < _NORMAL_NORM_TOLERANCE
    encoded = np.clip(np.round((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.where(valid[..., None], encoded, 0).astype(np.uint8)


def decode_normals(encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `encode_normals`: 8-bit RGB `[H, W, 3]` -> (`[H, W, 3]` float32 unit normals, zero where
    invalid; `[H, W]` bool validity)."""
    encoded = np.asarray(encoded)
    if encoded.ndim != 3 or encoded.shape[2] != 3:
        raise ValueError(f"an encoded normal map must be [H, W, 3], got shape {encoded.shape}")
    normals = encoded.astype(np.float32) / 127.5 - 1.0
    length = np.linalg.norm(normals, axis=2)
    valid = np.abs(length - 1.0) < _NORMAL_NORM_TOLERANCE
    normals = np.where(valid[..., None], normals / np.maximum(length, 1e-6)[..., None], 0.0)
    return normals.astype(np.float32), valid


def load_normals(path: Path | str) -> np.ndarray:
    """Reads a surface-normal PNG (8-bit RGB, see the module docstring).

    Returns:
        `[H, W, 3]` float32 camera-frame unit normals (OpenCV axes, towards the camera); 0 where unknown.
    """
    image = _open(path, "normal map")
    if image.mode != "RGB":
        raise ValueError(f"normal map {path} must be an 8-bit RGB image, got mode {image.mode}")
    return decode_normals(np.asarray(image))[0]
