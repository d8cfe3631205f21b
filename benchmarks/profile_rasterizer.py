"""Per-kernel GPU times of fit3d's renderer on the benchmark workload (torch.profiler), plus binning stats and, per
forward and forward+backward call, its host latency, GPU busy time and idle gaps (gpu_gaps.gpu_time_per_call).

python benchmarks/profile_rasterizer.py [--n 1000000] [--ch 64] [--cams 1] [--host]
"""

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_gaps import gpu_time_per_call, trace_events  # noqa: E402
from rasterizer import cameras, make_scene, timeit  # noqa: E402
from timing import synchronize  # noqa: E402

from fit3d_hf.render import _wrapper, render  # noqa: E402
from fit3d_hf.render._backend import require_extension  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--ch", type=int, default=64)
    parser.add_argument("--cams", type=int, default=1)
    parser.add_argument(
        "--host", action="store_true", help="only the host time per call of each forward step"
    )
    parser.add_argument(
        "--plain", type=int, default=0, metavar="K", help="only run K forward+backward calls (for ncu / nsys)"
    )
    parser.add_argument(
        "--device",
        default="cuda",
        help="--host only: cuda, or cpu (the CPU extension; checks the script here)",
    )
    parser.add_argument("--width", type=int, default=876)
    parser.add_argument("--height", type=int, default=584)
    args = parser.parse_args(argv)
    if args.host:
        return host_overhead(device=args.device)
    dev, w, h = "cuda", args.width, args.height
    means, quats, scales, opac = make_scene(args.n, dev)
    viewmats, ks = cameras(args.cams, w, h, dev)
    colors = torch.rand(args.n, 3, device=dev)
    feats = torch.randn(args.n, args.ch, device=dev) * 0.5
    params = [p.clone().requires_grad_(True) for p in (means, quats, scales, opac, colors, feats)]
    weights = [torch.randn(args.cams, c, h, w, device=dev) for c in (3, 1, args.ch)]

    def fwdbwd():
        out = render(*params, ks, viewmats, w, h, backend="cuda")
        images = (out.rgb, out.depth, out.features)
        sum((image * weight).sum() for image, weight in zip(images, weights, strict=True)).backward()

    if args.plain:
        for _ in range(args.plain):
            fwdbwd()
        torch.cuda.synchronize()
        return None

    with torch.no_grad():  # binning statistics
        m2d, con, dep, radii = _wrapper.project(means, quats, scales, opac, viewmats, ks, w, h)
        ranges, ids, _ = require_extension().isect_tiles(m2d, con, opac, dep, radii, w, h, 0)
        lengths = (ranges[:, 1] - ranges[:, 0]).float()
        out = render(means, quats, scales, opac, colors, feats, ks, viewmats, w, h, backend="cuda")
    print(  # noqa: T201
        f"visible {(radii > 0).sum().item()} / {radii.numel()}, pairs {ids.numel()}, "
        f"tiles {lengths.numel()}, "
        f"list length mean {lengths.mean().item():.0f} max {lengths.max().item():.0f}, "
        f"mean alpha {out.alpha.mean().item():.3f}"
    )
    for _ in range(3):
        fwdbwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fwdbwd()
        torch.cuda.synchronize()
    print("== forward+backward (the benchmark's loss), 5 calls")  # noqa: T201
    print(kernel_table(prof, rows=22))  # noqa: T201

    # The forward alone (no grad), and its fixed cost: the same call with 1000 Gaussians.
    def forward(n):
        with torch.no_grad():
            render(
                means[:n],
                quats[:n],
                scales[:n],
                opac[:n],
                colors[:n],
                feats[:n],
                ks,
                viewmats,
                w,
                h,
                backend="cuda",
            )

    print(  # noqa: T201
        f"forward: {timeit(lambda: forward(args.n)):.3f} ms at n={args.n}, {timeit(lambda: forward(1000)):.3f} ms at n=1000"
    )
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            forward(args.n)
        torch.cuda.synchronize()
    print("== forward (no gradients), 5 calls")  # noqa: T201
    print(kernel_table(prof, rows=25))  # noqa: T201
    time_per_call("forward", lambda: forward(args.n))
    time_per_call("forward+backward", fwdbwd)


def kernel_table(prof, rows: int) -> str:
    # names wide enough to tell CUB's kernels apart (its onesweep and histogram kernels share a 60-character prefix)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=100)


