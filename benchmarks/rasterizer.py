"""Benchmark: fit3d-hf's CUDA rasterizer against gsplat 1.5.3 on the anchors' workload.

The workload, timing and JSON fields mirror the anchors' gsplat_bench.py (in shared/anchors/ beside the
repository): a synthetic 6x4x6 m room of Gaussians, 876x584, N in {100k, 500k, 1M}, 1 and 4 cameras, C in
{3, 32, 64, 128, 384}; forward without grad and forward+backward of (out * w).sum(); median of 20 after 5
warm-ups with CUDA events; also `renderer_fwdbwd_ms`, the same forward+backward without the loss's kernels and
the accumulation into `.grad` (the renderer's own share); peak memory after resetting the peak counter, so it
includes the scene, the parameters and their gradients.

For gsplat, "ch" colour channels are rendered with render_mode="RGB+ED", packed=False, exactly as in the
anchor script. For fit3d, "ch" feature channels are rendered together with RGB and depth (ch + 4 blended
channels) in one call of `fit3d_hf.render.render`; `feature_grad_to_geometry` is recorded. `extra_mib` is
the peak minus what was allocated just before the measured call (the renderer's own working memory).

Prints one JSON line per configuration; run from the repository root:
    python benchmarks/rasterizer.py --lib both [--quick]
"""

import argparse
import json
import math
import sys
import time

import torch


def make_scene(n, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # points in a 6 x 4 x 6 m room, camera at origin looking down +z
    means = torch.rand(n, 3, generator=g) * torch.tensor([6.0, 4.0, 6.0]) - torch.tensor([3.0, 2.0, -0.5])
    # log-uniform scales 5 mm .. 8 cm, anisotropic
    scales = torch.exp(torch.rand(n, 3, generator=g) * (math.log(0.08) - math.log(0.005)) + math.log(0.005))
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    opac = torch.sigmoid(torch.randn(n, generator=g) * 2.0)
    return [t.to(device) for t in (means, quats, scales, opac)]


def cameras(c, width, height, device):
    views = []
    ks = []
    for i in range(c):
        ang = 0.15 * i
        r = torch.tensor([[math.cos(ang), 0, math.sin(ang)], [0, 1, 0], [-math.sin(ang), 0, math.cos(ang)]])
        v = torch.eye(4)
        v[:3, :3] = r
        views.append(v)
        f = 0.9 * width
        ks.append(torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]]))
    return torch.stack(views).to(device), torch.stack(ks).to(device)


