"""Benchmark: the compiled CPU rasterizer against the PyTorch reference, side by side in the same run.

Targets of issue 17, each printed as one JSON line (with the CPU's name, the thread count and the load
average, since the 2-core machine is shared):
  * fwdbwd: forward + backward of render() at 100k Gaussians of the anchors' synthetic room, 256x192, 1 camera,
    RGB + depth + 64 feature channels (loss = weighted sum of the three images); CPU backend vs reference,
    alternating, median of --repeats;
  * lift: one Stage I iteration (render, SSIM + L1, the 3x3 decoder conv 64 -> D, the feature loss, backward,
    Adam) at 270x480 (portrait, as the issue's phone capture at scale 0.25) with 100k Gaussians and 64-d
    features, for D = 64 and D = 384 (DINOv2-small), with two kinds of Gaussians (see make_lifter); median
    over --lift_steps, reference over fewer. A profile of the CPU backend's iteration says where the time goes
    (`lift_profile` lines: self CPU ms per op and iteration).

    python benchmarks/cpu_backend.py [--targets fwdbwd lift] [--repeats 5]
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scene generators of the other benchmarks
from profile_lift import random_scene  # noqa: E402
from rasterizer import cameras, make_scene  # noqa: E402

from fit3d_hf.lifting import LiftingArguments  # noqa: E402
from fit3d_hf.lifting.lifter import Lifter  # noqa: E402
from fit3d_hf.render import _backend, render  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def header(**fields) -> dict:
    return dict(
        device=cpu_name(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        loadavg_1min=round(os.getloadavg()[0], 2),
        **fields,
    )


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)  # noqa: T201 (benchmark output)


def bench_fwdbwd(repeats: int, reference_repeats: int) -> None:
    n, width, height, channels = 100_000, 256, 192, 64
    means, quats, scales, opac = make_scene(n, "cpu")
    viewmats, ks = cameras(1, width, height, "cpu")
    g = torch.Generator().manual_seed(1)
    colors = torch.rand(n, 3, generator=g)
    feats = torch.randn(n, channels, generator=g) * 0.5
    params = [p.clone().requires_grad_(True) for p in (means, quats, scales, opac, colors, feats)]
    w = [torch.randn(1, c, height, width, generator=g) for c in (3, 1, channels)]

    def step(backend):
        for p in params:
            p.grad = None
        start = time.perf_counter()
        out = render(*params, ks, viewmats, width, height, backend=backend)
        forward = time.perf_counter() - start
        ((out.rgb * w[0]).sum() + (out.depth * w[1]).sum() + (out.features * w[2]).sum()).backward()
        return forward, time.perf_counter() - start, int((out.radii > 0).sum())

    step("cpu"), step("reference")  # warm-up (and the extension's first load)
    times = {"cpu": [], "reference": []}
    for r in range(repeats):
        times["cpu"].append(step("cpu"))
        if r < reference_repeats:
            times["reference"].append(step("reference"))
    medians = {
        k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()
    }
    emit(
        header(
            target="fwdbwd",
            n=n,
            visible=times["cpu"][0][2],
            cams=1,
            ch=channels,
            w=width,
            h=height,
            cpu_fwd_s=round(medians["cpu"][0], 4),
            cpu_fwdbwd_s=round(medians["cpu"][1], 4),
            cpu_fwdbwd_best_s=round(min(t[1] for t in times["cpu"]), 4),
            reference_fwd_s=round(medians["reference"][0], 3),
            reference_fwdbwd_s=round(medians["reference"][1], 3),
            reference_fwdbwd_best_s=round(min(t[1] for t in times["reference"]), 3),
            speedup=round(medians["reference"][1] / medians["cpu"][1], 1),
            speedup_best=round(min(t[1] for t in times["reference"]) / min(t[1] for t in times["cpu"]), 1),
            repeats=repeats,
            reference_repeats=len(times["reference"]),
        )
    )


def make_lifter(decoder_dim: int, n: int, width: int, height: int, scene: str, views: int = 8) -> Lifter:
    """A Stage I lifter on random views of the 6 x 4 x 6 m room. scene "init": the Gaussians as Stage I
    initialises them from 100k points (3DGS: isotropic, scale = distance to the nearest points, opacity 0.1;
    large and translucent, so each pixel blends hundreds); "room": the same means with the rasterizer
    benchmark's sizes and opacities (log-uniform 5 mm .. 8 cm, anisotropic; sigmoid(2 N(0, 1)))."""
    data = random_scene(n, views, width, height, decoder_dim, torch.device("cpu"))
    args = LiftingArguments(
        backbone="random", out="/tmp/unused", iterations=30_000, densify_until=0, checkpoint_interval=0,
        device="cpu",
    )  # fmt: skip
    lifter = Lifter(args, data, list(range(views)), torch.device("cpu"))
    lifter.gaussians.active_sh_degree = lifter.gaussians.max_sh_degree  # the full cost, as late in training
    if scene == "room":
        _, _, scales, opacities = make_scene(n, "cpu")
        with torch.no_grad():
            lifter.gaussians.log_scales.copy_(scales.log())
            lifter.gaussians.opacity_logits.copy_(torch.logit(opacities.clamp(1e-6, 1 - 1e-6)))
    return lifter


