"""The synthetic room's geometry: the room box seen from inside, boxes and spheres standing in it, their
semantic labels, and the closed-form geometry the ray caster and the point sampler need (first ray hits,
analytic surface normals, area-uniform surface samples).

Primitive ids: 0-5 are the room faces (x=0, x=X, y=0, y=Y, floor, ceiling), then the boxes, then the
spheres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fit3d_hf.scene.camera import Camera
from fit3d_hf.scene.synthetic.cameras import FisheyeIntrinsics
from fit3d_hf.scene.synthetic.config import SyntheticSceneConfig
from fit3d_hf.scene.synthetic.textures import ProceduralTexture

__all__ = [
    "NO_HIT_LABEL",
    "SEMANTIC_CLASSES",
    "SyntheticBox",
    "SyntheticRoom",
    "SyntheticSphere",
]

# Semantic label id = index in this list.
SEMANTIC_CLASSES: list[str] = ["wall", "floor", "ceiling", "box", "sphere"]
# Label of pixels whose ray hits nothing (cannot happen inside the closed room; kept for completeness).
NO_HIT_LABEL = 255

_WALL, _FLOOR, _CEILING, _BOX, _SPHERE = range(5)
# Room faces in the order the ray caster numbers them: x=0, x=X, y=0, y=Y, z=0 (floor), z=Z (ceiling).
_ROOM_FACE_LABELS = (_WALL, _WALL, _WALL, _WALL, _FLOOR, _CEILING)


@dataclass(frozen=True, eq=False)
class SyntheticBox:
    """A box standing in the room, rotated by `yaw` about the vertical axis (room frame)."""

    center: np.ndarray  # [3]
    half_size: np.ndarray  # [3]
    yaw: float
    texture: ProceduralTexture
    label: int = _BOX

    @property
    def rotation(self) -> np.ndarray:
        """`[3, 3]` local-to-room rotation."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True, eq=False)
class SyntheticSphere:
    """A sphere in the room frame."""

    center: np.ndarray  # [3]
    radius: float
    texture: ProceduralTexture
    label: int = _SPHERE


@dataclass(eq=False)
class SyntheticRoom:
    """Everything needed to render a synthetic scene: geometry, textures, light and the camera path.

    Attributes:
        config: the options it was built from.
        size: `[3]` room extent (x, y, z) in metres; the room spans [0, size] in the room frame.
        room_to_world: `[4, 4]` rigid transform from the room frame to the world (COLMAP) frame.
        face_textures: six textures for the faces x=0, x=X, y=0, y=Y, floor, ceiling.
        boxes: the boxes.
        spheres: the spheres.
        light_position: `[3]` point light, room frame.
        cameras: one pinhole `Camera` per view (the preprocessed images), world frame.
        fisheye: the raw camera's intrinsics (shared by all views, same poses as `cameras`).
        image_ids: ScanNet++-style image names without extension, "DSC00000", ...
        is_test: per view, whether it belongs to `test_frames`.
        anonymised_regions: per view, None or (a0, b0, a1, b1), a rectangle in normalised camera
            coordinates (x/z, y/z) whose pixels are anonymised.
    """

    config: SyntheticSceneConfig
    size: np.ndarray
    room_to_world: np.ndarray
    face_textures: list[ProceduralTexture]
    boxes: list[SyntheticBox]
    spheres: list[SyntheticSphere]
    light_position: np.ndarray
    cameras: list[Camera]
    fisheye: FisheyeIntrinsics
    image_ids: list[str]
    is_test: list[bool]
    anonymised_regions: list[tuple[float, float, float, float] | None] = field(default_factory=list)

    @property
    def num_primitives(self) -> int:
        return 6 + len(self.boxes) + len(self.spheres)

    def primitive_labels(self) -> np.ndarray:
        """`[num_primitives]` semantic label of each primitive id used by the ray caster."""
        labels = list(_ROOM_FACE_LABELS) + [box.label for box in self.boxes] + [s.label for s in self.spheres]
        return np.asarray(labels, dtype=np.int32)


