"""Real multi-process runs on the CPU (gloo): Stage II on two processes (exact validation, frames split) and
both stages on two "machines" on localhost (`accelerate launch --num_machines 2 --machine_rank 0/1`).

Every launch has a hard timeout; a hang at teardown fails with a message naming torch 2.13's gloo deadlock
(see `distributed_helpers`).
"""

import json
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from backbone_helpers import save_tiny_dinov2
from distributed_helpers import REPO, accelerate_launch, free_port, run_processes
from safetensors.torch import load_file

from fit3d_hf.finetuning import BackboneArguments, DataArguments, FinetuningArguments, train
from fit3d_hf.lifting import LiftingArguments, lift_scene, resolve_scene_list
from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset

HOOK = str(REPO / "tests" / "crash_hook.py")
TIMEOUT = 420
TRAIN_FRAMES = 12


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two train scenes of 6 views and one validation scene, lifted (one thread, as the launched processes
    run: the same kernels, the same bits); a tiny backbone."""
    root = tmp_path_factory.mktemp("distributed")
    data = root / "data"
    generate_dataset(
        data,
        num_scenes=2,
        num_val_scenes=1,
        config=SyntheticSceneConfig(seed=21, num_views=6, width=32, height=24, num_points=400),
    )
    save_tiny_dinov2(root / "backbone")
    lift = LiftingArguments(**_lift_options(root, root / "gaussians"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for scene in resolve_scene_list(str(data)):
            lift_scene(scene, lift, progress=False)
    finally:
        torch.set_num_threads(threads)
    return root


def _lift_options(root: Path, out: Path) -> dict:
    return dict(
        backbone=str(root / "backbone"), out=str(out), feature_dim=8, iterations=30, checkpoint_interval=0, device="cpu",
        previews=False, holdout_every=0, densify_from=10, densify_interval=10, densify_until=25, max_gaussians=1000,
        bundle_sh_refine_steps=3,
    )  # fmt: skip


def _finetune_args(root: Path, output_dir: Path) -> list[str]:
    options = {
        "backbone": root / "backbone", "frames": root / "data", "gaussians": root / "gaussians", "output_dir": output_dir,
        "max_train_steps": 3, "train_batch_size": 2, "checkpointing_steps": 3, "learning_rate": 1e-3, "seed": 5,
        "max_validation_samples": 5, "consistency_pairs": 1, "report_to": "none",
    }  # fmt: skip
    argv = [str(REPO / "training" / "finetune.py")]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return argv


def _traced(trace_prefix: Path) -> dict[int, list[int]]:
    """Training frame indices served to each process (traced calls of FrameDataset.__getitem__)."""
    served = defaultdict(list)
    for path in sorted(trace_prefix.parent.glob(trace_prefix.name + ".*")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["len"] == TRAIN_FRAMES:  # the training split (the validation one holds 5 frames)
                served[int(path.suffix[1:])].append(record["args"][0])
    return dict(served)


def _stage2_outputs(output_dir: Path):
    metrics = output_dir / "metrics.json"
    return f"{metrics} written" if metrics.is_file() else None


def _assert_frames_split(served: dict[int, list[int]]) -> None:
    assert len(served) == 2, f"frames were served to {len(served)} processes: {served}"
    first, second = (set(v) for v in served.values())
    assert first and second and not first & second  # each process its own frames ...
    assert len(first | second) == 3 * 2 * 2  # ... 3 steps x batch 2 x 2 processes, none twice


@pytest.fixture(scope="module")
def one_machine_two_processes(workspace):
    output_dir = workspace / "one_machine"
    trace = workspace / "one_machine_trace"
    command = accelerate_launch(
        "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port())
    )
    command += [
        HOOK,
        str(trace),
        "trace:fit3d_hf.finetuning.frames:FrameDataset.__getitem__",
        "0",
        "--",
        *_finetune_args(workspace, output_dir),
    ]
    run_processes([command], [workspace / "one_machine.log"], timeout=TIMEOUT, finished=lambda: _stage2_outputs(output_dir),
                  what="Stage II on 2 gloo processes")  # fmt: skip
    return output_dir, _traced(trace)


@pytest.mark.slow
def test_stage2_on_two_processes_validates_exactly_and_splits_the_frames(
    workspace, one_machine_two_processes, tmp_path
):
    output_dir, served = one_machine_two_processes
    _assert_frames_split(served)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    # The validation loss of the untrained backbone over the 5 validation frames, in one process: the two
    # processes pad their 3 batches of 2 to 4 with duplicates, which must not count.
    model = BackboneArguments(backbone=str(workspace / "backbone"))
    data = DataArguments(
        frames=str(workspace / "data"),
        gaussians=str(workspace / "gaussians"),
        max_validation_samples=5,
        consistency_pairs=1,
    )
    single = train(
        model,
        data,
        FinetuningArguments(
            output_dir=str(tmp_path), max_train_steps=1, checkpointing_steps=0, report_to="none", seed=5
        ),
    )
    assert metrics["validation_loss_before"] == pytest.approx(
        single["validation_loss_before"], rel=1e-5, abs=0
    )
    assert (output_dir / "checkpoint-3" / "random_states_1.pkl").is_file()  # both processes saved their state


@pytest.mark.slow
def test_two_machines_split_stage2_frames_and_match_one_machine(workspace, one_machine_two_processes):
    output_dir = workspace / "two_machines"
    trace = workspace / "two_machines_trace"
    port = str(free_port())
    commands = [
        accelerate_launch("--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip",
                          "127.0.0.1", "--main_process_port", port)
        + [HOOK, str(trace), "trace:fit3d_hf.finetuning.frames:FrameDataset.__getitem__", "0", "--", *_finetune_args(workspace, output_dir)]
        for rank in (0, 1)
    ]  # fmt: skip
    logs = [workspace / f"machine{rank}.log" for rank in (0, 1)]
    run_processes(
        commands,
        logs,
        timeout=TIMEOUT,
        finished=lambda: _stage2_outputs(output_dir),
        what="Stage II on 2 machines",
    )
    _assert_frames_split(_traced(trace))
    one_machine = load_file(one_machine_two_processes[0] / "finetuned" / "model.safetensors")
    two_machines = load_file(output_dir / "finetuned" / "model.safetensors")
    for key in one_machine:
        assert torch.equal(one_machine[key], two_machines[key]), key
    metrics = [
        json.loads((d / "metrics.json").read_text()) for d in (one_machine_two_processes[0], output_dir)
    ]
    assert metrics[0]["validation_loss"] == metrics[1]["validation_loss"]


@pytest.mark.slow
def test_two_machines_split_stage1_scenes_and_match_one_process(workspace):
    out = workspace / "lift_two_machines"
    options = _lift_options(workspace, out)
    argv = [str(REPO / "training" / "lift_features.py"), "--scenes", str(workspace / "data")]
    for key, value in options.items():
        if key != "device":  # each process takes its accelerator's device
            argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    port = str(free_port())
    commands = [
        accelerate_launch("--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip",
                          "127.0.0.1", "--main_process_port", port) + argv
        for rank in (0, 1)
    ]  # fmt: skip
    scenes = [p.name for p in resolve_scene_list(str(workspace / "data"))]

    def done():
        finished = [s for s in scenes if (out / s / "metrics.json").is_file()]
        return f"all {len(scenes)} scenes lifted" if len(finished) == len(scenes) else None

    logs = [workspace / f"lift_machine{rank}.log" for rank in (0, 1)]
    run_processes(commands, logs, timeout=TIMEOUT, finished=done, what="Stage I on 2 machines")
    owners = {s: json.loads((out / ".claims" / f"{s}.done").read_text())["owner"] for s in scenes}
    assert len(set(owners.values())) == 2, owners  # each machine lifted one of the two scenes
    for scene in scenes:  # the same bundles as the single-process lifting of the fixture
        assert (out / scene / "gaussians.safetensors").read_bytes() == (
            workspace / "gaussians" / scene / "gaussians.safetensors"
        ).read_bytes(), scene


def test_multi_node_config_and_slurm_example_are_valid():
    """The multi-node accelerate config loads as a 2-machine MULTI_GPU config, and every option the SLURM
    example passes to the two training scripts exists in their argument dataclasses."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "training" / "accelerate_configs" / "multi_node.yaml"))
    assert (config.distributed_type, config.num_machines, config.num_processes) == ("MULTI_GPU", 2, 16)
    script = REPO / "training" / "slurm" / "fit3d_multinode.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    sys_path = str(REPO / "training")
    sys.path.insert(0, sys_path)
    try:
        from lift_features import ScenesArguments
    finally:
        sys.path.remove(sys_path)
    known = {
        "lift_features.py": {f.name for cls in (ScenesArguments, LiftingArguments) for f in fields(cls)},
        "finetune.py": {
            f.name for cls in (BackboneArguments, DataArguments, FinetuningArguments) for f in fields(cls)
        },
    }
    for script_name, names in known.items():
        call = text[text.index(f"launch training/{script_name}") :].split("\n\n")[0]
        flags = re.findall(r"--(\w+)", call)
        assert flags and set(flags) <= names, (script_name, set(flags) - names)
