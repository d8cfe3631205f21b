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
from pathlib import Path

import numpy as np

from fit3d_hf.errors import InputError, UsageError
from fit3d_hf.scene.preprocess_images import (
    UndistortionPlan,
    _cv2,
    _read_image,
    _undistort_image,
    _undistort_mask,
    _write_image,
    binarize_mask,
    downscale_image,
    make_undistortion_plan,
)
from fit3d_hf.utils import atomic_folder, atomic_write_text

# The image steps live in preprocess_images; their public names stay importable from here too.
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


def _frame_lists(transforms: dict, transforms_path: Path) -> dict[str, list[dict]]:
    """`frames` and `test_frames` of a raw transforms file; refuses an image listed twice."""
    frame_lists = {"frames": transforms["frames"], "test_frames": transforms.get("test_frames", [])}
    names = [Path(frame["file_path"]).name for frames in frame_lists.values() for frame in frames]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(f"{transforms_path}: frames listed more than once: {duplicates[:5]}")
    return frame_lists


def _preprocess_frame(
    frame: dict,
    dslr: Path,
    tmp: Path,
    raw_size: tuple[int, int],
    plan: UndistortionPlan,
    downscale: float,
    jpeg_quality: int,
) -> dict:
    """Downscales and undistorts one frame's image and mask into `tmp`; returns its output frame entry."""
    cv2 = _cv2()
    image_name = Path(frame["file_path"]).name
    image = _read_image(dslr / "resized_images" / image_name, cv2.IMREAD_COLOR, raw_size, "image")
    image = _undistort_image(downscale_image(image, downscale), plan)
    _write_image(tmp / "images" / image_name, image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    mask_name = Path(frame.get("mask_path") or f"{Path(image_name).stem}.png").name
    if "mask_path" in frame:
        mask = _read_image(dslr / "resized_anon_masks" / mask_name, cv2.IMREAD_GRAYSCALE, raw_size, "mask")
        mask = _undistort_mask(binarize_mask(downscale_image(mask, downscale)), plan)
    else:  # nothing anonymised in this frame
        mask = np.full((plan.height, plan.width), 255, dtype=np.uint8)
    _write_image(tmp / "masks" / mask_name, mask, [])
    return {**frame, "file_path": image_name, "mask_path": mask_name}


def _pinhole_transforms(transforms: dict, plan: UndistortionPlan, out_frames: dict[str, list[dict]]) -> dict:
    """The preprocessed scene's `transforms_train.json`: the raw file's other keys, PINHOLE intrinsics of
    `plan`, zero distortion, and the output frames."""
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
            "w": plan.width,
            "h": plan.height,
            **{key: 0.0 for key in ("k1", "k2", "k3", "k4")},
            **{key: 0.0 for key in ("p1", "p2") if key in transforms},
            **out_frames,
        }
    )
    return out_transforms


def _fill_scene_folder(
    tmp: Path, dslr: Path, transforms: dict, plan: UndistortionPlan, downscale: float, jpeg_quality: int
) -> int:
    """Writes the whole preprocessed scene into `tmp`, the done marker last; returns its number of frames."""
    from tqdm.auto import tqdm

    (tmp / "images").mkdir()
    (tmp / "masks").mkdir()
    frame_lists = _frame_lists(transforms, dslr / "nerfstudio" / "transforms.json")
    raw_size = (int(transforms["w"]), int(transforms["h"]))
    num_frames = sum(len(frames) for frames in frame_lists.values())
    out_frames: dict[str, list[dict]] = {key: [] for key in frame_lists}
    progress = tqdm(total=num_frames, desc=dslr.parent.name, unit="frame", leave=False)  # desc: the scene id
    for key, frames in frame_lists.items():
        for frame in frames:
            out_frames[key].append(
                _preprocess_frame(frame, dslr, tmp, raw_size, plan, downscale, jpeg_quality)
            )
            progress.update()
    progress.close()
    shutil.copyfile(dslr / "colmap" / "points3D.txt", tmp / "points3D.txt")
    out_transforms = _pinhole_transforms(transforms, plan, out_frames)
    (tmp / "transforms_train.json").write_text(json.dumps(out_transforms, indent=2))
    marker = {
        **_marker_options(downscale, jpeg_quality),
        "camera_model": transforms["camera_model"],
        "num_frames": num_frames,
    }
    (tmp / DONE_MARKER).write_text(json.dumps(marker, indent=2))
    return num_frames


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
    _cv2()  # fails first, before any file is read, when OpenCV is missing
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

    for stale in target.parent.glob(f".{scene_id}.*"):  # staging folders left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_folder(target) as staging:  # swapped in whole at the end; removed on failure
        num_frames = _fill_scene_folder(staging, dslr, transforms, plan, downscale, jpeg_quality)
    logger.info(
        "scene %s: %d frames preprocessed (%s -> PINHOLE)",
        scene_id,
        num_frames,
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
