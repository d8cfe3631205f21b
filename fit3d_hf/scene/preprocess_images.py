"""Image steps of ScanNet++ preprocessing (see `fit3d_hf.scene.preprocess_scannetpp`), with OpenCV:
bicubic downscaling, mask binarisation, the undistortion plan of a raw camera and the remaps, reading
and writing the images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fit3d_hf.errors import CorruptFileError, InputError

__all__ = ["UndistortionPlan", "binarize_mask", "downscale_image", "make_undistortion_plan"]


def _cv2():
    try:
        import cv2
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise ImportError(
            "ScanNet++ preprocessing needs OpenCV. To fix: pip install 'fit3d-hf[preprocess]' "
            "(or opencv-python-headless)"
        ) from error
    return cv2


@dataclass(frozen=True, eq=False)
class UndistortionPlan:
    """How one scene's (downscaled) images become pinhole images.

    Attributes:
        K: `[3, 3]` intrinsics of the output images (library convention, pixel centres at half-integers).
        width: output width (= downscaled width).
        height: output height.
        map_x: `[H, W]` float32 source column (OpenCV convention) of every output pixel, None for no remap.
        map_y: `[H, W]` float32 source row, None for no remap.
    """

    K: np.ndarray
    width: int
    height: int
    map_x: np.ndarray | None
    map_y: np.ndarray | None


def downscale_image(image: np.ndarray, factor: float) -> np.ndarray:
    """Bicubic downscale by `factor` to (int(w / factor), int(h / factor)) as ScanNet++'s `downscale.py`."""
    cv2 = _cv2()
    height, width = image.shape[:2]
    size = (int(width / factor), int(height / factor))
    if size == (width, height):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """uint8 mask: 255 where `mask` == 255 (valid), 0 elsewhere (anonymised or touched by interpolation)."""
    return np.where(mask >= 255, 255, 0).astype(np.uint8)


def make_undistortion_plan(
    transforms: dict, width: int, height: int, scale_x: float, scale_y: float
) -> UndistortionPlan:
    """Plans the undistortion of images downscaled to `width` x `height` from a raw camera.

    Args:
        transforms: a checked raw `transforms.json` (see `read_raw_transforms`).
        width: downscaled width.
        height: downscaled height.
        scale_x: downscaled width / raw width.
        scale_y: downscaled height / raw height.

    Returns:
        The output intrinsics and remap tables.
    """
    model = transforms["camera_model"]
    K = np.array(
        [
            [transforms["fl_x"] * scale_x, 0.0, transforms["cx"] * scale_x],
            [0.0, transforms["fl_y"] * scale_y, transforms["cy"] * scale_y],
            [0.0, 0.0, 1.0],
        ],
        dtype=np.float64,
    )
    if model == "PINHOLE":
        return UndistortionPlan(K, width, height, None, None)
    cv2 = _cv2()
    # OpenCV puts pixel centres at integers; ScanNet++/COLMAP and this library at half-integers.
    to_opencv = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    K_cv = to_opencv @ K
    identity = np.eye(3)
    size = (width, height)
    if model == "OPENCV_FISHEYE":
        distortion = np.array([float(transforms.get(key, 0.0)) for key in ("k1", "k2", "k3", "k4")])
        new_K_cv = cv2.fisheye.estimateNewCameraMatrixForUndistortRectify(
            K_cv, distortion, size, identity, balance=0.0
        )
    else:  # OPENCV: radial-tangential (k1, k2, p1, p2[, k3])
        distortion = np.array([float(transforms.get(key, 0.0)) for key in ("k1", "k2", "p1", "p2", "k3")])
        new_K_cv, _ = cv2.getOptimalNewCameraMatrix(K_cv, distortion, size, 0.0, size)
    new_K_cv = np.array(new_K_cv, dtype=np.float64)
    # As in ScanNet++'s undistort.py: the principal point goes to the image centre (w/2, h/2 in the
    # half-integer convention that the written transforms use).
    new_K_cv[0, 2], new_K_cv[1, 2] = width / 2 - 0.5, height / 2 - 0.5
    if model == "OPENCV_FISHEYE":
        map_x, map_y = cv2.fisheye.initUndistortRectifyMap(
            K_cv, distortion, identity, new_K_cv, size, cv2.CV_32FC1
        )
    else:
        map_x, map_y = cv2.initUndistortRectifyMap(K_cv, distortion, identity, new_K_cv, size, cv2.CV_32FC1)
    return UndistortionPlan(np.linalg.inv(to_opencv) @ new_K_cv, width, height, map_x, map_y)


def _undistort_image(image: np.ndarray, plan: UndistortionPlan) -> np.ndarray:
    if plan.map_x is None:
        return image
    cv2 = _cv2()
    return cv2.remap(
        image, plan.map_x, plan.map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def _undistort_mask(mask: np.ndarray, plan: UndistortionPlan) -> np.ndarray:
    if plan.map_x is None:
        return mask
    cv2 = _cv2()
    remapped = cv2.remap(
        mask,
        plan.map_x,
        plan.map_y,
        interpolation=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=255,
    )
    return binarize_mask(remapped)


def _read_image(path: Path, flags: int, expected_size: tuple[int, int], what: str) -> np.ndarray:
    cv2 = _cv2()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} referenced by transforms.json not found")
    image = cv2.imread(str(path), flags)
    if image is None:
        raise CorruptFileError(f"{path}: cannot be read as an image (corrupt or unsupported format)")
    height, width = image.shape[:2]
    if (width, height) != expected_size:
        raise InputError(
            f"{path}: {what} is {width}x{height} but transforms.json says w x h = "
            f"{expected_size[0]}x{expected_size[1]}"
        )
    return image


def _write_image(path: Path, image: np.ndarray, params: list[int]) -> None:
    if not _cv2().imwrite(str(path), image, params):
        raise OSError(f"{path}: OpenCV could not write the image")
