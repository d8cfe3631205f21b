"""Gaussian bundle size and speed: bytes per Gaussian of the whole file (SH colours, decoder, codebook and
header included), time to write it (SH compression on the GPU when there is one), and time to load one
scene's Stage II tensors (geometry + fp16 features + decoder, no SH) from the page cache. Prints one JSON
line per size.

    python benchmarks/bundle_load.py --n 1000000 229439
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fit3d_hf.gaussians import FeatureGaussians, load_bundle, read_bundle_metadata, save_bundle
from fit3d_hf.gaussians.bundle import bundle_bytes_per_gaussian


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[1_000_000, 229_439])
    parser.add_argument("--feature_dim", type=int, default=64)
    parser.add_argument("--backbone_dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the SH are compressed"
    )
    args = parser.parse_args()
    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    save_device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    for n in args.n:
        rng = np.random.default_rng(0)
        gaussians = FeatureGaussians.from_points(
            rng.normal(size=(n, 3)), rng.integers(0, 255, (n, 3), dtype=np.uint8), args.feature_dim
        )
        with torch.no_grad():
            # Higher-order SH of the magnitude trained scenes show, with no structure for k-means to exploit
            # (every Gaussian non-zero, so the codebook is full and the k-means does all its work).
            gaussians.sh_rest.normal_(std=0.011, generator=torch.Generator().manual_seed(0))
        gaussians = gaussians.to(args.device)
        decoder = torch.randn(args.backbone_dim, args.feature_dim, 3, 3, device=args.device)
        with tempfile.TemporaryDirectory() as folder:
            save_bundle(
                Path(folder) / "warmup", gaussians, decoder, scene_id="s", backbone="b"
            )  # CUDA start-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            path = save_bundle(Path(folder), gaussians, decoder, scene_id="s", backbone="b")
            save_s = time.perf_counter() - start
            load_bundle(path)  # warm the page cache
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                bundle = load_bundle(path)
                _ = bundle.features.sum()  # touch the data
                times.append(time.perf_counter() - start)
            start = time.perf_counter()
            with_sh = load_bundle(path, include_sh=True)
            load_sh_s = time.perf_counter() - start
            sh_error = (with_sh.sh - gaussians.sh.detach().cpu()).abs()
            record = {
                "benchmark": "bundle_load_stage2",
                "device": cpu,
                "save_device": save_device,
                "n": n,
                "feature_dim": args.feature_dim,
                "backbone_dim": args.backbone_dim,
                "file_bytes": path.stat().st_size,
                "bytes_per_gaussian": round(bundle_bytes_per_gaussian(path), 2),
                "bytes_per_gaussian_stage2": 12 + 8 + 6 + 2 + 2 * args.feature_dim,
                "original_bytes_per_gaussian": 492,
                "sh_codebook_size": int(read_bundle_metadata(path)["sh_codebook_size"]),
                "sh_dc_max_error": round(float(sh_error[:, 0].max()), 5),
                "sh_rest_rms_error": round(float(sh_error[:, 1:].pow(2).mean().sqrt()), 5),
                "save_s": round(save_s, 3),
                "load_ms_median": round(1000 * float(np.median(times)), 2),
                "load_with_sh_ms": round(1000 * load_sh_s, 1),
            }
            print(json.dumps(record), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
