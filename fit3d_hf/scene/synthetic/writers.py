"""Writers of synthetic scenes: FiT3D's preprocessed ScanNet++ layout (`generate_scene`), the raw
ScanNet++ DSLR layout (`generate_raw_scene`), and whole datasets with their split lists
(`generate_dataset`)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fit3d_hf.scene.camera import colmap_to_scannetpp_nerfstudio, rotmat_to_qvec
from fit3d_hf.scene.scene import encode_normals
from fit3d_hf.scene.synthetic.cameras import _pixel_grid
from fit3d_hf.scene.synthetic.config import SyntheticSceneConfig, image_ids, scene_id_for_seed
from fit3d_hf.scene.synthetic.points import SparsePoints, _fisheye_view_projection, sample_points
from fit3d_hf.scene.synthetic.raycast import render_fisheye_view, render_view
from fit3d_hf.scene.synthetic.shapes import SyntheticRoom
from fit3d_hf.scene.synthetic.spec import anonymised_mask, make_scene_spec
from fit3d_hf.utils import atomic_folder, atomic_write_text

__all__ = ["generate_dataset", "generate_raw_scene", "generate_scene"]

logger = logging.getLogger(__name__)

# Grey written over anonymised regions (ScanNet++ blurs faces there; any flat value does for a mask test).
_ANONYMISED_GREY = 0.5
# generate_dataset: validation scene j uses seed `config.seed + _VAL_SEED_OFFSET + j`.
_VAL_SEED_OFFSET = 1000

_COLMAP_POINTS_HEADER = (
    "# 3D point list with one line of data per point:\n"
    "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n"
)


def _point2d_indices(visibility: np.ndarray) -> np.ndarray:
    """`[P, V]` index of point p among the points view v sees (POINT2D_IDX in images.txt), -1 if unseen."""
    return np.where(visibility, np.cumsum(visibility, axis=0) - 1, -1)


def _write_points3d(path: Path, points: SparsePoints) -> None:
    """COLMAP `points3D.txt`; IMAGE_ID v+1 is view v, POINT2D_IDX indexes that image's row in `images.txt`."""
    indices = _point2d_indices(points.visibility)
    mean_track = points.visibility.sum(axis=1).mean() if len(points.xyz) else 0.0
    lines = [
        _COLMAP_POINTS_HEADER,
        f"# Number of points: {len(points.xyz)}, mean track length: {mean_track:.6f}\n",
    ]
    for index, (xyz, rgb) in enumerate(zip(points.xyz, points.rgb, strict=True)):
        views = np.flatnonzero(points.visibility[index])
        track = " ".join(f"{view + 1} {indices[index, view]}" for view in views)
        lines.append(
            f"{index + 1} {xyz[0]:.9g} {xyz[1]:.9g} {xyz[2]:.9g} {rgb[0]} {rgb[1]} {rgb[2]} 0 {track}\n"
        )
    path.write_text("".join(lines))


def _write_colmap_raw(colmap_dir: Path, room: SyntheticRoom, points: SparsePoints) -> None:
    colmap_dir.mkdir(parents=True, exist_ok=True)
    fisheye = room.fisheye
    (colmap_dir / "cameras.txt").write_text(
        "# Camera list with one line of data per camera:\n"
        "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n"
        "# Number of cameras: 1\n"
        f"1 OPENCV_FISHEYE {fisheye.width} {fisheye.height} {fisheye.fx:.12g} {fisheye.fy:.12g} "
        f"{fisheye.cx:.12g} {fisheye.cy:.12g} " + " ".join(f"{k:.12g}" for k in fisheye.k) + "\n"
    )
    observations = points.visibility.sum()
    lines = [
        "# Image list with two lines of data per image:\n",
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n",
        "#   POINTS2D[] as (X, Y, POINT3D_ID)\n",
        f"# Number of images: {len(room.cameras)}, mean observations per image: "
        f"{observations / max(len(room.cameras), 1):.6f}\n",
    ]
    for view_index, (camera, name) in enumerate(zip(room.cameras, room.image_ids, strict=True)):
        qvec = rotmat_to_qvec(camera.world_to_camera[:3, :3])
        tvec = camera.world_to_camera[:3, 3]
        values = " ".join(f"{v:.12g}" for v in (*qvec, *tvec))
        lines.append(f"{view_index + 1} {values} 1 {name}.JPG\n")
        seen = np.flatnonzero(points.visibility[:, view_index])
        pixels, _ = _fisheye_view_projection(room, view_index, points.xyz[seen])
        lines.append(
            " ".join(f"{x:.6f} {y:.6f} {pid + 1}" for (x, y), pid in zip(pixels, seen, strict=True)) + "\n"
        )
    (colmap_dir / "images.txt").write_text("".join(lines))
    _write_points3d(colmap_dir / "points3D.txt", points)