@contextlib.contextmanager
def without_cpu_extension():
    """What a machine without the CPU extension runs: the reference renderer and the composed feature loss."""
    saved = _backend._load_cpu
    _backend._load_cpu = lambda: (None, "disabled by benchmarks/cpu_backend.py")
    try:
        yield
    finally:
        _backend._load_cpu = saved


def time_steps(lifter: Lifter, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        lifter.step()
        times.append(time.perf_counter() - start)
    return times


def bench_lift(steps: int, reference_steps: int, decoder_dims: list[int], scene: str) -> None:
    n, width, height = 100_000, 270, 480
    for dim in decoder_dims:
        results = {}
        lifter = make_lifter(dim, n, width, height, scene)
        time_steps(lifter, 1)  # warm-up
        results["cpu"] = time_steps(lifter, steps)
        profile_steps(lifter, dim, scene)
        if reference_steps > 0:
            with without_cpu_extension():
                lifter = make_lifter(dim, n, width, height, scene)
                time_steps(lifter, 1)
                results["reference"] = time_steps(lifter, reference_steps)
        cpu_s = statistics.median(results["cpu"])
        record = header(
            target="lift_iteration", scene=scene, n=n, w=width, h=height, feature_dim=64, decoder_dim=dim,
            cpu_s=round(cpu_s, 3), cpu_best_s=round(min(results["cpu"]), 3), steps=steps,
        )  # fmt: skip
        if "reference" in results:
            ref_s = statistics.median(results["reference"])
            record.update(
                reference_s=round(ref_s, 2),
                reference_steps=len(results["reference"]),
                speedup=round(ref_s / cpu_s, 1),
            )
        emit(record)


def profile_steps(lifter: Lifter, dim: int, scene: str, steps: int = 3) -> None:
    """Self CPU time per op of the CPU backend's iterations (ms per iteration), the largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_steps(lifter, steps)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1000 / steps
    top = {e.key: round(e.self_cpu_time_total / 1000 / steps, 1) for e in events[:12]}
    emit(
        header(target="lift_profile", scene=scene, decoder_dim=dim, total_ms=round(total, 1), self_cpu_ms=top)
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", choices=("fwdbwd", "lift"), default=["fwdbwd", "lift"])
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed forward+backward calls of the CPU backend"
    )
    parser.add_argument(
        "--reference_repeats", type=int, default=3, help="... of the reference (about 20 s each)"
    )
    parser.add_argument("--lift_steps", type=int, default=5, help="timed Stage I iterations, CPU backend")
    parser.add_argument(
        "--reference_lift_steps", type=int, default=1, help="... with the reference (0: skip)"
    )
    parser.add_argument("--decoder_dims", type=int, nargs="+", default=[64, 384])
    parser.add_argument("--lift_scenes", nargs="+", choices=("room", "init"), default=["room", "init"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if "fwdbwd" in args.targets:
        bench_fwdbwd(args.repeats, args.reference_repeats)
    if "lift" in args.targets:
        for scene in args.lift_scenes:
            bench_lift(args.lift_steps, args.reference_lift_steps, args.decoder_dims, scene)


if __name__ == "__main__":
    main()
