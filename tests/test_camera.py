"""Camera conventions: each conversion in fit3d_hf.scene.camera against known geometry; Camera's checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from fit3d_hf.scene.camera import (
    Camera,
    colmap_to_scannetpp_nerfstudio,
    intrinsics_matrix,
    opencv_to_opengl_camera_to_world,
    opengl_camera_to_world_to_opencv,
    qvec_to_rotmat,
    rotmat_to_qvec,
    scannetpp_nerfstudio_to_colmap,
)

K = intrinsics_matrix(100.0, 110.0, 32.0, 24.0)
FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])
# ScanNet++'s world change from COLMAP to its nerfstudio files: swap the x and y rows, negate z.
SCANNETPP_WORLD = np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1]])


def random_w2c(rng: np.random.Generator) -> np.ndarray:
    w2c = np.eye(4)
    w2c[:3, :3] = Rotation.random(random_state=rng.integers(1 << 31)).as_matrix()
    w2c[:3, 3] = rng.normal(size=3)
    return w2c


def camera_looking_at(center, target) -> Camera:
    """OpenCV camera at `center` whose optical axis passes through `target` (world z up)."""
    center, target = np.asarray(center, float), np.asarray(target, float)
    forward = (target - center) / np.linalg.norm(target - center)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([right, np.cross(forward, right), forward])
    w2c[:3, 3] = -w2c[:3, :3] @ center
    return Camera(K, w2c, 64, 48)


def test_camera_looking_at_a_point_projects_it_to_the_principal_point():
    camera = camera_looking_at([3.0, -1.0, 2.0], [0.5, 0.5, 0.0])
    uv, depth = camera.project(np.array([[0.5, 0.5, 0.0]]))
    np.testing.assert_allclose(uv[0], [32.0, 24.0], atol=1e-12)  # the image centre: cx = W/2, cy = H/2
    assert depth[0] == pytest.approx(np.linalg.norm([2.5, -1.5, 2.0]))
    np.testing.assert_allclose(camera.center, [3.0, -1.0, 2.0], atol=1e-12)
    np.testing.assert_allclose(camera.camera_to_world @ camera.world_to_camera, np.eye(4), atol=1e-12)
    # world up (+z) appears towards the top of the image (smaller row), as y points down
    uv_up, _ = camera.project(np.array([[0.5, 0.5, 0.3]]))
    assert uv_up[0, 1] < 24.0
    # a point behind the camera has no pixel
    uv_behind, depth_behind = camera.project(np.array([[6.0, -3.0, 4.0]]))
    assert np.isnan(uv_behind).all() and depth_behind[0] < 0


def test_pinhole_projection_matches_K():
    camera = Camera(K, np.eye(4), 64, 48)
    uv, depth = camera.project(np.array([[0.2, -0.1, 2.0]]))
    np.testing.assert_allclose(uv[0], [32.0 + 100.0 * 0.1, 24.0 - 110.0 * 0.05])
    assert depth[0] == 2.0


def test_opengl_conversion_against_known_geometry():
    # OpenGL camera at (1, 2, 3) with identity rotation looks down world -z, y up.
    c2w_gl = np.eye(4)
    c2w_gl[:3, 3] = [1.0, 2.0, 3.0]
    camera = Camera(K, opengl_camera_to_world_to_opencv(c2w_gl), 64, 48)
    np.testing.assert_allclose(camera.center, [1.0, 2.0, 3.0])
    uv, depth = camera.project(np.array([[1.0, 2.0, 1.0], [1.0, 2.5, 1.0], [1.5, 2.0, 1.0]]))
    np.testing.assert_allclose(depth, [2.0, 2.0, 2.0])
    np.testing.assert_allclose(uv[0], [32.0, 24.0])
    assert uv[1, 1] < 24.0 and uv[1, 0] == pytest.approx(32.0)  # world +y is up in this camera
    assert uv[2, 0] > 32.0 and uv[2, 1] == pytest.approx(24.0)  # world +x is right


def test_opengl_round_trip_and_definition():
    rng = np.random.default_rng(0)
    for _ in range(5):
        w2c = random_w2c(rng)
        c2w_gl = opencv_to_opengl_camera_to_world(w2c)
        np.testing.assert_allclose(c2w_gl, np.linalg.inv(w2c) @ FLIP_YZ, atol=1e-12)
        np.testing.assert_allclose(opengl_camera_to_world_to_opencv(c2w_gl), w2c, atol=1e-12)


def test_scannetpp_conversion_is_the_documented_composition():
    """ScanNet++ nerfstudio matrix = (world x<->y swap, z negated) @ COLMAP camera-to-world @ (y/z flip)."""
    rng = np.random.default_rng(1)
    for _ in range(5):
        w2c = random_w2c(rng)
        transform_matrix = SCANNETPP_WORLD @ np.linalg.inv(w2c) @ FLIP_YZ
        np.testing.assert_allclose(colmap_to_scannetpp_nerfstudio(w2c), transform_matrix, atol=1e-12)
        np.testing.assert_allclose(scannetpp_nerfstudio_to_colmap(transform_matrix), w2c, atol=1e-12)
        # equivalently: a plain OpenGL pose in ScanNet++'s world, moved back to COLMAP's world
        generic = opengl_camera_to_world_to_opencv(transform_matrix) @ SCANNETPP_WORLD
        np.testing.assert_allclose(generic, w2c, atol=1e-12)


def test_scannetpp_conversion_keeps_colmap_points_on_their_pixels():
    rng = np.random.default_rng(2)
    w2c = random_w2c(rng)
    points = (
        np.linalg.inv(w2c) @ np.c_[rng.uniform(-1, 1, (10, 2)), rng.uniform(2, 5, 10), np.ones(10)].T
    ).T[:, :3]
    truth = Camera(K, w2c, 64, 48)
    recovered = Camera(K, scannetpp_nerfstudio_to_colmap(colmap_to_scannetpp_nerfstudio(w2c)), 64, 48)
    np.testing.assert_allclose(recovered.project(points)[0], truth.project(points)[0], atol=1e-9)
    # reading the ScanNet++ matrix as a plain OpenGL pose would put the points elsewhere
    wrong = Camera(K, opengl_camera_to_world_to_opencv(colmap_to_scannetpp_nerfstudio(w2c)), 64, 48)
    assert not np.allclose(wrong.world_to_camera, w2c, atol=1e-3)


def test_quaternions_known_values_and_round_trip():
    quarter_turn_z = np.array([math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)])
    np.testing.assert_allclose(qvec_to_rotmat(quarter_turn_z), [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(
        qvec_to_rotmat(3.0 * quarter_turn_z), qvec_to_rotmat(quarter_turn_z)
    )  # normalised
    np.testing.assert_allclose(rotmat_to_qvec(np.eye(3)), [1.0, 0.0, 0.0, 0.0])
    rng = np.random.default_rng(3)
    for _ in range(10):
        rotation = Rotation.random(random_state=rng.integers(1 << 31)).as_matrix()
        qvec = rotmat_to_qvec(rotation)
        assert qvec[0] >= 0 and np.linalg.norm(qvec) == pytest.approx(1.0)
        np.testing.assert_allclose(qvec_to_rotmat(qvec), rotation, atol=1e-12)
        np.testing.assert_allclose(qvec_to_rotmat(-qvec), rotation, atol=1e-12)  # q and -q: same rotation
    with pytest.raises(ValueError, match="zero or non-finite norm"):
        qvec_to_rotmat([0.0, 0.0, 0.0, 0.0])


def test_camera_helpers():
    camera = camera_looking_at([1.0, 2.0, 1.5], [0.0, 0.0, 0.0])
    half = camera.scaled(0.5)
    assert (half.width, half.height) == (32, 24)
    np.testing.assert_allclose(half.K, intrinsics_matrix(50.0, 55.0, 16.0, 12.0))
    point = np.array([[0.3, -0.2, 0.1]])
    np.testing.assert_allclose(
        half.project(point)[0], camera.project(point)[0] / 2
    )  # pixels scale with the image
    odd = Camera(K, np.eye(4), 65, 49).scaled(0.5)
    assert (odd.width, odd.height) == (32, 24)  # int(size * scale), as ScanNet++'s downscaling
    again = Camera.from_dict(camera.to_dict())
    np.testing.assert_array_equal(again.K, camera.K)
    np.testing.assert_array_equal(again.world_to_camera, camera.world_to_camera)
    assert (again.width, again.height) == (64, 48)
    assert (camera.fx, camera.fy, camera.cx, camera.cy) == (100.0, 110.0, 32.0, 24.0)


def _reflection() -> np.ndarray:
    pose = np.eye(4)
    pose[0, 0] = -1.0
    return pose


@pytest.mark.parametrize(
    "K_value,pose,size,message",
    [
        (np.eye(2), np.eye(4), (4, 4), r"K must have shape \(3, 3\)"),
        (K, np.eye(3), (4, 4), r"world_to_camera must have shape \(4, 4\)"),
        (np.where(np.eye(3) > 0, np.nan, 0.0), np.eye(4), (4, 4), "K contain NaN"),
        (K, np.full((4, 4), np.inf), (4, 4), "pose contains NaN or infinite"),
        (intrinsics_matrix(-1.0, 1.0, 0.0, 0.0), np.eye(4), (4, 4), "focal lengths must be positive"),
        (K, np.eye(4), (0, 4), "image size must be positive"),
        (K, np.diag([1.0, 1.0, 1.0, 2.0]), (4, 4), r"last row must be \[0, 0, 0, 1\]"),
        (K, np.diag([1.0, 2.0, 1.0, 1.0]), (4, 4), "not a rigid transform"),
        (K, _reflection(), (4, 4), "not a rigid transform"),
    ],
)
def test_camera_validation_errors(K_value, pose, size, message):
    with pytest.raises(ValueError, match=message):
        Camera(K_value, pose, *size)


def test_singular_poses_raise_value_error():
    with pytest.raises(ValueError, match="not invertible"):
        opengl_camera_to_world_to_opencv(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="not invertible"):
        scannetpp_nerfstudio_to_colmap(np.zeros((4, 4)))