def _frames_json(room: SyntheticRoom) -> tuple[list[dict], list[dict]]:
    frames, test_frames = [], []
    for camera, name, is_test in zip(room.cameras, room.image_ids, room.is_test, strict=True):
        frame = {
            "file_path": f"{name}.JPG",
            "mask_path": f"{name}.png",
            "transform_matrix": colmap_to_scannetpp_nerfstudio(camera.world_to_camera).tolist(),
            "is_bad": False,
        }
        (test_frames if is_test else frames).append(frame)
    return frames, test_frames


def _save_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    from PIL import Image

    # 4:4:4 (no chroma subsampling): at these small sizes 4:2:0 would blur the texture colours noticeably.
    Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(
        path, quality=quality, subsampling=0
    )


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def _write_json(path: Path, data: dict) -> None:
    import json

    path.write_text(json.dumps(data, indent=2))


def _write_lines(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def generate_scene(
    out_root: str | os.PathLike,
    scene_id: str,
    config: SyntheticSceneConfig | None = None,
    *,
    workers: int = 1,
) -> Path:
    """Writes one scene in FiT3D's *preprocessed* ScanNet++ layout, plus depth and label ground truth.

    Layout under `<out_root>/scenes/<scene_id>/`: `images/<id>.JPG`, `masks/<id>.png` (255 valid, 0
    anonymised), `depth/<id>.png` (uint16 mm, 0 = no hit), `labels/<id>.png` (uint8 class ids),
    `normals/<id>.png` (analytic camera-frame normals, `fit3d_hf.scene.encode_normals`),
    `points3D.txt` (COLMAP, world frame; IMAGE_ID v+1 is view v) and `transforms_train.json` (PINHOLE,
    ScanNet++ nerfstudio poses; every ~8th view in `test_frames`). The folder is built under a temporary
    name and renamed, replacing an existing one.

    Args:
        out_root: dataset root.
        scene_id: folder name of the scene.
        config: scene options; `config.seed` decides the scene.
        workers: processes rendering views in parallel (the files are the same for any count).

    Returns:
        The scene folder.
    """
    config = config or SyntheticSceneConfig()
    start = time.perf_counter()
    room = make_scene_spec(config)
    points = sample_points(room, workers=workers)
    target = Path(out_root) / "scenes" / scene_id
    with atomic_folder(target) as tmp:
        for sub in ("images", "masks", "depth", "labels", "normals"):
            (tmp / sub).mkdir()
        jobs = [(room, config, view_index, tmp) for view_index in range(len(room.cameras))]
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_write_preprocessed_view, jobs))
        else:
            for job in jobs:
                _write_preprocessed_view(job)
        _write_points3d(tmp / "points3D.txt", points)
        frames, test_frames = _frames_json(room)
        K = room.cameras[0].K
        transforms = {
            "camera_model": "PINHOLE",
            "fl_x": float(K[0, 0]),
            "fl_y": float(K[1, 1]),
            "cx": float(K[0, 2]),
            "cy": float(K[1, 2]),
            "w": config.width,
            "h": config.height,
            "k1": 0.0,
            "k2": 0.0,
            "k3": 0.0,
            "k4": 0.0,
            "frames": frames,
            "test_frames": test_frames,
        }
        _write_json(tmp / "transforms_train.json", transforms)
    logger.info(
        "synthetic scene %s: %d views in %.2f s", scene_id, config.num_views, time.perf_counter() - start
    )
    return target


