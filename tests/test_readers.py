"""Scene readers and writers: ScanNet++ layout, nerfstudio / instant-ngp, COLMAP text, PLY, undistortion.

The fixtures below write small scenes with known cameras and points (they are also used by
test_scannetpp_builder.py and test_cli.py); the tests check that every reader recovers them exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fit3d_hf.errors import CorruptFileError, InputError
from fit3d_hf.scene import (
    Camera,
    colmap_to_scannetpp_nerfstudio,
    detect_layout,
    intrinsics_matrix,
    load_depth,
    load_image,
    load_labels,
    load_mask,
    opencv_to_opengl_camera_to_world,
    read_colmap_points,
    read_ply_points,
    read_scannetpp_split,
    read_scene,
    rotmat_to_qvec,
    write_colmap_text,
    write_nerfstudio_transforms,
    write_ply_points,
)

# --------------------------------------------------------------------------------------------------------
# Fixture writers (shared with the builder and CLI tests)


def look_at(center, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV world_to_camera of a camera at `center` looking at `target` (image up ~ world `up`)."""
    center, target, up = (np.asarray(v, dtype=np.float64) for v in (center, target, up))
    forward = (target - center) / np.linalg.norm(target - center)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([right, down, forward])
    w2c[:3, 3] = -w2c[:3, :3] @ center
    return w2c