def timeit(fn, iters=20, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def renderer_fwdbwd(params, run, grads):
    """Median ms of a forward and a backward of the renderer alone: the loss's gradients are given (`grads`, what
    the loss (out * w).sum() sends back) and the parameters' gradients are cleared first, so neither the loss's
    elementwise kernels nor the accumulation into `.grad` (about 0.7 ms of fwd+bwd at 64 channels, the same for
    both libraries) are timed."""

    def step():
        for p in params:
            p.grad = None
        torch.autograd.backward(run(), grads)

    return timeit(step)


def peak_memory(fn):
    """(peak MiB during one call, MiB above what was allocated before it)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return round(peak / 2**20), round((peak - before) / 2**20)


def bench_gsplat(scene, n, ncam, ch, width, height, dev, channel_chunk=32):
    """The inner loop of the anchors' gsplat_bench.py, unchanged but for `channel_chunk`: gsplat's default 32
    renders the ch + 1 channels of "RGB+ED" in ceil((ch + 1) / 32) passes; ch + 1 renders them in one (gsplat
    compiles kernels for 65 and 129 channels, among others, and pads other counts to a power of two)."""
    from gsplat import rasterization

    means, quats, scales, opac = scene
    viewmats, ks = cameras(ncam, width, height, dev)
    feats = torch.randn(n, ch, device=dev) * 0.5
    params = [p.clone().requires_grad_(True) for p in (means, quats, scales, opac, feats)]

    def fwd():
        with torch.no_grad():
            out, alpha, meta = rasterization(
                means,
                quats,
                scales,
                opac,
                feats,
                viewmats,
                ks,
                width,
                height,
                packed=False,
                render_mode="RGB+ED",
                channel_chunk=channel_chunk,
            )
        return out

    w = torch.randn(ncam, height, width, ch + 1, device=dev)

    def render_all():
        m, q, s, o, f = params
        out, alpha, meta = rasterization(
            m,
            q,
            s,
            o,
            f,
            viewmats,
            ks,
            width,
            height,
            packed=False,
            render_mode="RGB+ED",
            channel_chunk=channel_chunk,
        )
        return out

    def fwdbwd():
        (render_all() * w).sum().backward()

    tf = timeit(fwd)
    tb = timeit(fwdbwd)
    tr = renderer_fwdbwd(params, render_all, w)
    peak, extra = peak_memory(fwdbwd)
    return dict(
        lib="gsplat-1.5.3",
        channel_chunk=channel_chunk,
        gsplat_passes=math.ceil((ch + 1) / channel_chunk),
        fwd_ms=round(tf, 3),
        fwdbwd_ms=round(tb, 3),
        renderer_fwdbwd_ms=round(tr, 3),
        peak_mib=peak,
        extra_mib=extra,
    )


def bench_fit3d(scene, n, ncam, ch, width, height, dev, route):
    """The same measurement for fit3d_hf.render.render: RGB + depth + ch features in one call."""
    from fit3d_hf.render import render

    means, quats, scales, opac = scene
    viewmats, ks = cameras(ncam, width, height, dev)
    g = torch.Generator(device="cpu").manual_seed(1)
    colors = torch.rand(n, 3, generator=g).to(dev)
    feats = torch.randn(n, ch, device=dev) * 0.5
    params = [p.clone().requires_grad_(True) for p in (means, quats, scales, opac, colors, feats)]

    def fwd():
        with torch.no_grad():
            out = render(
                means, quats, scales, opac, colors, feats, ks, viewmats, width, height, backend="cuda"
            )
        return out

    w_rgb = torch.randn(ncam, 3, height, width, device=dev)
    w_depth = torch.randn(ncam, 1, height, width, device=dev)
    w_feat = torch.randn(ncam, ch, height, width, device=dev)

    def render_all():
        out = render(*params, ks, viewmats, width, height, backend="cuda", feature_grad_to_geometry=route)
        return out.rgb, out.depth, out.features

    def fwdbwd():
        rgb, depth, features = render_all()
        ((rgb * w_rgb).sum() + (depth * w_depth).sum() + (features * w_feat).sum()).backward()

    tf = timeit(fwd)
    tb = timeit(fwdbwd)
    tr = renderer_fwdbwd(params, render_all, (w_rgb, w_depth, w_feat))
    peak, extra = peak_memory(fwdbwd)
    return dict(
        lib="fit3d",
        fwd_ms=round(tf, 3),
        fwdbwd_ms=round(tb, 3),
        renderer_fwdbwd_ms=round(tr, 3),
        peak_mib=peak,
        extra_mib=extra,
        blended_ch=ch + 4,
        feature_grad_to_geometry=route,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", choices=("fit3d", "gsplat", "both"), default="fit3d")
    parser.add_argument(
        "--quick", action="store_true", help="1M Gaussians, 1 camera, ch in {3, 64, 384} only"
    )
    parser.add_argument("--width", type=int, default=876)
    parser.add_argument("--height", type=int, default=584)
    parser.add_argument("--feature-grad-to-geometry", action="store_true", help="fit3d: route feature grads")
    parser.add_argument(
        "--gsplat-chunks",
        default="32,one",
        help="gsplat channel_chunk values, comma-separated: numbers, or 'one' for ch + 1 (a single pass)",
    )
    parser.add_argument(
        "--channels", default=None, help="comma-separated channel counts (overrides the matrix)"
    )
    args = parser.parse_args(argv)

    dev = "cuda"
    device_name = torch.cuda.get_device_name()
    libs = ("fit3d", "gsplat") if args.lib == "both" else (args.lib,)
    counts, cam_counts, channels = (100_000, 500_000, 1_000_000), (1, 4), (3, 32, 64, 128, 384)
    if args.quick:
        counts, cam_counts, channels = (1_000_000,), (1,), (3, 64, 384)
    if args.channels:
        channels = tuple(int(c) for c in args.channels.split(","))
    chunks = args.gsplat_chunks.split(",")
    for n in counts:
        scene = make_scene(n, dev)
        for ncam in cam_counts:
            for ch in channels:
                runs = [(lib, None) for lib in libs if lib == "fit3d"]
                runs += [("gsplat", ch + 1 if c == "one" else int(c)) for c in chunks if "gsplat" in libs]
                for lib, chunk in runs:
                    if (
                        lib == "gsplat"
                        and chunk != 32
                        and math.ceil((ch + 1) / chunk) == math.ceil((ch + 1) / 32)
                    ):
                        continue  # the same passes as the default chunk: measured once
                    head = dict(device=device_name, n=n, cams=ncam, ch=ch, w=args.width, h=args.height)
                    try:
                        if lib == "gsplat":
                            rec = bench_gsplat(scene, n, ncam, ch, args.width, args.height, dev, chunk)
                        else:
                            rec = bench_fit3d(
                                scene,
                                n,
                                ncam,
                                ch,
                                args.width,
                                args.height,
                                dev,
                                args.feature_grad_to_geometry,
                            )
                        rec = {"lib": rec.pop("lib"), **head, **rec}
                    except (RuntimeError, ImportError) as exc:  # e.g. out of memory, gsplat not installed
                        rec = dict(
                            lib={"gsplat": "gsplat-1.5.3"}.get(lib, lib),
                            **head,
                            channel_chunk=chunk,
                            error=str(exc)[:300],
                        )
                    print(json.dumps(rec), flush=True)  # noqa: T201 (benchmark output)
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    t0 = time.time()
    main(sys.argv[1:])
    print("total_s", round(time.time() - t0, 1))  # noqa: T201
