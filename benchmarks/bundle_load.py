"""Time to load one scene's Stage II tensors (geometry + fp16 features + decoder, no SH) from a bundle in
the page cache. Prints one JSON line per size."""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fit3d_hf.gaussians import FeatureGaussians, load_bundle, save_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--feature_dim", type=int, default=64)
    parser.add_argument("--backbone_dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    for n in args.n:
        rng = np.random.default_rng(0)
        gaussians = FeatureGaussians.from_points(rng.normal(size=(n, 3)), rng.integers(0, 255, (n, 3), dtype=np.uint8), args.feature_dim)
        with tempfile.TemporaryDirectory() as folder:
            path = save_bundle(Path(folder), gaussians, torch.randn(args.backbone_dim, args.feature_dim, 3, 3), scene_id="s", backbone="b")
            load_bundle(path)  # warm the page cache
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                bundle = load_bundle(path)
                _ = bundle.features.sum()  # touch the data
                times.append(time.perf_counter() - start)
            record = {
                "benchmark": "bundle_load_stage2",
                "device": f"cpu ({device}, {torch.get_num_threads()} threads)",
                "n": n,
                "feature_dim": args.feature_dim,
                "file_bytes": path.stat().st_size,
                "bytes_per_gaussian_stage2": 12 + 8 + 6 + 2 + 2 * args.feature_dim,
                "load_ms_median": round(1000 * float(np.median(times)), 2),
            }
            print(json.dumps(record))  # noqa: T201


if __name__ == "__main__":
    main()
