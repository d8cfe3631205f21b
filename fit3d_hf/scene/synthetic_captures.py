"""Synthetic own captures: the synthetic room as a phone capture comes out of COLMAP or nerfstudio's
`ns-process-data`, lens distortion included, for tests and examples of the "own captures" path.

`generate_capture` writes the views of a `make_scene_spec` room through an OpenCV radial-tangential lens
(`OPENCV` in both tools: k1, k2, p1, p2) as

- ``"nerfstudio"``: `transforms.json` (OpenGL camera-to-world poses, `camera_model: OPENCV`, `ply_file_path`
  to the sparse points) with `images/`, and per frame `depth_file_path` and `normal_path`;
- ``"colmap"``: a COLMAP text model in `sparse/0` (an `OPENCV` camera, `images.txt`, `points3D.txt`) with
  `images/`, and `depth/`, `normals/` beside it.

Depth (uint16 millimetres, camera z) and surface normals (`fit3d_hf.scene.encode_normals`) are ground truth of
the *distorted* pixels, as a sensor registered to the camera would give them; the readers undistort them with
the images. Each pixel's colour is the ray through its centre: its normalised coordinates are found by
inverting OpenCV's distortion model by fixed-point iteration here, independently of OpenCV, so that the
readers' undistortion (which uses OpenCV) is checked against something else.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from fit3d_hf.scene.camera import opencv_to_opengl_camera_to_world, rotmat_to_qvec
from fit3d_hf.scene.scene import encode_normals
from fit3d_hf.scene.synthetic import SyntheticSceneConfig, make_scene_spec, render_rays, sample_points
from fit3d_hf.scene.synthetic.cameras import _pixel_grid
from fit3d_hf.scene.writers import write_ply_points
from fit3d_hf.utils import atomic_folder

__all__ = ["CAPTURE_LAYOUTS", "distort", "generate_capture", "undistort_points"]

CAPTURE_LAYOUTS = ("nerfstudio", "colmap")
# Fixed-point iterations inverting the distortion: mild lenses converge to 1e-12 in well under this many.
_INVERSION_STEPS = 50


def distort(normalized: np.ndarray, coefficients: tuple[float, float, float, float]) -> np.ndarray:
    """OpenCV's radial-tangential model: undistorted normalised coordinates `[N, 2]` -> distorted ones.

    Args:
        normalized: `[N, 2]` (x / z, y / z).
        coefficients: (k1, k2, p1, p2).
    """
    k1, k2, p1, p2 = coefficients
    x, y = normalized[:, 0], normalized[:, 1]
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2
    return np.stack(
        [
            x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y,
        ],
        axis=1,
    )


def undistort_points(distorted: np.ndarray, coefficients: tuple[float, float, float, float]) -> np.ndarray:
    """The inverse of `distort` (fixed-point iteration): distorted normalised coordinates -> undistorted ones."""
    k1, k2, p1, p2 = coefficients
    x, y = distorted[:, 0].copy(), distorted[:, 1].copy()
    for _ in range(_INVERSION_STEPS):
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 * r2
        dx = 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        dy = p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        x, y = (distorted[:, 0] - dx) / radial, (distorted[:, 1] - dy) / radial
    undistorted = np.stack([x, y], axis=1)
    residual = np.abs(distort(undistorted, coefficients) - distorted).max()
    if residual > 1e-9:
        raise ValueError(
            f"the distortion {coefficients} is too strong to invert here (residual {residual:.2e})"
        )
    return undistorted


def _save(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def generate_capture(
    folder: str | os.PathLike,
    config: SyntheticSceneConfig | None = None,
    *,
    layout: str = "nerfstudio",
    distortion: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
) -> Path:
    """Writes the room of `config` as an own capture in `layout` (see the module docstring).

    The folder is built under a temporary name and renamed (replacing an existing one); its name is the scene
    id the readers give it.

    Args:
        folder: the capture folder to write.
        config: the room, views and image size (`config.seed` decides the room).
        layout: "nerfstudio" or "colmap".
        distortion: OpenCV (k1, k2, p1, p2) of the lens; zeros for a pinhole capture.

    Returns:
        The capture folder.
    """
    if layout not in CAPTURE_LAYOUTS:
        raise ValueError(f"layout must be one of {CAPTURE_LAYOUTS}, got {layout!r}")
    config = replace(config or SyntheticSceneConfig(), anonymised_every=0)
    room = make_scene_spec(config)
    points = sample_points(room)
    camera = room.cameras[0]  # every view shares the intrinsics
    pixels = _pixel_grid(camera.width, camera.height, 1)
    distorted = (pixels - [camera.cx, camera.cy]) / [camera.fx, camera.fy]
    rays = undistort_points(distorted, distortion)
    names = [f"frame_{index + 1:05d}" for index in range(len(room.cameras))]
    target = Path(folder)
    with atomic_folder(target) as tmp:
        for name, view_camera in zip(names, room.cameras, strict=True):
            view = render_rays(room, view_camera.world_to_camera, rays)
            shape = (camera.height, camera.width)
            _save(
                tmp / "images" / f"{name}.png",
                np.round(np.clip(view["rgb"], 0, 1) * 255).astype(np.uint8).reshape(*shape, 3),
            )
            depth_mm = np.clip(np.round(view["depth"] * 1000.0), 0, np.iinfo(np.uint16).max).astype(np.uint16)
            _save(tmp / "depth" / f"{name}.png", depth_mm.reshape(shape))
            _save(tmp / "normals" / f"{name}.png", encode_normals(view["normals"].reshape(*shape, 3)))
        k1, k2, p1, p2 = (float(value) for value in distortion)
        if layout == "nerfstudio":
            frames = [
                {
                    "file_path": f"images/{name}.png",
                    "depth_file_path": f"depth/{name}.png",
                    "normal_path": f"normals/{name}.png",
                    "transform_matrix": opencv_to_opengl_camera_to_world(
                        view_camera.world_to_camera
                    ).tolist(),
                }
                for name, view_camera in zip(names, room.cameras, strict=True)
            ]
            write_ply_points(tmp / "sparse_pc.ply", points.xyz, points.rgb)
            transforms = {
                "camera_model": "OPENCV", "fl_x": camera.fx, "fl_y": camera.fy, "cx": camera.cx, "cy": camera.cy,
                "w": camera.width, "h": camera.height, "k1": k1, "k2": k2, "p1": p1, "p2": p2,
                "frames": frames, "ply_file_path": "sparse_pc.ply",
            }  # fmt: skip
            (tmp / "transforms.json").write_text(json.dumps(transforms, indent=2))
        else:
            model = tmp / "sparse" / "0"
            model.mkdir(parents=True)
            params = " ".join(
                repr(float(v)) for v in (camera.fx, camera.fy, camera.cx, camera.cy, k1, k2, p1, p2)
            )
            (model / "cameras.txt").write_text(f"1 OPENCV {camera.width} {camera.height} {params}\n")
            lines = []
            for index, (name, view_camera) in enumerate(zip(names, room.cameras, strict=True)):
                rotation, translation = (
                    view_camera.world_to_camera[:3, :3],
                    view_camera.world_to_camera[:3, 3],
                )
                pose = " ".join(repr(float(v)) for v in (*rotmat_to_qvec(rotation), *translation))
                lines += [f"{index + 1} {pose} 1 {name}.png", ""]
            (model / "images.txt").write_text("\n".join(lines) + "\n")
            (model / "points3D.txt").write_text(
                "".join(
                    f"{i + 1} {x!r} {y!r} {z!r} {r} {g} {b} 0.0\n"
                    for i, ((x, y, z), (r, g, b)) in enumerate(
                        zip(points.xyz.tolist(), points.rgb.tolist(), strict=True)
                    )
                )
            )
    return target