def make_scannetpp_scene(
    scene_dir: Path,
    rng: np.random.Generator,
    num_frames: int = 3,
    size: tuple[int, int] = (40, 30),
    test_frames: int = 1,
    with_extras: bool = True,
) -> dict:
    """Writes a ScanNet++-layout scene with known cameras; returns them (w2c, K, points, colours, ids).

    As in the real data, the test frames appear in `frames` and again in `test_frames`.
    """
    width, height = size
    images, masks, depth, labels = (scene_dir / name for name in ("images", "masks", "depth", "labels"))
    for folder in (images, masks) + ((depth, labels) if with_extras else ()):
        folder.mkdir(parents=True, exist_ok=True)
    K = intrinsics_matrix(35.0, 36.0, width / 2 + 0.3, height / 2 - 0.2)
    points = rng.uniform(-1.0, 1.0, size=(25, 3))
    colors = rng.integers(0, 256, size=(25, 3)).astype(np.uint8)
    frames, w2cs, ids = [], {}, []
    for index in range(num_frames):
        angle = 2 * math.pi * index / num_frames
        w2c = look_at([4 * math.cos(angle), 4 * math.sin(angle), 1.0 + 0.2 * index], [0.1, -0.2, 0.0])
        image_id = f"DSC{index:05d}"
        ids.append(image_id)
        w2cs[image_id] = w2c
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{image_id}.JPG", quality=95)
        mask = np.full((height, width), 255, dtype=np.uint8)
        mask[: height // 3, : width // 4] = 0
        Image.fromarray(mask).save(masks / f"{image_id}.png")
        if with_extras:
            Image.fromarray(np.full((height, width), 1500 + index, dtype=np.uint16)).save(
                depth / f"{image_id}.png"
            )
            Image.fromarray((np.arange(width)[None, :].repeat(height, 0) % 7).astype(np.uint8)).save(
                labels / f"{image_id}.png"
            )
        frames.append(
            {
                "file_path": f"{image_id}.JPG",
                "mask_path": f"{image_id}.png",
                "transform_matrix": colmap_to_scannetpp_nerfstudio(w2c).tolist(),
                "is_bad": False,
            }
        )
    meta = {
        "camera_model": "PINHOLE",
        "fl_x": K[0, 0],
        "fl_y": K[1, 1],
        "cx": K[0, 2],
        "cy": K[1, 2],
        "w": width,
        "h": height,
        "k1": 0.0,
        "k2": 0.0,
        "k3": 0.0,
        "k4": 0.0,
        "frames": frames,
        "test_frames": frames[num_frames - test_frames :],
    }
    (scene_dir / "transforms_train.json").write_text(json.dumps(meta))
    lines = ["# 3D point list with one line of data per point:"]
    for index, (point, color) in enumerate(zip(points, colors, strict=True)):
        track = " ".join(f"{i + 1} {j}" for i, j in enumerate(rng.integers(0, 50, size=3)))
        x, y, z = point.tolist()
        r, g, b = color.tolist()
        lines.append(f"{index + 1} {x!r} {y!r} {z!r} {r} {g} {b} 0.5 {track}")
    (scene_dir / "points3D.txt").write_text("\n".join(lines) + "\n")
    return {
        "w2c": w2cs,
        "K": K,
        "size": size,
        "points": points,
        "colors": colors,
        "ids": ids,
        "test_ids": set(ids[num_frames - test_frames :]),
    }


def make_scannetpp_root(root: Path, rng: np.random.Generator, train=None, val=None) -> dict:
    """Writes `scenes/` + `metadata/` with train scenes (all frames listed but the last of the first scene)
    and val scenes; returns scene id -> fixture info, plus the listed sample ids per split."""
    train = train if train is not None else {"scene_a": 3, "scene_b_2": 2}
    val = val if val is not None else {"val_c": 2}
    info, samples = {}, {"train": [], "val": []}
    for split, scenes in (("train", train), ("val", val)):
        for scene_id, num_frames in scenes.items():
            info[scene_id] = make_scannetpp_scene(root / "scenes" / scene_id, rng, num_frames=num_frames)
            samples[split] += [f"{scene_id}_{image_id}" for image_id in info[scene_id]["ids"]]
    if "scene_a" in info:
        samples["train"].remove(f"scene_a_{info['scene_a']['ids'][-1]}")  # a frame left out of every split
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (root / "metadata" / f"{split}_samples.txt").write_text("\n".join(samples[split]) + "\n")
    info["samples"] = samples
    return info


# --------------------------------------------------------------------------------------------------------
# ScanNet++ layout


def assert_same_cameras(scene_a, scene_b, atol=1e-9):
    assert [f.image_id for f in scene_a.frames] == [f.image_id for f in scene_b.frames]
    for a, b in zip(scene_a.frames, scene_b.frames, strict=True):
        np.testing.assert_allclose(a.camera.K, b.camera.K, atol=atol)
        np.testing.assert_allclose(a.camera.world_to_camera, b.camera.world_to_camera, atol=atol)
        assert (a.camera.width, a.camera.height) == (b.camera.width, b.camera.height)


def test_scannetpp_scene_recovers_known_cameras_points_and_files(tmp_path):
    truth = make_scannetpp_scene(tmp_path / "s1", np.random.default_rng(0), num_frames=4, test_frames=2)
    scene = read_scene(tmp_path / "s1")
    assert scene.scene_id == "s1"
    # test frames are listed twice in the json but read once
    assert scene.image_ids == truth["ids"]
    assert scene.test_image_ids == truth["test_ids"]
    for frame in scene.frames:
        np.testing.assert_allclose(frame.camera.world_to_camera, truth["w2c"][frame.image_id], atol=1e-12)
        np.testing.assert_allclose(frame.camera.K, truth["K"], atol=1e-12)
        assert (frame.camera.width, frame.camera.height) == truth["size"]
        assert frame.image_path == tmp_path / "s1" / "images" / f"{frame.image_id}.JPG"
        assert frame.mask_path == tmp_path / "s1" / "masks" / f"{frame.image_id}.png"
        assert load_mask(frame.mask_path).sum() == 40 * 30 - 10 * 10
        assert load_depth(frame.depth_path)[0, 0] == pytest.approx((1500 + int(frame.image_id[3:])) / 1000)
        assert load_labels(frame.label_path)[3, 9] == 9 % 7
    np.testing.assert_allclose(scene.points, truth["points"], atol=1e-15)
    np.testing.assert_array_equal(scene.point_colors, truth["colors"])
    image = load_image(scene.frames[0].image_path)
    assert image.shape == (30, 40, 3) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1


def test_scannetpp_points_project_where_the_colmap_pose_says(tmp_path):
    """A point straight ahead of a known COLMAP camera lands on the principal point after the reader has
    undone ScanNet++'s world permutation."""
    truth = make_scannetpp_scene(tmp_path / "s", np.random.default_rng(1), num_frames=2)
    w2c = truth["w2c"]["DSC00000"]
    center = -w2c[:3, :3].T @ w2c[:3, 3]
    ahead = (center + 2.5 * w2c[2, :3]).tolist()  # 2.5 units along the optical axis
    lines = (tmp_path / "s" / "points3D.txt").read_text().splitlines()
    lines.append(f"999 {ahead[0]!r} {ahead[1]!r} {ahead[2]!r} 1 2 3 0.1")
    (tmp_path / "s" / "points3D.txt").write_text("\n".join(lines) + "\n")
    scene = read_scene(tmp_path / "s")
    uv, depth = scene.frames[0].camera.project(scene.points[-1:])
    np.testing.assert_allclose(uv[0], [truth["K"][0, 2], truth["K"][1, 2]], atol=1e-9)
    assert depth[0] == pytest.approx(2.5)


def test_scannetpp_layout_detection_and_override(tmp_path):
    make_scannetpp_scene(tmp_path / "s", np.random.default_rng(2))
    assert detect_layout(tmp_path / "s") == ("scannetpp", tmp_path / "s")
    assert detect_layout(tmp_path / "s" / "transforms_train.json") == ("scannetpp", tmp_path / "s")
    # forced generic reading: file paths are then relative to the json, not to images/
    assert detect_layout(tmp_path / "s", "nerfstudio") == (
        "nerfstudio",
        tmp_path / "s" / "transforms_train.json",
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"transforms_train.json: 6 files it lists for its 3 frames do not exist: .*s/DSC00000.JPG, ",
    ):
        read_scene(tmp_path / "s", layout="nerfstudio")
    # without points3D.txt the folder is a generic transforms_train.json scene (e.g. Blender's)
    (tmp_path / "s" / "points3D.txt").unlink()
    assert detect_layout(tmp_path / "s")[0] == "nerfstudio"
    with pytest.raises(FileNotFoundError, match="points3D.txt"):
        read_scene(tmp_path / "s", layout="scannetpp")
    with pytest.raises(ValueError, match="unknown layout"):
        read_scene(tmp_path / "s", layout="blender")
    with pytest.raises(FileNotFoundError, match="no known scene layout"):
        read_scene(tmp_path / "s" / "images")


def test_read_scannetpp_split(tmp_path):
    info = make_scannetpp_root(tmp_path, np.random.default_rng(3))
    assert read_scannetpp_split(tmp_path, "train") == info["samples"]["train"]
    assert read_scannetpp_split(tmp_path, "val") == ["val_c_DSC00000", "val_c_DSC00001"]
    with pytest.raises(FileNotFoundError, match="test_samples.txt"):
        read_scannetpp_split(tmp_path, "test")


# --------------------------------------------------------------------------------------------------------
# Writers: round trips


def test_round_trip_through_nerfstudio_and_colmap(tmp_path):
    make_scannetpp_scene(tmp_path / "s", np.random.default_rng(4), num_frames=3)
    scene = read_scene(tmp_path / "s")

    json_path = write_nerfstudio_transforms(scene, tmp_path / "ns" / "transforms.json")
    assert detect_layout(tmp_path / "ns")[0] == "nerfstudio"
    again = read_scene(tmp_path / "ns")
    assert_same_cameras(scene, again)
    np.testing.assert_allclose(again.points, scene.points, atol=1e-12)
    np.testing.assert_array_equal(again.point_colors, scene.point_colors)
    assert again.test_image_ids == scene.test_image_ids
    for a, b in zip(scene.frames, again.frames, strict=True):
        assert a.image_path.resolve() == b.image_path.resolve()
        assert a.mask_path.resolve() == b.mask_path.resolve()
        assert a.depth_path.resolve() == b.depth_path.resolve()
        assert a.label_path.resolve() == b.label_path.resolve()
    # the file holds OpenGL camera-to-world poses
    meta = json.loads(json_path.read_text())
    np.testing.assert_allclose(
        meta["frames"][0]["transform_matrix"],
        opencv_to_opengl_camera_to_world(scene.frames[0].camera.world_to_camera),
    )

    write_colmap_text(scene, tmp_path / "s" / "sparse" / "0")
    assert detect_layout(tmp_path / "s" / "sparse" / "0")[0] == "colmap"
    colmap = read_scene(tmp_path / "s" / "sparse" / "0")  # finds s/images two levels up
    assert_same_cameras(scene, colmap)
    np.testing.assert_allclose(colmap.points, scene.points, atol=1e-12)
    np.testing.assert_array_equal(colmap.point_colors, scene.point_colors)
    assert [f.mask_path for f in colmap.frames] == [f.mask_path for f in scene.frames]
    # frames sharing intrinsics share one PINHOLE camera; quaternions are COLMAP's (qw >= 0)
    assert (tmp_path / "s" / "sparse" / "0" / "cameras.txt").read_text().count("PINHOLE") == 1
    first = (tmp_path / "s" / "sparse" / "0" / "images.txt").read_text().splitlines()[3].split()
    np.testing.assert_allclose(
        [float(v) for v in first[1:5]], rotmat_to_qvec(scene.frames[0].camera.world_to_camera[:3, :3])
    )

    # elsewhere: images_dir must be given
    write_colmap_text(scene, tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="images_dir"):
        read_scene(tmp_path / "model")
    assert_same_cameras(scene, read_scene(tmp_path / "model", images_dir=tmp_path / "s" / "images"))


# --------------------------------------------------------------------------------------------------------
# Generic nerfstudio / instant-ngp files


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_nerfstudio_camera_angle_and_opengl_pose(tmp_path):
    """Blender-style file: camera_angle_x only, no size, no extension; the pose is OpenGL c2w."""
    _write_png(tmp_path / "train" / "r_0.png", np.zeros((20, 30, 3), dtype=np.uint8))
    c2w_gl = np.eye(4)
    c2w_gl[:3, 3] = [1.0, 2.0, 3.0]  # camera at (1,2,3) looking down world -z (OpenGL looks along -z)
    meta = {
        "camera_angle_x": 2 * math.atan(0.5),
        "frames": [{"file_path": "./train/r_0", "transform_matrix": c2w_gl.tolist()}],
    }
    (tmp_path / "transforms_train.json").write_text(json.dumps(meta))
    scene = read_scene(tmp_path)
    camera = scene.frames[0].camera
    assert scene.frames[0].image_id == "r_0"
    # tan(angle/2) = 0.5 -> fx = (w/2) / 0.5 = w
    np.testing.assert_allclose(camera.K, intrinsics_matrix(30.0, 30.0, 15.0, 10.0))
    np.testing.assert_allclose(camera.center, [1.0, 2.0, 3.0])
    uv, depth = camera.project(np.array([[1.0, 2.0, 0.0], [1.5, 2.0, 0.0]]))
    np.testing.assert_allclose(uv[0], [15.0, 10.0])  # straight ahead: principal point
    np.testing.assert_allclose(uv[1], [15.0 + 30.0 * 0.5 / 3.0, 10.0])  # +x world is image right
    np.testing.assert_allclose(depth, [3.0, 3.0])
    assert len(scene.points) == 0 and scene.points.shape == (0, 3)


def _gaussian_blobs(width, height, centers, sigma=1.3) -> np.ndarray:
    """uint8 grey image with Gaussian blobs at `centers` (pixel coordinates, centres at +0.5)."""
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    image = np.zeros((height, width))
    for u, v in centers:
        image += np.exp(-((cols - u) ** 2 + (rows - v) ** 2) / (2 * sigma**2))
    return np.repeat((np.clip(image, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def _blob_centroid(image: np.ndarray, u: float, v: float, radius: int = 5) -> np.ndarray:
    grey = image.mean(axis=2)
    c0, r0 = int(u) - radius, int(v) - radius
    window = grey[r0 : r0 + 2 * radius + 1, c0 : c0 + 2 * radius + 1]
    rows, cols = np.mgrid[r0 : r0 + 2 * radius + 1, c0 : c0 + 2 * radius + 1]
    return np.array([(window * (cols + 0.5)).sum(), (window * (rows + 0.5)).sum()]) / window.sum()


def _distorted_projection(points_cam, K, model, coefficients):
    import cv2

    K_cv = K.copy()
    K_cv[:2, 2] -= 0.5  # OpenCV puts pixel centres at integers
    if model == "fisheye":
        uv, _ = cv2.fisheye.projectPoints(
            points_cam[None], np.zeros(3), np.zeros(3), K_cv, np.array(coefficients)
        )
    else:
        uv, _ = cv2.projectPoints(points_cam, np.zeros(3), np.zeros(3), K_cv, np.array(coefficients))
    return uv.reshape(-1, 2) + 0.5


POINTS_CAM = np.array(
    [[0.0, 0.0, 2.0], [0.5, 0.3, 2.0], [-0.6, -0.35, 2.0], [0.62, -0.4, 2.0], [-0.5, 0.42, 2.5]]
)


@pytest.mark.parametrize(
    "model,coefficients,keys",
    [
        ("radial", [-0.12, 0.03, 0.002, -0.001], {"k1": -0.12, "k2": 0.03, "p1": 0.002, "p2": -0.001}),
        (
            "fisheye",
            [0.08, -0.02, 0.01, 0.0],
            {"camera_model": "OPENCV_FISHEYE", "k1": 0.08, "k2": -0.02, "k3": 0.01},
        ),
    ],
)
def test_distorted_frames_are_undistorted_once_into_the_cache(tmp_path, model, coefficients, keys):
    width, height = 120, 90
    K = intrinsics_matrix(80.0, 82.0, 61.0, 44.0)
    _write_png(
        tmp_path / "images" / "a.png",
        _gaussian_blobs(width, height, _distorted_projection(POINTS_CAM, K, model, coefficients)),
    )
    mask = np.full((height, width), 255, dtype=np.uint8)
    mask[:10, :10] = 0
    _write_png(tmp_path / "masks" / "a.png", mask)
    pose = opencv_to_opengl_camera_to_world(np.eye(4)).tolist()
    frame = {"file_path": "images/a.png", "mask_path": "masks/a.png", "transform_matrix": pose}
    meta = {
        "fl_x": 80.0,
        "fl_y": 82.0,
        "cx": 61.0,
        "cy": 44.0,
        "w": width,
        "h": height,
        **keys,
        "frames": [frame],
    }
    (tmp_path / "transforms.json").write_text(json.dumps(meta))

    scene = read_scene(tmp_path)
    frame = scene.frames[0]
    cache = tmp_path / ".fit3d_undistorted"
    assert frame.image_path == cache / "images" / "a.png"
    camera = frame.camera
    assert (camera.width, camera.height) == (width, height)
    assert (camera.cx, camera.cy) == (width / 2, height / 2)
    undistorted = np.asarray(Image.open(frame.image_path))
    expected_uv, _ = camera.project(POINTS_CAM)
    for u, v in expected_uv:
        np.testing.assert_allclose(_blob_centroid(undistorted, u, v), [u, v], atol=0.2)
    # the mask follows the image: bilinear sampling keeps a pixel valid iff every source pixel it blends
    # is valid and inside the image (OpenCV coordinates = ours - 0.5; 1/32 px remap precision)
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    rays = np.stack([cols, rows, np.ones_like(cols)], -1).reshape(-1, 3) @ np.linalg.inv(camera.K).T
    source = _distorted_projection(rays, K, model, coefficients).reshape(height, width, 2) - 0.5
    su, sv = source[..., 0], source[..., 1]
    expected = ~((su < 10) & (sv < 10)) & (su >= 0) & (su <= width - 1) & (sv >= 0) & (sv <= height - 1)
    clear = ((np.abs(su - 10) > 0.1) | (np.abs(sv - 10) > 0.1)) & (np.abs(su) > 0.1) & (np.abs(sv) > 0.1)
    clear &= (np.abs(su - width + 1) > 0.1) & (np.abs(sv - height + 1) > 0.1)
    np.testing.assert_array_equal(load_mask(frame.mask_path)[clear], expected[clear])
    assert (~expected).sum() > 20

    # second read: reused (nothing rewritten); a changed source is redone
    stamp = frame.image_path.stat().st_mtime_ns
    again = read_scene(tmp_path)
    assert frame.image_path.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.frames[0].camera.K, camera.K)
    _write_png(tmp_path / "images" / "a.png", np.zeros((height, width, 3), dtype=np.uint8))
    read_scene(tmp_path, cache_dir=tmp_path / "other_cache")
    assert (tmp_path / "other_cache" / "images" / "a.png").is_file()
    read_scene(tmp_path)
    assert np.asarray(Image.open(frame.image_path)).max() == 0


def test_colmap_models_map_to_opencv_intrinsics(tmp_path):
    """Every supported COLMAP model; distortion-free ones are read as is, distorted ones undistorted."""
    _write_png(tmp_path / "images" / "a.png", np.zeros((30, 40, 3), dtype=np.uint8))
    _write_png(tmp_path / "images" / "b.png", np.zeros((30, 40, 3), dtype=np.uint8))
    w2c = look_at([1.0, -2.0, 0.5], [0.0, 0.0, 0.0])
    qvec, tvec = rotmat_to_qvec(w2c[:3, :3]), w2c[:3, 3]
    pose = " ".join(map(repr, [*qvec.tolist(), *tvec.tolist()]))
    (tmp_path / "images.txt").write_text(f"# header\n1 {pose} 1 a.png\n\n2 {pose} 2 b.png\n1.0 2.0 -1\n")
    (tmp_path / "points3D.txt").write_text("")
    for model, params, K in [
        ("SIMPLE_PINHOLE", "30 20 15", intrinsics_matrix(30, 30, 20, 15)),
        ("PINHOLE", "30 31 20 15", intrinsics_matrix(30, 31, 20, 15)),
    ]:
        (tmp_path / "cameras.txt").write_text(f"1 {model} 40 30 {params}\n2 PINHOLE 40 30 30 30 20 15\n")
        scene = read_scene(tmp_path)
        np.testing.assert_allclose(scene.frames[0].camera.K, K)
        np.testing.assert_allclose(scene.frames[0].camera.world_to_camera, w2c, atol=1e-12)
        assert scene.image_ids == ["a", "b"] and scene.points.shape == (0, 3)
    for model, params in [
        ("SIMPLE_RADIAL", "30 20 15 0.01"),
        ("RADIAL", "30 20 15 0.01 0.001"),
        ("OPENCV", "30 31 20 15 0.01 0.001 0.0 0.0"),
        ("FULL_OPENCV", "30 31 20 15 0.01 0.001 0 0 0 0 0 0"),
        ("SIMPLE_RADIAL_FISHEYE", "30 20 15 0.01"),
        ("RADIAL_FISHEYE", "30 20 15 0.01 0.001"),
        ("OPENCV_FISHEYE", "30 31 20 15 0.01 0.001 0 0"),
    ]:
        (tmp_path / "cameras.txt").write_text(f"1 {model} 40 30 {params}\n2 PINHOLE 40 30 30 30 20 15\n")
        scene = read_scene(tmp_path, cache_dir=tmp_path / "cache" / model)
        assert scene.frames[0].image_path == tmp_path / "cache" / model / "images" / "a.png"
        assert scene.frames[1].image_path == tmp_path / "images" / "b.png"  # pinhole: untouched
        np.testing.assert_allclose(scene.frames[0].camera.K[:2, 2], [20.0, 15.0])
    (tmp_path / "cameras.txt").write_text("1 THIN_PRISM_FISHEYE 40 30 1 2 3 4 5 6 7 8 9 10 11 12\n")
    with pytest.raises(
        ValueError, match=r"cameras.txt, camera line 1: unknown camera model 'THIN_PRISM_FISHEYE'"
    ):
        read_scene(tmp_path)
    (tmp_path / "cameras.txt").write_text("1 PINHOLE 40 30 1 2 3\n")
    with pytest.raises(ValueError, match="PINHOLE takes 4 parameters, got 3"):
        read_scene(tmp_path)


# --------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the file, nothing written


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit,error,message",
    [
        (
            lambda m: m["frames"][1].update(file_path="DSC99999.JPG"),
            FileNotFoundError,
            r"frames\[1\].*DSC99999.JPG does not exist",
        ),
        (
            lambda m: m["frames"][0].update(mask_path="nope.png"),
            FileNotFoundError,
            r"frames\[0\].*mask .*nope.png does not exist",
        ),
        (
            lambda m: m["frames"][0]["transform_matrix"][0].__setitem__(1, float("nan")),
            ValueError,
            r"frames\[0\].*NaN",
        ),
        (
            lambda m: m["frames"][1].update(transform_matrix=np.zeros((4, 4)).tolist()),
            ValueError,
            r"frames\[1\].*not invertible",
        ),
        (
            lambda m: m["frames"][1].update(transform_matrix=np.diag([2.0, 2.0, 2.0, 1.0]).tolist()),
            ValueError,
            r"frames\[1\].*not a rigid",
        ),
        (
            lambda m: m.update(camera_model="EQUIRECTANGULAR"),
            ValueError,
            r"unknown camera_model 'EQUIRECTANGULAR'",
        ),
        (lambda m: m.update(w=41), ValueError, r"is 40x30 but the intrinsics say 41x30"),
        (lambda m: m.update(fl_x=-3.0), ValueError, r"frames\[0\].*focal lengths must be positive"),
    ],
)
def test_bad_scannetpp_input_names_the_file_and_frame(tmp_path, edit, error, message):
    make_scannetpp_scene(tmp_path / "s", np.random.default_rng(5))
    _edit_json(tmp_path / "s" / "transforms_train.json", edit)
    with pytest.raises(error, match=message) as caught:
        read_scene(tmp_path / "s")
    assert "transforms_train.json" in str(caught.value)


def test_other_bad_input(tmp_path):
    make_scannetpp_scene(tmp_path / "s", np.random.default_rng(6))
    (tmp_path / "s" / "points3D.txt").write_text("# no points\n")
    with pytest.raises(ValueError, match=r"points3D.txt holds no points"):
        read_scene(tmp_path / "s")
    (tmp_path / "s" / "points3D.txt").write_text("1 0 0 zero 1 2 3 0.5\n")
    with pytest.raises(ValueError, match=r"points3D.txt is not a COLMAP points3D.txt"):
        read_scene(tmp_path / "s")
    (tmp_path / "s" / "images" / "DSC00001.JPG").write_bytes(b"not a jpeg")
    (tmp_path / "s" / "points3D.txt").write_text("1 0 0 0 1 2 3 0.5\n")
    with pytest.raises(ValueError, match=r"DSC00001.JPG cannot be read as an image"):
        read_scene(tmp_path / "s")
    (tmp_path / "s" / "transforms_train.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"transforms_train.json is not valid JSON"):
        read_scene(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match=r"image .*missing.png does not exist"):
        load_image(tmp_path / "missing.png")


def test_errors_come_before_any_undistortion_is_written(tmp_path):
    for name in ("a", "b"):
        _write_png(tmp_path / f"{name}.png", np.zeros((30, 40, 3), dtype=np.uint8))
    frame = {"transform_matrix": np.eye(4).tolist()}
    frames = [{"file_path": "a.png", **frame}, {"file_path": "b.png", **frame, "h": 31}]
    meta = {"fl_x": 30, "fl_y": 30, "w": 40, "h": 30, "k1": 0.1, "frames": frames}
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"transforms.json, frames\[1\] \(b.png\): image .*b.png is 40x30"):
        read_scene(tmp_path)
    assert not (tmp_path / ".fit3d_undistorted").exists()


# --------------------------------------------------------------------------------------------------------
# Point files


def test_ply_reader_handles_ascii_binary_and_writer_round_trip(tmp_path):
    xyz = np.array([[0.5, -1.25, 2.0], [3.0, 4.0, -5.5]])
    ascii_ply = (
        "ply\nformat ascii 1.0\ncomment x\nelement vertex 2\nproperty float x\nproperty float y\n"
        "property float z\nproperty float nx\nproperty uchar red\nproperty uchar green\nproperty uchar blue\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
        "0.5 -1.25 2 0 10 20 30\n3 4 -5.5 0 40 50 60\n3 0 1 1\n"
    )
    (tmp_path / "a.ply").write_text(ascii_ply)
    points, colors = read_ply_points(tmp_path / "a.ply")
    np.testing.assert_array_equal(points, xyz)
    np.testing.assert_array_equal(colors, [[10, 20, 30], [40, 50, 60]])

    # big-endian floats, float colours in [0, 1], a fixed-size element before the vertices
    dtype = np.dtype([("x", ">f4"), ("y", ">f4"), ("z", ">f4"), ("r", ">f4"), ("g", ">f4"), ("b", ">f4")])
    vertices = np.array([(0.5, -1.25, 2.0, 1.0, 0.0, 0.5), (3.0, 4.0, -5.5, 0.2, 0.4, 0.6)], dtype=dtype)
    header = (
        "ply\nformat binary_big_endian 1.0\nelement camera 1\nproperty double fx\nelement vertex 2\n"
        + "".join(f"property float {name}\n" for name in "xyzrgb")
        + "end_header\n"
    )
    (tmp_path / "b.ply").write_bytes(header.encode() + np.array([7.0], ">f8").tobytes() + vertices.tobytes())
    points, colors = read_ply_points(tmp_path / "b.ply")
    np.testing.assert_array_equal(points, xyz)
    np.testing.assert_array_equal(colors, [[255, 0, 128], [51, 102, 153]])

    rng = np.random.default_rng(7)
    xyz, rgb = rng.normal(size=(100, 3)), rng.integers(0, 256, (100, 3)).astype(np.uint8)
    write_ply_points(tmp_path / "c.ply", xyz, rgb)
    points, colors = read_ply_points(tmp_path / "c.ply")
    np.testing.assert_array_equal(points, xyz)
    np.testing.assert_array_equal(colors, rgb)
    (tmp_path / "d.ply").write_bytes(b"solid mesh\n")
    with pytest.raises(ValueError, match="d.ply is not a PLY file"):
        read_ply_points(tmp_path / "d.ply")


def test_ply_reader_names_the_damage_plyfile_finds(tmp_path):
    # a vertex element without properties (the old hand parser divided by its zero item size), a property
    # line before any element, a value out of its type's range, a forged vertex count
    header = "ply\nformat {fmt} 1.0\nelement vertex {count}\n{props}end_header\n"
    xyz = "property float x\nproperty float y\nproperty float z\n"
    cases = {
        "no_properties.ply": (InputError, header.format(fmt="binary_little_endian", count=2, props="").encode() + bytes(24)),
        "stray_property.ply": (CorruptFileError, b"ply\nformat ascii 1.0\nproperty float w\nelement vertex 1\n" + xyz.encode() + b"end_header\n1 2 3\n"),
        "out_of_range.ply": (CorruptFileError, header.format(fmt="ascii", count=1, props=xyz + "property uchar red\n").encode() + b"1 2 3 300\n"),
        "forged_count.ply": (CorruptFileError, header.format(fmt="binary_little_endian", count=10**15, props=xyz).encode() + bytes(24)),
    }  # fmt: skip
    for name, (error, content) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(error, match=name):
            read_ply_points(tmp_path / name)


def test_colmap_points_reader_skips_tracks_and_comments(tmp_path):
    (tmp_path / "points3D.txt").write_text("# c\n7 1.5 -2 3 255 0 10 0.3 1 2 5 6 7 8\n9 0 0 1e-3 1 2 3 0.1\n")
    xyz, rgb = read_colmap_points(tmp_path / "points3D.txt")
    np.testing.assert_array_equal(xyz, [[1.5, -2.0, 3.0], [0.0, 0.0, 1e-3]])
    np.testing.assert_array_equal(rgb, [[255, 0, 10], [1, 2, 3]])
    assert rgb.dtype == np.uint8 and xyz.dtype == np.float64


def test_scene_model_validation(tmp_path):
    camera = Camera(intrinsics_matrix(10, 10, 5, 5), np.eye(4), 10, 10)
    from fit3d_hf.scene import Frame, Scene

    frames = [Frame("a", tmp_path / "a.png", camera), Frame("a", tmp_path / "b.png", camera)]
    with pytest.raises(ValueError, match="duplicate image ids"):
        Scene("s", tmp_path, frames, np.zeros((0, 3)), np.zeros((0, 3), np.uint8), set())
    with pytest.raises(ValueError, match="test image ids"):
        Scene("s", tmp_path, frames[:1], np.zeros((0, 3)), np.zeros((0, 3), np.uint8), {"zz"})
    with pytest.raises(ValueError, match="2 points but 1 point colours"):
        Scene("s", tmp_path, frames[:1], np.zeros((2, 3)), np.zeros((1, 3), np.uint8), set())


# --------------------------------------------------------------------------------------------------------
# Generated synthetic scenes (fit3d_hf.scene.synthetic): geometry checked against the ray caster


@pytest.fixture(scope="module")
def synthetic_scene(tmp_path_factory):
    from fit3d_hf.scene import synthetic

    config = synthetic.SyntheticSceneConfig(num_views=5, width=64, height=48, num_points=200, test_every=2)
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate_dataset(root, num_scenes=1, num_val_scenes=0, config=config)
    synthetic.generate_dataset(root / "raw", num_scenes=1, num_val_scenes=0, config=config, raw=True)
    room = synthetic.make_scene_spec(config)
    return synthetic, root, room


def test_synthetic_points_land_where_the_rendered_depth_says(synthetic_scene):
    synthetic, root, room = synthetic_scene
    scene = read_scene(root / "scenes" / synthetic.scene_id_for_seed(0))
    sparse = synthetic.sample_points(room)
    np.testing.assert_allclose(scene.points, sparse.xyz, atol=1e-6)
    np.testing.assert_array_equal(scene.point_colors, sparse.rgb)
    assert scene.test_image_ids == {
        name for name, test in zip(room.image_ids, room.is_test, strict=True) if test
    }
    checked = 0
    for frame in scene.frames:
        view = room.image_ids.index(frame.image_id)
        camera = frame.camera
        np.testing.assert_allclose(camera.world_to_camera, room.cameras[view].world_to_camera, atol=1e-9)
        # the depth file is the ray caster's depth for the camera the reader built (1 mm quantisation)
        rendered = synthetic.render_view(room, camera)
        np.testing.assert_allclose(load_depth(frame.depth_path), rendered["depth"], atol=0.51e-3)
        np.testing.assert_array_equal(load_labels(frame.label_path), rendered["labels"])
        uv, depth = camera.project(scene.points)
        seen = (
            sparse.visibility[:, view]
            & (depth > 0)
            & np.all((uv >= 0) & (uv < [camera.width, camera.height]), axis=1)
        )
        for (u, v), point in zip(uv[seen], scene.points[seen], strict=True):
            # a 1x1 camera whose only pixel centre is the point's sub-pixel projection (u, v)
            K = camera.K.copy()
            K[0, 2] -= u - 0.5
            K[1, 2] -= v - 0.5
            hit_depth = synthetic.render_view(room, Camera(K, camera.world_to_camera, 1, 1))["depth"][0, 0]
            hit = camera.camera_to_world[:3, :3] @ (hit_depth * np.linalg.inv(camera.K) @ [u, v, 1.0])
            np.testing.assert_allclose(hit + camera.center, point, atol=1e-5)
            checked += 1
    assert checked >= 50


def test_synthetic_scene_round_trips_through_every_format(synthetic_scene, tmp_path):
    synthetic, root, _ = synthetic_scene
    scene = read_scene(root / "scenes" / synthetic.scene_id_for_seed(0))
    ns = read_scene(write_nerfstudio_transforms(scene, tmp_path / "ns"))
    colmap = read_scene(write_colmap_text(scene, tmp_path / "colmap"), images_dir=scene.root / "images")
    for other in (ns, colmap):
        assert_same_cameras(scene, other)
        np.testing.assert_allclose(other.points, scene.points, atol=1e-12)
        np.testing.assert_array_equal(other.point_colors, scene.point_colors)
    assert ns.test_image_ids == scene.test_image_ids


def test_raw_fisheye_colmap_model_undistorts_to_the_rendered_pinhole_view(synthetic_scene, tmp_path):
    """The raw layout's OPENCV_FISHEYE COLMAP model (2x the size): the undistorted images must look like
    the ray caster's pinhole view through the camera the reader returns."""
    synthetic, root, room = synthetic_scene
    dslr = root / "raw" / "data" / synthetic.scene_id_for_seed(0) / "dslr"
    scene = read_scene(dslr / "colmap", images_dir=dslr / "resized_images", cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "manifest.json").is_file()
    anonymised = {
        name for name, region in zip(room.image_ids, room.anonymised_regions, strict=True) if region
    }
    for frame in scene.frames:
        view = room.image_ids.index(frame.image_id)
        camera = frame.camera
        assert (camera.width, camera.height) == (room.fisheye.width, room.fisheye.height)
        np.testing.assert_allclose(camera.world_to_camera, room.cameras[view].world_to_camera, atol=1e-6)
        if frame.image_id in anonymised:
            continue  # grey rectangles are not in the ray caster's image
        image = load_image(frame.image_path)
        expected = synthetic.render_view(room, camera, supersample=2)["rgb"]
        valid = np.ones(image.shape[:2], bool) if frame.mask_path is None else load_mask(frame.mask_path)
        error = np.abs(image - expected)[valid]
        assert error.mean() < 0.02, (frame.image_id, error.mean())
