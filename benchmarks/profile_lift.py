"""Where the time of one Stage I iteration goes on the GPU (torch.profiler), without generating a scene:
random views, random target features and ~230k random Gaussians in a 6x4x6 m room (the size the Stage I
benchmark ends with), densification off so every step costs the same.

python benchmarks/profile_lift.py [--gaussians 230000] [--steps 50] [--mixed_precision bf16] [--densification]

Prints the wall time per iteration, the GPU time per kernel, and the GPU's idle time between kernels with the host
operators that kept it waiting (benchmarks/gpu_gaps.py). With --densification, the iterations gather
densification's statistics as in the first half of a run (no Gaussians added or removed, so every step still costs
the same), and the time of one densification event (clone, split, prune) is printed after them. Also timed: a
checkpoint written in the background while the steps go on (and, to see where its cost comes from, its host
copy alone and with the checksums), the evaluation of views, and the colours' compression and refinement. The
last line is the run's JSON line (for results/lift.jsonl).
"""

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from fit3d_hf import checkpoints
from fit3d_hf.lifting import LiftingArguments, SceneData, checkpoint_writer
from fit3d_hf.lifting.checkpoint_writer import CheckpointWriter
from fit3d_hf.lifting.lifter import Lifter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_gaps import gpu_idle_gaps_of_file  # noqa: E402
from timing import device_kernels, synchronize, top_kernels_ms  # noqa: E402


def random_scene(n_points: int, views: int, width: int, height: int, dim: int, device) -> SceneData:
    g = torch.Generator().manual_seed(0)
    points = (
        torch.rand(n_points, 3, generator=g) * torch.tensor([6.0, 4.0, 6.0]) - torch.tensor([3.0, 2.0, -0.5])
    ).numpy()
    Ks, poses, centers = [], [], []
    for i in range(views):
        a = 0.05 * i
        pose = torch.eye(4)
        pose[:3, :3] = torch.tensor(
            [[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]]
        )
        poses.append(pose)
        centers.append(np.array([0.3 * i, 0.0, 0.0]))  # for the scene's extent only (2.5 m, a room's)
        f = 0.9 * width
        Ks.append(torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]]))
    h, w = height // 14, width // 14
    return SceneData(
        scene_id="profile", image_ids=[str(i) for i in range(views)],
        images=torch.randint(0, 256, (views, 3, height, width), generator=g, dtype=torch.uint8).to(device),
        masks=torch.ones(views, 1, height, width, dtype=torch.bool, device=device),
        K=torch.stack(Ks).to(device), world_to_camera=torch.stack(poses).to(device),
        targets=torch.randn(views, dim, h, w, generator=g).half().to(device),
        points=points, point_colors=np.random.default_rng(0).random((n_points, 3)), camera_centers=np.stack(centers),
    )  # fmt: skip


def warm_lifter(gaussians: int, width: int, height: int, device: torch.device, **lift_overrides) -> Lifter:
    """A Lifter on `random_scene` (16 views) with every SH degree active, after 10 warm-up steps: the iterations
    this script and gpu_sharing.py time. `lift_overrides` go to LiftingArguments."""
    data = random_scene(gaussians, 16, width, height, 384, device)
    lift_args = LiftingArguments(
        backbone="random", out="/tmp/unused", iterations=30_000, checkpoint_interval=0, device=str(device),
        **lift_overrides,
    )  # fmt: skip
    lifter = Lifter(lift_args, data, list(range(16)), device)
    lifter.gaussians.active_sh_degree = lifter.gaussians.max_sh_degree
    for _ in range(10):
        lifter.step()
    return lifter


