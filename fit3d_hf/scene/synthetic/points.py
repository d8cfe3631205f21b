"""Sparse points standing in for COLMAP's reconstruction: surface samples seen by at least two views."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fit3d_hf.scene.synthetic.raycast import _surface_colour
from fit3d_hf.scene.synthetic.shapes import SyntheticRoom, _first_hits, _sample_surfaces

__all__ = ["SparsePoints", "sample_points"]

logger = logging.getLogger(__name__)

# Sparse points: a point is visible from a camera when the ray towards it first hits it (within this).
_VISIBILITY_TOLERANCE_M = 1e-4
# Sparse points: at most this many batches of candidates are drawn before settling for fewer points.
_MAX_POINT_BATCHES = 16


@dataclass(eq=False)
class SparsePoints:
    """Surface samples standing in for COLMAP's sparse reconstruction.

    Attributes:
        xyz: `[P, 3]` world (COLMAP) positions.
        rgb: `[P, 3]` uint8 shaded colour (what every camera sees there: shading is view-independent).
        labels: `[P]` semantic label.
        visibility: `[P, V]` bool, whether view v sees the point (inside its raw fisheye frame, not occluded).
    """

    xyz: np.ndarray
    rgb: np.ndarray
    labels: np.ndarray
    visibility: np.ndarray


def _fisheye_view_projection(room: SyntheticRoom, view_index: int, world_points: np.ndarray):
    """Raw fisheye pixels `[P, 2]` of world points and whether they fall inside the raw frame `[P]`."""
    camera = room.cameras[view_index]
    camera_points = camera.world_to_camera_points(world_points)
    in_front = camera_points[:, 2] > 1e-6
    normalized = camera_points[:, :2] / np.where(in_front, camera_points[:, 2], 1.0)[:, None]
    pixels = room.fisheye.distort(normalized)
    inside = (
        in_front
        & (pixels[:, 0] >= 0)
        & (pixels[:, 0] < room.fisheye.width)
        & (pixels[:, 1] >= 0)
        & (pixels[:, 1] < room.fisheye.height)
    )
    return pixels, inside


def _visibility(job) -> np.ndarray:
    """`[P, len(view_indices)]`: which candidates each view sees, unoccluded and inside its raw frame."""
    room, view_indices, candidates, world_points = job
    world_to_room = np.linalg.inv(room.room_to_world)
    visibility = np.zeros((len(candidates), len(view_indices)), dtype=bool)
    for column, view_index in enumerate(view_indices):
        origin = (world_to_room @ np.append(room.cameras[view_index].center, 1.0))[:3]
        _, inside = _fisheye_view_projection(room, view_index, world_points)
        offsets = candidates - origin
        distance = np.linalg.norm(offsets, axis=1)
        t, _ = _first_hits(room, np.broadcast_to(origin, offsets.shape), offsets / distance[:, None])
        visibility[:, column] = inside & (np.abs(t - distance) < _VISIBILITY_TOLERANCE_M)
    return visibility


def sample_points(room: SyntheticRoom, workers: int = 1) -> SparsePoints:
    """Samples `config.num_points` surface points seen (unoccluded, inside the raw fisheye frame) by at
    least two views, as a COLMAP reconstruction would hold, deterministically from the seed.

    Args:
        room: the scene.
        workers: processes casting the visibility rays (views split among them; same result for any count).
    """
    config = room.config
    rng = np.random.default_rng([config.seed, 0x9017])
    kept_points, kept_ids, kept_visibility = [], [], []
    num_kept = 0
    # Draw candidates in batches until enough of them are seen twice (few views see little of the room).
    for _ in range(_MAX_POINT_BATCHES):
        if num_kept >= config.num_points:
            break
        candidates, primitive_ids = _sample_surfaces(room, max(2 * config.num_points, 1024), rng)
        world_points = candidates @ room.room_to_world[:3, :3].T + room.room_to_world[:3, 3]
        chunks = [
            chunk for chunk in np.array_split(np.arange(config.num_views), max(workers, 1)) if len(chunk)
        ]
        jobs = [(room, chunk, candidates, world_points) for chunk in chunks]
        if len(jobs) > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(len(jobs)) as pool:
                visibility = np.concatenate(list(pool.map(_visibility, jobs)), axis=1)
        else:
            visibility = _visibility(jobs[0])
        keep = np.flatnonzero(visibility.sum(axis=1) >= 2)[: config.num_points - num_kept]
        kept_points.append(candidates[keep])
        kept_ids.append(primitive_ids[keep])
        kept_visibility.append(visibility[keep])
        num_kept += len(keep)
    if num_kept < config.num_points:
        logger.warning(
            "synthetic room (seed %d): only %d of %d requested points are seen by two views",
            config.seed,
            num_kept,
            config.num_points,
        )
    points = np.concatenate(kept_points) if kept_points else np.zeros((0, 3))
    primitive_ids = np.concatenate(kept_ids) if kept_ids else np.zeros(0, dtype=int)
    visibility = np.concatenate(kept_visibility) if kept_visibility else np.zeros((0, config.num_views), bool)
    colours = _surface_colour(room, points, primitive_ids)
    return SparsePoints(
        xyz=points @ room.room_to_world[:3, :3].T + room.room_to_world[:3, 3],
        rgb=np.round(colours * 255).astype(np.uint8),
        labels=room.primitive_labels()[primitive_ids],
        visibility=visibility,
    )
