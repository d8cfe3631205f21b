"""Stale results: a rerun of Stage I reuses a scene only when the settings that determine it are equal."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest
from backbone_helpers import save_tiny_dinov2

from fit3d_hf.cli import main
from fit3d_hf.errors import UsageError
from fit3d_hf.lifting import NON_RESULT_FIELDS, LiftingArguments, lift_scene, lifting_settings
from fit3d_hf.reruns import check_previous_result, result_settings, settings_differences
from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reruns")
    generate_dataset(
        root / "data",
        num_scenes=1,
        num_val_scenes=0,
        config=SyntheticSceneConfig(seed=2, num_views=4, width=32, height=24, num_points=300),
    )
    save_tiny_dinov2(root / "backbone")
    scene = next((root / "data" / "scenes").iterdir())
    return {"scene": str(scene), "backbone": str(root / "backbone"), "scene_id": scene.name}


def _argv(setup, out, *extra):
    return ["lift", "--scene", setup["scene"], "--backbone", setup["backbone"], "--out", str(out), "--iterations", "6",
            "--feature_dim", "4", "--densify_from", "100", "--checkpoint_interval", "0", "--no_previews",
            "--bundle_sh", "fp16", "--device", "cpu", *extra]  # fmt: skip


def test_settings_are_the_dataclass_fields_minus_an_explicit_list():
    args = LiftingArguments(backbone="dinov2_small", out="o")
    settings = lifting_settings(args)
    assert set(settings) == {f.name for f in dataclasses.fields(LiftingArguments)} - NON_RESULT_FIELDS
    assert {"backbone", "iterations", "feature_dim", "image_scale", "seed", "normalization"} <= set(settings)
    assert not {"out", "device", "previews", "overwrite"} & set(settings)
    # one backbone, two spellings: the same settings
    assert settings == lifting_settings(
        LiftingArguments(backbone="facebook/dinov2-small", out="elsewhere", device="cpu")
    )

    # A field added to the options later is recorded (and compared) with no list to edit.
    @dataclasses.dataclass
    class Extended(LiftingArguments):
        near_plane: float = 0.2

    assert lifting_settings(Extended(backbone="b", out="o"))["near_plane"] == 0.2
    assert settings_differences(
        {"iterations": 10, "seed": 0}, {"iterations": 20, "seed": 0, "near_plane": 0.2}
    ) == [
        "iterations: 10 -> 20",
        "near_plane: (not recorded) -> 0.2",
    ]
    everything_but_scale = [f.name for f in dataclasses.fields(args) if f.name != "image_scale"]
    assert result_settings(args, exclude=everything_but_scale) == {"image_scale": 1.0}


def test_rerun_skips_equal_settings_refuses_others_and_overwrites_on_request(setup, tmp_path, capsys):
    out = tmp_path / "lifted"
    folder = out / setup["scene_id"]
    assert main(_argv(setup, out)) == 0
    first = json.loads((folder / "metrics.json").read_text())
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["iterations"] == 6 and settings["backbone"] == setup["backbone"] and "out" not in settings
    bundle_time = (folder / "gaussians.safetensors").stat().st_mtime_ns
    capsys.readouterr()

    # equal settings (output-only options may differ): a one-line notice, no work
    assert main(_argv(setup, out, "--previews", "--checkpoint_interval", "3")) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"{setup['scene_id']}: already lifted with these settings ({folder}): skipping it; --overwrite redoes it"
    ]
    assert json.loads(captured.out)["seconds_training"] == first["seconds_training"]
    assert (folder / "gaussians.safetensors").stat().st_mtime_ns == bundle_time

    # other settings: refused, naming them, and nothing touched
    assert main(_argv(setup, out, "--iterations", "8", "--seed", "3")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fit3d lift: error: {folder} holds a finished lifted scene made with other settings (iterations: 6 -> 8; "
        "seed: 0 -> 3); pass --overwrite to replace it, or choose another output folder"
    )
    assert (folder / "gaussians.safetensors").stat().st_mtime_ns == bundle_time

    # --overwrite redoes it with the new settings
    assert main(_argv(setup, out, "--iterations", "8", "--seed", "3", "--overwrite")) == 0
    redone = json.loads((folder / "metrics.json").read_text())
    assert redone["iterations"] == 8 and json.loads((folder / "settings.json").read_text())["seed"] == 3
    # The outputs can be read by the others who share the folder (the umask decides, not mkstemp's 0600).
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("gaussians.safetensors", "metrics.json", "settings.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~umask, name


def test_unfinished_scene_resumes_only_with_equal_settings(setup, tmp_path):
    out = tmp_path / "lifted"
    args = LiftingArguments(
        backbone=setup["backbone"], out=str(out), iterations=6, feature_dim=4, densify_from=100, checkpoint_interval=2,
        previews=False, bundle_sh="fp16", device="cpu",
    )  # fmt: skip
    assert lift_scene(setup["scene"], args, max_iterations_this_run=2, progress=False) is None
    folder = out / setup["scene_id"]
    assert (folder / "checkpoint.pt").is_file()
    with pytest.raises(
        UsageError, match=r"holds an unfinished lifted scene made with other settings \(feature_dim: 4 -> 8\)"
    ):
        lift_scene(setup["scene"], dataclasses.replace(args, feature_dim=8), progress=False)
    assert (folder / "checkpoint.pt").is_file()  # the refused run left the checkpoint alone
    resumed = lift_scene(setup["scene"], args, progress=False)
    assert resumed["iterations"] == 6 and not (folder / "checkpoint.pt").exists()


def test_results_without_recorded_settings_are_not_reused_silently(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(UsageError, match="whose settings were not recorded"):
        check_previous_result(tmp_path, {"iterations": 1}, finished=True, unfinished=False, overwrite=False)
    assert (
        check_previous_result(tmp_path, {"iterations": 1}, finished=True, unfinished=False, overwrite=True)
        == "overwrite"
    )
    assert check_previous_result(tmp_path, {}, finished=False, unfinished=False, overwrite=False) == "new"


def test_every_phase_of_a_lift_shows_progress_or_a_status_line(setup, tmp_path, capsys):
    argv = ["lift", "--scene", setup["scene"], "--backbone", setup["backbone"], "--out", str(tmp_path / "out"),
            "--iterations", "4", "--feature_dim", "4", "--densify_from", "100", "--checkpoint_interval", "0",
            "--no_previews", "--holdout_every", "2", "--bundle_sh_refine_steps", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    scene = setup["scene_id"]
    phases = ["target features", "initial evaluation", "lifting", "evaluating the training views",
              "evaluating the held-out views", "compressing the SH colours", "refining the compressed colours",
              "writing the bundle", "evaluating the saved bundle"]  # fmt: skip
    positions = [err.find(f"{scene}: {phase}") for phase in phases]
    assert -1 not in positions, [phase for phase, at in zip(phases, positions, strict=True) if at == -1]
    assert positions == sorted(positions)  # in the order they run


def test_atomic_outputs_get_the_permissions_the_umask_gives(tmp_path):
    from fit3d_hf.utils import atomic_path, atomic_write_text, make_staging_dir

    previous = os.umask(0o027)  # a cluster setting: group may read, others nothing
    try:
        written = atomic_write_text(tmp_path / "metrics.json", "{}")
        with atomic_path(tmp_path / "model.safetensors") as temporary:
            temporary.write_bytes(b"weights")
        staging = make_staging_dir(tmp_path / "checkpoint")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == 0o640  # mkstemp alone would leave 0o600
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE(staging.stat().st_mode) == 0o750  # mkdtemp alone would leave 0o700
    assert staging.parent == tmp_path and staging.name.startswith(".checkpoint.")


def test_partial_writes_of_a_killed_lift_are_removed_and_nothing_else(tmp_path):
    from fit3d_hf.lifting.results import remove_partial_writes

    leftovers = [
        ".checkpoint.pt.k2x_9ab1.pt",
        ".gaussians.safetensors.q7m3zz0p.safetensors",
        ".metrics.json.a1.json",
    ]
    kept = ["checkpoint.pt", ".checkpoint.pt", ".gaussians.safetensors.notes.txt", "mine.pt", ".hidden"]
    for name in leftovers + kept:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".settings.json.dir.json").mkdir()  # not a file: left alone
    removed = remove_partial_writes(tmp_path)
    assert sorted(p.name for p in removed) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, ".settings.json.dir.json"])
