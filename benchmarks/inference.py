"""Inference throughput of FiT3DModel against running its two backbones separately.

For random DINOv2-small- and base-sized models, at 518x518 and ScanNet++'s 876x584 (width x height), batch
32 and 1, bf16 autocast and SDPA attention, it prints one JSON line per setting:

    {"device", "model", "size", "batch", "images_per_s", "separate_images_per_s", "ratio"}

`images_per_s` times the whole FiT3DModel forward on images in [0, 1] (resize to a patch multiple, normalise,
two backbones, concatenation). `separate_images_per_s` times only the two backbones' own forward calls, one
after the other, on inputs already resized and normalised: the lower bound FiT3DModel's overhead is measured
against (target: ratio >= 0.95 at batch 32).

    python benchmarks/inference.py                      # CUDA
    python benchmarks/inference.py --device cpu --quick # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import Dinov2Config

from fit3d_hf import FiT3DConfig, FiT3DModel
from fit3d_hf.modeling_fit3d import resize_to_patch_multiple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_seconds  # noqa: E402

MODELS = {
    "dinov2-small-random": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "dinov2-base-random": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
}
SIZES = [(518, 518), (876, 584)]  # width x height
QUICK_SIZES = [(112, 112), (146, 98)]


def build_model(name: str, device: torch.device) -> FiT3DModel:
    """A randomly initialised FiT3DModel with DINOv2 backbones of the named size, SDPA attention."""
    backbone_config = Dinov2Config(**MODELS[name], image_size=518, patch_size=14)
    config = FiT3DConfig(backbone_config=backbone_config, attn_implementation="sdpa")
    return FiT3DModel(config).to(device).eval()


def benchmark(
    model: FiT3DModel, size: tuple[int, int], batch: int, device: torch.device, warmup: int, iterations: int
) -> dict:
    width, height = size
    images = torch.rand(batch, 3, height, width, device=device)
    prepared = (resize_to_patch_multiple(images, model.patch_size) - model.image_mean) / model.image_std
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def fit3d():
        with torch.inference_mode(), autocast:
            return model(images).features

    def separate():
        with torch.inference_mode(), autocast:
            return model.original(prepared).last_hidden_state, model.finetuned(prepared).last_hidden_state

    # Interleave the two measurements so clock or thermal drift affects both alike.
    fit3d_seconds, separate_seconds = [], []
    for _ in range(2):
        fit3d_seconds.append(median_seconds(fit3d, device, warmup, iterations))
        separate_seconds.append(median_seconds(separate, device, warmup, iterations))
    images_per_s = batch / min(fit3d_seconds)
    separate_images_per_s = batch / min(separate_seconds)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "hidden_size": model.hidden_size,
        "size": f"{width}x{height}",
        "batch": batch,
        "images_per_s": round(images_per_s, 2),
        "separate_images_per_s": round(separate_images_per_s, 2),
        "ratio": round(images_per_s / separate_images_per_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quick", action="store_true", help="Smoke run: the small model, small images, batches 2 and 1."
    )
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="Batch sizes (default 32 1).")
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS), help="Default: all.")
    parser.add_argument("--iterations", type=int, default=None, help="Timed calls per measurement.")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    sizes = QUICK_SIZES if args.quick else SIZES
    batches = args.batches or ([2, 1] if args.quick else [32, 1])
    models = args.models or (list(MODELS)[:1] if args.quick else list(MODELS))
    iterations = args.iterations or (3 if args.quick else 10)
    warmup = 2 if args.quick else 3
    torch.manual_seed(0)
    for name in models:
        model = build_model(name, device)
        for size in sizes:
            for batch in batches:
                result = {"model": name, **benchmark(model, size, batch, device, warmup, iterations)}
                sys.stdout.write(json.dumps(result) + "\n")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
