"""Scene specs (one parser for every stage), Stage I's held-out rule, the undistortion cache location, and
own captures written by the synthetic capture generator (nerfstudio with OPENCV distortion, COLMAP text)."""

import os
from pathlib import Path

import numpy as np
import pytest

from fit3d_hf.errors import InputError, MissingInputError, UsageError
from fit3d_hf.scene import (
    UNDISTORT_CACHE_ENV,
    heldout_view_indices,
    load_depth,
    load_normals,
    read_scene,
    resolve_scene_list,
    split_views,
    undistort_cache_dir,
)
from fit3d_hf.scene import undistort as undistort_module
from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset, make_scene_spec, render_view
from fit3d_hf.scene.synthetic_captures import distort, generate_capture, undistort_points

CAPTURE = SyntheticSceneConfig(seed=7, num_views=5, width=48, height=36, num_points=200)
LENS = (-0.08, 0.02, 0.001, -0.0015)


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    """A folder holding a nerfstudio capture with lens distortion, a COLMAP text one, and a ScanNet++ dataset."""
    root = tmp_path_factory.mktemp("captures")
    generate_capture(root / "kitchen", CAPTURE, layout="nerfstudio", distortion=LENS)
    generate_capture(
        root / "office",
        SyntheticSceneConfig(seed=8, num_views=5, width=48, height=36, num_points=200),
        layout="colmap",
    )
    generate_dataset(
        root / "snpp",
        1,
        1,
        SyntheticSceneConfig(num_views=4, width=32, height=24, num_points=100, test_every=2),
    )
    return root


def test_every_form_of_spec_resolves_to_the_same_scenes(captures, tmp_path):
    kitchen, office = captures / "kitchen", captures / "office"
    assert resolve_scene_list(str(kitchen)) == [kitchen]
    assert resolve_scene_list(str(kitchen / "transforms.json")) == [kitchen / "transforms.json"]
    assert resolve_scene_list(str(office / "sparse" / "0")) == [office / "sparse" / "0"]
    # a folder of scenes: its scene subfolders, sorted (the ScanNet++ dataset root is no scene itself)
    assert resolve_scene_list(str(captures)) == [kitchen, office]
    snpp = captures / "snpp" / "scenes"
    assert resolve_scene_list(str(captures / "snpp")) == [snpp / "synth00000", snpp / "synth01000"]
    # a list file: relative lines are relative to it; comments and blank lines are skipped
    listing = captures / "my_scenes.txt"
    listing.write_text(f"# my captures\nkitchen\n\n{office.resolve()}  # absolute\n")
    assert [p.resolve() for p in resolve_scene_list(str(listing))] == [kitchen.resolve(), office.resolve()]
    # a comma-separated list of all of these, each scene once, in order
    spec = f"{office},{listing}, {snpp / 'synth01000'}"
    assert [p.resolve() for p in resolve_scene_list(spec)] == [
        office.resolve(), kitchen.resolve(), (snpp / "synth01000").resolve(),
    ]  # fmt: skip
    listing.unlink()


def test_bad_specs_name_what_is_wrong(captures, tmp_path):
    with pytest.raises(MissingInputError, match="neither a file nor a folder"):
        resolve_scene_list(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match="no scene found"):
        resolve_scene_list(str(tmp_path / "empty"))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{captures / 'kitchen'}\nnot_there\n")
    with pytest.raises(MissingInputError, match=r"list.txt: line 2: .*not_there does not exist"):
        resolve_scene_list(str(listing))
    listing.write_text(f"{tmp_path / 'empty'}\n")
    with pytest.raises(MissingInputError, match="line 1: .* holds no scene"):
        resolve_scene_list(str(listing))
    with pytest.raises(UsageError, match="empty"):
        resolve_scene_list(" , ")


def test_held_out_views_are_stage_one_s_and_split_the_scene(captures):
    assert heldout_view_indices(10, 4) == [3, 7]
    assert heldout_view_indices(10, 0) == []
    with pytest.raises(UsageError, match="holdout_every"):
        heldout_view_indices(10, 1)
    ids = [f"v{i}" for i in range(9)]
    assert split_views(ids, {"v0"}, 3) == {
        "train": ["v0", "v1", "v3", "v4", "v6", "v7"],
        "val": ["v2", "v5", "v8"],
    }
    # without holdout_every: the test frames the scene's files list
    assert split_views(ids, {"v0", "v4"}, 0) == {
        "train": [i for i in ids if i not in ("v0", "v4")],
        "val": ["v0", "v4"],
    }
    # the synthetic ScanNet++ scene's test_frames (every 2nd view here) become val
    scene = read_scene(captures / "snpp" / "scenes" / "synth00000")
    assert split_views(scene.image_ids, scene.test_image_ids, 0)["val"] == sorted(scene.test_image_ids) != []


