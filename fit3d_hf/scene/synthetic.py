"""A procedurally textured synthetic room, ray-cast analytically, written as ScanNet++ scenes.

The generator stands in for ScanNet++ wherever real data is not available (tests, CI, `fit3d demo`):
it writes the same files FiT3D's preprocessing produces (`generate_scene`), or the raw ScanNet++ DSLR
layout with fisheye images that `fit3d preprocess-scannetpp` consumes (`generate_raw_scene`), plus
ground truth (depth, semantic labels, analytic surface normals) the real preprocessed data does not carry.

No renderer library is involved: a room is an axis-aligned box seen from inside plus a few boxes and
spheres, so each ray's first hit has a closed form and a whole image is a handful of vectorised numpy
expressions. Shading is Lambertian under one point light and therefore view-independent, which makes the
sparse points' colours equal to the rendered colours wherever they are seen.

Frames: geometry lives in a "room frame" (x along the room's width, y along its depth, z up, the room
spanning [0, size]); `SyntheticRoom.room_to_world` places it in the world (COLMAP) frame in which the
cameras and `points3D.txt` are expressed -- a random rigid transform by default, so that nothing
downstream can silently rely on an axis-aligned, z-up world.
"""

from __future__ import annotations

import colorsys
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fit3d_hf.scene.camera import Camera, colmap_to_scannetpp_nerfstudio, intrinsics_matrix, rotmat_to_qvec
from fit3d_hf.scene.scene import encode_normals
from fit3d_hf.utils import atomic_write_text

__all__ = [
    "NO_HIT_LABEL",
    "SEMANTIC_CLASSES",
    "FisheyeIntrinsics",
    "ProceduralTexture",
    "SparsePoints",
    "SyntheticBox",
    "SyntheticRoom",
    "SyntheticSceneConfig",
    "SyntheticSphere",
    "anonymised_mask",
    "generate_dataset",
    "generate_raw_scene",
    "generate_scene",
    "image_ids",
    "make_scene_spec",
    "render_fisheye_view",
    "render_rays",
    "render_view",
    "sample_points",
    "scene_id_for_seed",
]

logger = logging.getLogger(__name__)

# Semantic label id = index in this list.
SEMANTIC_CLASSES: list[str] = ["wall", "floor", "ceiling", "box", "sphere"]
# Label of pixels whose ray hits nothing (cannot happen inside the closed room; kept for completeness).
NO_HIT_LABEL = 255

_WALL, _FLOOR, _CEILING, _BOX, _SPHERE = range(5)
# Room faces in the order the ray caster numbers them: x=0, x=X, y=0, y=Y, z=0 (floor), z=Z (ceiling).
_ROOM_FACE_LABELS = (_WALL, _WALL, _WALL, _WALL, _FLOOR, _CEILING)
# Grey written over anonymised regions (ScanNet++ blurs faces there; any flat value does for a mask test).
_ANONYMISED_GREY = 0.5
# Lambertian shading: ambient floor + diffuse share; the light hangs this far below the ceiling centre.
_AMBIENT, _DIFFUSE, _LIGHT_BELOW_CEILING = 0.35, 0.75, 0.5
# Sparse points: a point is visible from a camera when the ray towards it first hits it (within this).
_VISIBILITY_TOLERANCE_M = 1e-4
# Camera path: an ellipse around the room centre with these semi-axes (fractions of the room's width and
# depth); objects keep this many metres between their footprint circle and the path.
_PATH_SEMI_AXES, _PATH_CLEARANCE_M = (0.18, 0.15), 0.45
# Sparse points: at most this many batches of candidates are drawn before settling for fewer points.
_MAX_POINT_BATCHES = 16
# generate_dataset: validation scene j uses seed `config.seed + _VAL_SEED_OFFSET + j`.
_VAL_SEED_OFFSET = 1000

_COLMAP_POINTS_HEADER = (
    "# 3D point list with one line of data per point:\n"
    "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n"
)