def _first_hits(
    room: SyntheticRoom, origins: np.ndarray, directions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Ray parameter `t [N]` of the first hit along `origins + t * directions` (room frame, directions need
    not be unit) and the primitive id `[N]` hit (0-5 room faces, then boxes, then spheres; -1 for none)."""
    num_rays = origins.shape[0]
    # Inside the room every ray leaves through exactly one face: the nearest of the three face planes ahead.
    with np.errstate(divide="ignore", invalid="ignore"):
        bounds = np.where(directions > 0, room.size, 0.0)
        t_faces = (bounds - origins) / directions
    t_faces = np.where(np.abs(directions) > 1e-12, t_faces, np.inf)
    axis = np.argmin(t_faces, axis=1)
    best_t = t_faces[np.arange(num_rays), axis]
    best_id = 2 * axis + (directions[np.arange(num_rays), axis] > 0)
    best_id = np.where(np.isfinite(best_t), best_id, -1)

    for index, box in enumerate(room.boxes):
        # Slab test in the box's local frame.
        local_origins = (origins - box.center) @ box.rotation
        local_dirs = directions @ box.rotation
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / local_dirs
            t1 = (-box.half_size - local_origins) * inv
            t2 = (box.half_size - local_origins) * inv
        t1 = np.nan_to_num(t1, nan=-np.inf)
        t2 = np.nan_to_num(t2, nan=np.inf)
        t_near = np.max(np.minimum(t1, t2), axis=1)
        t_far = np.min(np.maximum(t1, t2), axis=1)
        hit = (t_near <= t_far) & (t_near > 1e-9) & (t_near < best_t)
        best_t = np.where(hit, t_near, best_t)
        best_id = np.where(hit, 6 + index, best_id)

    for index, sphere in enumerate(room.spheres):
        offset = origins - sphere.center
        a = np.einsum("ij,ij->i", directions, directions)
        b = np.einsum("ij,ij->i", directions, offset)
        c = np.einsum("ij,ij->i", offset, offset) - sphere.radius**2
        discriminant = b * b - a * c
        with np.errstate(invalid="ignore"):
            t_sphere = (-b - np.sqrt(discriminant)) / a
        hit = (discriminant >= 0) & (t_sphere > 1e-9) & (t_sphere < best_t)
        best_t = np.where(hit, t_sphere, best_t)
        best_id = np.where(hit, 6 + len(room.boxes) + index, best_id)
    return best_t, best_id


def _surface_normals(room: SyntheticRoom, points: np.ndarray, primitive_ids: np.ndarray) -> np.ndarray:
    """Analytic unit normals `[N, 3]` (room frame) of surface points `[N, 3]` on primitives `[N]` (-1: zero).

    Every normal points to the side the cameras see: room faces into the room, boxes and spheres outwards.
    """
    normals = np.zeros((points.shape[0], 3))
    for primitive in np.unique(primitive_ids):
        if primitive < 0:
            continue
        select = primitive_ids == primitive
        p = points[select]
        if primitive < 6:
            axis, positive = divmod(int(primitive), 2)
            normals[select, axis] = -1.0 if positive else 1.0  # faces look into the room
        elif primitive < 6 + len(room.boxes):
            box = room.boxes[primitive - 6]
            local = (p - box.center) @ box.rotation
            axis = np.argmax(np.abs(local) / box.half_size, axis=1)
            local_normal = np.zeros_like(local)
            local_normal[np.arange(len(local)), axis] = np.sign(local[np.arange(len(local)), axis])
            normals[select] = local_normal @ box.rotation.T
        else:
            sphere = room.spheres[primitive - 6 - len(room.boxes)]
            normals[select] = (p - sphere.center) / sphere.radius
    return normals


def _sample_surfaces(
    room: SyntheticRoom, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`count` room-frame points drawn uniformly by area over all surfaces, and their primitive ids."""
    size = room.size
    areas = [size[1] * size[2]] * 2 + [size[0] * size[2]] * 2 + [size[0] * size[1]] * 2
    for box in room.boxes:
        hx, hy, hz = box.half_size
        areas.append(8 * (hx * hy + hx * hz + hy * hz))
    areas += [4 * np.pi * sphere.radius**2 for sphere in room.spheres]
    areas = np.asarray(areas)
    primitive_ids = rng.choice(len(areas), size=count, p=areas / areas.sum())
    points = np.zeros((count, 3))
    for primitive in np.unique(primitive_ids):
        select = primitive_ids == primitive
        n = int(select.sum())
        if primitive < 6:
            axis, positive = divmod(int(primitive), 2)
            p = rng.uniform(0, 1, size=(n, 3)) * size
            p[:, axis] = size[axis] if positive else 0.0
        elif primitive < 6 + len(room.boxes):
            box = room.boxes[primitive - 6]
            half = box.half_size
            face_areas = np.array([half[1] * half[2], half[0] * half[2], half[0] * half[1]]).repeat(2)
            faces = rng.choice(6, size=n, p=face_areas / face_areas.sum())
            local = rng.uniform(-1, 1, size=(n, 3)) * half
            axis = faces // 2
            local[np.arange(n), axis] = np.where(faces % 2, 1.0, -1.0) * half[axis]
            p = local @ box.rotation.T + box.center
        else:
            sphere = room.spheres[primitive - 6 - len(room.boxes)]
            direction = rng.normal(size=(n, 3))
            direction /= np.linalg.norm(direction, axis=1, keepdims=True)
            p = sphere.center + sphere.radius * direction
        points[select] = p
    return points, primitive_ids
