"""Per-kernel GPU times of fit3d's renderer on the benchmark workload (torch.profiler), plus binning stats.

python benchmarks/profile_rasterizer.py [--n 1000000] [--ch 64] [--cams 1]
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rasterizer import cameras, make_scene  # noqa: E402

from fit3d_hf.render import _wrapper, render  # noqa: E402
from fit3d_hf.render._backend import require_extension  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--ch", type=int, default=64)
    parser.add_argument("--cams", type=int, default=1)
    parser.add_argument("--width", type=int, default=876)
    parser.add_argument("--height", type=int, default=584)
    args = parser.parse_args(argv)
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

    with torch.no_grad():  # binning statistics
        m2d, con, dep, radii = _wrapper.project(means, quats, scales, opac, viewmats, ks, w, h)
        ranges, ids = require_extension().isect_tiles(m2d, con, opac, dep, radii, w, h)
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
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))  # noqa: T201


if __name__ == "__main__":
    main(sys.argv[1:])
