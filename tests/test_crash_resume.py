"""Crash safety proven by real crashes: the real `fit3d lift` and `training/finetune.py` run in a subprocess and
get SIGKILLed at a step, or inside the atomic write of a checkpoint or bundle (after the temporary file is
written and cut in half, before its rename: `tests/crash_hook.py` pauses the process there and the test
kills it). After each kill the same command resumes, and the final bundle or weights must equal those of an
uninterrupted run with the same seed, bit for bit, on the CPU.

Also the Stage II resume variants (gradient accumulation, epoch boundary, checkpoint rotation, an explicit
checkpoint path, a missing one) in-process.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from backbone_helpers import save_tiny_dinov2
from safetensors.torch import load_file

from fit3d_hf.checkpoints import load_torch_checkpoint, verify_checkpoint_folder
from fit3d_hf.errors import MissingInputError
from fit3d_hf.finetuning import BackboneArguments, DataArguments, FinetuningArguments, train
from fit3d_hf.lifting import LiftingArguments, lift_scene, resolve_scene_list
from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset

REPO = Path(__file__).resolve().parents[1]
HOOK = REPO / "tests" / "crash_hook.py"
# The same single-threaded kernels in every run: the uninterrupted and the resumed runs must agree bit for bit.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TQDM_DISABLE": "1",
}
TIMEOUT = 300

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny synthetic dataset (one train scene of 12 views), a tiny backbone, and its lifted Gaussians."""
    root = tmp_path_factory.mktemp("crash")
    data = root / "data"
    generate_dataset(
        data,
        num_scenes=1,
        num_val_scenes=0,
        config=SyntheticSceneConfig(seed=7, num_views=12, width=32, height=24, num_points=600),
    )
    save_tiny_dinov2(root / "backbone")
    scene = resolve_scene_list(str(data))[0]
    lift_scene(scene, LiftingArguments(**_lift_options(root, root / "gaussians")), progress=False)
    return {
        "root": root,
        "data": data,
        "scene": scene,
        "backbone": str(root / "backbone"),
        "gaussians": root / "gaussians",
    }


def _lift_options(root, out) -> dict:
    return dict(
        backbone=str(root / "backbone"), out=str(out), feature_dim=8, iterations=60, checkpoint_interval=20, device="cpu",
        previews=False, holdout_every=0, densify_from=10, densify_interval=10, densify_until=50, max_gaussians=2000,
        sh_increase_interval=20, bundle_sh_refine_steps=5, feature_lr=0.01, decoder_lr=0.01,
    )  # fmt: skip


def _lift_command(workspace, out) -> list[str]:
    options = _lift_options(workspace["root"], out)
    argv = ["-m", "fit3d_hf.cli", "lift", "--scene", str(workspace["scene"])]
    for key, value in options.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def _run(
    argv, log: Path, where: str = "none", occurrence: int = 1, marker: Path | None = None
) -> dict | None:
    """Runs `argv` under the crash hook. With a pause point: waits until the process pauses there, SIGKILLs
    it and returns what it paused in; without: waits for a clean exit."""
    marker = marker or log.with_suffix(".paused")
    marker.unlink(missing_ok=True)
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, str(HOOK), str(marker), where, str(occurrence), "--", *argv],
                                   cwd=REPO, env=ENV, stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + TIMEOUT
        try:
            while time.monotonic() < deadline:
                if where != "none" and marker.is_file():
                    paused = json.loads(marker.read_text())
                    os.kill(process.pid, signal.SIGKILL)
                    assert process.wait(timeout=30) == -signal.SIGKILL
                    return paused
                if process.poll() is not None:
                    break
                time.sleep(0.05)
            else:
                pytest.fail(
                    f"{argv[:3]} did not finish or pause within {TIMEOUT} s; log:\n{log.read_text()[-3000:]}"
                )
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert where == "none", (
        f"the run ended without reaching its pause point {where}; log:\n{log.read_text()[-3000:]}"
    )
    assert process.returncode == 0, log.read_text()[-3000:]
    return None


# --------------------------------------------------------------------------------------------------------
# Stage I


@pytest.fixture(scope="module")
def lifted_uninterrupted(workspace):
    out = workspace["root"] / "lift_uninterrupted"
    _run(_lift_command(workspace, out), workspace["root"] / "lift_uninterrupted.log")
    return (out / workspace["scene"].name / "gaussians.safetensors").read_bytes()


def _bundle_bytes(out, workspace) -> bytes:
    return (out / workspace["scene"].name / "gaussians.safetensors").read_bytes()


