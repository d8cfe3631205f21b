"""The `scannetpp` datasets builder: real `download_and_prepare()` / `as_dataset()` / streaming on small
fixture roots and on generated synthetic scenes; rows must equal the source files."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from test_readers import make_scannetpp_root

from dataset_builders.scannetpp import FRAME_FEATURES, ScanNetPP, group_samples, load_scannetpp
from fit3d_hf.scene import read_scene


@pytest.fixture
def root(tmp_path):
    info = make_scannetpp_root(tmp_path / "root", np.random.default_rng(0))
    return tmp_path / "root", info


def _expected_rows(info, split):
    """(scene, image) of the listed samples in the builder's order: sorted by scene, then image."""
    rows = []
    for sample in info["samples"][split]:
        for scene_id in sorted(info, reverse=True):
            if scene_id != "samples" and sample.startswith(scene_id + "_"):
                rows.append((scene_id, sample[len(scene_id) + 1 :]))
                break
    return sorted(rows)


def test_frames_config_equals_the_source_files(root, tmp_path):
    data_dir, info = root
    builder = ScanNetPP(cache_dir=str(tmp_path / "cache"), config_name="frames", data_dir=str(data_dir))
    builder.download_and_prepare()
    dataset = builder.as_dataset()
    assert set(dataset) == {"train", "val"}
    assert dataset["train"].features == FRAME_FEATURES
    for split in ("train", "val"):
        rows = dataset[split]
        assert list(zip(rows["scene_id"], rows["image_id"], strict=True)) == _expected_rows(info, split)
    train = dataset["train"]
    assert len(train) == 4  # scene_a's last frame is in no split file
    for row in train:
        truth = info[row["scene_id"]]
        scene_dir = data_dir / "scenes" / row["scene_id"]
        np.testing.assert_allclose(row["K"], truth["K"], rtol=1e-6)
        np.testing.assert_allclose(row["world_to_camera"], truth["w2c"][row["image_id"]], atol=1e-6)
        assert (row["width"], row["height"]) == truth["size"]
        assert row["is_test"] == (row["image_id"] in truth["test_ids"])
        source = Image.open(scene_dir / "images" / f"{row['image_id']}.JPG")
        np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(source))
        np.testing.assert_array_equal(
            np.asarray(row["mask"]), np.asarray(Image.open(scene_dir / "masks" / f"{row['image_id']}.png"))
        )
        np.testing.assert_array_equal(
            np.asarray(row["depth"]), np.asarray(Image.open(scene_dir / "depth" / f"{row['image_id']}.png"))
        )
    # torch format: uint8 CHW images and 4x4 poses
    torch_row = train.with_format("torch")[0]
    assert torch_row["image"].shape == (3, 30, 40) and torch_row["world_to_camera"].shape == (4, 4)

    # streaming reads the same rows straight from the scene files
    streamed = list(builder.as_streaming_dataset(split="train"))
    assert [(r["scene_id"], r["image_id"]) for r in streamed] == _expected_rows(info, "train")
    for row, stream_row in zip(train, streamed, strict=True):
        np.testing.assert_allclose(
            np.asarray(stream_row["world_to_camera"], dtype=np.float32), row["world_to_camera"]
        )
        np.testing.assert_array_equal(np.asarray(stream_row["image"]), np.asarray(row["image"]))


def test_points_config_and_load_helper(root, tmp_path):
    data_dir, info = root
    points = load_scannetpp(data_dir, "points", split="train", cache_dir=tmp_path / "cache")
    assert points["scene_id"] == ["scene_a", "scene_b_2"]
    for row in points.with_format("numpy"):
        truth = info[row["scene_id"]]
        np.testing.assert_array_equal(row["xyz"], truth["points"].astype(np.float32))
        np.testing.assert_array_equal(row["rgb"], truth["colors"])
    val = load_scannetpp(data_dir, "points", split="val", cache_dir=tmp_path / "cache")
    assert val["scene_id"] == ["val_c"]


def test_cache_is_reused_and_rebuilt_when_the_data_change(root, tmp_path):
    data_dir, info = root
    cache = str(tmp_path / "cache")
    first = ScanNetPP(cache_dir=cache, config_name="frames", data_dir=str(data_dir))
    first.download_and_prepare()
    again = ScanNetPP(cache_dir=cache, config_name="frames", data_dir=str(data_dir))
    assert again.cache_dir == first.cache_dir
    # move scene_b_2's first camera: the json changes, so the cache path does too
    json_path = data_dir / "scenes" / "scene_b_2" / "transforms_train.json"
    meta = json.loads(json_path.read_text())
    meta["frames"][0]["transform_matrix"][0][3] += 1.0
    json_path.write_text(json.dumps(meta))
    changed = ScanNetPP(cache_dir=cache, config_name="frames", data_dir=str(data_dir))
    assert changed.cache_dir != first.cache_dir
    changed.download_and_prepare()
    row = changed.as_dataset(split="train").filter(lambda r: r["scene_id"] == "scene_b_2")[0]
    expected = read_scene(data_dir / "scenes" / "scene_b_2").frames[0].camera.world_to_camera
    np.testing.assert_allclose(row["world_to_camera"], expected, atol=1e-6)
    assert not np.allclose(row["world_to_camera"], info["scene_b_2"]["w2c"]["DSC00000"], atol=1e-3)


