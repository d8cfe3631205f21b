"""Where Stage I's scene-data phase spends its time (4.3 s for 300 views at 876x584 on an H100, session 13): the
image readers alone, the backbone alone at each precision and batch size, and the phase as the lift runs it.

    python benchmarks/target_features.py --scene .liftscene/bench00000 [--views 64] [--batches 1,8]

The backbone is benchmarks/lift.py's DINOv2-small-sized model with random weights. Each precision's
features are compared with fp32 at batch 1 after the fp16 cast the targets are stored in: `max_abs_diff`, and
`mean_rel_diff` (mean |difference| / mean |feature|). One JSON line per measured configuration.
"""

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
from transformers import Dinov2Model

from fit3d_hf.backbones import DenseFeatureExtractor
from fit3d_hf.lifting import scene_data
from fit3d_hf.scene import read_scene
from fit3d_hf.utils import map_ahead

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lift import dinov2_small_config  # noqa: E402
from timing import synchronize  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16")


def random_dinov2_small(device: torch.device) -> DenseFeatureExtractor:
    torch.manual_seed(0)
    return DenseFeatureExtractor(Dinov2Model(dinov2_small_config())).to(device).eval()


@torch.no_grad()
def features(extractor, images: torch.Tensor, batch: int, precision: str) -> tuple[torch.Tensor, float]:
    """fp16 features of `images` (on the host, float) in batches of `batch`, and the seconds taken."""
    device = extractor.image_mean.device
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        synchronize(device)
        start = time.perf_counter()
        out = []
        for first in range(0, len(images), batch):
            chunk = images[first : first + batch].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out.append(extractor(chunk).to(torch.float16))
        out = torch.cat(out)
        synchronize(device)
        return out, time.perf_counter() - start
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def time_readers(scene, threads: int) -> float:
    """Views per second read, decoded and converted by `threads` threads, without the backbone."""
    start = time.perf_counter()
    read = functools.partial(scene_data._load_view, image_scale=1.0)
    for _ in map_ahead(read, scene.frames, threads):
        pass
    return len(scene.frames) / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scene", default=None, help="a scene folder; without one, random images only")
    parser.add_argument("--views", type=int, default=64, help="views per backbone configuration")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--width", type=int, default=876)
    parser.add_argument("--height", type=int, default=584)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    extractor = random_dinov2_small(device)
    scene = read_scene(Path(args.scene)) if args.scene else None
    records = []

    if scene is not None:
        for threads in sorted({scene_data._READ_THREADS, 2 * scene_data._READ_THREADS}):
            records.append(
                {"part": "readers", "threads": threads, "views_per_s": time_readers(scene, threads)}
            )
        # the views as the lift's readers give them (uint8 at full size), in [0, 1]
        images = torch.cat([scene_data._load_view(f, 1.0)[0] for f in scene.frames[: args.views]]) / 255.0
    else:
        images = torch.rand(
            args.views, 3, args.height, args.width, generator=torch.Generator().manual_seed(0)
        )

    features(extractor, images[:2], 2, "fp32")  # warm-up (cuDNN, kernels' first launch)
    reference, _ = features(extractor, images, 1, "fp32")
    scale = reference.float().abs().mean()
    for precision in PRECISIONS:
        if precision != "fp32" and device.type != "cuda":
            continue
        for batch in map(int, args.batches.split(",")):
            features(extractor, images[:batch], batch, precision)  # warm-up of this shape
            out, seconds = features(extractor, images, batch, precision)
            diff = (out.float() - reference.float()).abs()
            records.append({
                "part": "backbone", "precision": precision, "batch": batch, "views_per_s": len(images) / seconds,
                "max_abs_diff": float(diff.max()), "mean_rel_diff": float(diff.mean() / scale),
            })  # fmt: skip

    if scene is not None:
        synchronize(device)
        start = time.perf_counter()
        scene_data.load_scene_data(scene, extractor, 1.0, device, progress=False)
        synchronize(device)
        records.append(
            {"part": "scene_data", "views_per_s": len(scene.frames) / (time.perf_counter() - start)}
        )

    for record in records:
        record = {
            "benchmark": "target_features",
            "device": name,
            "image_size": [args.width, args.height],
            **record,
        }
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}))  # noqa: T201


if __name__ == "__main__":
    main(sys.argv[1:])
