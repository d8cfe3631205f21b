"""The headline's Stage I measurement: copies of the Stage I benchmark scene (benchmarks/lift.py's) lifted by
`training/lift_features.py` on every GPU of one machine at once (one process per GPU, `accelerate launch`, scenes
claimed one at a time), timed as a whole. One GPU alone does not say it: the processes share the host's cores and
memory bandwidth (scene data, checkpoints, evaluations). With `--launches 2`, two such launches run at once over
the same scenes (the claims give each scene to one process), two scenes per GPU: under CUDA MPS (start it first,
`nvidia-cuda-mps-control -d`) their kernels run side by side; without it the processes take turns on the GPU.

Prints one JSON line: the wall time, scenes per hour, each scene's minutes (its own metrics.json) and the
projection of FiT3D's 280 scenes onto one 8-GPU node at the measured rate per GPU.

    python benchmarks/lift_node.py --processes 8 --scenes 8 --views 300 --points_per_sample 5 --workers 16 \\
        --work_dir /tmp/fit3d-liftbench --base_scene .liftscene/bench00000

The scene is prepared as lift.py prepares it (the same options, the same --work_dir reuse), then each copy is a
folder of links to its files (named bench00000, bench00001, ...: the scene id is the folder's name).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lift import add_scene_arguments, prepare_scene, save_random_backbone  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIT3D_SCENES = 280  # ScanNet++ scenes through FiT3D's Stage I
NODE_GPUS = 8


def link_copies(scene_dir: Path, folder: Path, count: int) -> list[Path]:
    """`count` scene folders under `folder` whose entries link to `scene_dir`'s (a folder linked whole would be
    one scene: scene lists drop paths that resolve alike)."""
    shutil.rmtree(folder, ignore_errors=True)
    copies = []
    for index in range(count):
        copy = folder / f"bench{index:05d}"
        copy.mkdir(parents=True)
        for entry in scene_dir.iterdir():
            (copy / entry.name).symlink_to(entry.resolve())
        copies.append(copy)
    return copies


def launch_command(args: argparse.Namespace, scenes: Path, backbone: Path, out: Path) -> list[str]:
    """`accelerate launch` of training/lift_features.py over `args.processes` processes with the Stage I
    benchmark's settings."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.processes)]
    if args.processes > 1:
        launch.append("--multi_gpu")  # torchrun's processes: NCCL on GPUs, gloo on the CPU
    elif args.device == "cpu":
        launch.append("--cpu")
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(args.port)]
    return [
        *launch, str(REPO / "training" / "lift_features.py"),
        "--scenes", str(scenes), "--backbone", str(backbone), "--out", str(out),
        "--feature_dim", str(args.feature_dim), "--iterations", str(args.iterations), "--holdout_every", "8",
        "--mixed_precision", args.mixed_precision, "--previews", "False",
    ]  # fmt: skip


def summarise(out: Path, copies: list[Path], processes: int, wall_s: float, launches: int = 1) -> dict:
    """The JSON record of a finished run: wall time, rate, each scene's own minutes, the 8-GPU projection. Each of
    the `launches` ran `processes` processes, one per GPU."""
    minutes = []
    for copy in copies:
        metrics_file = out / copy.name / "metrics.json"
        if not metrics_file.is_file():
            raise RuntimeError(f"{metrics_file} is missing: scene {copy.name} did not finish")
        minutes.append(round(json.loads(metrics_file.read_text())["seconds_total"] / 60, 2))
    scenes_per_hour = len(copies) / (wall_s / 3600)
    per_gpu = scenes_per_hour / processes
    return {
        "processes": processes,
        "launches": launches,
        "scenes": len(copies),
        "wall_minutes": round(wall_s / 60, 2),
        "scenes_per_hour": round(scenes_per_hour, 2),
        "scenes_per_hour_per_process": round(per_gpu / launches, 2),
        "scenes_per_hour_per_gpu": round(per_gpu, 2),
        "minutes_per_scene": minutes,
        # FiT3D's 280 scenes on one 8-GPU node at this rate per GPU (35 whole rounds of 8 scenes)
        "projected_node_hours": round(FIT3D_SCENES / (per_gpu * NODE_GPUS), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_scene_arguments(parser)
    gpus = torch.cuda.device_count()
    parser.add_argument(
        "--processes", type=int, default=max(gpus, 1), help="processes, one per GPU (default: every GPU)"
    )
    parser.add_argument(
        "--launches",
        type=int,
        default=1,
        help="accelerate launches at once over the same scenes, so this many scenes per GPU (more than 1: start "
        "CUDA MPS first; without it the processes take turns on the GPU)",
    )
    parser.add_argument(
        "--scenes",
        type=int,
        default=None,
        help="copies of the scene (default: one per process of every launch)",
    )
    parser.add_argument("--iterations", type=int, default=30_000)
    parser.add_argument("--feature_dim", type=int, default=64)
    parser.add_argument("--mixed_precision", default="bf16", choices=("no", "bf16"))
    parser.add_argument("--device", default="cuda" if gpus else "cpu", choices=("cuda", "cpu"))
    parser.add_argument(
        "--backbone", default=None, help="a saved backbone (default: a random DINOv2-S-sized one)"
    )
    parser.add_argument("--port", type=int, default=29541, help="accelerate's main process port")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.launches < 1 or (args.scenes is not None and args.scenes < 1):
        parser.error("--processes, --launches and --scenes must be at least 1")
    if args.device == "cuda" and args.processes > gpus:
        parser.error(f"--processes {args.processes}: this machine has {gpus} GPUs")
    work, scene_dir, generation_s = prepare_scene(parser, args)
    copies = link_copies(scene_dir, work / "node_scenes", args.scenes or args.processes * args.launches)
    backbone = Path(args.backbone) if args.backbone else save_random_backbone(work / "backbone")
    out = work / "node_lifted"
    shutil.rmtree(out, ignore_errors=True)  # a timing of finished scenes would be of nothing
    commands = [
        launch_command(
            argparse.Namespace(**{**vars(args), "port": args.port + i}), work / "node_scenes", backbone, out
        )
        for i in range(args.launches)
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    # their output to stderr: stdout is the JSON line
    launched = [subprocess.Popen(command, env=env, stdout=2) for command in commands]
    for launch, code in zip(launched, [p.wait() for p in launched], strict=True):
        if code != 0:
            raise subprocess.CalledProcessError(code, launch.args)
    record = {
        "benchmark": "lift_node",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "views": args.views,
        "points_per_sample": args.points_per_sample,
        "iterations": args.iterations,
        "mixed_precision": args.mixed_precision,
        "scene_generation_s": round(generation_s, 1),
        **summarise(out, copies, args.processes, time.perf_counter() - start, args.launches),
    }
    print(json.dumps(record), flush=True)  # noqa: T201
    return record


if __name__ == "__main__":
    main()
