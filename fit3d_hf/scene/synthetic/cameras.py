"""Cameras of the synthetic room: the raw fisheye lens, the loop the views follow, the pinhole cameras
of the preprocessed images, and the pixel sample grid the ray caster shoots through."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fit3d_hf.scene.camera import Camera, intrinsics_matrix
from fit3d_hf.scene.synthetic.config import SyntheticSceneConfig

__all__ = ["FisheyeIntrinsics"]

# Camera path: an ellipse around the room centre with these semi-axes (fractions of the room's width
# and depth).
_PATH_SEMI_AXES = (0.18, 0.15)


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


def _look_rotation(forward: np.ndarray, up: np.ndarray) -> np.ndarray:
    """`[3, 3]` world-to-camera rotation (OpenCV axes) of a camera looking along `forward`."""
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


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


def _pinhole_cameras(
    config: SyntheticSceneConfig, positions: np.ndarray, rotations: np.ndarray, room_to_world: np.ndarray
) -> list[Camera]:
    """The preprocessed images' pinhole cameras (world frame) at room-frame `positions` `[V, 3]` and
    room-to-camera `rotations` `[V, 3, 3]`."""
    world_to_room = np.linalg.inv(room_to_world)
    fx = 0.5 * config.width / math.tan(math.radians(config.fov_degrees) / 2)
    K = intrinsics_matrix(fx, fx, config.width / 2, config.height / 2)
    cameras = []
    for position, rotation in zip(positions, rotations, strict=True):
        room_to_camera = np.eye(4)
        room_to_camera[:3, :3] = rotation
        room_to_camera[:3, 3] = -rotation @ position
        cameras.append(Camera(K, room_to_camera @ world_to_room, config.width, config.height))
    return cameras


def _raw_fisheye(config: SyntheticSceneConfig, rng: np.random.Generator) -> FisheyeIntrinsics:
    """The raw fisheye camera: about the same horizontal angle over twice the pixels, slightly anisotropic
    focal and an off-centre principal point, like a calibrated DSLR."""
    k = (config.fisheye_k1, config.fisheye_k2, config.fisheye_k3, config.fisheye_k4)
    half_angle = math.radians(config.fov_degrees) / 2
    theta2 = half_angle * half_angle
    theta_d = half_angle * (1 + theta2 * (k[0] + theta2 * (k[1] + theta2 * (k[2] + theta2 * k[3]))))
    raw_width, raw_height = config.raw_scale * config.width, config.raw_scale * config.height
    raw_fx = 0.5 * raw_width / theta_d
    return FisheyeIntrinsics(
        fx=float(raw_fx),
        fy=float(raw_fx * rng.uniform(0.99, 1.01)),
        cx=float(raw_width / 2 + rng.uniform(-0.02, 0.02) * raw_width),
        cy=float(raw_height / 2 + rng.uniform(-0.02, 0.02) * raw_height),
        k=k,
        width=raw_width,
        height=raw_height,
    )


def _pixel_grid(width: int, height: int, samples: int) -> np.ndarray:
    """`[H * W * S * S, 2]` sample positions (col, row): S x S regular sub-samples per pixel, pixel-major."""
    offsets = (np.arange(samples) + 0.5) / samples
    sub_x, sub_y = np.meshgrid(offsets, offsets)
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    xs = cols[..., None] + sub_x.reshape(-1)
    ys = rows[..., None] + sub_y.reshape(-1)
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1)
