"""The synthetic room generator: determinism, geometric consistency of every written file, layouts."""

import filecmp
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_erosion

from fit3d_hf.scene.camera import Camera, qvec_to_rotmat, scannetpp_nerfstudio_to_colmap
from fit3d_hf.scene.synthetic import (
    SEMANTIC_CLASSES,
    SyntheticSceneConfig,
    generate_dataset,
    generate_raw_scene,
    generate_scene,
    make_scene_spec,
    render_view,
    sample_points,
    scene_id_for_seed,
)

SMALL = SyntheticSceneConfig(num_views=6, width=96, height=72, num_points=800)


def _read_points3d(path: Path) -> dict[int, tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]]:
    points = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        values = line.split()
        track = [(int(values[i]), int(values[i + 1])) for i in range(8, len(values), 2)]
        points[int(values[0])] = (np.array(values[1:4], float), np.array(values[4:7], int), track)
    return points


def _read_cameras(scene_dir: Path) -> tuple[dict, list[Camera], list[str]]:
    transforms = json.loads((scene_dir / "transforms_train.json").read_text())
    K = np.array(
        [[transforms["fl_x"], 0, transforms["cx"]], [0, transforms["fl_y"], transforms["cy"]], [0, 0, 1]]
    )
    frames = sorted(transforms["frames"] + transforms["test_frames"], key=lambda frame: frame["file_path"])
    cameras = [
        Camera(K, scannetpp_nerfstudio_to_colmap(frame["transform_matrix"]), transforms["w"], transforms["h"])
        for frame in frames
    ]
    return transforms, cameras, [Path(frame["file_path"]).stem for frame in frames]


