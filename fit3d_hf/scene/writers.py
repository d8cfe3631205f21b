"""Scene writers: nerfstudio `transforms.json`, COLMAP text models and FiT3D's ScanNet++ scene layout.

They let users convert a scene to the formats other tools read (`fit3d convert-scene`), and let the tests
check every reader by a round trip (read -> write -> read gives the same cameras and points). All write
pinhole cameras: the `Scene` model holds undistorted frames only. Files are written to a temporary name and
renamed. The nerfstudio and COLMAP writers refer to the frames' files where they are (`copy_frame_files`
first makes a self-contained copy); the ScanNet++ layout fixes where files go, so its writer copies them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from fit3d_hf.errors import InputError
from fit3d_hf.scene.camera import (
    colmap_to_scannetpp_nerfstudio,
    opencv_to_opengl_camera_to_world,
    rotmat_to_qvec,
)
from fit3d_hf.scene.ply import write_ply_points
from fit3d_hf.scene.scene import Frame, Scene
from fit3d_hf.scene.undistort import AUX_DIRS
from fit3d_hf.utils import atomic_path, atomic_write_text

__all__ = [
    "copy_frame_files",
    "write_colmap_text",
    "write_nerfstudio_transforms",
    "write_ply_points",
    "write_scannetpp_scene",
]


def _relative(path: Path, start: Path) -> str:
    """`path` relative to `start` when both share a root, else absolute (as a POSIX string)."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
    except ValueError:  # different drives on Windows
        return Path(path).resolve().as_posix()


def _points3d_text(scene: Scene) -> str:
    """The scene's sparse points as a COLMAP `points3D.txt` (no tracks)."""
    lines = [
        f"{index + 1} {x!r} {y!r} {z!r} {r} {g} {b} 0.0\n"
        for index, ((x, y, z), (r, g, b)) in enumerate(
            zip(scene.points.tolist(), scene.point_colors.tolist(), strict=True)
        )
    ]
    return (
        "# 3D point list with one line of data per point:\n"
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n" + "".join(lines)
    )


def write_nerfstudio_transforms(scene: Scene, path: Path | str) -> Path:
    """Writes the scene as a nerfstudio `transforms.json` (PINHOLE, per-frame intrinsics).

    Poses become OpenGL camera-to-world `transform_matrix`es in the scene's world frame. File paths are
    relative to the json's folder. Test frames are listed in `test_filenames` (nerfstudio's split key);
    points, if any, go to `sparse_points.ply` beside the json (`ply_file_path`).

    Args:
        scene: the scene.
        path: the json file to write, or a folder (then `<folder>/transforms.json`).

    Returns:
        The json path.
    """
    path = Path(path)
    if path.suffix != ".json":
        path = path / "transforms.json"
    folder = path.parent
    frames = []
    for frame in scene.frames:
        camera = frame.camera
        entry = {
            "file_path": _relative(frame.image_path, folder),
            "transform_matrix": opencv_to_opengl_camera_to_world(camera.world_to_camera).tolist(),
            "fl_x": camera.fx,
            "fl_y": camera.fy,
            "cx": camera.cx,
            "cy": camera.cy,
            "w": camera.width,
            "h": camera.height,
        }
        if frame.mask_path is not None:
            entry["mask_path"] = _relative(frame.mask_path, folder)
        if frame.depth_path is not None:
            entry["depth_file_path"] = _relative(frame.depth_path, folder)
        if frame.label_path is not None:
            entry["label_path"] = _relative(frame.label_path, folder)  # not a nerfstudio key; ours
        if frame.normal_path is not None:
            entry["normal_path"] = _relative(frame.normal_path, folder)  # ours too
        frames.append(entry)
    meta = {"camera_model": "PINHOLE", "frames": frames}
    test_frames = [frame for frame in scene.frames if frame.image_id in scene.test_image_ids]
    if test_frames:
        meta["test_filenames"] = [_relative(frame.image_path, folder) for frame in test_frames]
    if len(scene.points):
        write_ply_points(folder / "sparse_points.ply", scene.points, scene.point_colors)
        meta["ply_file_path"] = "sparse_points.ply"
    atomic_write_text(path, json.dumps(meta, indent=2))
    return path


