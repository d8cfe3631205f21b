"""How errors reach a person: one line for known errors (exit 2 usage, 1 other), tracebacks only with --debug
or FIT3D_DEBUG=1, argument checks in the parser, readable --help, backbone loading that names what it tried."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from backbone_helpers import save_tiny_dinov2

from fit3d_hf.backbones import load_backbone
from fit3d_hf.cli import main, parse_args, run_command
from fit3d_hf.errors import HubUnavailableError, InputError, MissingInputError, UsageError
from fit3d_hf.finetuning import DataArguments, check_frames_against_gaussians
from fit3d_hf.lifting import LiftingArguments

REPO = Path(__file__).resolve().parents[1]


def _raiser(error):
    def command(argv):
        raise error

    return command


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (
            UsageError("--image_scale must be in (0, 1], got 2.0"),
            2,
            "--image_scale must be in (0, 1], got 2.0",
        ),
        (
            InputError("a/b.json: frames[3]: no 'transform_matrix'"),
            1,
            "a/b.json: frames[3]: no 'transform_matrix'",
        ),
        (MissingInputError("scene s does not exist"), 1, "scene s does not exist"),
        (HubUnavailableError("the Hub is unreachable"), 1, "the Hub is unreachable"),
        (FileNotFoundError("x.txt does not exist"), 1, "x.txt does not exist"),  # always a missing input
    ],
)
def test_known_errors_are_one_line_with_their_exit_code(error, code, line, capsys, monkeypatch):
    monkeypatch.delenv("FIT3D_DEBUG", raising=False)
    assert run_command("fit3d lift", _raiser(error), ["--scene", "s"]) == code
    captured = capsys.readouterr()
    assert captured.err == f"fit3d lift: error: {line}\n" and captured.out == ""


def test_a_known_error_behind_a_wrapper_is_reported_and_unknown_errors_keep_their_traceback(
    capsys, monkeypatch
):
    monkeypatch.delenv("FIT3D_DEBUG", raising=False)

    def wrapped(argv):  # datasets wraps its builders' errors; the cause is what a person needs
        try:
            raise InputError("scene_a/transforms.json: frames[1]: 'w' is nan")
        except InputError as cause:
            raise RuntimeError("An error occurred while generating the dataset") from cause

    assert run_command("fit3d export-dataset", wrapped, []) == 1
    assert (
        capsys.readouterr().err
        == "fit3d export-dataset: error: scene_a/transforms.json: frames[1]: 'w' is nan\n"
    )
    with pytest.raises(ZeroDivisionError):  # a bug is not a known error
        run_command("fit3d lift", _raiser(ZeroDivisionError("bug")), [])
    with pytest.raises(ValueError, match="plain"):  # nor is a bare ValueError
        run_command("fit3d lift", _raiser(ValueError("plain")), [])


def test_debug_flag_and_environment_show_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("FIT3D_DEBUG", raising=False)
    assert (
        run_command("fit3d push", _raiser(MissingInputError("--model_dir m is not a folder")), ["--debug"])
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "MissingInputError" in err
    assert err.endswith("fit3d push: error: --model_dir m is not a folder\n")
    monkeypatch.setenv("FIT3D_DEBUG", "1")
    assert run_command("fit3d push", _raiser(UsageError("bad")), []) == 2
    assert capsys.readouterr().err.startswith("Traceback (most recent call last):")
    monkeypatch.setenv("FIT3D_DEBUG", "0")
    assert run_command("fit3d push", _raiser(UsageError("bad")), []) == 2
    assert capsys.readouterr().err == "fit3d push: error: bad\n"


def test_option_checks_are_argparse_errors_with_exit_2(capsys, tmp_path):
    for argv, message in [
        (["--image_scale", "0"], "fit3d lift: error: --image_scale must be in (0, 1], got 0.0"),
        (["--iterations", "-5"], "fit3d lift: error: --iterations must be positive, got -5"),
        (["--mixed_precision", "fp8"], "fit3d lift: error: argument --mixed_precision/--mixed-precision: invalid choice: 'fp8' (choose from 'no', 'bf16')"),
        (["--normalization", "clip"], "fit3d lift: error: argument --normalization: invalid choice: 'clip' (choose from 'imagenet', 'processor')"),
        (["--device", "gpu0"], "fit3d lift: error: --device 'gpu0' is not a device: use auto, cpu, cuda or cuda:N"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["lift", "--scene", "s", "--backbone", "b", "--out", str(tmp_path / "out"), *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: fit3d lift") and err.splitlines()[-1] == message
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "finetune",
                "--backbone",
                "b",
                "--frames",
                "f",
                "--gaussians",
                "g",
                "--output_dir",
                "o",
                "--mixed_precision",
                "fp4",
            ]
        )
    assert exit_info.value.code == 2
    assert "invalid choice: 'fp4' (choose from 'no', 'bf16', 'fp16')" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # A config file gets the same checks, and names a missing required option.
    config = tmp_path / "lift.yaml"
    config.write_text("scene: s\nbackbone: b\nout: o\nimage_scale: 0\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_args("fit3d lift", "", [LiftingArguments], [str(config)])
    assert exit_info.value.code == 2 and "--image_scale must be in (0, 1]" in capsys.readouterr().err
    config = tmp_path / "lift.json"
    config.write_text(json.dumps({"out": "o"}))
    with pytest.raises(SystemExit) as exit_info:
        parse_args("fit3d lift", "", [LiftingArguments], [str(config)])
    assert (
        exit_info.value.code == 2
        and "missing 1 required positional argument: 'backbone'" in capsys.readouterr().err
    )


def _option_help(help_text: str, flag: str) -> str:
    """The help block of one option in argparse's --help output."""
    lines = help_text.splitlines()
    start = next(
        i
        for i, line in enumerate(lines)
        if line.strip().startswith(flag + " ") or line.strip() == flag or line.strip().startswith(flag + ",")
    )
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if line.strip().startswith("-"):
            break
        block.append(line)
    return " ".join(" ".join(block).split())


