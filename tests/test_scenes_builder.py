"""The `scenes` datasets builder (any scene spec, mixed layouts), `fit3d export-dataset` of a spec, and
`fit3d convert-scene` (every layout read back to the same scene, ScanNet++ writer included)."""

import json

import numpy as np
import pytest
from datasets import load_dataset
from PIL import Image

from dataset_builders.scannetpp import FRAME_FEATURES, ScanNetPP
from dataset_builders.scenes import Scenes, load_scenes, make_frames_builder
from fit3d_hf.cli import main
from fit3d_hf.errors import InputError, UsageError
from fit3d_hf.scene import read_scene
from fit3d_hf.scene.convert import convert_scenes
from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset
from fit3d_hf.scene.synthetic_captures import generate_capture

LENS = (-0.08, 0.02, 0.001, -0.0015)


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    root = tmp_path_factory.mktemp("captures")
    generate_capture(
        root / "own" / "kitchen",
        SyntheticSceneConfig(seed=7, num_views=6, width=40, height=30, num_points=150),
        distortion=LENS,
    )
    generate_capture(
        root / "own" / "office",
        SyntheticSceneConfig(seed=8, num_views=5, width=40, height=30, num_points=150),
        layout="colmap",
    )
    generate_dataset(
        root / "snpp",
        1,
        0,
        SyntheticSceneConfig(num_views=4, width=40, height=30, num_points=100, test_every=2),
    )
    return root


def test_scenes_builder_reads_mixed_layouts_with_stage_one_s_split(captures, tmp_path):
    spec = f"{captures / 'own'},{captures / 'snpp'}"
    splits = load_scenes(spec, holdout_every=3, cache_dir=tmp_path / "cache")
    assert splits["train"].features == FRAME_FEATURES
    rows = {
        split: list(zip(splits[split]["scene_id"], splits[split]["image_id"], strict=True))
        for split in splits
    }
    # holdout_every 3: views 2, 5, ... of every scene, in its frame order as read (the ScanNet++ scene lists its
    # test frames last: DSC00000, DSC00002, DSC00001, DSC00003)
    assert rows["val"] == [
        ("kitchen", "frame_00003"),
        ("kitchen", "frame_00006"),
        ("office", "frame_00003"),
        ("synth00000", "DSC00001"),
    ]
    assert len(rows["train"]) == 6 + 5 + 4 - 4
    kitchen = read_scene(captures / "own" / "kitchen")
    row = splits["val"][0]
    frame = kitchen.frame("frame_00003")
    np.testing.assert_allclose(row["K"], frame.camera.K, rtol=1e-6)
    np.testing.assert_allclose(row["world_to_camera"], frame.camera.world_to_camera, atol=1e-6)
    # images come undistorted (from the cache); depth and normals with them
    assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(frame.image_path).convert("RGB")))
    assert row["depth"].mode.startswith("I") and row["normals"].mode == "RGB"
    # without holdout_every: the scenes' own test frames (the ScanNet++ scene's test_frames; the captures have none)
    own = load_scenes(spec, cache_dir=tmp_path / "cache")
    assert own["val"]["image_id"] == ["DSC00001", "DSC00003"] and all(own["val"]["is_test"])
    assert len(own["train"]) == 6 + 5 + 2
    points = load_scenes(spec, "points", "train", cache_dir=tmp_path / "cache")
    assert points["scene_id"] == ["kitchen", "office", "synth00000"] and len(points[0]["xyz"]) > 50


def test_builder_choice_and_a_stale_cache_is_rebuilt(captures, tmp_path):
    assert isinstance(
        make_frames_builder(captures / "snpp", cache_dir=tmp_path), ScanNetPP
    )  # split by sample lists
    assert isinstance(make_frames_builder(captures / "own", cache_dir=tmp_path), Scenes)
    spec = str(captures / "own" / "office")
    before = Scenes(cache_dir=str(tmp_path), config_name="frames", scenes=spec)._cache_dir
    assert Scenes(cache_dir=str(tmp_path), config_name="frames", scenes=spec)._cache_dir == before
    images = captures / "own" / "office" / "sparse" / "0" / "images.txt"
    original = images.read_text()
    try:
        images.write_text(original.replace("frame_00005.png\n", "frame_00005.png\n\n", 1) + "\n")
        assert Scenes(cache_dir=str(tmp_path), config_name="frames", scenes=spec)._cache_dir != before
    finally:
        images.write_text(original)


def test_duplicate_scene_ids_are_refused(captures, tmp_path):
    copy = tmp_path / "elsewhere" / "kitchen"
    generate_capture(copy, SyntheticSceneConfig(seed=9, num_views=3, width=40, height=30, num_points=50))
    with pytest.raises(InputError, match=r"both scene 'kitchen'"):
        load_scenes(f"{captures / 'own'},{copy}", cache_dir=tmp_path / "cache")