def test_stage1_killed_at_a_random_step_resumes_to_the_same_bundle(workspace, lifted_uninterrupted, tmp_path):
    step = 21 + int(
        torch.randint(0, 29, (1,), generator=torch.Generator().manual_seed(int(time.time())))
    )  # 21..49
    out = tmp_path / "out"
    # Densifier.update_stats runs inside each step, between its backward and its optimizer step.
    paused = _run(
        _lift_command(workspace, out),
        tmp_path / "a.log",
        "call:fit3d_hf.gaussians.densify:Densifier.update_stats",
        step,
    )
    assert f"call {step} of" in paused["paused_in"]
    checkpoint = out / workspace["scene"].name / "checkpoint.pt"
    assert load_torch_checkpoint(checkpoint)["iteration"] == 20 * ((step - 1) // 20), (
        step
    )  # the last one before the kill
    _run(_lift_command(workspace, out), tmp_path / "b.log")
    assert _bundle_bytes(out, workspace) == lifted_uninterrupted, f"killed at step {step}"
    assert not checkpoint.exists()  # removed once the scene is done


def test_stage1_killed_while_writing_a_checkpoint_keeps_the_previous_one(
    workspace, lifted_uninterrupted, tmp_path
):
    out = tmp_path / "out"
    paused = _run(_lift_command(workspace, out), tmp_path / "a.log", r"replace:checkpoint\.pt$", 2)
    assert "cut from" in paused["paused_in"]
    folder = out / workspace["scene"].name
    leftovers = [p for p in folder.iterdir() if p.name.startswith(".checkpoint.pt.")]
    assert len(leftovers) == 1  # the half-written temporary file, never taken for the checkpoint
    assert load_torch_checkpoint(folder / "checkpoint.pt")["iteration"] == 20  # the previous one, whole
    _run(_lift_command(workspace, out), tmp_path / "b.log")
    assert _bundle_bytes(out, workspace) == lifted_uninterrupted
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # the resumed run removed the leftover


def test_stage1_killed_while_writing_the_bundle_redoes_it(workspace, lifted_uninterrupted, tmp_path):
    out = tmp_path / "out"
    paused = _run(_lift_command(workspace, out), tmp_path / "a.log", r"replace:gaussians\.safetensors$", 1)
    assert "cut from" in paused["paused_in"]
    folder = out / workspace["scene"].name
    assert not (folder / "gaussians.safetensors").exists() and not (folder / "metrics.json").exists()
    assert load_torch_checkpoint(folder / "checkpoint.pt")["iteration"] == 40
    _run(_lift_command(workspace, out), tmp_path / "b.log")
    assert _bundle_bytes(out, workspace) == lifted_uninterrupted


# --------------------------------------------------------------------------------------------------------
# Stage II through the training script


def _finetune_command(workspace, output_dir, **overrides) -> list[str]:
    options = {
        "backbone": workspace["backbone"], "frames": str(workspace["data"]), "gaussians": str(workspace["gaussians"]),
        "output_dir": str(output_dir), "max_train_steps": 6, "checkpointing_steps": 2, "train_batch_size": 2,
        "learning_rate": 1e-3, "validation_split": "", "report_to": "none", "seed": 3, **overrides,
    }  # fmt: skip
    argv = [str(REPO / "training" / "finetune.py")]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return argv


def _weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / "finetuned" / "model.safetensors")


def _assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def finetuned_uninterrupted(workspace):
    output_dir = workspace["root"] / "finetune_uninterrupted"
    _run(_finetune_command(workspace, output_dir), workspace["root"] / "finetune_uninterrupted.log")
    return _weights(output_dir)


def test_stage2_killed_mid_step_resumes_to_the_same_weights(workspace, finetuned_uninterrupted, tmp_path):
    output_dir = tmp_path / "run"
    # The 3rd optimisation step is killed between its backward and its optimizer step (after checkpoint-2).
    paused = _run(
        _finetune_command(workspace, output_dir),
        tmp_path / "a.log",
        "call:accelerate:Accelerator.clip_grad_norm_",
        3,
    )
    assert "call 3 of" in paused["paused_in"]
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    _run(_finetune_command(workspace, output_dir, resume_from_checkpoint="latest"), tmp_path / "b.log")
    assert "resumed from" in (tmp_path / "b.log").read_text()
    _assert_same_weights(_weights(output_dir), finetuned_uninterrupted)


