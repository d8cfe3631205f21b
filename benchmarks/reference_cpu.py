"""Benchmark: forward + backward of the pure-PyTorch reference renderer on the CPU.

20k Gaussians of the anchors' synthetic room (see rasterizer.py), one 160x120 camera, RGB + depth + 16
feature channels; median of 5 after 1 warm-up. Prints one JSON line. Run from the repository root:
    python benchmarks/reference_cpu.py
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scene generator lives in rasterizer.py
from rasterizer import cameras, make_scene  # noqa: E402

from fit3d_hf.render import render  # noqa: E402


def main(n=20_000, width=160, height=120, n_features=16, iters=5):
    means, quats, scales, opac = make_scene(n, "cpu")
    viewmats, ks = cameras(1, width, height, "cpu")
    g = torch.Generator().manual_seed(1)
    colors = torch.rand(n, 3, generator=g)
    feats = torch.randn(n, n_features, generator=g) * 0.5
    params = [p.clone().requires_grad_(True) for p in (means, quats, scales, opac, colors, feats)]
    w = [torch.randn(1, c, height, width, generator=g) for c in (3, 1, n_features)]

    def step():
        out = render(*params, ks, viewmats, width, height, backend="reference")
        loss = (out.rgb * w[0]).sum() + (out.depth * w[1]).sum() + (out.features * w[2]).sum()
        loss.backward()
        return out

    out = step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    record = dict(
        lib="fit3d-reference",
        device="cpu",
        threads=torch.get_num_threads(),
        n=n,
        visible=int((out.radii > 0).sum()),
        cams=1,
        ch=n_features,
        w=width,
        h=height,
        fwdbwd_s=round(times[len(times) // 2], 3),
    )
    print(json.dumps(record))  # noqa: T201 (benchmark output)


if __name__ == "__main__":
    main()
