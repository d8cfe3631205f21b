"""Ray casting the synthetic room: shaded colour, depth, labels and normals of camera rays, as pinhole
views (`render_view`), raw fisheye views (`render_fisheye_view`) or any rays (`render_rays`)."""

from __future__ import annotations

import numpy as np

from fit3d_hf.scene.camera import Camera
from fit3d_hf.scene.synthetic.cameras import _pixel_grid
from fit3d_hf.scene.synthetic.shapes import NO_HIT_LABEL, SyntheticRoom, _first_hits, _surface_normals

__all__ = ["render_fisheye_view", "render_rays", "render_view"]

# Lambertian shading: ambient floor + diffuse share (the light is `SyntheticRoom.light_position`).
_AMBIENT, _DIFFUSE = 0.35, 0.75


def _surface_colour(
    room: SyntheticRoom, points: np.ndarray, primitive_ids: np.ndarray, normals: np.ndarray | None = None
) -> np.ndarray:
    """Shaded colour `[N, 3]` of room-frame surface points `[N, 3]` lying on primitives `[N]` (-1: black);
    `normals` are their `_surface_normals` (computed when not given)."""
    colours = np.zeros((points.shape[0], 3))
    if normals is None:
        normals = _surface_normals(room, points, primitive_ids)
    for primitive in np.unique(primitive_ids):
        if primitive < 0:
            continue
        select = primitive_ids == primitive
        p = points[select]
        if primitive < 6:
            axis = int(primitive) // 2
            uv = np.delete(p, axis, axis=1)
            texture = room.face_textures[primitive]
        elif primitive < 6 + len(room.boxes):
            box = room.boxes[primitive - 6]
            local = (p - box.center) @ box.rotation
            axis = np.argmax(np.abs(local) / box.half_size, axis=1)
            # In-plane coordinates of each face, offset per face so that faces do not look alike.
            others = np.array([[1, 2], [0, 2], [0, 1]])[axis]
            uv = np.take_along_axis(local, others, axis=1) + 0.37 * axis[:, None]
            texture = box.texture
        else:
            sphere = room.spheres[primitive - 6 - len(room.boxes)]
            offset = p - sphere.center
            longitude = np.arctan2(offset[:, 1], offset[:, 0])
            latitude = np.arcsin(np.clip(offset[:, 2] / sphere.radius, -1.0, 1.0))
            uv = sphere.radius * np.stack([longitude, latitude], axis=1)
            texture = sphere.texture
        colours[select] = texture.albedo(uv, p)
    to_light = room.light_position - points
    to_light /= np.maximum(np.linalg.norm(to_light, axis=1, keepdims=True), 1e-9)
    lambert = np.clip(np.einsum("ij,ij->i", normals, to_light), 0.0, 1.0)
    shading = _AMBIENT + _DIFFUSE * lambert
    return np.clip(colours * shading[:, None], 0.0, 1.0) * (primitive_ids >= 0)[:, None]


def _cast_camera_rays(room: SyntheticRoom, world_to_camera: np.ndarray, normalized: np.ndarray):
    """Casts camera rays (a, b, 1) for normalised coordinates `[N, 2]` of the camera pose `world_to_camera`.

    Returns:
        depth `[N]` (camera z of the hit, 0 for none), colour `[N, 3]`, primitive id `[N]`, and the unit surface
        normal `[N, 3]` in the camera frame (OpenCV axes, towards the camera; 0 for none).
    """
    room_to_camera = world_to_camera @ room.room_to_world
    rotation, translation = room_to_camera[:3, :3], room_to_camera[:3, 3]
    origin = -rotation.T @ translation
    camera_dirs = np.concatenate([normalized, np.ones((normalized.shape[0], 1))], axis=1)
    directions = camera_dirs @ rotation  # rows: R^T d
    t, primitive_ids = _first_hits(room, np.broadcast_to(origin, directions.shape), directions)
    hit = primitive_ids >= 0
    # Camera-frame z of the direction is 1, so the ray parameter *is* the depth.
    depth = np.where(hit, t, 0.0)
    points = origin + np.where(hit, t, 0.0)[:, None] * directions
    normals = _surface_normals(room, points, primitive_ids)
    return depth, _surface_colour(room, points, primitive_ids, normals), primitive_ids, normals @ rotation.T