def _bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Samples `image` [H, W(, C)] at pixel coordinates uv [N, 2] (pixel centres at half-integers)."""
    x, y = uv[:, 0] - 0.5, uv[:, 1] - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    if image.ndim == 3:
        fx, fy = fx[:, None], fy[:, None]
    return (
        image[y0, x0] * (1 - fx) * (1 - fy)
        + image[y0, x0 + 1] * fx * (1 - fy)
        + image[y0 + 1, x0] * (1 - fx) * fy
        + image[y0 + 1, x0 + 1] * fx * fy
    )


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory) -> Path:
    return generate_scene(tmp_path_factory.mktemp("synthetic"), "synth00000", SMALL)


def test_same_seed_same_files_other_seed_other_scene(tmp_path, small_scene):
    again = generate_scene(tmp_path / "again", "synth00000", SMALL)
    names = sorted(str(p.relative_to(small_scene)) for p in small_scene.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    assert len(names) == 5 * SMALL.num_views + 2  # image, mask, depth, labels, normals per view
    match, mismatch, errors = filecmp.cmpfiles(small_scene, again, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names)

    other = generate_scene(
        tmp_path / "other", "synth00001", SyntheticSceneConfig(**{**SMALL.__dict__, "seed": 1})
    )
    first = np.asarray(Image.open(small_scene / "images" / "DSC00000.JPG"), dtype=float)
    second = np.asarray(Image.open(other / "images" / "DSC00000.JPG"), dtype=float)
    assert np.abs(first - second).mean() > 10.0
    assert (small_scene / "points3D.txt").read_text() != (other / "points3D.txt").read_text()
    room_a, room_b = make_scene_spec(SMALL), make_scene_spec(SMALL)
    np.testing.assert_array_equal(room_a.room_to_world, room_b.room_to_world)
    for cam_a, cam_b in zip(room_a.cameras, room_b.cameras, strict=True):
        np.testing.assert_array_equal(cam_a.world_to_camera, cam_b.world_to_camera)


def test_points_project_onto_matching_depth_and_colour(small_scene):
    transforms, cameras, names = _read_cameras(small_scene)
    points = _read_points3d(small_scene / "points3D.txt")
    assert len(points) == SMALL.num_points
    depths = [np.asarray(Image.open(small_scene / "depth" / f"{n}.png"), dtype=float) / 1000.0 for n in names]
    labels = [np.asarray(Image.open(small_scene / "labels" / f"{n}.png")) for n in names]
    images = [np.asarray(Image.open(small_scene / "images" / f"{n}.JPG"), dtype=float) / 255.0 for n in names]
    masks = [np.asarray(Image.open(small_scene / "masks" / f"{n}.png")) for n in names]
    depth_errors, colour_errors, observations = [], [], []
    for point_id, (xyz, rgb, track) in points.items():
        assert len(track) >= 2  # COLMAP keeps points seen by two images
        for image_id, _ in track:
            view = image_id - 1  # IMAGE_ID v+1 is view v
            uv, depth = cameras[view].project(xyz[None])
            col, row = np.floor(uv[0] - 0.5).astype(int)
            if not (1 <= col < transforms["w"] - 2 and 1 <= row < transforms["h"] - 2):
                continue  # seen by the wider raw fisheye only, or too close to the border
            window = depths[view][row - 1 : row + 3, col - 1 : col + 3]
            inverse = 1.0 / window
            # One plane around the point, where inverse depth is affine in pixels and bilinear interpolation
            # of it is exact: one label, and second differences of inverse depth at mm-quantisation level.
            bend = max(
                np.abs(inverse[:, :-2] - 2 * inverse[:, 1:-1] + inverse[:, 2:]).max(),
                np.abs(inverse[:-2] - 2 * inverse[1:-1] + inverse[2:]).max(),
            )
            if (
                len(np.unique(labels[view][row - 1 : row + 3, col - 1 : col + 3])) > 1
                or bend * depth[0] ** 2 > 0.003
            ):
                continue
            if not masks[view][row : row + 2, col : col + 2].all():
                continue
            interpolated = 1.0 / _bilinear(1.0 / depths[view], uv)[0]
            depth_errors.append(abs(interpolated - depth[0]))
            colour_errors.append(np.abs(_bilinear(images[view], uv)[0] - rgb / 255.0).max())
            observations.append((point_id, view, uv[0], depth[0]))
    assert len(depth_errors) > 500
    depth_errors, colour_errors = np.array(depth_errors), np.array(colour_errors)
    assert np.median(depth_errors) < 0.0005 and depth_errors.max() < 0.002  # metres; depth PNGs hold mm
    # Image colour (JPEG, texture varying within a pixel) against the stored point colour.
    assert np.median(colour_errors) < 0.02 and np.quantile(colour_errors, 0.95) < 0.08

    # Exactly at the sub-pixel position (a 1x1 camera centred on the projection), the renderer sees the point
    # at its depth and with its stored colour: the sparse points lie on the rendered surfaces.
    room = make_scene_spec(SMALL)
    for point_id, view, uv, depth in observations[:: max(1, len(observations) // 60)]:
        K = cameras[view].K.copy()
        K[0, 2] += 0.5 - uv[0]
        K[1, 2] += 0.5 - uv[1]
        pixel = render_view(room, Camera(K, cameras[view].world_to_camera, 1, 1))
        assert abs(pixel["depth"][0, 0] - depth) < 1e-4
        np.testing.assert_allclose(pixel["rgb"][0, 0] * 255.0, points[point_id][1], atol=0.51)


def test_labels_depth_and_masks(small_scene):
    _, cameras, names = _read_cameras(small_scene)
    room = make_scene_spec(SMALL)
    seen = set()
    for view, name in enumerate(names):
        labels = np.asarray(Image.open(small_scene / "labels" / f"{name}.png"))
        depth_mm = np.asarray(Image.open(small_scene / "depth" / f"{name}.png"))
        assert labels.dtype == np.uint8 and depth_mm.dtype == np.uint16
        rendered = render_view(room, cameras[view])
        np.testing.assert_array_equal(labels, rendered["labels"])
        np.testing.assert_allclose(depth_mm / 1000.0, rendered["depth"], atol=0.0005 + 1e-6)
        assert depth_mm.min() > 300  # closed room, cameras keep clear of everything
        seen |= set(np.unique(labels).tolist())
        mask = np.asarray(Image.open(small_scene / "masks" / f"{name}.png"))
        assert set(np.unique(mask).tolist()) <= {0, 255}
        anonymised = room.anonymised_regions[view] is not None
        assert (mask == 0).any() == anonymised
        if anonymised:  # the blob is grey in the image
            image = np.asarray(Image.open(small_scene / "images" / f"{name}.JPG"), dtype=float)
            inner = binary_erosion(mask == 0, iterations=2)
            assert np.abs(image[inner] - 127.5).mean() < 2 and np.abs(image[inner] - 127.5).max() < 12  # JPEG
    assert {SEMANTIC_CLASSES.index(c) for c in ("wall", "floor")} <= seen
    assert len(seen) >= 4 and seen <= set(range(len(SEMANTIC_CLASSES)))


def test_default_scene_generates_in_seconds(tmp_path):
    start = time.perf_counter()
    scene = generate_scene(tmp_path, "synth00000")
    assert time.perf_counter() - start < 15.0  # ~1 s on one core
    transforms = json.loads((scene / "transforms_train.json").read_text())
    assert transforms["camera_model"] == "PINHOLE"
    assert (transforms["w"], transforms["h"], transforms["cx"], transforms["cy"]) == (160, 120, 80.0, 60.0)
    assert transforms["fl_x"] == pytest.approx(80.0 / np.tan(np.radians(35.0)))
    assert all(transforms[f"k{i}"] == 0.0 for i in range(1, 5))
    assert len(transforms["frames"]) == 21 and len(transforms["test_frames"]) == 3
    assert [f["file_path"] for f in transforms["test_frames"]] == [
        "DSC00007.JPG",
        "DSC00015.JPG",
        "DSC00023.JPG",
    ]
    with Image.open(scene / "images" / "DSC00023.JPG") as image:
        assert image.size == (160, 120)
    assert (
        sum(1 for line in (scene / "points3D.txt").read_text().splitlines() if not line.startswith("#"))
        == 4000
    )
    # transform_matrix is ScanNet++'s nerfstudio convention of the generator's cameras.
    room = make_scene_spec(SyntheticSceneConfig())
    for frame in transforms["frames"]:
        view = int(frame["file_path"][3:8])
        np.testing.assert_allclose(
            scannetpp_nerfstudio_to_colmap(frame["transform_matrix"]),
            room.cameras[view].world_to_camera,
            atol=1e-12,
        )


def test_dataset_lists_and_splits(tmp_path):
    config = SyntheticSceneConfig(num_views=3, width=32, height=24, num_points=50, seed=5)
    root = generate_dataset(tmp_path, num_scenes=2, num_val_scenes=1, config=config)
    metadata = root / "metadata"
    assert (metadata / "nvs_sem_train.txt").read_text().split() == ["synth00005", "synth00006"]
    assert (metadata / "nvs_sem_val.txt").read_text().split() == [scene_id_for_seed(1005)]
    train = (metadata / "train_samples.txt").read_text().split()
    assert train == [f"synth0000{s}_DSC0000{i}" for s in (5, 6) for i in range(3)]
    assert (metadata / "val_samples.txt").read_text().split() == [f"synth01005_DSC0000{i}" for i in range(3)]
    for sample in train:
        scene_id, image_id = sample.rsplit("_", 1)
        assert (root / "scenes" / scene_id / "images" / f"{image_id}.JPG").is_file()
    assert not list((root / "scenes").glob(".*"))  # no temporary folders left


def test_raw_layout_is_consistent_fisheye_colmap(tmp_path):
    cv2 = pytest.importorskip("cv2")
    config = SyntheticSceneConfig(num_views=3, width=48, height=36, num_points=200, raw_supersample=1)
    scene = generate_raw_scene(tmp_path, "synth00000", config) / "dslr"
    room = make_scene_spec(config)
    transforms = json.loads((scene / "nerfstudio" / "transforms.json").read_text())
    assert transforms["camera_model"] == "OPENCV_FISHEYE" and (transforms["w"], transforms["h"]) == (96, 72)
    assert transforms["cx"] != 48.0 and transforms["cy"] != 36.0
    camera_line = (scene / "colmap" / "cameras.txt").read_text().splitlines()[-1].split()
    assert camera_line[:4] == ["1", "OPENCV_FISHEYE", "96", "72"]
    params = np.array(camera_line[4:], float)
    np.testing.assert_allclose(
        params, [transforms[k] for k in ("fl_x", "fl_y", "cx", "cy", "k1", "k2", "k3", "k4")]
    )
    with Image.open(scene / "resized_images" / "DSC00002.JPG") as image:
        assert image.size == (96, 72)

    # The fisheye model is OpenCV's: same pixels as cv2.fisheye.distortPoints, and undistort inverts it.
    fisheye = room.fisheye
    normalized = np.random.default_rng(0).uniform(-0.8, 0.8, size=(500, 2))
    K = np.array([[fisheye.fx, 0, fisheye.cx], [0, fisheye.fy, fisheye.cy], [0, 0, 1]])
    expected = cv2.fisheye.distortPoints(normalized[:, None, :], K, np.array(fisheye.k))[:, 0]
    np.testing.assert_allclose(fisheye.distort(normalized), expected, atol=1e-6)
    np.testing.assert_allclose(fisheye.undistort(fisheye.distort(normalized)), normalized, atol=1e-9)

    # images.txt: poses equal the generator's cameras and the nerfstudio frames; 2D points are the
    # fisheye projections of the 3D points they reference.
    points = _read_points3d(scene / "colmap" / "points3D.txt")
    lines = [
        line
        for line in (scene / "colmap" / "images.txt").read_text().splitlines()
        if not line.startswith("#")
    ]
    frames = {f["file_path"]: f for f in transforms["frames"] + transforms["test_frames"]}
    for view in range(config.num_views):
        header, observations = (
            lines[2 * view].split(),
            np.array(lines[2 * view + 1].split(), float).reshape(-1, 3),
        )
        world_to_camera = np.eye(4)
        world_to_camera[:3, :3] = qvec_to_rotmat(np.array(header[1:5], float))
        world_to_camera[:3, 3] = np.array(header[5:8], float)
        np.testing.assert_allclose(world_to_camera, room.cameras[view].world_to_camera, atol=1e-9)
        pose = scannetpp_nerfstudio_to_colmap(frames[header[9]]["transform_matrix"])
        np.testing.assert_allclose(pose, world_to_camera, atol=1e-9)
        xyz = np.stack([points[int(pid)][0] for pid in observations[:, 2]])
        camera_points = room.cameras[view].world_to_camera_points(xyz)
        projected = fisheye.distort(camera_points[:, :2] / camera_points[:, 2:])
        np.testing.assert_allclose(projected, observations[:, :2], atol=1e-5)
        for index, pid in enumerate(observations[:, 2].astype(int)):  # tracks point back at these rows
            assert (view + 1, index) in points[pid][2]
    # The preprocessed layout of the same seed carries the very same sparse points.
    preprocessed = generate_scene(tmp_path / "pre", "synth00000", config)
    assert (preprocessed / "points3D.txt").read_bytes() == (scene / "colmap" / "points3D.txt").read_bytes()
    assert len(sample_points(room).xyz) == len(points)


@pytest.mark.parametrize("seed", [0, 3, 7, 11])
def test_cameras_stay_in_free_space(seed):
    room = make_scene_spec(SyntheticSceneConfig(seed=seed))
    world_to_room = np.linalg.inv(room.room_to_world)
    centres = np.stack([(world_to_room @ np.append(camera.center, 1.0))[:3] for camera in room.cameras])
    assert (centres > 0.5).all() and (centres < room.size - 0.5).all()
    assert len(room.boxes) == 4 and len(room.spheres) == 3
    for box in room.boxes:
        local = np.abs((centres - box.center) @ box.rotation) - box.half_size
        assert np.linalg.norm(np.maximum(local, 0.0), axis=1).min() > 0.4  # distance to the box
    for sphere in room.spheres:
        assert np.linalg.norm(centres - sphere.center, axis=1).min() - sphere.radius > 0.4
    # Consecutive views move smoothly: steps of at most ~0.4 m and 40 degrees.
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    assert steps.max() < 0.4
    forwards = np.stack([camera.world_to_camera[2, :3] for camera in room.cameras])
    assert np.degrees(np.arccos(np.clip((forwards[1:] * forwards[:-1]).sum(1), -1, 1))).max() < 40