def test_export_dataset_of_a_scene_spec(captures, tmp_path, capsys):
    out = tmp_path / "export"
    argv = [
        "export-dataset",
        "--data_dir",
        f"{captures / 'own'}",
        "--output_dir",
        str(out),
        "--holdout_every",
        "2",
    ]
    assert main(argv) == 0
    assert "train: 1 shard(s)" in capsys.readouterr().out
    exported = load_dataset(str(out))
    assert sorted(exported) == ["train", "validation"] and len(exported["validation"]) == 3 + 2
    source = load_scenes(
        str(captures / "own"), "frames", "val", holdout_every=2, cache_dir=tmp_path / "cache"
    )
    assert exported["validation"]["image_id"] == source["image_id"]
    # self-contained: the undistorted image bytes are embedded
    assert np.array_equal(np.asarray(exported["validation"][0]["image"]), np.asarray(source[0]["image"]))
    assert "fit3d-hf scenes (frames)" in (out / "README.md").read_text()


def _frames_signature(scene):
    return [
        (
            f.image_id,
            np.round(f.camera.K, 9).tolist(),
            np.round(f.camera.world_to_camera, 9).tolist(),
            f.camera.width,
            f.camera.height,
        )
        for f in scene.frames
    ]


@pytest.mark.parametrize("layout", ["scannetpp", "nerfstudio", "colmap"])
def test_convert_scene_round_trips_every_layout(captures, tmp_path, layout):
    spec = f"{captures / 'own' / 'kitchen'},{captures / 'snpp'}"
    out = tmp_path / layout
    written = convert_scenes(spec, layout, out, holdout_every=2, progress=False)
    sources = [
        read_scene(captures / "own" / "kitchen"),
        read_scene(captures / "snpp" / "scenes" / "synth00000"),
    ]
    assert [p.name for p in written] == ["kitchen", "synth00000"]
    for source, path in zip(sources, written, strict=True):
        copy = read_scene(path)
        assert copy.scene_id == source.scene_id
        assert _frames_signature(copy) == _frames_signature(source)
        np.testing.assert_allclose(copy.points, source.points, atol=1e-12)
        assert np.array_equal(copy.point_colors, source.point_colors)
        assert copy.test_image_ids == (set() if layout == "colmap" else source.test_image_ids)
        for a, b in zip(source.frames, copy.frames, strict=True):
            assert b.image_path.is_relative_to(out) and a.image_path.read_bytes() == b.image_path.read_bytes()
            for kind in ("mask", "depth", "label", "normal"):
                pa, pb = getattr(a, f"{kind}_path"), getattr(b, f"{kind}_path")
                assert (pa is None) == (pb is None), kind
                if pa is not None:
                    assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb))), kind
    # a dataset root the scannetpp builder reads, split as the scenes builder splits
    if layout == "scannetpp":
        samples = (out / "metadata" / "val_samples.txt").read_text().split()
        assert samples == [
            "kitchen_frame_00002",
            "kitchen_frame_00004",
            "kitchen_frame_00006",
            "synth00000_DSC00002",
            "synth00000_DSC00003",
        ]
        frames = load_scenes(str(out), "frames", "val", cache_dir=tmp_path / "cache")
        assert [f"{s}_{i}" for s, i in zip(frames["scene_id"], frames["image_id"], strict=True)] == samples


def test_convert_scene_cli_and_its_refusals(captures, tmp_path, capsys):
    out = tmp_path / "ns"

    def convert(to, *extra):
        command = ["convert-scene", "--scenes", str(captures / "own" / "office"), "--to", to]
        return main([*command, "--output_dir", str(out), *extra])

    assert convert("nerfstudio") == 0
    assert capsys.readouterr().out.strip() == str(out / "office")
    meta = json.loads((out / "office" / "transforms.json").read_text())
    assert meta["camera_model"] == "PINHOLE" and meta["frames"][0]["normal_path"] == "normals/frame_00001.png"
    # an existing output is kept unless --overwrite
    assert convert("colmap") == 2
    assert "already exists" in capsys.readouterr().err and (out / "office" / "transforms.json").is_file()
    assert convert("colmap", "--overwrite") == 0
    assert (out / "office" / "sparse" / "0" / "cameras.txt").is_file()
    assert not (out / "office" / "transforms.json").exists()
    # ScanNet++ needs sparse points: a capture without them is refused, and nothing is left behind
    bare = tmp_path / "bare"
    generate_capture(bare, SyntheticSceneConfig(seed=3, num_views=3, width=40, height=30, num_points=50))
    meta = json.loads((bare / "transforms.json").read_text())
    del meta["ply_file_path"]
    (bare / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="no sparse points"):
        convert_scenes(str(bare), "scannetpp", tmp_path / "snpp_out", progress=False)
    assert not (tmp_path / "snpp_out").exists() and not list(tmp_path.glob(".snpp_out*"))
    with pytest.raises(UsageError, match="--to must be one of"):
        convert_scenes(str(bare), "blender", tmp_path / "x", progress=False)