def render_view(room: SyntheticRoom, camera: Camera, *, supersample: int = 1) -> dict[str, np.ndarray]:
    """Ray-casts a pinhole view of the room (no anonymisation).

    Args:
        room: the scene from `make_scene_spec`.
        camera: any pinhole `Camera` in the world frame; pixel (col, row) is sampled at (col+0.5, row+0.5).
        supersample: S x S rays per pixel averaged for RGB; depth, labels and normals always come from the
            centre ray.

    Returns:
        {"rgb": float32 `[H, W, 3]` in [0, 1], "depth": float32 `[H, W]` camera z in metres (0 where
        nothing is hit), "labels": int32 `[H, W]` index into `SEMANTIC_CLASSES` (`NO_HIT_LABEL` for none),
        "normals": float32 `[H, W, 3]` analytic unit surface normals in the camera frame (OpenCV axes: x right,
        y down, z forward), pointing towards the camera (`n . p < 0` at the camera-frame point p); 0 where
        nothing is hit}.
    """
    width, height, K = camera.width, camera.height, camera.K
    centres = _pixel_grid(width, height, 1)
    normalized = np.stack([(centres[:, 0] - K[0, 2]) / K[0, 0], (centres[:, 1] - K[1, 2]) / K[1, 1]], axis=1)
    view = render_rays(room, camera.world_to_camera, normalized)
    if supersample > 1:
        samples = _pixel_grid(width, height, supersample)
        normalized = np.stack(
            [(samples[:, 0] - K[0, 2]) / K[0, 0], (samples[:, 1] - K[1, 2]) / K[1, 1]], axis=1
        )
        sample_colour = _cast_camera_rays(room, camera.world_to_camera, normalized)[1]
        view["rgb"] = sample_colour.reshape(-1, supersample * supersample, 3).mean(axis=1).astype(np.float32)
    shapes = {
        "rgb": (height, width, 3),
        "depth": (height, width),
        "labels": (height, width),
        "normals": (height, width, 3),
    }
    return {key: value.reshape(shapes[key]) for key, value in view.items()}


def render_rays(
    room: SyntheticRoom, world_to_camera: np.ndarray, normalized: np.ndarray
) -> dict[str, np.ndarray]:
    """Ray-casts the camera rays (a, b, 1) of normalised camera coordinates `[N, 2]` (any lens model: pass the
    undistorted coordinates of its pixels) from the pose `world_to_camera`.

    Returns:
        `render_view`'s entries for the N rays: "rgb" `[N, 3]`, "depth" `[N]`, "labels" `[N]`, "normals" `[N, 3]`.
    """
    depth, colour, primitive_ids, normals = _cast_camera_rays(
        room, world_to_camera, np.asarray(normalized, dtype=np.float64)
    )
    labels = np.where(primitive_ids >= 0, room.primitive_labels()[np.maximum(primitive_ids, 0)], NO_HIT_LABEL)
    return {
        "rgb": colour.astype(np.float32),
        "depth": depth.astype(np.float32),
        "labels": labels.astype(np.int32),
        "normals": normals.astype(np.float32),
    }


def render_fisheye_view(
    room: SyntheticRoom, view_index: int, *, supersample: int | None = None
) -> np.ndarray:
    """Renders view `view_index` through the raw fisheye camera `room.fisheye` (no anonymisation).

    Each sub-pixel sample casts the ray obtained by undistorting its position, so the image is exactly
    what an `OPENCV_FISHEYE` camera with these intrinsics would record (up to the S x S box filter).

    Returns:
        float32 `[H_raw, W_raw, 3]` in [0, 1].
    """
    samples_per_side = room.config.raw_supersample if supersample is None else supersample
    fisheye = room.fisheye
    samples = _pixel_grid(fisheye.width, fisheye.height, samples_per_side)
    colour = _cast_camera_rays(room, room.cameras[view_index].world_to_camera, fisheye.undistort(samples))[1]
    colour = colour.reshape(-1, samples_per_side * samples_per_side, 3).mean(axis=1)
    return colour.reshape(fisheye.height, fisheye.width, 3).astype(np.float32)