@dataclass
class SyntheticSceneConfig:
    """Options of one synthetic scene; the same config and seed always give the same files.

    Args:
        seed: seeds the room layout, textures, camera path and sparse points.
        num_views: number of camera views along the path.
        width: width of the *preprocessed* (pinhole) images in pixels.
        height: height of the preprocessed images in pixels.
        num_points: number of sparse points in `points3D.txt` (fewer if the room cannot supply enough
            points seen by at least two views).
        fov_degrees: horizontal field of view of the preprocessed pinhole camera; the raw fisheye camera
            is built to cover about the same angle.
        room_width: room extent along the room frame's x axis, in metres.
        room_depth: room extent along y, in metres.
        room_height: room extent along z (up), in metres.
        num_boxes: boxes standing on the floor (some rotated about the vertical axis).
        num_spheres: spheres resting on the floor or floating.
        test_every: every `test_every`-th view (indices test_every-1, 2*test_every-1, ...) goes to
            `test_frames`; 0 puts every view into `frames`.
        anonymised_every: every `anonymised_every`-th view (indices 2, 2+n, ...) gets an anonymised
            rectangle (grey in the image, 0 in the mask); 0 disables them.
        supersample: rays per pixel side for the RGB of the preprocessed images (depth and labels are
            always taken at the pixel centre).
        raw_scale: the raw images are `raw_scale` times the preprocessed size (ScanNet++ downscales x2).
        raw_supersample: rays per pixel side for the raw fisheye images, so that downscaling them is clean.
        fisheye_k1: OPENCV_FISHEYE (equidistant) distortion coefficient k1 of the raw camera.
        fisheye_k2: coefficient k2.
        fisheye_k3: coefficient k3.
        fisheye_k4: coefficient k4.
        jpeg_quality: JPEG quality of the written images.
        random_world_frame: place the room in the world (COLMAP) frame with a random rigid transform;
            if False the world frame is the room frame (z up, room in [0, size]).
    """

    seed: int = 0
    num_views: int = 24
    width: int = 160
    height: int = 120
    num_points: int = 4000
    fov_degrees: float = 70.0
    room_width: float = 6.0
    room_depth: float = 4.0
    room_height: float = 3.0
    num_boxes: int = 4
    num_spheres: int = 3
    test_every: int = 8
    anonymised_every: int = 5
    supersample: int = 1
    raw_scale: int = 2
    raw_supersample: int = 2
    fisheye_k1: float = 0.05
    fisheye_k2: float = -0.01
    fisheye_k3: float = 0.004
    fisheye_k4: float = -0.001
    jpeg_quality: int = 95
    random_world_frame: bool = True

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("num_views", "width", "height", "supersample", "raw_scale", "raw_supersample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 10.0 <= self.fov_degrees <= 120.0:
            raise ValueError(f"fov_degrees must lie in [10, 120], got {self.fov_degrees}")
        if min(self.room_width, self.room_depth) < 2.5 or self.room_height < 2.0:
            raise ValueError(
                "the room must be at least 2.5 m wide and deep and 2 m high, got "
                f"{self.room_width} x {self.room_depth} x {self.room_height}"
            )
        if self.num_points < 0 or self.num_boxes < 0 or self.num_spheres < 0:
            raise ValueError("num_points, num_boxes and num_spheres must be >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")


@dataclass(frozen=True, eq=False)
class ProceduralTexture:
    """A band-limited procedural albedo: two colours mixed by a stripe or soft-checker pattern laid out
    in surface coordinates, perturbed by smooth noise (a sum of plane waves in 3D).

    The pattern is deliberately smooth at the pixel scale (sinusoids, tanh-softened checkers): it carries
    plenty of detail for PSNR and features, while resampling (downscale, undistortion) stays faithful.
    """

    colour_a: np.ndarray  # [3]
    colour_b: np.ndarray  # [3]
    pattern: str  # "stripes" | "checker"
    wavelength: float  # metres per pattern period
    angle: float  # stripe direction in the (u, v) surface plane, radians
    phases: np.ndarray  # [2]
    wave_vectors: np.ndarray  # [K, 3] noise spatial frequencies, cycles per metre
    wave_phases: np.ndarray  # [K]
    tint: np.ndarray  # [3] colour direction of the noise

    def albedo(self, uv: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Albedo `[N, 3]` in [0, 1] at surface coordinates `uv [N, 2]` (metres) and points `[N, 3]`."""
        omega = 2.0 * np.pi / self.wavelength
        if self.pattern == "stripes":
            coordinate = math.cos(self.angle) * uv[:, 0] + math.sin(self.angle) * uv[:, 1]
            mix = 0.5 + 0.5 * np.sin(omega * coordinate + self.phases[0])
        else:
            product = np.sin(omega * uv[:, 0] + self.phases[0]) * np.sin(omega * uv[:, 1] + self.phases[1])
            mix = 0.5 + 0.5 * np.tanh(2.5 * product)
        noise = np.sin(2.0 * np.pi * points @ self.wave_vectors.T + self.wave_phases).mean(axis=1)
        mix = np.clip(mix + 0.3 * noise, 0.0, 1.0)[:, None]
        colour = self.colour_a * (1.0 - mix) + self.colour_b * mix
        colour = colour * (1.0 + 0.15 * noise[:, None]) + 0.03 * noise[:, None] * self.tint
        return np.clip(colour, 0.0, 1.0)


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


@dataclass(frozen=True, eq=False)
class FisheyeIntrinsics:
    """The raw DSLR camera: OpenCV's equidistant fisheye model (`cv2.fisheye`, COLMAP `OPENCV_FISHEYE`).

    Pixel coordinates follow the library convention (pixel centres at half-integers), as COLMAP's do.
    A normalised ray (a, b, 1) at angle theta = atan(r), r = |(a, b)|, lands at radius
    theta_d = theta (1 + k1 theta^2 + k2 theta^4 + k3 theta^6 + k4 theta^8) scaled by (fx, fy).
    """

    fx: float
    fy: float
    cx: float
    cy: float
    k: tuple[float, float, float, float]
    width: int
    height: int

    def distort(self, normalized: np.ndarray) -> np.ndarray:
        """Normalised camera coordinates `[N, 2]` (x/z, y/z) -> pixel coordinates `[N, 2]`."""
        radius = np.hypot(normalized[:, 0], normalized[:, 1])
        theta = np.arctan(radius)
        theta2 = theta * theta
        k1, k2, k3, k4 = self.k
        theta_d = theta * (1 + theta2 * (k1 + theta2 * (k2 + theta2 * (k3 + theta2 * k4))))
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(radius > 1e-12, theta_d / radius, 1.0)
        return np.stack(
            [self.fx * normalized[:, 0] * scale + self.cx, self.fy * normalized[:, 1] * scale + self.cy],
            axis=1,
        )

    def undistort(self, pixels: np.ndarray) -> np.ndarray:
        """Pixel coordinates `[N, 2]` -> normalised camera coordinates `[N, 2]`.

        Written by hand (Newton on theta, 8 steps, converges to ~1e-12 for the mild coefficients used here)
        so that the generator does not need OpenCV, which is an optional dependency of the package.
        """
        distorted = np.stack([(pixels[:, 0] - self.cx) / self.fx, (pixels[:, 1] - self.cy) / self.fy], axis=1)
        theta_d = np.hypot(distorted[:, 0], distorted[:, 1])
        k1, k2, k3, k4 = self.k
        theta = theta_d.copy()
        for _ in range(8):
            theta2 = theta * theta
            value = theta * (1 + theta2 * (k1 + theta2 * (k2 + theta2 * (k3 + theta2 * k4)))) - theta_d
            slope = 1 + theta2 * (3 * k1 + theta2 * (5 * k2 + theta2 * (7 * k3 + theta2 * 9 * k4)))
            theta = theta - value / slope
        if np.any(theta >= 0.5 * np.pi - 1e-3):
            raise ValueError(
                "fisheye pixels beyond 90 degrees from the axis; use milder coefficients or a longer focal"
            )
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(theta_d > 1e-12, np.tan(theta) / theta_d, 1.0)
        return distorted * scale[:, None]

    def to_transforms_dict(self) -> dict:
        """The intrinsics keys of a ScanNet++ nerfstudio `transforms.json`."""
        k1, k2, k3, k4 = self.k
        return {
            "fl_x": self.fx,
            "fl_y": self.fy,
            "cx": self.cx,
            "cy": self.cy,
            "w": self.width,
            "h": self.height,
            "k1": k1,
            "k2": k2,
            "k3": k3,
            "k4": k4,
            "camera_model": "OPENCV_FISHEYE",
        }


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


def scene_id_for_seed(seed: int) -> str:
    """Scene id of the generated scene with `seed`: ten characters without "_" like ScanNet++'s ids."""
    return f"synth{seed:05d}"


def image_ids(num_views: int) -> list[str]:
    """ScanNet++-style DSLR image names (without extension) of `num_views` views."""
    return [f"DSC{index:05d}" for index in range(num_views)]


# ---------------------------------------------------------------------------------------------------
# Scene description
# ---------------------------------------------------------------------------------------------------


def _random_texture(
    rng: np.random.Generator, hue: float, pattern: str, angle: float | None = None
) -> ProceduralTexture:
    saturation, value = rng.uniform(0.35, 0.65), rng.uniform(0.6, 0.9)
    colour_a = np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))
    # The second colour is a darker shade of a close hue: the pattern is mostly luminance, as in real
    # textures, so chroma-subsampled JPEGs keep it, and every surface stays recognisable by its hue.
    colour_b = np.array(
        colorsys.hsv_to_rgb(
            (hue + rng.uniform(0.0, 0.04)) % 1.0, min(1.0, saturation + 0.1), value * rng.uniform(0.35, 0.55)
        )
    )
    num_waves = 6
    directions = rng.normal(size=(num_waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(0.25, 1.2, size=num_waves)
    return ProceduralTexture(
        colour_a=colour_a,
        colour_b=colour_b,
        pattern=pattern,
        wavelength=float(rng.uniform(0.3, 0.6)),
        angle=float(rng.uniform(0, np.pi) if angle is None else angle),
        phases=rng.uniform(0, 2 * np.pi, size=2),
        wave_vectors=directions / wavelengths[:, None],
        wave_phases=rng.uniform(0, 2 * np.pi, size=num_waves),
        tint=rng.normal(size=3),
    )


def _look_rotation(forward: np.ndarray, up: np.ndarray) -> np.ndarray:
    """`[3, 3]` world-to-camera rotation (OpenCV axes) of a camera looking along `forward`."""
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def _random_rigid(rng: np.random.Generator) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    transform = np.eye(4)
    transform[:3, :3] = Rotation.random(random_state=rng).as_matrix()
    transform[:3, 3] = rng.uniform(-2.0, 2.0, size=3)
    return transform


def _camera_path(config: SyntheticSceneConfig, size: np.ndarray, rng: np.random.Generator):
    """Positions `[V, 3]` and room-to-camera rotations `[V, 3, 3]` (room frame) along a smooth loop.

    The cameras circle an ellipse around the room centre and look across the room (at the far walls and
    the objects standing between the path and those walls), with smoothly varying yaw offset, pitch and
    height, so that neighbouring views overlap a lot.
    """
    semi_axes = np.array(_PATH_SEMI_AXES) * size[:2]
    phase = rng.uniform(0, 2 * np.pi)
    yaw_phase, pitch_phase, height_phase = rng.uniform(0, 2 * np.pi, size=3)
    angles = phase + 2 * np.pi * np.arange(config.num_views) / config.num_views
    positions = np.stack(
        [
            size[0] / 2 + semi_axes[0] * np.cos(angles),
            size[1] / 2 + semi_axes[1] * np.sin(angles),
            0.5 * size[2] + 0.1 * size[2] * np.sin(2 * angles + height_phase),
        ],
        axis=1,
    )
    yaws = angles + np.pi + 0.6 * np.sin(angles + yaw_phase)
    pitches = -0.3 + 0.12 * np.sin(2 * angles + pitch_phase)
    forwards = np.stack(
        [np.cos(yaws) * np.cos(pitches), np.sin(yaws) * np.cos(pitches), np.sin(pitches)], axis=1
    )
    rotations = np.stack([_look_rotation(f, np.array([0.0, 0.0, 1.0])) for f in forwards])
    return positions, rotations


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


def make_scene_spec(config: SyntheticSceneConfig | None = None) -> SyntheticRoom:
    """Builds the geometry, textures, light and camera path of a scene, deterministically from `config.seed`.

    Args:
        config: scene options (defaults: `SyntheticSceneConfig()`).

    Returns:
        The `SyntheticRoom`; `render_view(room, room.cameras[i])` renders view i.
    """
    config = config or SyntheticSceneConfig()
    rng = np.random.default_rng([config.seed, 0x5CE7E])
    size = np.array([config.room_width, config.room_depth, config.room_height])
    room_to_world = _random_rigid(rng) if config.random_world_frame else np.eye(4)

    # Distinct hues for the six faces (evenly spaced with a random offset, shuffled).
    face_hues = (rng.uniform(0, 1) + np.arange(6) / 6.0)[rng.permutation(6)]
    face_patterns = ["stripes", "checker", "stripes", "checker", "checker", "stripes"]
    face_textures = [
        _random_texture(rng, hue, pattern) for hue, pattern in zip(face_hues, face_patterns, strict=True)
    ]
    boxes, spheres = _place_objects(config, size, rng)
    light_position = np.array([size[0] / 2, size[1] / 2, size[2] - _LIGHT_BELOW_CEILING])

    positions, rotations = _camera_path(config, size, rng)
    world_to_room = np.linalg.inv(room_to_world)
    fx = 0.5 * config.width / math.tan(math.radians(config.fov_degrees) / 2)
    K = intrinsics_matrix(fx, fx, config.width / 2, config.height / 2)
    cameras = []
    for position, rotation in zip(positions, rotations, strict=True):
        room_to_camera = np.eye(4)
        room_to_camera[:3, :3] = rotation
        room_to_camera[:3, 3] = -rotation @ position
        cameras.append(Camera(K, room_to_camera @ world_to_room, config.width, config.height))

    # Raw fisheye: about the same horizontal angle over twice the pixels, slightly anisotropic focal and
    # an off-centre principal point, like a calibrated DSLR.
    k = (config.fisheye_k1, config.fisheye_k2, config.fisheye_k3, config.fisheye_k4)
    half_angle = math.radians(config.fov_degrees) / 2
    theta2 = half_angle * half_angle
    theta_d = half_angle * (1 + theta2 * (k[0] + theta2 * (k[1] + theta2 * (k[2] + theta2 * k[3]))))
    raw_width, raw_height = config.raw_scale * config.width, config.raw_scale * config.height
    raw_fx = 0.5 * raw_width / theta_d
    fisheye = FisheyeIntrinsics(
        fx=float(raw_fx),
        fy=float(raw_fx * rng.uniform(0.99, 1.01)),
        cx=float(raw_width / 2 + rng.uniform(-0.02, 0.02) * raw_width),
        cy=float(raw_height / 2 + rng.uniform(-0.02, 0.02) * raw_height),
        k=k,
        width=raw_width,
        height=raw_height,
    )

    names = image_ids(config.num_views)
    is_test = [
        config.test_every > 0 and index % config.test_every == config.test_every - 1
        for index in range(config.num_views)
    ]
    regions: list[tuple[float, float, float, float] | None] = []
    for index in range(config.num_views):
        if config.anonymised_every > 0 and index % config.anonymised_every == 2 % config.anonymised_every:
            centre = rng.uniform([-0.35, -0.25], [0.35, 0.25])
            half = rng.uniform([0.06, 0.08], [0.12, 0.15])
            regions.append(tuple(float(v) for v in (*(centre - half), *(centre + half))))
        else:
            regions.append(None)
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
        image_ids=names,
        is_test=is_test,
        anonymised_regions=regions,
    )


# ---------------------------------------------------------------------------------------------------
# Ray casting
# ---------------------------------------------------------------------------------------------------


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


def _pixel_grid(width: int, height: int, samples: int) -> np.ndarray:
    """`[H * W * S * S, 2]` sample positions (col, row): S x S regular sub-samples per pixel, pixel-major."""
    offsets = (np.arange(samples) + 0.5) / samples
    sub_x, sub_y = np.meshgrid(offsets, offsets)
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    xs = cols[..., None] + sub_x.reshape(-1)
    ys = rows[..., None] + sub_y.reshape(-1)
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1)


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
    shapes = {"rgb": (height, width, 3), "depth": (height, width), "labels": (height, width), "normals": (height, width, 3)}
    return {key: value.reshape(shapes[key]) for key, value in view.items()}


