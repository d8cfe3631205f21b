"""Stage II benchmark: images/s of the full fine-tuning step (render the 64-d features of each frame from
~1M Gaussians, decode them on the patch grid, flip, DINOv2-small-sized backbone forward+backward in bf16,
masked L1, clipping, AdamW) at 876x584, with the time split into target rendering, backbone step and data
loading. Mirrors ../shared/anchors/stage2_step_gsplat.py so that the numbers compare.

    python benchmarks/finetune.py --batch 8 16 32
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model

from fit3d_hf.backbones import DenseFeatureExtractor
from fit3d_hf.finetuning import GaussianCache, _flip_table, training_step_inputs
from fit3d_hf.gaussians import FeatureGaussians, save_bundle
from fit3d_hf.losses import masked_l1


def make_bundle(folder: Path, n: int, feature_dim: int, backbone_dim: int) -> None:
    """Random Gaussians in a 6 x 4 x 6 m room in front of the cameras (as the gsplat anchor)."""
    g = torch.Generator().manual_seed(0)
    means = torch.rand(n, 3, generator=g) * torch.tensor([6.0, 4.0, 6.0]) - torch.tensor([3.0, 2.0, -0.5])
    gaussians = FeatureGaussians(
        means, F.normalize(torch.randn(n, 4, generator=g), dim=-1),
        torch.rand(n, 3, generator=g) * (math.log(0.08) - math.log(0.005)) + math.log(0.005),
        torch.randn(n, generator=g) * 2, torch.randn(n, 16, 3, generator=g) * 0.1, torch.randn(n, feature_dim, generator=g),
    )  # fmt: skip
    save_bundle(folder / "bench" , gaussians, torch.randn(backbone_dim, feature_dim, 3, 3) * 0.05, scene_id="bench", backbone="random")


def batch_of(b: int, width: int, height: int, device) -> dict:
    views, Ks = [], []
    for i in range(b):
        a = 0.1 * i
        view = torch.eye(4)
        view[:3, :3] = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
        views.append(view)
        f = 0.9 * width
        Ks.append(torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]]))
    return {
        "index": torch.arange(b),
        "scene_id": ["bench"] * b,
        "image": torch.randint(0, 256, (b, 3, height, width), dtype=torch.uint8),
        "mask": torch.ones(b, 1, height, width),
        "K": torch.stack(Ks),
        "world_to_camera": torch.stack(views),
    }


def data_loading_images_per_s(work: Path, width: int, height: int, workers: int, batch: int) -> float:
    """Frames/s of the real input path (JPEG + mask decode through the scannetpp builder and FrameDataset)."""
    from fit3d_hf.finetuning import FinetuningArguments, build_train_dataloader, load_frames
    from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset

    generate_dataset(work / "frames", num_scenes=1, num_val_scenes=0, config=SyntheticSceneConfig(num_views=32, width=width, height=height))
    frames = load_frames(work / "frames", "train")
    loader = build_train_dataloader(frames, FinetuningArguments(output_dir=str(work), train_batch_size=batch, dataloader_num_workers=workers))
    start, count = time.perf_counter(), 0
    for batch_data in loader:
        count += len(batch_data["image"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=876)
    parser.add_argument("--height", type=int, default=584)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--loader_workers", type=int, default=8, help="workers for the data loading measurement (0: skip it)")
    args = parser.parse_args()
    device = torch.device("cuda")
    work = Path(tempfile.mkdtemp())
    make_bundle(work, args.n, 64, 384)
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=14, image_size=518)
    extractor = DenseFeatureExtractor(Dinov2Model(config)).to(device).train()
    step_model = torch.compile(extractor) if args.compile else extractor
    optimizer = torch.optim.AdamW(extractor.parameters(), lr=1e-5, weight_decay=1e-4, fused=True)
    cache = GaussianCache(work, device, 8e9)
    loading = data_loading_images_per_s(work, args.width, args.height, args.loader_workers, 8) if args.loader_workers else None
    for b in args.batch:
        batch = batch_of(b, args.width, args.height, device)
        flips = _flip_table(b, 0.5, 0, 0)
        timings = {"targets": [], "backbone": [], "total": []}
        for step in range(args.steps + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            images, targets, masks = training_step_inputs(batch, cache, extractor, flips, device)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                predictions = step_model(images)
            loss = masked_l1(predictions.float(), targets, masks)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(extractor.parameters(), 0.1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if step >= 3:
                timings["targets"].append(t1 - t0)
                timings["backbone"].append(t2 - t1)
                timings["total"].append(t2 - t0)
        median = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
        record = {
            "benchmark": "finetune_step",
            "device": torch.cuda.get_device_name(),
            "gpus": 1,
            "backbone": "dinov2-small-sized (random)",
            "compiled": args.compile,
            "n": args.n,
            "batch": b,
            "images_per_s": round(b / median["total"], 1),
            "targets_ms_per_image": round(1000 * median["targets"] / b, 2),
            "backbone_ms_per_image": round(1000 * median["backbone"] / b, 2),
            "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20),
            "data_loading_images_per_s": round(loading, 1) if loading else None,
        }
        print(json.dumps(record), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
