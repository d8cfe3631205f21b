"""`make_scene_spec`: the seeded description of one synthetic room (world placement, textures, objects,
light, camera path, raw lens, test views and anonymised regions), and the anonymisation query."""

from __future__ import annotations

import logging

import numpy as np

from fit3d_hf.scene.synthetic.cameras import _PATH_SEMI_AXES, _camera_path, _pinhole_cameras, _raw_fisheye
from fit3d_hf.scene.synthetic.config import SyntheticSceneConfig, image_ids
from fit3d_hf.scene.synthetic.shapes import SyntheticBox, SyntheticRoom, SyntheticSphere
from fit3d_hf.scene.synthetic.textures import ProceduralTexture, _random_texture

__all__ = ["anonymised_mask", "make_scene_spec"]

logger = logging.getLogger(__name__)

# The light hangs this far below the ceiling centre (metres).
_LIGHT_BELOW_CEILING = 0.5
# Objects keep this many metres between their footprint circle and the camera path.
_PATH_CLEARANCE_M = 0.45


def _random_rigid(rng: np.random.Generator) -> np.ndarray:
    """A random rigid room-to-world transform `[4, 4]` (uniform rotation, offset within 2 m)."""
    from scipy.spatial.transform import Rotation

    transform = np.eye(4)
    transform[:3, :3] = Rotation.random(random_state=rng).as_matrix()
    transform[:3, 3] = rng.uniform(-2.0, 2.0, size=3)
    return transform


def _path_clearance(points_xy: np.ndarray, path_xy: np.ndarray) -> np.ndarray:
    """Distance `[M]` from each point to a densely sampled closed path `[S, 2]`."""
    return np.min(np.linalg.norm(points_xy[:, None, :] - path_xy[None, :, :], axis=2), axis=1)


def _place_objects(config: SyntheticSceneConfig, size: np.ndarray, rng: np.random.Generator):
    """Boxes and spheres that keep clear of the camera path, of the walls and of each other."""
    dense = np.linspace(0, 2 * np.pi, 256, endpoint=False)
    semi_axes = np.array(_PATH_SEMI_AXES) * size[:2]
    path_xy = size[:2] / 2 + semi_axes * np.stack([np.cos(dense), np.sin(dense)], axis=1)
    clearance = _PATH_CLEARANCE_M
    footprints: list[tuple[np.ndarray, float]] = []
    hues = rng.uniform(0, 1, size=config.num_boxes + config.num_spheres)

    def free_spot(radius: float) -> np.ndarray | None:
        for _ in range(400):
            xy = rng.uniform(
                [radius + 0.02, radius + 0.02], [size[0] - radius - 0.02, size[1] - radius - 0.02]
            )
            if _path_clearance(xy[None], path_xy)[0] < radius + clearance:
                continue
            if all(
                np.linalg.norm(xy - other) > radius + other_radius + 0.1 for other, other_radius in footprints
            ):
                footprints.append((xy, radius))
                return xy
        return None

    boxes = []
    for index in range(config.num_boxes):
        half = np.array([rng.uniform(0.15, 0.4), rng.uniform(0.15, 0.4), rng.uniform(0.2, 0.6)])
        xy = free_spot(float(np.hypot(half[0], half[1])))
        if xy is None:
            logger.warning(
                "synthetic room (seed %d): no room left for box %d, skipping it", config.seed, index
            )
            continue
        yaw = float(rng.uniform(0, np.pi / 2)) if index % 2 else 0.0
        pattern = "checker" if index % 2 == 0 else "stripes"
        boxes.append(
            SyntheticBox(
                np.array([xy[0], xy[1], half[2]]), half, yaw, _random_texture(rng, hues[index], pattern)
            )
        )
    spheres = []
    for index in range(config.num_spheres):
        radius = float(rng.uniform(0.18, 0.4))
        xy = free_spot(radius)
        if xy is None:
            logger.warning(
                "synthetic room (seed %d): no room left for sphere %d, skipping it", config.seed, index
            )
            continue
        z = radius if index % 2 == 0 else float(rng.uniform(radius + 0.2, 0.6 * size[2]))
        # Stripes along latitude only (angle pi/2 in (longitude, latitude) coordinates): no seam.
        texture = _random_texture(rng, hues[config.num_boxes + index], "stripes", angle=np.pi / 2)
        spheres.append(SyntheticSphere(np.array([xy[0], xy[1], z]), radius, texture))
    return boxes, spheres