def test_help_lists_choices_without_misleading_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["lift", "--help"])
    text = capsys.readouterr().out
    for flag in ("--scene", "--backbone", "--out"):  # required: no "(default: None)"
        assert "default" not in _option_help(text, flag), _option_help(text, flag)
    assert "{imagenet,processor}" in _option_help(text, "--normalization")
    assert "{no,bf16}" in _option_help(text, "--mixed_precision")
    assert "{compressed,fp16}" in _option_help(text, "--bundle_sh")
    assert (
        _option_help(text, "--no_previews")
        == "--no_previews, --no-previews Turn --previews off (it is on by default)."
    )
    assert "(default: 30000)" in _option_help(text, "--iterations")
    assert "FIT3D_DEBUG=1" in _option_help(text, "--debug")
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    for flag in ("--backbone", "--frames", "--gaussians", "--output_dir"):
        assert "default" not in _option_help(text, flag)
    assert "{none,all,tensorboard,wandb" in _option_help(text, "--report_to")
    assert (
        "--skip_scenes_without_bundles" in _option_help(text, "--gaussians")
        or "--skip_scenes_without_bundles" in text
    )


def test_unknown_command_suggests_the_closest(capsys):
    assert main(["lfit"]) == 2
    assert (
        capsys.readouterr().err.splitlines()[-1]
        == "fit3d: error: unknown command 'lfit'; did you mean 'lift'?"
    )


# ---- backbone loading names what it tried -------------------------------------------------------------------