def render_rays(room: SyntheticRoom, world_to_camera: np.ndarray, normalized: np.ndarray) -> dict[str, np.ndarray]:
    """Ray-casts the camera rays (a, b, 1) of normalised camera coordinates `[N, 2]` (any lens model: pass the
    undistorted coordinates of its pixels) from the pose `world_to_camera`.

    Returns:
        `render_view`'s entries for the N rays: "rgb" `[N, 3]`, "depth" `[N]`, "labels" `[N]`, "normals" `[N, 3]`.
    """
    depth, colour, primitive_ids, normals = _cast_camera_rays(room, world_to_camera, np.asarray(normalized, dtype=np.float64))
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


# ---------------------------------------------------------------------------------------------------
# Sparse points
# ---------------------------------------------------------------------------------------------------


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
        chunks = [chunk for chunk in np.array_split(np.arange(config.num_views), max(workers, 1)) if len(chunk)]
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


# ---------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------


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


class _AtomicFolder:
    """Builds a folder under a temporary name beside `target`; swapped in on success, removed on failure."""

    def __init__(self, target: Path) -> None:
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # mkdir (not mkdtemp, which makes it 0700) so the folder gets the usual umask permissions.
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            shutil.rmtree(self.target)
        os.replace(self.tmp, self.target)


def _write_lines(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def generate_scene(
    out_root: str | os.PathLike, scene_id: str, config: SyntheticSceneConfig | None = None, *, workers: int = 1
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
    with _AtomicFolder(target) as tmp:
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
    with _AtomicFolder(target) as tmp:
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
