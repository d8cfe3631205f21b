"""ScanNet++ preprocessing on a raw synthetic fisheye dataset, checked against the generator's own renders."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

cv2 = pytest.importorskip("cv2")

from fit3d_hf.cli import main as fit3d_main  # noqa: E402
from fit3d_hf.scene.camera import Camera, scannetpp_nerfstudio_to_colmap  # noqa: E402
from fit3d_hf.scene.preprocess_scannetpp import (  # noqa: E402
    DONE_MARKER,
    make_undistortion_plan,
    preprocess_scannetpp,
    preprocess_scene,
)
from fit3d_hf.scene.synthetic import (  # noqa: E402
    SyntheticSceneConfig,
    anonymised_mask,
    generate_dataset,
    make_scene_spec,
    render_view,
)

CONFIG = SyntheticSceneConfig(num_views=8, width=128, height=96, num_points=300, anonymised_every=3)
TRAIN, VAL = "synth00000", "synth01000"
MARGIN = 6  # pixels left out at the border: balance=0 plus a recentred principal point reflects some there


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory) -> Path:
    return generate_dataset(
        tmp_path_factory.mktemp("raw"), num_scenes=1, num_val_scenes=1, config=CONFIG, raw=True
    )


@pytest.fixture(scope="module")
def out_root(raw_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preprocessed")
    preprocess_scannetpp(raw_root, out)
    return out


def _pinhole_cameras(scene_dir: Path) -> tuple[dict, dict[str, Camera]]:
    transforms = json.loads((scene_dir / "transforms_train.json").read_text())
    K = np.array(
        [[transforms["fl_x"], 0, transforms["cx"]], [0, transforms["fl_y"], transforms["cy"]], [0, 0, 1]]
    )
    cameras = {
        frame["file_path"]: Camera(
            K, scannetpp_nerfstudio_to_colmap(frame["transform_matrix"]), transforms["w"], transforms["h"]
        )
        for frame in transforms["frames"] + transforms["test_frames"]
    }
    return transforms, cameras


def _psnr(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b)[valid] ** 2)))


def test_images_match_pinhole_renders(out_root):
    scene = out_root / "scenes" / TRAIN
    transforms, cameras = _pinhole_cameras(scene)
    assert transforms["camera_model"] == "PINHOLE"
    assert (transforms["w"], transforms["h"]) == (CONFIG.width, CONFIG.height)
    assert (transforms["cx"], transforms["cy"]) == (CONFIG.width / 2, CONFIG.height / 2)
    assert all(transforms[f"k{i}"] == 0.0 for i in range(1, 5))
    room = make_scene_spec(CONFIG)
    border = np.zeros((CONFIG.height, CONFIG.width), dtype=bool)
    border[MARGIN:-MARGIN, MARGIN:-MARGIN] = True
    for name, camera in cameras.items():
        view = int(name[3:8])
        np.testing.assert_allclose(camera.world_to_camera, room.cameras[view].world_to_camera, atol=1e-9)
        image = np.asarray(Image.open(scene / "images" / name), dtype=np.float32) / 255.0
        assert image.shape == (CONFIG.height, CONFIG.width, 3)
        mask = np.asarray(Image.open(scene / "masks" / f"{name[:-4]}.png"))
        valid = border & (mask == 255)
        # The pipeline filters (2x2 supersampled raw, bicubic downscale, bilinear remap) and compresses
        # (JPEG twice, the second 4:2:0), so the fair oracle is an anti-aliased render: measured 33.4-38.4 dB
        # here. Against the point-sampled render, object edges alias: measured 30.2-35.1 dB.
        assert _psnr(image, render_view(room, camera, supersample=4)["rgb"], valid) >= 32.0
        assert _psnr(image, render_view(room, camera)["rgb"], valid) >= 29.0


def test_undistortion_maps_follow_the_fisheye_model(raw_root):
    raw = json.loads((raw_root / "data" / TRAIN / "dslr" / "nerfstudio" / "transforms.json").read_text())
    plan = make_undistortion_plan(raw, CONFIG.width, CONFIG.height, 0.5, 0.5)
    fisheye = make_scene_spec(CONFIG).fisheye
    rows, cols = np.mgrid[0 : CONFIG.height, 0 : CONFIG.width]
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)
    rays = (centres - plan.K[:2, 2]) / np.diag(plan.K)[:2]
    # Output pixel centre -> its ray -> raw fisheye pixel (half-integer centres) -> downscaled x0.5 ->
    # OpenCV's integer-centred source coordinate: what the remap table must hold.
    expected = fisheye.distort(rays) * 0.5 - 0.5
    np.testing.assert_allclose(plan.map_x.ravel(), expected[:, 0], atol=2e-3)
    np.testing.assert_allclose(plan.map_y.ravel(), expected[:, 1], atol=2e-3)


def test_masks_are_binary_and_in_place(out_root):
    scene = out_root / "scenes" / TRAIN
    _, cameras = _pinhole_cameras(scene)
    room = make_scene_spec(CONFIG)
    num_anonymised = 0
    for name, camera in cameras.items():
        view = int(name[3:8])
        mask = np.asarray(Image.open(scene / "masks" / f"{name[:-4]}.png"))
        assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) <= {0, 255}
        rows, cols = np.mgrid[0 : camera.height, 0 : camera.width]
        rays = np.stack(
            [(cols.ravel() + 0.5 - camera.cx) / camera.fx, (rows.ravel() + 0.5 - camera.cy) / camera.fy], 1
        )
        ideal = anonymised_mask(room, view, rays).reshape(mask.shape)
        # Every anonymised pixel is masked; interpolation may widen the region by a few pixels, no more.
        assert (mask[ideal] == 0).all()
        assert not (mask[~binary_dilation(ideal, structure=np.ones((3, 3)), iterations=3)] == 0).any()
        num_anonymised += bool(ideal.any())
    assert num_anonymised >= 2


def test_layout_lists_every_frame_once(raw_root, out_root):
    metadata = out_root / "metadata"
    assert (metadata / "nvs_sem_train.txt").read_text().split() == [TRAIN]
    assert (metadata / "nvs_sem_val.txt").read_text().split() == [VAL]
    for split, scene_id in (("train", TRAIN), ("val", VAL)):
        samples = (metadata / f"{split}_samples.txt").read_text().split()
        assert samples == [f"{scene_id}_DSC{index:05d}" for index in range(CONFIG.num_views)]
        scene = out_root / "scenes" / scene_id
        transforms = json.loads((scene / "transforms_train.json").read_text())
        raw = json.loads(
            (raw_root / "data" / scene_id / "dslr" / "nerfstudio" / "transforms.json").read_text()
        )
        # frames and test_frames keep the raw partition: each frame exactly once, test frames not duplicated.
        assert [f["file_path"] for f in transforms["frames"]] == [f["file_path"] for f in raw["frames"]]
        assert [f["file_path"] for f in transforms["test_frames"]] == [
            f["file_path"] for f in raw["test_frames"]
        ]
        assert len(transforms["test_frames"]) == 1
        for frame, raw_frame in zip(transforms["frames"], raw["frames"], strict=True):
            assert frame["transform_matrix"] == raw_frame["transform_matrix"]
            assert (scene / "images" / frame["file_path"]).is_file() and (
                scene / "masks" / frame["mask_path"]
            ).is_file()
        assert sorted(p.name for p in (scene / "images").iterdir()) == [
            f"DSC{i:05d}.JPG" for i in range(CONFIG.num_views)
        ]
        colmap_points = raw_root / "data" / scene_id / "dslr" / "colmap" / "points3D.txt"
        assert (scene / "points3D.txt").read_bytes() == colmap_points.read_bytes()
        assert json.loads((scene / DONE_MARKER).read_text())["num_frames"] == CONFIG.num_views
    assert not list((out_root / "scenes").glob(".*"))


def test_resume_skips_finished_scenes(raw_root, out_root):
    image = out_root / "scenes" / TRAIN / "images" / "DSC00000.JPG"
    before = image.stat().st_mtime_ns
    assert (
        fit3d_main(
            ["preprocess-scannetpp", "--raw", str(raw_root), "--out", str(out_root), "--scenes", TRAIN]
        )
        == 0
    )
    assert image.stat().st_mtime_ns == before
    assert (out_root / "metadata" / "val_samples.txt").read_text().split()[0] == f"{VAL}_DSC00000"  # kept


@pytest.fixture
def broken_raw(raw_root, tmp_path) -> Path:
    """A copy of the raw train scene under a new id, listed in the train split."""
    root = tmp_path / "raw"
    shutil.copytree(raw_root / "data" / TRAIN, root / "data" / "broken0000")
    (root / "splits").mkdir()
    (root / "splits" / "nvs_sem_train.txt").write_text("broken0000\n")
    (root / "splits" / "nvs_sem_val.txt").write_text("")
    return root


def _transforms_path(root: Path) -> Path:
    return root / "data" / "broken0000" / "dslr" / "nerfstudio" / "transforms.json"


def _edit_transforms(root: Path, **changes) -> None:
    path = _transforms_path(root)
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_image_fails_cleanly(broken_raw, tmp_path):
    missing = broken_raw / "data" / "broken0000" / "dslr" / "resized_images" / "DSC00005.JPG"
    missing.unlink()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        preprocess_scannetpp(broken_raw, out)
    assert list((out / "scenes").iterdir()) == []  # neither the scene nor its temporary folder
    assert fit3d_main(["preprocess-scannetpp", "--raw", str(broken_raw), "--out", str(out)]) == 1


@pytest.mark.parametrize(
    ("breakage", "error", "culprit"),
    [
        ("unknown_model", ValueError, "transforms.json"),
        ("missing_transforms", FileNotFoundError, "transforms.json"),
        ("unreadable_image", ValueError, "DSC00002.JPG"),
        ("wrong_size", ValueError, "DSC00001.JPG"),
    ],
)
def test_bad_input_names_the_file(broken_raw, tmp_path, breakage, error, culprit):
    dslr = broken_raw / "data" / "broken0000" / "dslr"
    if breakage == "unknown_model":
        _edit_transforms(broken_raw, camera_model="EQUIRECTANGULAR")
    elif breakage == "missing_transforms":
        _transforms_path(broken_raw).unlink()
    elif breakage == "unreadable_image":
        (dslr / "resized_images" / "DSC00002.JPG").write_bytes(b"not a jpeg")
    else:
        Image.new("RGB", (10, 10)).save(dslr / "resized_images" / "DSC00001.JPG")
    with pytest.raises(error, match=culprit) as info:
        preprocess_scene(broken_raw, tmp_path / "out", "broken0000")
    assert str(dslr) in str(info.value)
    assert not (tmp_path / "out" / "scenes" / "broken0000").exists()


def test_pinhole_and_opencv_raw_cameras(broken_raw, tmp_path):
    raw = json.loads(_transforms_path(broken_raw).read_text())
    # PINHOLE: only downscaled; the intrinsics are scaled, principal point kept where it was.
    _edit_transforms(broken_raw, camera_model="PINHOLE")
    scene = preprocess_scene(broken_raw, tmp_path / "pinhole", "broken0000")
    transforms = json.loads((scene / "transforms_train.json").read_text())
    assert transforms["camera_model"] == "PINHOLE"
    assert (transforms["fl_x"], transforms["cx"], transforms["cy"]) == pytest.approx(
        (raw["fl_x"] / 2, raw["cx"] / 2, raw["cy"] / 2)
    )
    resized = cv2.resize(
        cv2.imread(str(broken_raw / "data" / "broken0000" / "dslr" / "resized_images" / "DSC00003.JPG")),
        (CONFIG.width, CONFIG.height),
        interpolation=cv2.INTER_CUBIC,
    )
    _, encoded = cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, 95])
    np.testing.assert_array_equal(
        cv2.imread(str(scene / "images" / "DSC00003.JPG")), cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    )

    # OPENCV (radial-tangential): the remap sends each output pixel centre's ray through OpenCV's distortion.
    opencv = {
        **raw,
        "camera_model": "OPENCV",
        "k1": -0.08,
        "k2": 0.01,
        "p1": 0.001,
        "p2": -0.0005,
        "k3": 0.002,
    }
    plan = make_undistortion_plan(opencv, CONFIG.width, CONFIG.height, 0.5, 0.5)
    assert (plan.K[0, 2], plan.K[1, 2]) == (CONFIG.width / 2, CONFIG.height / 2)
    rows, cols = np.mgrid[0 : CONFIG.height, 0 : CONFIG.width]
    rays = np.stack(
        [
            (cols.ravel() + 0.5 - plan.K[0, 2]) / plan.K[0, 0],
            (rows.ravel() + 0.5 - plan.K[1, 2]) / plan.K[1, 1],
        ],
        1,
    )
    K_raw_cv = np.array(
        [[raw["fl_x"] / 2, 0, raw["cx"] / 2 - 0.5], [0, raw["fl_y"] / 2, raw["cy"] / 2 - 0.5], [0, 0, 1]]
    )
    object_points = np.concatenate([rays, np.ones((len(rays), 1))], axis=1)
    expected, _ = cv2.projectPoints(
        object_points, np.zeros(3), np.zeros(3), K_raw_cv, np.array([-0.08, 0.01, 0.001, -0.0005, 0.002])
    )
    np.testing.assert_allclose(plan.map_x.ravel(), expected[:, 0, 0], atol=2e-3)
    np.testing.assert_allclose(plan.map_y.ravel(), expected[:, 0, 1], atol=2e-3)
    # balance/alpha 0: no output pixel samples outside the source image away from the recentred border.
    inner = (slice(MARGIN, -MARGIN), slice(MARGIN, -MARGIN))
    assert plan.map_x[inner].min() > -0.5 and plan.map_x[inner].max() < CONFIG.width - 0.5