def test_frames_without_masks_depth_or_labels_are_none(tmp_path):
    info = make_scannetpp_root(tmp_path / "root", np.random.default_rng(1), train={"plain": 2}, val={})
    for folder in ("masks", "depth", "labels"):
        for path in (tmp_path / "root" / "scenes" / "plain" / folder).iterdir():
            path.unlink()
    json_path = tmp_path / "root" / "scenes" / "plain" / "transforms_train.json"
    meta = json.loads(json_path.read_text())
    for frame in meta["frames"] + meta["test_frames"]:
        del frame["mask_path"]
    json_path.write_text(json.dumps(meta))
    (tmp_path / "root" / "metadata" / "val_samples.txt").unlink()
    dataset = load_scannetpp(tmp_path / "root", cache_dir=tmp_path / "cache")
    assert set(dataset) == {"train"}
    rows = dataset["train"]
    assert rows["image_id"] == info["plain"]["ids"] == ["DSC00000", "DSC00001"]
    assert rows["mask"] == [None, None] and rows["depth"] == [None, None] and rows["label"] == [None, None]


def test_bad_roots_give_clear_errors(root, tmp_path):
    data_dir, _ = root
    with pytest.raises(ValueError, match="needs data_dir"):
        ScanNetPP(cache_dir=str(tmp_path / "c0"), config_name="frames").download_and_prepare()
    with pytest.raises(FileNotFoundError, match="no scenes/ folder"):
        load_scannetpp(tmp_path / "nowhere", cache_dir=tmp_path / "c1")
    split_file = data_dir / "metadata" / "val_samples.txt"
    split_file.write_text("ghost_DSC00000\n")
    with pytest.raises(
        ValueError, match=r"val_samples.txt: sample 'ghost_DSC00000' is not '<scene_id>_<image_id>'"
    ):
        load_scannetpp(data_dir, cache_dir=tmp_path / "c2")
    split_file.write_text("val_c_DSC00042\n")
    with pytest.raises(Exception) as caught:  # wrapped by datasets in a DatasetGenerationError
        load_scannetpp(data_dir, cache_dir=tmp_path / "c3")
    assert "val_samples.txt lists 1 images of scene val_c that its transforms_train.json does not" in str(
        caught.value.__cause__ or caught.value
    )
    for name in ("train_samples.txt", "val_samples.txt"):
        (data_dir / "metadata" / name).unlink()
    with pytest.raises(FileNotFoundError, match="train_samples.txt"):
        load_scannetpp(data_dir, cache_dir=tmp_path / "c4")


def test_group_samples_splits_at_the_longest_existing_scene_id():
    grouped = group_samples(["a_b_DSC1", "a_DSC2", "a_b_c_DSC3"], {"a", "a_b"}, "list.txt")
    assert grouped == {"a_b": ["DSC1", "c_DSC3"], "a": ["DSC2"]}
    with pytest.raises(ValueError, match="list.txt: sample 'b_DSC1'"):
        group_samples(["b_DSC1"], {"a"}, "list.txt")


def test_builder_on_synthetic_scenes_matches_the_generator(tmp_path):
    from fit3d_hf.scene import synthetic

    config = synthetic.SyntheticSceneConfig(num_views=6, width=64, height=48, num_points=300)
    root = synthetic.generate_dataset(tmp_path / "synth", num_scenes=2, num_val_scenes=1, config=config)
    frames = load_scannetpp(root, cache_dir=tmp_path / "cache")
    assert (len(frames["train"]), len(frames["val"])) == (12, 6)
    for split, seeds in (("train", [0, 1]), ("val", [1000])):
        assert sorted(set(frames[split]["scene_id"])) == [synthetic.scene_id_for_seed(s) for s in seeds]
    rooms = {
        synthetic.scene_id_for_seed(s): synthetic.make_scene_spec(replace(config, seed=s)) for s in (0, 1)
    }
    for row in frames["train"].select(range(0, 12, 5)).to_iterable_dataset():
        room = rooms[row["scene_id"]]
        view = room.image_ids.index(row["image_id"])
        camera = room.cameras[view]
        np.testing.assert_allclose(row["world_to_camera"], camera.world_to_camera, atol=1e-5)
        np.testing.assert_allclose(row["K"], camera.K, rtol=1e-6)
        assert row["is_test"] == room.is_test[view]
        scene_dir = root / "scenes" / row["scene_id"]
        np.testing.assert_array_equal(
            np.asarray(row["image"]), np.asarray(Image.open(scene_dir / "images" / f"{row['image_id']}.JPG"))
        )
        np.testing.assert_array_equal(
            np.asarray(row["label"]), np.asarray(Image.open(scene_dir / "labels" / f"{row['image_id']}.png"))
        )
    points = load_scannetpp(root, "points", split="val", cache_dir=tmp_path / "cache").with_format("numpy")[0]
    scene = read_scene(root / "scenes" / synthetic.scene_id_for_seed(1000))
    np.testing.assert_array_equal(points["xyz"], scene.points.astype(np.float32))
    np.testing.assert_array_equal(points["rgb"], scene.point_colors)
