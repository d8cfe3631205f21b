"""Pinhole cameras in one convention, and the conversions from every other one.

The library's convention is OpenCV's: x right, y down, z forward; a camera is `K` (3x3),
`world_to_camera` (4x4), `width` and `height`. Pixel (col, row) covers [col, col+1) x [row, row+1), so
its centre is at (col + 0.5, row + 0.5) -- the convention of 3DGS and gsplat, in which a principal point
at (width / 2, height / 2) is the image centre.

Readers convert at the edge, once, with the functions below:
- nerfstudio / instant-ngp `transform_matrix`: camera-to-world with OpenGL camera axes (y up, z back);
- ScanNet++'s nerfstudio files, whose *world* frame is also permuted relative to COLMAP's;
- COLMAP's `images.txt`: world-to-camera as a (qw, qx, qy, qz) quaternion and a translation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Camera",
    "colmap_to_scannetpp_nerfstudio",
    "intrinsics_matrix",
    "opencv_to_opengl_camera_to_world",
    "opengl_camera_to_world_to_opencv",
    "qvec_to_rotmat",
    "rotmat_to_qvec",
    "scannetpp_nerfstudio_to_colmap",
]

# Flips the y and z camera axes: OpenCV (y down, z forward) <-> OpenGL (y up, z backward).
_FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Camera:
    """A pinhole camera in the OpenCV convention.

    Args:
        K: `[3, 3]` intrinsics (fx, fy, cx, cy in pixels, pixel centres at half-integers).
        world_to_camera: `[4, 4]` rigid transform from world to camera coordinates.
        width: image width in pixels.
        height: image height in pixels.

    Raises:
        ValueError: on wrong shapes, non-finite values, a non-positive focal length or size, or a
            pose that is not a rigid transform. Readers catch it and add the file name.
    """

    K: np.ndarray
    world_to_camera: np.ndarray
    width: int
    height: int

    def __post_init__(self) -> None:
        K = np.asarray(self.K, dtype=np.float64)
        w2c = np.asarray(self.world_to_camera, dtype=np.float64)
        if K.shape != (3, 3):
            raise ValueError(f"intrinsics K must have shape (3, 3), got {K.shape}")
        if w2c.shape != (4, 4):
            raise ValueError(f"world_to_camera must have shape (4, 4), got {w2c.shape}")
        if not np.isfinite(K).all():
            raise ValueError("intrinsics K contain NaN or infinite values")
        if not np.isfinite(w2c).all():
            raise ValueError("pose contains NaN or infinite values")
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise ValueError(f"focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}")
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")
        rotation = w2c[:3, :3]
        if not np.allclose(w2c[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
            raise ValueError(f"pose's last row must be [0, 0, 0, 1], got {w2c[3].tolist()}")
        if abs(np.linalg.det(rotation) - 1.0) > 1e-3 or not np.allclose(
            rotation @ rotation.T, np.eye(3), atol=1e-3
        ):
            raise ValueError("pose is not a rigid transform (its rotation is not orthonormal with det +1)")
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "world_to_camera", w2c)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))

    @property
    def camera_to_world(self) -> np.ndarray:
        """`[4, 4]` inverse of `world_to_camera` (exact for a rigid transform)."""
        rotation, translation = self.world_to_camera[:3, :3], self.world_to_camera[:3, 3]
        c2w = np.eye(4)
        c2w[:3, :3] = rotation.T
        c2w[:3, 3] = -rotation.T @ translation
        return c2w

    @property
    def center(self) -> np.ndarray:
        """`[3]` camera centre in world coordinates."""
        return self.camera_to_world[:3, 3]

    @property
    def fx(self) -> float:
        return float(self.K[0, 0])

    @property
    def fy(self) -> float:
        return float(self.K[1, 1])

    @property
    def cx(self) -> float:
        return float(self.K[0, 2])

    @property
    def cy(self) -> float:
        return float(self.K[1, 2])

    def world_to_camera_points(self, points: np.ndarray) -> np.ndarray:
        """Transforms `[M, 3]` world points into `[M, 3]` camera coordinates."""
        points = np.asarray(points, dtype=np.float64)
        return points @ self.world_to_camera[:3, :3].T + self.world_to_camera[:3, 3]

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projects `[M, 3]` world points to `[M, 2]` pixel coordinates and `[M]` depths (camera z).

        Points with depth <= 0 get NaN pixel coordinates.
        """
        cam = self.world_to_camera_points(points)
        depth = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = (cam @ self.K.T)[:, :2] / depth[:, None]
        uv[depth <= 0] = np.nan
        return uv, depth

    def scaled(self, scale_x: float, scale_y: float | None = None) -> Camera:
        """The same camera for an image resized by (`scale_x`, `scale_y`); the size is rounded down as
        ScanNet++'s downscaling does (`int(width * scale)`)."""
        scale_y = scale_x if scale_y is None else scale_y
        K = self.K.copy()
        K[0] *= scale_x
        K[1] *= scale_y
        return Camera(K, self.world_to_camera.copy(), int(self.width * scale_x), int(self.height * scale_y))

    def to_dict(self) -> dict:
        """JSON-serialisable form (lists of floats)."""
        return {
            "K": self.K.tolist(),
            "world_to_camera": self.world_to_camera.tolist(),
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Camera:
        return cls(np.asarray(data["K"]), np.asarray(data["world_to_camera"]), data["width"], data["height"])

    def __repr__(self) -> str:
        return (
            f"Camera({self.width}x{self.height}, fx={self.fx:.2f}, fy={self.fy:.2f}, "
            f"cx={self.cx:.2f}, cy={self.cy:.2f}, center={np.round(self.center, 3).tolist()})"
        )


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """`[3, 3]` pinhole intrinsics."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def opengl_camera_to_world_to_opencv(transform_matrix: np.ndarray) -> np.ndarray:
    """nerfstudio / instant-ngp `transform_matrix` (camera-to-world, OpenGL camera axes) -> OpenCV
    `world_to_camera`. The world frame is left as it is."""
    c2w = np.asarray(transform_matrix, dtype=np.float64) @ _FLIP_YZ
    return _invert_rigid(c2w)


def opencv_to_opengl_camera_to_world(world_to_camera: np.ndarray) -> np.ndarray:
    """Inverse of `opengl_camera_to_world_to_opencv`."""
    return _invert_rigid(np.asarray(world_to_camera, dtype=np.float64)) @ _FLIP_YZ


def scannetpp_nerfstudio_to_colmap(transform_matrix: np.ndarray) -> np.ndarray:
    """A ScanNet++ nerfstudio `transform_matrix` -> OpenCV `world_to_camera` in the COLMAP world frame,
    the frame of the scene's `points3D.txt`.

    ScanNet++'s toolkit made its nerfstudio poses from COLMAP's by flipping the camera's y/z axes
    (OpenCV -> OpenGL), swapping the world's x and y rows and negating its z row. This undoes the
    three steps in reverse order (FiT3D's dataset reader does the same).
    """
    c2w = np.array(transform_matrix, dtype=np.float64)
    c2w[2, :] *= -1
    c2w = c2w[[1, 0, 2, 3], :]
    c2w[0:3, 1:3] *= -1
    return _invert_rigid(c2w)


def colmap_to_scannetpp_nerfstudio(world_to_camera: np.ndarray) -> np.ndarray:
    """Inverse of `scannetpp_nerfstudio_to_colmap`: the `transform_matrix` ScanNet++ would write."""
    c2w = _invert_rigid(np.asarray(world_to_camera, dtype=np.float64))
    c2w[0:3, 1:3] *= -1
    c2w = c2w[[1, 0, 2, 3], :]
    c2w[2, :] *= -1
    return c2w


def qvec_to_rotmat(qvec: np.ndarray) -> np.ndarray:
    """COLMAP quaternion (qw, qx, qy, qz) -> `[3, 3]` rotation matrix (normalises the quaternion)."""
    qvec = np.asarray(qvec, dtype=np.float64)
    norm = np.linalg.norm(qvec)
    if not np.isfinite(norm) or norm < 1e-12:
        raise ValueError(f"quaternion {qvec.tolist()} has zero or non-finite norm")
    w, x, y, z = qvec / norm
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def rotmat_to_qvec(rotation: np.ndarray) -> np.ndarray:
    """`[3, 3]` rotation matrix -> quaternion (qw, qx, qy, qz) with qw >= 0."""
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(np.asarray(rotation, dtype=np.float64)).as_quat()
    qvec = np.array([w, x, y, z])
    return qvec if qvec[0] >= 0 else -qvec


def _invert_rigid(matrix: np.ndarray) -> np.ndarray:
    """Inverts a 4x4 pose; `np.linalg.inv` keeps non-rigid inputs invertible so that Camera can
    report them, and raises on singular ones."""
    try:
        return np.linalg.inv(matrix)
    except np.linalg.LinAlgError as error:
        raise ValueError("pose matrix is not invertible") from error