def time_steps(lifter: Lifter, steps: int, windows: int) -> list[float]:
    """Wall milliseconds per iteration over `steps` iterations, in `windows` equal consecutive windows, the
    device synchronised at each window's ends: a spread between windows shows a one-off stall (a recompile,
    a slow allocation) that the mean alone would spread over every iteration."""
    device = lifter.device
    per_window = max(1, steps // windows)
    times = []
    for _ in range(windows):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(per_window):
            lifter.step()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - start) / per_window)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaussians", type=int, default=230_000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--width", type=int, default=876)
    parser.add_argument("--height", type=int, default=584)
    parser.add_argument("--mixed_precision", default="bf16")
    parser.add_argument(
        "--densification",
        action="store_true",
        help="gather densification statistics; time densification events",
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    # with --densification: statistics at every step, events only where this script calls them (densify_from)
    # (and a cap 2% above the start, so that the timed events cannot grow the scene far from --gaussians)
    lifter = warm_lifter(
        args.gaussians, args.width, args.height, device,
        densify_until=30_000 if args.densification else 0, densify_from=10**9,
        max_gaussians=int(1.02 * args.gaussians), mixed_precision=args.mixed_precision,
    )  # fmt: skip
    windows = time_steps(lifter, args.steps, windows=5)
    ms = sum(windows) / len(windows)
    peak = torch.cuda.max_memory_allocated() / 2**20
    record = {
        "benchmark": "lift_iteration_profile", "device": torch.cuda.get_device_name(), "gaussians": len(lifter.gaussians),
        "image_size": [args.width, args.height], "feature_dim": lifter.args.feature_dim, "mixed_precision": args.mixed_precision,
        "command": "python benchmarks/profile_lift.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "ms_per_iteration": round(ms, 2), "window_ms_per_iteration": [round(w, 2) for w in windows],
        "minutes_per_30k_iterations": round(30 * ms / 60, 2), "peak_mib": round(peak),
    }  # fmt: skip
    print(  # noqa: T201
        f"{len(lifter.gaussians)} Gaussians, {args.width}x{args.height}: {ms:.2f} ms / iteration, "
        f"30k iterations: {30 * ms / 60:.2f} min, peak {peak:.0f} MiB ({torch.cuda.get_device_name()})"
    )
    steps = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            lifter.step()
        torch.cuda.synchronize()
        profiled_wall = 1000 * (time.perf_counter() - start) / steps
    kernels, total = kernel_times(prof, steps, "iteration", rows=60)
    record["gpu_ms_per_iteration"] = round(total, 3)
    # the wall time of these same steps: set against ms_per_iteration, whether the profiled steps are typical
    record["profiled_wall_ms_per_iteration"] = round(profiled_wall, 2)
    record["top_kernels_ms"] = top_kernels_ms(kernels, steps, 8)

    # where the GPU waits between kernels, and on which host operator (a second pass: recording the host's
    # operators slows the host, so this overstates host-bound time somewhat)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            lifter.step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        gaps = gpu_idle_gaps_of_file(f"{tmp}/trace.json")
    print(  # noqa: T201
        f"GPU idle per iteration (host operators recorded): {gaps['idle_us'] / steps / 1000:.3f} ms, of which "
        f"host-bound {gaps['host_bound_us'] / steps / 1000:.3f} ms; host-bound idle by operator (ms per iteration):"
    )
    for name, us in gaps["by_operator"]:
        print(f"  {us / steps / 1000:7.3f}  {name[:110]}")  # noqa: T201
    record["gpu_idle_ms"] = round(gaps["idle_us"] / steps / 1000, 3)
    record["host_bound_idle_ms"] = round(gaps["host_bound_us"] / steps / 1000, 3)
    record.update(time_checkpoint_write(lifter, ms))
    record["checkpoint_part_cost_s"] = {
        name: time_checkpoint_write(lifter, ms, f"checkpoint part {name}", save)["checkpoint_cost_s"]
        for name, save in CHECKPOINT_PARTS.items()
    }
    if args.densification:
        record.update(time_densification_events(lifter))
    record.update(time_evaluation(lifter))
    record.update(time_colour_refinement(lifter))
    print(json.dumps(record))  # noqa: T201


def kernel_times(prof, steps: int, unit: str, rows: int) -> tuple[list, float]:
    """The profiled GPU kernels and copies (no CPU-side operator rows, which double-count them), slowest first,
    and their total in ms per `unit`; the first `rows` printed per `unit`."""
    kernels, total = device_kernels(prof, steps)
    print(f"GPU time per {unit}: {total:.3f} ms; per kernel (ms per {unit}, launches per {unit}):")  # noqa: T201
    for e in kernels[:rows]:
        print(f"  {e.self_device_time_total / steps / 1000:7.3f}  {e.count / steps:5.1f}  {e.key[:110]}")  # noqa: T201
    return kernels, total


def time_densification_events(lifter: Lifter, events: int = 5, steps_between: int = 20) -> dict:
    """Wall time of a densification event (3DGS's every 100 steps until 15k), each after `steps_between` steps
    of statistics, with what it changed: printed, and returned for the JSON line."""
    seconds, changes = [], []
    for _ in range(events):
        for _ in range(steps_between):
            lifter.step()
        synchronize(lifter.device)
        start = time.perf_counter()
        # transparent ones pruned only: random Gaussians this sparse would all be too large
        with torch.no_grad():
            changes.append(
                lifter.densifier.densify_and_prune(lifter.gaussians, lifter.optimizer, prune_large=False)
            )
        synchronize(lifter.device)
        seconds.append(time.perf_counter() - start)
    print(  # noqa: T201
        f"densification event: {1000 * np.mean(seconds):.1f} ms (min {1000 * min(seconds):.1f}); "
        f"changes: {changes}"
    )
    return {
        "densification_event_ms": round(1000 * float(np.mean(seconds)), 1),
        "densification_event_min_ms": round(1000 * min(seconds), 1),
        "densification_changes": changes,
    }


# Parts of a background checkpoint's work, timed alone against the steps they overlap: the writer thread runs
# with `save_torch_checkpoint` replaced, so that it copies the snapshot to the host and then does only this.
CHECKPOINT_PARTS = {
    "host_copy": lambda state, path: None,
    "host_copy_and_checksums": lambda state, path: checkpoints._checksums(state),
}


def time_checkpoint_write(
    lifter: Lifter, ms_per_iteration: float, label: str = "checkpoint", save=None
) -> dict:
    """What a background checkpoint (`CheckpointWriter`, as Stage I writes them on a GPU) costs the training:
    the time `submit` holds the loop, the write's duration, and the steps taken meanwhile against
    `ms_per_iteration` without one (`checkpoint_cost_s`: the extra wall time of those steps). With `save`, the
    writer thread calls it instead of `save_torch_checkpoint` (see CHECKPOINT_PARTS)."""
    writer = CheckpointWriter(background=True)
    replaced = mock.patch.object(checkpoint_writer, "save_torch_checkpoint", save) if save else nullcontext()
    with tempfile.TemporaryDirectory() as folder, replaced:
        synchronize(lifter.device)
        start = time.perf_counter()
        writer.submit(lifter.state_dict(), Path(folder) / "checkpoint.pt")
        submit_ms = 1000 * (time.perf_counter() - start)
        steps = 0
        while writer.writing or steps == 0:
            lifter.step()
            steps += 1
        writer.wait()
        synchronize(lifter.device)
        seconds = time.perf_counter() - start
    during = 1000 * seconds / steps
    print(  # noqa: T201
        f"{label} in the background: loop held {submit_ms:.1f} ms, written in {seconds:.2f} s over {steps} "
        f"steps at {during:.2f} ms each (without one: {ms_per_iteration:.2f})"
    )
    return {
        "checkpoint_submit_ms": round(submit_ms, 2),
        "checkpoint_write_s": round(seconds, 3),
        "ms_per_iteration_during_checkpoint": round(during, 2),
        "checkpoint_cost_s": round(steps * (during - ms_per_iteration) / 1000, 3),
    }


def time_evaluation(lifter: Lifter, rounds: int = 3) -> dict:
    """Wall time per view of `Lifter.evaluate` (render, decode, PSNR and feature L1; a whole run evaluates its
    training views before training and every view after it: about 560 views, 2.5 s in session 16): printed, and
    returned for the JSON line."""
    views = list(lifter.train_views) * rounds
    lifter.evaluate(lifter.train_views[:2])  # warm-up
    synchronize(lifter.device)
    start = time.perf_counter()
    lifter.evaluate(views)
    per_view = (time.perf_counter() - start) / len(views)
    print(f"evaluation: {1000 * per_view:.2f} ms / view")  # noqa: T201
    return {"evaluation_ms_per_view": round(1000 * per_view, 2)}


def time_colour_refinement(lifter: Lifter, steps: int = 50) -> dict:
    """Wall time of the k-means colour compression and of one step of the compressed colours' refinement
    (1000 steps at the end of a 30k run; 4.8 ms per step at 1M Gaussians on an H100 in session 13, against a
    Stage I iteration's 7.9 with about 2.5 times the GPU work): printed, and returned for the JSON line."""
    # higher orders as a trained scene has them (a fresh one's are zero: k-means would have nothing to fit)
    with torch.no_grad():
        lifter.gaussians.sh_rest.normal_(0.0, 0.1)
    synchronize(lifter.device)
    start = time.perf_counter()
    compressed = lifter.compress_colours()
    synchronize(lifter.device)
    kmeans = time.perf_counter() - start
    lifter.refine_compressed_colours(compressed, steps=3)  # warm-up
    synchronize(lifter.device)
    start = time.perf_counter()
    lifter.refine_compressed_colours(compressed, steps=steps)
    synchronize(lifter.device)
    per_step = (time.perf_counter() - start) / steps
    print(f"colour compression: k-means {kmeans:.2f} s, refinement {1000 * per_step:.2f} ms / step")  # noqa: T201
    timed = {"colour_kmeans_s": round(kmeans, 2), "colour_refinement_ms_per_step": round(1000 * per_step, 2)}
    if lifter.device.type == "cuda":  # where a refinement step's GPU time goes, against its wall time
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            lifter.refine_compressed_colours(compressed, steps=10)
            synchronize(lifter.device)
        _, total = kernel_times(prof, 10, "refinement step", rows=25)
        timed["colour_refinement_gpu_ms_per_step"] = round(total, 3)
    return timed


if __name__ == "__main__":
    main(sys.argv[1:])