def _write_preprocessed_view(job) -> None:
    """Renders view `view_index` and writes its image, mask, depth and labels (one job of generate_scene)."""
    room, config, view_index, folder = job
    camera, name = room.cameras[view_index], room.image_ids[view_index]
    view = render_view(room, camera, supersample=config.supersample)
    centres = _pixel_grid(camera.width, camera.height, 1)
    normalized = (centres - [camera.cx, camera.cy]) / [camera.fx, camera.fy]
    anonymised = anonymised_mask(room, view_index, normalized).reshape(camera.height, camera.width)
    rgb = np.where(anonymised[..., None], _ANONYMISED_GREY, view["rgb"])
    _save_jpeg(folder / "images" / f"{name}.JPG", rgb, config.jpeg_quality)
    _save_png(folder / "masks" / f"{name}.png", np.where(anonymised, 0, 255).astype(np.uint8))
    depth_mm = np.clip(np.round(view["depth"] * 1000.0), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    _save_png(folder / "depth" / f"{name}.png", depth_mm)
    _save_png(folder / "labels" / f"{name}.png", view["labels"].astype(np.uint8))
    _save_png(folder / "normals" / f"{name}.png", encode_normals(view["normals"]))


def generate_raw_scene(
    raw_root: str | os.PathLike, scene_id: str, config: SyntheticSceneConfig | None = None
) -> Path:
    """Writes one scene in the *raw* ScanNet++ v1 DSLR layout (fisheye images at `raw_scale` x the size).

    Layout under `<raw_root>/data/<scene_id>/dslr/`: `resized_images/<id>.JPG`, `resized_anon_masks/<id>.png`,
    `colmap/{cameras,images,points3D}.txt` (OPENCV_FISHEYE) and `nerfstudio/transforms.json`
    (OPENCV_FISHEYE intrinsics, `frames`/`test_frames` with ScanNet++ nerfstudio poses). Built under a
    temporary name and renamed. Split files are written by `generate_dataset`.

    Returns:
        The scene folder `<raw_root>/data/<scene_id>`.
    """
    config = config or SyntheticSceneConfig()
    start = time.perf_counter()
    room = make_scene_spec(config)
    points = sample_points(room)
    target = Path(raw_root) / "data" / scene_id
    fisheye = room.fisheye
    with atomic_folder(target) as tmp:
        dslr = tmp / "dslr"
        for sub in ("resized_images", "resized_anon_masks", "colmap", "nerfstudio"):
            (dslr / sub).mkdir(parents=True)
        centres = _pixel_grid(fisheye.width, fisheye.height, 1)
        normalized_centres = fisheye.undistort(centres)
        for view_index, name in enumerate(room.image_ids):
            rgb = render_fisheye_view(room, view_index)
            anonymised = anonymised_mask(room, view_index, normalized_centres).reshape(
                fisheye.height, fisheye.width
            )
            rgb = np.where(anonymised[..., None], _ANONYMISED_GREY, rgb)
            _save_jpeg(dslr / "resized_images" / f"{name}.JPG", rgb, config.jpeg_quality)
            _save_png(
                dslr / "resized_anon_masks" / f"{name}.png", np.where(anonymised, 0, 255).astype(np.uint8)
            )
        _write_colmap_raw(dslr / "colmap", room, points)
        frames, test_frames = _frames_json(room)
        transforms = {**fisheye.to_transforms_dict(), "frames": frames, "test_frames": test_frames}
        _write_json(dslr / "nerfstudio" / "transforms.json", transforms)
    logger.info(
        "raw synthetic scene %s: %d views in %.2f s", scene_id, config.num_views, time.perf_counter() - start
    )
    return target


def generate_dataset(
    out_root: str | os.PathLike,
    num_scenes: int = 2,
    num_val_scenes: int = 1,
    config: SyntheticSceneConfig | None = None,
    raw: bool = False,
) -> Path:
    """Writes several synthetic scenes and the split/sample lists.

    Training scene i uses seed `config.seed + i`, validation scene j seed `config.seed + 1000 + j`; scene
    ids are `scene_id_for_seed(seed)` ("synth00000", ...).

    With `raw=False` (FiT3D's preprocessed layout): `<out_root>/scenes/<scene_id>/...` (see
    `generate_scene`), `<out_root>/metadata/{nvs_sem_train,nvs_sem_val}.txt` (scene ids) and
    `<out_root>/metadata/{train,val}_samples.txt` ("<scene_id>_<image_id>", every frame once).
    With `raw=True` (ScanNet++ raw DSLR layout): `<out_root>/data/<scene_id>/dslr/...` (see
    `generate_raw_scene`) and `<out_root>/splits/{nvs_sem_train,nvs_sem_val}.txt`.

    Args:
        out_root: dataset root.
        num_scenes: number of training scenes.
        num_val_scenes: number of validation scenes.
        config: options shared by all scenes (its seed is the base seed).
        raw: write the raw layout instead of the preprocessed one.

    Returns:
        `out_root` as a Path.
    """
    from tqdm.auto import tqdm

    config = config or SyntheticSceneConfig()
    if not (0 <= num_scenes <= _VAL_SEED_OFFSET and num_val_scenes >= 0):
        raise ValueError(
            f"need 0 <= num_scenes <= {_VAL_SEED_OFFSET} and num_val_scenes >= 0 (validation seeds start "
            f"{_VAL_SEED_OFFSET} above the training ones), got {num_scenes} and {num_val_scenes}"
        )
    out_root = Path(out_root)
    splits = {
        "train": [config.seed + index for index in range(num_scenes)],
        "val": [config.seed + _VAL_SEED_OFFSET + index for index in range(num_val_scenes)],
    }
    jobs = [(split, seed) for split, seeds in splits.items() for seed in seeds]
    writer = generate_raw_scene if raw else generate_scene
    for _split, seed in tqdm(jobs, desc="synthetic scenes", unit="scene"):
        writer(out_root, scene_id_for_seed(seed), replace(config, seed=seed))
    names = image_ids(config.num_views)
    for split, seeds in splits.items():
        scene_ids = [scene_id_for_seed(seed) for seed in seeds]
        if raw:
            _write_lines(out_root / "splits" / f"nvs_sem_{split}.txt", scene_ids)
        else:
            _write_lines(out_root / "metadata" / f"nvs_sem_{split}.txt", scene_ids)
            _write_lines(
                out_root / "metadata" / f"{split}_samples.txt",
                [f"{scene_id}_{name}" for scene_id in scene_ids for name in names],
            )
    return out_root