def _face_textures(rng: np.random.Generator) -> list[ProceduralTexture]:
    """The six room faces' textures, with distinct hues (evenly spaced with a random offset, shuffled)."""
    face_hues = (rng.uniform(0, 1) + np.arange(6) / 6.0)[rng.permutation(6)]
    face_patterns = ["stripes", "checker", "stripes", "checker", "checker", "stripes"]
    return [_random_texture(rng, hue, pattern) for hue, pattern in zip(face_hues, face_patterns, strict=True)]


def _anonymised_regions(
    config: SyntheticSceneConfig, rng: np.random.Generator
) -> list[tuple[float, float, float, float] | None]:
    """Per view, None or the (a0, b0, a1, b1) rectangle in normalised camera coordinates it anonymises."""
    regions: list[tuple[float, float, float, float] | None] = []
    for index in range(config.num_views):
        if config.anonymised_every > 0 and index % config.anonymised_every == 2 % config.anonymised_every:
            centre = rng.uniform([-0.35, -0.25], [0.35, 0.25])
            half = rng.uniform([0.06, 0.08], [0.12, 0.15])
            regions.append(tuple(float(v) for v in (*(centre - half), *(centre + half))))
        else:
            regions.append(None)
    return regions


def make_scene_spec(config: SyntheticSceneConfig | None = None) -> SyntheticRoom:
    """Builds the geometry, textures, light and camera path of a scene, deterministically from `config.seed`.

    Args:
        config: scene options (defaults: `SyntheticSceneConfig()`).

    Returns:
        The `SyntheticRoom`; `render_view(room, room.cameras[i])` renders view i.
    """
    config = config or SyntheticSceneConfig()
    # One random stream, drawn from in this order: world placement, face textures, objects, camera path,
    # raw lens, anonymised regions (reordering the steps would change every generated scene).
    rng = np.random.default_rng([config.seed, 0x5CE7E])
    size = np.array([config.room_width, config.room_depth, config.room_height])
    room_to_world = _random_rigid(rng) if config.random_world_frame else np.eye(4)
    face_textures = _face_textures(rng)
    boxes, spheres = _place_objects(config, size, rng)
    light_position = np.array([size[0] / 2, size[1] / 2, size[2] - _LIGHT_BELOW_CEILING])
    positions, rotations = _camera_path(config, size, rng)
    cameras = _pinhole_cameras(config, positions, rotations, room_to_world)
    fisheye = _raw_fisheye(config, rng)
    is_test = [
        config.test_every > 0 and index % config.test_every == config.test_every - 1
        for index in range(config.num_views)
    ]
    return SyntheticRoom(
        config=config,
        size=size,
        room_to_world=room_to_world,
        face_textures=face_textures,
        boxes=boxes,
        spheres=spheres,
        light_position=light_position,
        cameras=cameras,
        fisheye=fisheye,
        image_ids=image_ids(config.num_views),
        is_test=is_test,
        anonymised_regions=_anonymised_regions(config, rng),
    )


def anonymised_mask(room: SyntheticRoom, view_index: int, normalized: np.ndarray) -> np.ndarray:
    """`[N]` bool: which normalised camera coordinates `[N, 2]` of view `view_index` are anonymised."""
    region = room.anonymised_regions[view_index]
    if region is None:
        return np.zeros(normalized.shape[0], dtype=bool)
    a0, b0, a1, b1 = region
    return (
        (normalized[:, 0] >= a0)
        & (normalized[:, 0] <= a1)
        & (normalized[:, 1] >= b0)
        & (normalized[:, 1] <= b1)
    )