def test_backbone_errors_name_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        InputError,
        match=r"^unknown backbone 'dinov2_smal'; did you mean dinov2_small\? Short names: dinov2_small, dinov2_base",
    ):
        load_backbone("dinov2_smal")
    with pytest.raises(MissingInputError, match=rf"^backbone folder {tmp_path}/missing does not exist$"):
        load_backbone(str(tmp_path / "missing"))
    with pytest.raises(MissingInputError, match=r"^backbone folder \./nowhere/model does not exist$"):
        load_backbone("./nowhere/model")
    with pytest.raises(HubUnavailableError) as error_info:
        load_backbone("facebook/dinov2-small", cache_dir=str(tmp_path / "empty-cache"))
    message = str(error_info.value)
    assert message.startswith(
        "backbone 'facebook/dinov2-small' is not a local folder and the Hub is unreachable"
    )
    assert (
        "HF_HUB_OFFLINE" in message
        and "dinov2_small, dinov2_base, dinov2_reg_small, clip_base, mae_base, deit3_base" in message
    )
    with pytest.raises(HubUnavailableError, match=r"^backbone 'mae_base' \(Hub id facebook/vit-mae-base\)"):
        load_backbone("mae_base", cache_dir=str(tmp_path / "empty-cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match="is it a save_pretrained folder"):
        load_backbone(str(tmp_path / "empty"))


# ---- commands: one line, nothing written ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backbone")
    save_tiny_dinov2(folder)
    return str(folder)


def test_lift_failures_are_one_line_and_leave_no_output_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset

    generate_dataset(
        tmp_path / "data",
        num_scenes=1,
        num_val_scenes=0,
        config=SyntheticSceneConfig(seed=1, num_views=4, width=32, height=24, num_points=200),
    )
    scene = next((tmp_path / "data" / "scenes").iterdir())
    out = tmp_path / "runs" / "lifted"
    base = ["lift", "--scene", str(scene), "--out", str(out), "--iterations", "2"]
    assert main([*base, "--backbone", "dinov2_smal"]) == 1
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith("fit3d lift: error: unknown backbone 'dinov2_smal'; did you mean dinov2_small?")
    )
    assert main([*base, "--backbone", str(tmp_path / "no-backbone")]) == 1
    assert (
        capsys.readouterr().err.splitlines()[-1]
        == f"fit3d lift: error: backbone folder {tmp_path / 'no-backbone'} does not exist"
    )
    assert main(["lift", "--scene", str(tmp_path / "no-scene"), "--out", str(out), "--backbone", "b"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--backbone", "b", "--device", "cuda"]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            "fit3d lift: error: --device cuda: this machine has no CUDA device (torch sees none); use --device cpu"
        )
    assert not (tmp_path / "runs").exists()  # no empty output folders from a failed start


def test_finetune_names_a_missing_gaussians_folder_and_writes_nothing(tmp_path, capsys, tiny_backbone):
    argv = ["finetune", "--backbone", tiny_backbone, "--frames", str(tmp_path), "--gaussians", str(tmp_path / "lifted"),
            "--output_dir", str(tmp_path / "run"), "--report_to", "none"]  # fmt: skip
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        f"fit3d finetune: error: --gaussians {tmp_path / 'lifted'} does not exist: pass the output folder of Stage I "
        "(`fit3d lift --out` or training/lift_features.py --out), which holds <scene_id>/gaussians.safetensors\n"
    )
    assert not (tmp_path / "run").exists()


def test_missing_bundles_message_counts_them_and_offers_a_way_out(tmp_path):
    (tmp_path / "lifted").mkdir()
    scenes = [f"scene{i}" for i in range(8)]
    (tmp_path / "lifted" / "scene7").mkdir()
    (tmp_path / "lifted" / "scene7" / "gaussians.safetensors").write_bytes(b"")
    with pytest.raises(MissingInputError) as error_info:
        check_frames_against_gaussians(scenes, tmp_path / "lifted", 32)
    assert str(error_info.value) == (
        f"{tmp_path / 'lifted'} has no Gaussian bundle for 7 of the 8 scenes of the frames (scene0, scene1, scene2, "
        "scene3, scene4 and 2 more); lift them first (`fit3d lift`), or pass --skip_scenes_without_bundles to train "
        "on the other scenes' frames"
    )
    assert DataArguments(frames="f", gaussians="g").skip_scenes_without_bundles is False


def test_training_script_reports_known_errors_in_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("FIT3D_DEBUG", None)
    argv = [sys.executable, str(REPO / "training" / "lift_features.py"), "--scenes", str(tmp_path / "none"),
            "--backbone", "b", "--out", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"lift_features.py: error: scene spec '{tmp_path / 'none'}' is neither a file nor a folder"
    )
    assert "Traceback" not in result.stderr
    result = subprocess.run(
        [*argv, "--iterations", "0"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "lift_features.py: error: --iterations must be positive, got 0"
    )
    result = subprocess.run(
        argv, env={**env, "FIT3D_DEBUG": "1"}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_lift_help_gives_sizing_advice_and_the_readme_agrees(capsys):
    with pytest.raises(SystemExit):
        main(["lift", "--help"])
    raw = capsys.readouterr().out
    text = " ".join(raw.split())
    for flag in ("--iterations 2000", "--image_scale 0.25", "--random_init_points 20000", "--overwrite"):
        assert flag in text
    readme = " ".join((REPO / "README.md").read_text().split())
    bundle_help = _option_help(raw, "--bundle_sh")
    sizes = re.findall(r"about (\d+) B", bundle_help)
    assert sizes == ["164", "252"], bundle_help
    assert "about 164 B per Gaussian" in readme and "252 B per Gaussian" in readme
    assert "fit3d finetune" in readme  # the single-process Stage II command is documented
