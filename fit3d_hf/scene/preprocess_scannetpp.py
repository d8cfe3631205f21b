"""Raw ScanNet++ v1 DSLR scenes -> FiT3D's preprocessed scene layout (downscale, undistort, reorganise).

This follows FiT3D's `scannetpp_preprocess/` (itself adapted from the ScanNet++ toolkit), step by step:

1. downscale images and anonymisation masks by `downscale` (x2) with bicubic interpolation, binarise the
   masks (< 255 -> 0) and scale the intrinsics;
2. undistort to a pinhole camera: OpenCV fisheye with `estimateNewCameraMatrixForUndistortRectify(...,
   balance=0)`, then principal point moved to the image centre, `initUndistortRectifyMap(..., CV_32FC1)`;
   images remapped bilinearly with BORDER_REFLECT_101, masks bilinearly with BORDER_CONSTANT 255 and
   binarised again;
3. reorganise into `<out>/scenes/<scene>/{images, masks, points3D.txt, transforms_train.json}`;
4. write `<out>/metadata/{nvs_sem_train,nvs_sem_val}.txt` and `{train,val}_samples.txt`.

Deliberate differences from the original:
- every frame appears exactly once: test frames stay in `test_frames` (the original appended them to
  `frames` as a side effect, so they were listed twice);
- half-pixel convention: ScanNet++/COLMAP intrinsics put pixel centres at half-integers (the library's
  convention), OpenCV at integers. The original passed them to OpenCV unchanged, which shifts the
  undistorted image by up to half a pixel against its written intrinsics; here K is shifted by -0.5 px
  before the OpenCV calls and back after, so that the written cx = w/2, cy = h/2 is exactly the centre;
- the intrinsics are scaled by the actual size ratio (identical to x1/downscale for sizes it divides);
- raw `OPENCV` (radial-tangential) cameras are undistorted the same way with OpenCV's pinhole model
  (`getOptimalNewCameraMatrix(alpha=0)`), and `PINHOLE` ones are only downscaled (intrinsics kept).

Each scene is built in a temporary folder next to its destination, finished with a marker file and
renamed, so an interrupted or failed scene leaves nothing behind and a finished one is skipped on resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fit3d_hf.errors import CorruptFileError, InputError, UsageError
from fit3d_hf.utils import atomic_write_text

__all__ = [
    "DONE_MARKER",
    "SUPPORTED_CAMERA_MODELS",
    "UndistortionPlan",
    "binarize_mask",
    "downscale_image",
    "make_undistortion_plan",
    "preprocess_scannetpp",
    "preprocess_scene",
    "read_raw_transforms",
    "read_split",
    "write_metadata",
]

logger = logging.getLogger(__name__)

SUPPORTED_CAMERA_MODELS = ("OPENCV_FISHEYE", "OPENCV", "PINHOLE")
# Written last into a finished scene folder; its presence (with matching options) makes resume skip it.
DONE_MARKER = ".fit3d_preprocessed.json"
SPLITS = ("train", "val")
_INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


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


def read_raw_transforms(path: str | os.PathLike) -> dict:
    """Reads and checks a ScanNet++ nerfstudio `transforms.json`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON, missing intrinsics/frames, per-frame intrinsics or an unknown camera
            model; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: transforms file not found (expected dslr/nerfstudio/transforms.json)"
        )
    try:
        transforms = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(transforms, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    model = transforms.get("camera_model")
    if model not in SUPPORTED_CAMERA_MODELS:
        raise InputError(
            f"{path}: unknown camera model {model!r}; supported: {', '.join(SUPPORTED_CAMERA_MODELS)}"
        )
    missing = [key for key in _INTRINSIC_KEYS if key not in transforms]
    if missing:
        raise InputError(f"{path}: missing intrinsics {missing}")
    for key in (*_INTRINSIC_KEYS, *(k for k in _DISTORTION_KEYS if k in transforms)):
        value = transforms[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            raise InputError(f"{path}: {key} must be a finite number, got {value!r}")
    if transforms["fl_x"] <= 0 or transforms["fl_y"] <= 0 or transforms["w"] < 1 or transforms["h"] < 1:
        raise InputError(f"{path}: focal lengths and image size must be positive")
    frames = transforms.get("frames")
    if not isinstance(frames, list) or not isinstance(transforms.get("test_frames", []), list):
        raise InputError(f"{path}: 'frames' (and 'test_frames' if present) must be lists")
    for frame in frames + transforms.get("test_frames", []):
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise InputError(f"{path}: every frame needs 'file_path' and 'transform_matrix', got {frame!r}")
        per_frame = sorted(set(frame) & {*_INTRINSIC_KEYS, *_DISTORTION_KEYS, "camera_model"})
        if per_frame:
            raise InputError(
                f"{path}: per-frame intrinsics {per_frame} in frame {frame['file_path']} are not supported"
            )
    return transforms


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


def _marker_options(downscale: float, jpeg_quality: int) -> dict:
    return {"downscale": float(downscale), "jpeg_quality": int(jpeg_quality)}


def _is_finished(scene_dir: Path, options: dict) -> bool:
    marker = scene_dir / DONE_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return all(recorded.get(key) == value for key, value in options.items())


def preprocess_scene(
    raw_root: str | os.PathLike,
    out_root: str | os.PathLike,
    scene_id: str,
    *,
    downscale: float = 2.0,
    jpeg_quality: int = 95,
    overwrite: bool = False,
) -> Path:
    """Preprocesses one raw scene into `<out_root>/scenes/<scene_id>`, or skips it if already finished.

    Args:
        raw_root: raw ScanNet++ root (holding `data/<scene_id>/dslr/...`).
        out_root: output root.
        scene_id: the scene.
        downscale: image downscale factor (ScanNet++ and FiT3D: 2).
        jpeg_quality: JPEG quality of the written images (OpenCV's default, 95, as the original).
        overwrite: redo a finished scene.

    Returns:
        The output scene folder.

    Raises:
        FileNotFoundError: missing transforms.json, image, mask or points3D.txt (named in the message).
        ValueError: unreadable image, image size disagreeing with w/h, unknown camera model, bad JSON.
    """
    from tqdm.auto import tqdm

    cv2 = _cv2()
    if downscale < 1.0:
        raise UsageError(f"--downscale must be >= 1, got {downscale}")
    raw_root, out_root = Path(raw_root), Path(out_root)
    scenes_dir = out_root / "scenes"
    target = scenes_dir / scene_id
    options = _marker_options(downscale, jpeg_quality)
    if not overwrite and _is_finished(target, options):
        logger.info("scene %s already preprocessed, skipping", scene_id)
        return target

    dslr = raw_root / "data" / scene_id / "dslr"
    transforms_path = dslr / "nerfstudio" / "transforms.json"
    transforms = read_raw_transforms(transforms_path)
    points_path = dslr / "colmap" / "points3D.txt"
    if not points_path.is_file():
        raise FileNotFoundError(f"{points_path}: COLMAP sparse points not found")
    raw_size = (int(transforms["w"]), int(transforms["h"]))
    width, height = int(raw_size[0] / downscale), int(raw_size[1] / downscale)
    plan = make_undistortion_plan(transforms, width, height, width / raw_size[0], height / raw_size[1])

    scenes_dir.mkdir(parents=True, exist_ok=True)
    for stale in scenes_dir.glob(f".{scene_id}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    # mkdir (not mkdtemp, which makes it 0700) so the scene folder gets the usual umask permissions.
    tmp = scenes_dir / f".{scene_id}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        frame_lists = {"frames": transforms["frames"], "test_frames": transforms.get("test_frames", [])}
        all_frames = [frame for frames in frame_lists.values() for frame in frames]
        names = [Path(frame["file_path"]).name for frame in all_frames]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise InputError(f"{transforms_path}: frames listed more than once: {duplicates[:5]}")
        out_frames: dict[str, list[dict]] = {key: [] for key in frame_lists}
        progress = tqdm(total=len(all_frames), desc=scene_id, unit="frame", leave=False)
        for key, frames in frame_lists.items():
            for frame in frames:
                image_name = Path(frame["file_path"]).name
                image = _read_image(dslr / "resized_images" / image_name, cv2.IMREAD_COLOR, raw_size, "image")
                image = _undistort_image(downscale_image(image, downscale), plan)
                _write_image(tmp / "images" / image_name, image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
                mask_name = Path(frame.get("mask_path") or f"{Path(image_name).stem}.png").name
                if "mask_path" in frame:
                    mask = _read_image(
                        dslr / "resized_anon_masks" / mask_name, cv2.IMREAD_GRAYSCALE, raw_size, "mask"
                    )
                    mask = _undistort_mask(binarize_mask(downscale_image(mask, downscale)), plan)
                else:  # nothing anonymised in this frame
                    mask = np.full((height, width), 255, dtype=np.uint8)
                _write_image(tmp / "masks" / mask_name, mask, [])
                out_frames[key].append({**frame, "file_path": image_name, "mask_path": mask_name})
                progress.update()
        progress.close()
        shutil.copyfile(points_path, tmp / "points3D.txt")
        out_transforms = {
            key: value
            for key, value in transforms.items()
            if key not in (*_INTRINSIC_KEYS, *_DISTORTION_KEYS, "camera_model", "frames", "test_frames")
        }
        out_transforms.update(
            {
                "camera_model": "PINHOLE",
                "fl_x": float(plan.K[0, 0]),
                "fl_y": float(plan.K[1, 1]),
                "cx": float(plan.K[0, 2]),
                "cy": float(plan.K[1, 2]),
                "w": width,
                "h": height,
                **{key: 0.0 for key in ("k1", "k2", "k3", "k4")},
                **{key: 0.0 for key in ("p1", "p2") if key in transforms},
                **out_frames,
            }
        )
        (tmp / "transforms_train.json").write_text(json.dumps(out_transforms, indent=2))
        marker = {**options, "camera_model": transforms["camera_model"], "num_frames": len(all_frames)}
        (tmp / DONE_MARKER).write_text(json.dumps(marker, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "scene %s: %d frames preprocessed (%s -> PINHOLE)",
        scene_id,
        len(all_frames),
        transforms["camera_model"],
    )
    return target


def read_split(path: str | os.PathLike) -> list[str]:
    """Scene ids of a split file (one per line, blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _write_lines(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def write_metadata(out_root: str | os.PathLike, splits: dict[str, list[str]]) -> dict[str, list[str]]:
    """Writes `metadata/nvs_sem_<split>.txt` and `metadata/<split>_samples.txt` for the finished scenes.

    Args:
        out_root: output root holding `scenes/`.
        splits: split name -> scene ids (in order); scenes not finished under `out_root` are left out.

    Returns:
        split name -> sample ids "<scene_id>_<image_stem>" (every frame exactly once).
    """
    out_root = Path(out_root)
    samples: dict[str, list[str]] = {}
    for split, scene_ids in splits.items():
        finished = [
            scene_id for scene_id in scene_ids if (out_root / "scenes" / scene_id / DONE_MARKER).is_file()
        ]
        samples[split] = []
        for scene_id in finished:
            transforms = json.loads((out_root / "scenes" / scene_id / "transforms_train.json").read_text())
            stems = sorted(
                Path(frame["file_path"]).stem for frame in transforms["frames"] + transforms["test_frames"]
            )
            samples[split] += [f"{scene_id}_{stem}" for stem in stems]
        _write_lines(out_root / "metadata" / f"nvs_sem_{split}.txt", finished)
        _write_lines(out_root / "metadata" / f"{split}_samples.txt", samples[split])
    return samples


def preprocess_scannetpp(
    raw_root: str | os.PathLike,
    out_root: str | os.PathLike,
    scene_ids: list[str] | None = None,
    *,
    downscale: float = 2.0,
    jpeg_quality: int = 95,
    overwrite: bool = False,
) -> list[Path]:
    """Preprocesses raw ScanNet++ scenes (all scenes of `splits/nvs_sem_{train,val}.txt`, or `scene_ids`)
    and rewrites the metadata lists for every finished scene under `out_root`.

    Args:
        raw_root: raw ScanNet++ root holding `data/` and `splits/`.
        out_root: output root; gets `scenes/` and `metadata/`.
        scene_ids: restrict to these scenes (each must be listed in one of the split files).
        downscale: image downscale factor.
        jpeg_quality: JPEG quality of the written images.
        overwrite: redo scenes that are already finished.

    Returns:
        The output scene folders, in processing order.
    """
    from tqdm.auto import tqdm

    raw_root = Path(raw_root)
    splits = {split: read_split(raw_root / "splits" / f"nvs_sem_{split}.txt") for split in SPLITS}
    listed = [scene_id for split in SPLITS for scene_id in splits[split]]
    if scene_ids is None:
        scene_ids = listed
    else:
        unknown = [scene_id for scene_id in scene_ids if scene_id not in listed]
        if unknown:
            raise UsageError(
                f"--scenes {unknown} are not listed in {raw_root / 'splits'}/nvs_sem_train.txt "
                "or nvs_sem_val.txt"
            )
    folders = [
        preprocess_scene(
            raw_root, out_root, scene_id, downscale=downscale, jpeg_quality=jpeg_quality, overwrite=overwrite
        )
        for scene_id in tqdm(list(dict.fromkeys(scene_ids)), desc="scenes", unit="scene")
    ]
    samples = write_metadata(out_root, splits)
    logger.info("metadata: %s", ", ".join(f"{len(v)} {k} samples" for k, v in samples.items()))
    return folders