def write_colmap_text(scene: Scene, folder: Path | str, *, images_dir: Path | str | None = None) -> Path:
    """Writes the scene as a COLMAP text model: `cameras.txt` (PINHOLE), `images.txt`, `points3D.txt`.

    Image names are relative to `images_dir` (default: the folder holding all the scene's images); read the
    model back with `read_scene(folder, images_dir=...)` unless that folder is `folder/images` or
    `folder/../images`. Frames sharing intrinsics and size share a camera.

    Args:
        scene: the scene.
        folder: output folder (created).
        images_dir: the folder image names are written relative to.

    Returns:
        The output folder.
    """
    folder = Path(folder)
    if images_dir is None:
        images_dir = Path(
            os.path.commonpath([str(frame.image_path.resolve().parent) for frame in scene.frames])
        )
    images_dir = Path(images_dir).resolve()

    camera_ids: dict[tuple, int] = {}
    camera_lines, image_lines = [], []
    for frame in scene.frames:
        camera = frame.camera
        key = (camera.width, camera.height, camera.fx, camera.fy, camera.cx, camera.cy)
        if key not in camera_ids:
            camera_ids[key] = len(camera_ids) + 1
            params = " ".join(repr(float(value)) for value in key[2:])
            camera_lines.append(f"{camera_ids[key]} PINHOLE {camera.width} {camera.height} {params}")
        name = Path(os.path.relpath(frame.image_path.resolve(), images_dir)).as_posix()
        if name.startswith(".."):
            raise ValueError(f"image {frame.image_path} is not inside images_dir {images_dir}")
        rotation, translation = camera.world_to_camera[:3, :3], camera.world_to_camera[:3, 3]
        pose = " ".join(repr(float(value)) for value in (*rotmat_to_qvec(rotation), *translation))
        image_lines += [f"{len(image_lines) // 2 + 1} {pose} {camera_ids[key]} {name}", ""]

    atomic_write_text(
        folder / "cameras.txt",
        "# Camera list with one line of data per camera:\n"
        "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n" + "\n".join(camera_lines) + "\n",
    )
    atomic_write_text(
        folder / "images.txt",
        "# Image list with two lines of data per image:\n"
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n"
        "#   POINTS2D[] as (X, Y, POINT3D_ID)\n" + "\n".join(image_lines) + "\n",
    )
    atomic_write_text(folder / "points3D.txt", _points3d_text(scene))
    return folder


def _file_name(image_id: str) -> str:
    """A flat file stem for an image id (ids of scenes whose image stems collide hold a '/')."""
    return image_id.replace("/", "__")


def _copy_png(source: Path, target: Path) -> Path:
    """Copies an image file to `target` (a .png path), re-encoding it losslessly if it is no PNG."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix.lower() == ".png":
        with atomic_path(target) as temporary:
            shutil.copyfile(source, temporary)
        return target
    from PIL import Image

    with Image.open(source) as image, atomic_path(target) as temporary:
        image.save(temporary, format="PNG")
    return target


def copy_frame_files(scene: Scene, folder: Path | str) -> Scene:
    """Copies the frames' files into one folder and returns the scene pointing at the copies.

    Layout: `images/<id><suffix>` (the image keeps its format) and `masks/`, `depth/`, `labels/`, `normals/`
    with `<id>.png` beside it, where `<id>` is the image id with any '/' replaced by '__'. This is the layout
    the ScanNet++ and COLMAP readers look for, so the copy of a scene reads back with the same frames.

    Args:
        scene: the scene whose files are copied.
        folder: the output folder (created).

    Returns:
        The same scene (cameras, points, test ids) with the frames' paths in `folder`.
    """
    folder = Path(folder)
    frames = []
    for frame in scene.frames:
        name = _file_name(frame.image_id)
        image_path = folder / "images" / f"{name}{frame.image_path.suffix}"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(image_path) as temporary:
            shutil.copyfile(frame.image_path, temporary)
        extras = {}
        for kind, subfolder in AUX_DIRS.items():
            source = getattr(frame, f"{kind}_path")
            if source is not None:
                extras[f"{kind}_path"] = _copy_png(source, folder / subfolder / f"{name}.png")
        frames.append(Frame(frame.image_id, image_path, frame.camera, **extras))
    return replace(scene, root=folder, frames=frames)


def write_scannetpp_scene(scene: Scene, folder: Path | str) -> Path:
    """Writes the scene in FiT3D's preprocessed ScanNet++ layout, copying its files (see `copy_frame_files`).

    `transforms_train.json` holds per-frame PINHOLE intrinsics, ScanNet++'s nerfstudio poses (its permuted
    world frame; the reader maps them back), every frame in `frames` and the test frames also in `test_frames`;
    `points3D.txt` holds the sparse points, which the layout requires.

    Args:
        scene: the scene (it must have sparse points).
        folder: the scene folder to write (its name is the scene id the reader gives the copy).

    Returns:
        The scene folder.

    Raises:
        InputError: the scene has no sparse points.
    """
    folder = Path(folder)
    if not len(scene.points):
        raise InputError(
            f"scene {scene.scene_id} ({scene.root}) has no sparse points, which the ScanNet++ layout requires; "
            "convert it to nerfstudio or colmap instead"
        )
    copied = copy_frame_files(scene, folder)
    frames, test_frames = [], []
    for (
        frame
    ) in copied.frames:  # every frame in `frames` (keeps their order), test frames also in `test_frames`
        camera = frame.camera
        entry = {
            "file_path": frame.image_path.name,
            "transform_matrix": colmap_to_scannetpp_nerfstudio(camera.world_to_camera).tolist(),
            "fl_x": camera.fx,
            "fl_y": camera.fy,
            "cx": camera.cx,
            "cy": camera.cy,
            "w": camera.width,
            "h": camera.height,
        }
        if frame.mask_path is not None:
            entry["mask_path"] = frame.mask_path.name
        frames.append(entry)
        if frame.image_id in scene.test_image_ids:
            test_frames.append(entry)
    meta = {"camera_model": "PINHOLE", "frames": frames, "test_frames": test_frames}
    atomic_write_text(folder / "points3D.txt", _points3d_text(scene))
    atomic_write_text(folder / "transforms_train.json", json.dumps(meta, indent=2))
    return folder