def test_stage2_killed_while_saving_a_checkpoint_keeps_the_previous_one(
    workspace, finetuned_uninterrupted, tmp_path
):
    output_dir = tmp_path / "run"
    paused = _run(_finetune_command(workspace, output_dir), tmp_path / "a.log", r"replace:checkpoint-4$", 1)
    assert "cut from" in paused["paused_in"]
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == [
        "checkpoint-2"
    ]  # nothing half-written there
    assert (output_dir / ".partial-checkpoint-4").is_dir()
    assert verify_checkpoint_folder(output_dir / "checkpoint-2")["checksummed"]
    _run(_finetune_command(workspace, output_dir, resume_from_checkpoint="latest"), tmp_path / "b.log")
    assert (
        "resumed from" in (tmp_path / "b.log").read_text()
        and "checkpoint-2" in (tmp_path / "b.log").read_text()
    )
    _assert_same_weights(_weights(output_dir), finetuned_uninterrupted)
    assert not (output_dir / ".partial-checkpoint-4").exists()  # replaced by the complete checkpoint-4


# --------------------------------------------------------------------------------------------------------
# Stage II resume variants (in-process)


def _arguments(workspace, output_dir, **overrides):
    model = BackboneArguments(backbone=workspace["backbone"])
    data = DataArguments(
        frames=str(workspace["data"]), gaussians=str(workspace["gaussians"]), validation_split=None
    )
    training = FinetuningArguments(
        output_dir=str(output_dir), learning_rate=1e-3, max_train_steps=9, train_batch_size=2, checkpointing_steps=3,
        report_to="none", seed=3,
    )  # fmt: skip
    return model, data, replace(training, **overrides)


@pytest.fixture(scope="module")
def reference_run(workspace):
    """9 steps of batch 2 over 12 frames (6 steps per epoch), checkpoints every 3 steps, at most 2 kept."""
    output_dir = workspace["root"] / "reference"
    train(*_arguments(workspace, output_dir, checkpoints_total_limit=2))
    return output_dir