def test_distortion_inversion_is_exact():
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.6, 0.6, size=(200, 2))
    np.testing.assert_allclose(undistort_points(distort(points, LENS), LENS), points, atol=1e-10)
    with pytest.raises(ValueError, match="too strong"):
        undistort_points(np.array([[3.0, 3.0]]), (-0.9, 0.0, 0.0, 0.0))


@pytest.mark.parametrize("name", ["kitchen", "office"])
def test_own_captures_read_back_to_the_analytic_scene(captures, name):
    """Depth, normals and colours of the (undistorted) frames agree with the room rendered through the camera
    the reader returns: the poses, the intrinsics and the undistortion are right."""
    scene = read_scene(captures / name)
    assert scene.scene_id == name and len(scene.frames) == 5 and len(scene.points) > 0
    room = make_scene_spec(
        CAPTURE if name == "kitchen" else SyntheticSceneConfig(seed=8, num_views=5, width=48, height=36)
    )
    for frame in scene.frames[:2]:
        truth = render_view(room, frame.camera)
        depth, normals = load_depth(frame.depth_path), load_normals(frame.normal_path)
        valid = depth > 0
        assert valid.mean() > 0.95
        assert np.median(np.abs(depth - truth["depth"])[valid]) < 0.01  # metres
        angles = np.degrees(np.arccos(np.clip((normals * truth["normals"]).sum(-1), -1, 1)))[valid]
        assert np.median(angles) < 1.0 and (angles < 5).mean() > 0.9
    if (
        name == "kitchen"
    ):  # undistorted: a pinhole camera with the principal point at the centre, in the cache
        camera = scene.frames[0].camera
        assert (camera.cx, camera.cy) == (24.0, 18.0)
        assert ".fit3d_undistorted" in scene.frames[0].image_path.parts


def test_undistortion_cache_goes_where_it_can_be_written(captures, tmp_path, monkeypatch):
    kitchen = captures / "kitchen"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    monkeypatch.delenv(UNDISTORT_CACHE_ENV, raising=False)
    assert undistort_cache_dir(kitchen) == kitchen / ".fit3d_undistorted"
    assert undistort_cache_dir(kitchen, tmp_path / "mine") == tmp_path / "mine"
    # the environment variable names a folder for all scenes: one subfolder per scene folder
    monkeypatch.setenv(UNDISTORT_CACHE_ENV, str(tmp_path / "shared"))
    shared = undistort_cache_dir(kitchen)
    assert shared.parent == tmp_path / "shared" and shared.name.startswith("kitchen-")
    scene = read_scene(kitchen)
    assert scene.frames[0].image_path.is_relative_to(shared) and (shared / "manifest.json").is_file()
    monkeypatch.delenv(UNDISTORT_CACHE_ENV)

    # A read-only dataset folder: the user cache. (Root ignores permission bits, so the check is stubbed there.)
    readonly = tmp_path / "readonly"
    generate_capture(readonly / "hall", CAPTURE, layout="nerfstudio", distortion=LENS)
    if os.geteuid() == 0:
        original = undistort_module._writable
        monkeypatch.setattr(
            undistort_module, "_writable", lambda f: not f.is_relative_to(readonly) and original(f)
        )
    else:
        os.chmod(readonly / "hall", 0o555)
    try:
        cache = undistort_cache_dir(readonly / "hall")
        assert cache.is_relative_to(tmp_path / "user_cache" / "fit3d" / "undistorted")
        scene = read_scene(readonly / "hall")
        assert scene.frames[0].image_path.is_relative_to(cache)
        assert not (readonly / "hall" / ".fit3d_undistorted").exists()
        # Neither writable: the error names both places and the variable.
        monkeypatch.setattr(undistort_module, "_writable", lambda f: False)
        with pytest.raises(
            InputError,
            match=r"neither .*hall/\.fit3d_undistorted \(the scene folder\) nor .*user_cache.* is writable; set FIT3D_UNDISTORT_CACHE",
        ):
            read_scene(readonly / "hall")
    finally:
        os.chmod(readonly / "hall", 0o755)


def test_writable_check_on_real_permissions(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    assert undistort_module._writable(folder / "a" / "b")
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            assert not undistort_module._writable(folder / "cache")
        finally:
            os.chmod(folder, 0o755)
    assert not undistort_module._writable(Path("/proc/1/nonexistent"))