def time_per_call(label: str, call, calls: int = 10) -> None:
    """Splits what `rasterizer.py` times for one call (CUDA events around it, the GPU idle before): the host time
    before the first kernel, the GPU's busy time and its idle gaps within the call, and the host operators the
    gaps waited on (medians over `calls` profiled calls, each synchronised as the benchmark does)."""
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            with record_function("fit3d call"):
                call()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        per_call = gpu_time_per_call(trace_events(f"{tmp}/trace.json"), "fit3d call")

    def median(key):
        values = sorted(c[key] for c in per_call if c[key] is not None)
        return values[len(values) // 2] if values else float("nan")

    print(  # noqa: T201
        f"{label}, per call (profiler on, median of {calls}): first GPU activity after {median('latency_us'):.1f} us, "
        f"last ends at {median('span_us'):.1f} us; GPU busy {median('busy_us'):.1f} us, idle within "
        f"{median('idle_us'):.1f} us, of which host-bound {median('host_bound_us'):.1f} us; host-bound idle by "
        f"operator (us, summed over the calls):"
    )
    by_operator = defaultdict(float)
    for c in per_call:
        for name, us in c["by_operator"]:
            by_operator[name] += us
    for name, us in sorted(by_operator.items(), key=lambda item: -item[1])[:8]:
        print(f"  {us:8.1f}  {name[:100]}")  # noqa: T201


def host_overhead(n: int = 1000, calls: int = 300, device: str = "cuda") -> None:
    """Host time per call of each step of the forward, with so few Gaussians that the GPU never lags behind;
    `render` at the benchmark's 876x584 and at 128x96 (where the GPU's work, mostly writing the images, is far
    shorter than the host's: a render waits for its binning, queued behind the previous render's kernels, so the
    larger image's figure can be GPU time); last, `render` with the compiled ops stubbed out (they return the
    outputs of one real call): Python's share."""
    import time
    from unittest import mock

    from fit3d_hf.render._backend import extension_for
    from fit3d_hf.render.rasterize import _validate

    dev, w, h = device, 876, 584
    device = torch.device(device)
    means, quats, scales, opac = make_scene(n, dev)
    viewmats, ks = cameras(1, w, h, dev)
    small_viewmats, small_ks = cameras(1, 128, 96, dev)
    colors, feats = torch.rand(n, 3, device=dev), torch.randn(n, 64, device=dev)
    ext = extension_for(device)

    def report(name, step):
        for _ in range(20):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            step()
        host_us = 1e6 * (time.perf_counter() - start) / calls
        synchronize(device)
        print(f"host time per call, n={n}: {name:30s} {host_us:7.1f} us")  # noqa: T201

    def call_render():
        render(means, quats, scales, opac, colors, feats, ks, viewmats, w, h, backend=dev)

    def call_small_render():
        render(means, quats, scales, opac, colors, feats, small_ks, small_viewmats, 128, 96, backend=dev)

    with torch.no_grad():
        m2d, con, dep, radii = _wrapper.project(means, quats, scales, opac, viewmats, ks, w, h)
        ranges, ids, total = ext.isect_tiles(m2d, con, opac, dep, radii, w, h, 0)
        images = ext.rasterize_fwd(m2d, con, opac, colors, dep, feats, None, ranges, ids, w, h, False)
        steps = {
            "validate": lambda: _validate(
                means, quats, scales, opac, colors, feats, ks, viewmats, w, h, None, 0.01, 1e10
            ),
            "project": lambda: _wrapper.project(means, quats, scales, opac, viewmats, ks, w, h),
            "isect_tiles (capacity)": lambda: ext.isect_tiles(m2d, con, opac, dep, radii, w, h, 10_000),
            "isect_tiles (exact, sync)": lambda: ext.isect_tiles(m2d, con, opac, dep, radii, w, h, 0),
            "rasterize_fwd": lambda: ext.rasterize_fwd(
                m2d, con, opac, colors, dep, feats, None, ranges, ids, w, h, False
            ),
            "render": call_render,
            "render, 128 x 96 image": call_small_render,
        }
        for name, step in steps.items():
            report(name, step)

        class Stub:  # the extension's forward ops, answering at once with the outputs above
            def project_fwd(self, *args):
                return m2d, con, dep, radii

            def isect_tiles(self, *args):
                return ranges, ids, total

            def rasterize_fwd(self, *args):
                return images

            def wait_pair_count(self, device):  # the count above is already on the host
                pass

        with mock.patch.object(_wrapper, "extension_for", lambda device: Stub()):
            report("render, compiled ops stubbed", call_render)

        # where a render's host time goes: every torch op and CUDA runtime call (launches, copies, syncs,
        # attribute queries) with its host time per render
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(50):
                call_render()
            synchronize(device)
        events = prof.key_averages()
        gpu_us = sum(getattr(event, "self_device_time_total", 0) for event in events) / 50
        print(f"GPU time per render (kernels, copies, memsets): {gpu_us:.1f} us")  # noqa: T201
        print("host time per render by call (self CPU time / 50 renders):")  # noqa: T201
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:30]:
            print(  # noqa: T201
                f"  {event.key[:60]:60s} {event.self_cpu_time_total / 50:8.1f} us  {event.count / 50:5.1f} calls"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