def test_checkpoint_rotation_keeps_the_newest(reference_run):
    assert sorted(p.name for p in reference_run.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-9"]
    assert all(verify_checkpoint_folder(p)["checksummed"] for p in reference_run.glob("checkpoint-*"))


def test_resume_mid_epoch_across_the_epoch_boundary(workspace, reference_run, tmp_path):
    train(*_arguments(workspace, tmp_path, max_train_steps=4, checkpointing_steps=4))
    metrics = train(
        *_arguments(workspace, tmp_path, resume_from_checkpoint="latest")
    )  # 4 -> 9 crosses step 6
    assert metrics["steps"] == 9
    _assert_same_weights(_weights(tmp_path), _weights(reference_run))


def test_resume_from_an_explicit_checkpoint_at_the_epoch_boundary(workspace, reference_run, tmp_path):
    metrics = train(
        *_arguments(workspace, tmp_path, resume_from_checkpoint=str(reference_run / "checkpoint-6"))
    )
    assert metrics["steps"] == 9
    _assert_same_weights(_weights(tmp_path), _weights(reference_run))


def test_resume_with_gradient_accumulation(workspace, tmp_path):
    # 6 batches per epoch, 2 per step: 3 steps per epoch; 5 steps cross the epoch boundary.
    train(
        *_arguments(
            workspace, tmp_path / "a", gradient_accumulation_steps=2, max_train_steps=5, checkpointing_steps=0
        )
    )
    train(
        *_arguments(
            workspace, tmp_path / "b", gradient_accumulation_steps=2, max_train_steps=2, checkpointing_steps=2
        )
    )
    metrics = train(*_arguments(workspace, tmp_path / "b", gradient_accumulation_steps=2, max_train_steps=5,
                                checkpointing_steps=2, resume_from_checkpoint="latest"))  # fmt: skip
    assert metrics["steps"] == 5
    _assert_same_weights(_weights(tmp_path / "b"), _weights(tmp_path / "a"))
    # and the accumulation is real: one batch per step gives other weights
    train(*_arguments(workspace, tmp_path / "c", max_train_steps=5, checkpointing_steps=0))
    assert not torch.equal(_weights(tmp_path / "c")["embeddings.patch_embeddings.projection.weight"],
                           _weights(tmp_path / "a")["embeddings.patch_embeddings.projection.weight"])  # fmt: skip


def test_a_missing_resume_checkpoint_is_an_error(workspace, tmp_path):
    with pytest.raises(
        MissingInputError, match=r"--resume_from_checkpoint .*checkpoint-7: no such checkpoint folder"
    ):
        train(*_arguments(workspace, tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-7")))
    assert not (tmp_path / "finetuned").exists()
    # "latest" in an empty folder is a new run, as in the diffusers scripts
    metrics = train(
        *_arguments(
            workspace,
            tmp_path / "new",
            max_train_steps=1,
            checkpointing_steps=0,
            resume_from_checkpoint="latest",
        )
    )
    assert metrics["steps"] == 1


# --------------------------------------------------------------------------------------------------------
# Stage II from Parquet frames, Stage I over several scenes with resume


def test_stage2_reads_parquet_frames_like_the_scene_folders(workspace, tmp_path):
    """`fit3d export-dataset` output trains exactly as the ScanNet++-layout folders it came from."""
    from fit3d_hf.cli import main as fit3d_main

    parquet = tmp_path / "parquet"
    assert (
        fit3d_main(["export-dataset", "--data_dir", str(workspace["data"]), "--output_dir", str(parquet)])
        == 0
    )
    assert "train-00000-of-00001.parquet" in [p.name for p in (parquet / "data").glob("*.parquet")]
    model, data, training = _arguments(
        workspace, tmp_path / "folders", max_train_steps=3, checkpointing_steps=0
    )
    from_folders = train(model, data, training)
    from_parquet = train(
        model, replace(data, frames=str(parquet)), replace(training, output_dir=str(tmp_path / "parquet_run"))
    )
    assert from_parquet["train_loss_first"] == from_folders["train_loss_first"]
    _assert_same_weights(_weights(tmp_path / "parquet_run"), _weights(tmp_path / "folders"))


def test_lift_many_over_several_scenes_resumes(tmp_path):
    """Three scenes, the run stopped in the middle of the second: the rerun skips the first (its metrics as
    saved), resumes the second from its checkpoint, lifts the third, and ends with the uninterrupted bundles."""
    from fit3d_hf.lifting import lift_many

    root = tmp_path
    generate_dataset(
        root / "data",
        num_scenes=3,
        num_val_scenes=0,
        config=SyntheticSceneConfig(seed=9, num_views=6, width=32, height=24, num_points=300),
    )
    save_tiny_dinov2(root / "backbone")
    scenes = resolve_scene_list(str(root / "data"))
    options = {
        **_lift_options(root, root / "a"),
        "iterations": 20,
        "checkpoint_interval": 10,
        "densify_until": 15,
    }
    lift_many(scenes, LiftingArguments(**options), progress=False)

    interrupted = LiftingArguments(**{**options, "out": str(root / "b")})
    first = lift_scene(scenes[0], interrupted, progress=False)
    assert (
        lift_scene(scenes[1], interrupted, max_iterations_this_run=10, progress=False) is None
    )  # "killed" at 10
    assert load_torch_checkpoint(root / "b" / scenes[1].name / "checkpoint.pt")["iteration"] == 10
    results = lift_many(scenes, interrupted, progress=False)
    assert [r["scene_id"] for r in results] == [s.name for s in scenes]
    assert results[0]["seconds_training"] == first["seconds_training"]  # skipped: the saved metrics
    for scene in scenes:
        name = scene.name
        assert (root / "b" / name / "gaussians.safetensors").read_bytes() == (
            root / "a" / name / "gaussians.safetensors"
        ).read_bytes()
        assert not (root / "b" / name / "checkpoint.pt").exists()


def test_stage2_verifies_each_bundle_once_and_refuses_a_damaged_one(workspace, reference_run, tmp_path):
    import shutil

    from fit3d_hf.errors import CorruptFileError

    metrics = json.loads((reference_run / "metrics.json").read_text())
    scene = workspace["scene"].name
    assert list(metrics["bundle_verify_seconds_per_scene"]) == [scene]  # one scene, verified once
    gaussians = tmp_path / "gaussians"
    shutil.copytree(workspace["gaussians"], gaussians)
    bundle = gaussians / scene / "gaussians.safetensors"
    data = bytearray(bundle.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + header_length])["features"]["data_offsets"]
    data[8 + header_length + (begin + end) // 2] ^= (
        0x08  # inside the features: safetensors alone would not notice
    )
    bundle.write_bytes(bytes(data))
    model, data_args, training = _arguments(
        workspace, tmp_path / "run", max_train_steps=1, checkpointing_steps=0
    )
    with pytest.raises(
        CorruptFileError, match=rf"{scene}/gaussians.safetensors: tensor 'features' fails its checksum"
    ):
        train(model, replace(data_args, gaussians=str(gaussians)), training)
    assert not (tmp_path / "run" / "finetuned").exists()
