"""Stage II benchmark: images/s of the full fine-tuning step (render the 64-d features of each frame from
~1M Gaussians, decode them on the patch grid, flip, DINOv2-small-sized backbone forward+backward in bf16,
masked L1, clipping, AdamW) at 876x584, the time split per image, full against LoRA fine-tuning, the
frames/s of the data loading path, and the same step on several GPUs (DDP through `accelerator.prepare`).

The step is the trainer's (`fit3d_hf.finetuning.trainer`): an `Accelerator` with bf16 mixed precision
prepares the backbone (plain or wrapped by the trainer's own `lora_wrap`) and AdamW over its trainable
weights, then `training_step_inputs`, forward, `masked_l1`, `accelerator.backward`, clipping, step.

    python benchmarks/finetune.py --batch 16 32 --lora_rank 0 16 --loader_workers 4 8 16
    accelerate launch --multi_gpu --num_processes 2 benchmarks/finetune.py --batch 16 32 --loader_workers
    python benchmarks/finetune.py --device cpu --backbone tiny --n 2000 --width 112 --height 84 --batch 2 --steps 2 \\
        --lora_rank 0 4 --loader_workers 0 2      # CPU smoke test (reference renderer)

Each process renders its own batch from its own GaussianCache; images/s is global (all processes), timed
on rank 0 between barriers over `--steps` undisturbed steps. The time split comes from a separate pass
that synchronises the device around each phase. One JSON line per (lora rank, batch), printed by rank 0;
`benchmarks/device_finetune.sh` runs 1 then 2 processes on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model

import fit3d_hf.finetuning.rendered_targets as rendered_targets
import fit3d_hf.render
from fit3d_hf.backbones import DenseFeatureExtractor
from fit3d_hf.finetuning import BackboneArguments, GaussianCache, freeze_unused_parameters
from fit3d_hf.finetuning.backbone_setup import compile_backbone, lora_wrap, make_optimizer
from fit3d_hf.finetuning.rendered_targets import flip_table, training_step_inputs
from fit3d_hf.gaussians import FeatureGaussians, save_bundle
from fit3d_hf.losses import masked_l1

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import device_kernels, synchronize, top_kernels_ms  # noqa: E402

BACKBONES = {
    # DINOv2-S/14, and a tiny one for the CPU smoke test
    "small": {
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
    },
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}
FEATURE_DIM = 64
PHASES = ("upload_flip", "render", "decode", "forward", "backward", "optimizer")


def make_bundle(folder: Path, n: int, feature_dim: int, backbone_dim: int) -> None:
    """Random Gaussians in a 6 x 4 x 6 m room in front of the cameras (as the gsplat anchor)."""
    g = torch.Generator().manual_seed(0)
    means = torch.rand(n, 3, generator=g) * torch.tensor([6.0, 4.0, 6.0]) - torch.tensor([3.0, 2.0, -0.5])
    gaussians = FeatureGaussians(
        means, F.normalize(torch.randn(n, 4, generator=g), dim=-1),
        torch.rand(n, 3, generator=g) * (math.log(0.08) - math.log(0.005)) + math.log(0.005),
        torch.randn(n, generator=g) * 2, torch.randn(n, 16, 3, generator=g) * 0.1,
        torch.randn(n, feature_dim, generator=g),
    )  # fmt: skip
    decoder = torch.randn(backbone_dim, feature_dim, 3, 3) * 0.05
    save_bundle(folder / "bench", gaussians, decoder, scene_id="bench", backbone="random")


def batch_of(b: int, width: int, height: int, first_view: int = 0) -> dict:
    """A CPU batch as the trainer's loader yields it (uint8 images, float masks), views `first_view...`."""
    views, Ks = [], []
    for i in range(first_view, first_view + b):
        a = 0.1 * (i % 32)  # within the room the Gaussians fill
        view = torch.eye(4)
        view[:3, :3] = torch.tensor(
            [[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]]
        )
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


class Step:
    """The trainer's optimisation step on one model (full or LoRA) with its optimizer."""

    def __init__(self, accelerator, backbone: str, lora_rank: int, compile_model: bool):
        torch.manual_seed(0)
        config = Dinov2Config(**BACKBONES[backbone], patch_size=14, image_size=518)
        extractor = DenseFeatureExtractor(Dinov2Model(config))
        if lora_rank > 0:
            extractor = lora_wrap(extractor, BackboneArguments(backbone="bench", lora_rank=lora_rank))
        extractor.train()
        self.frozen_unused = freeze_unused_parameters(extractor)
        self.trainable = [p for p in extractor.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in self.trainable)
        optimizer = make_optimizer(self.trainable, 1e-5, 1e-4, accelerator.device)  # as the trainer
        self.model, self.optimizer = accelerator.prepare(extractor, optimizer)
        self.unwrapped = accelerator.unwrap_model(self.model)
        if compile_model:  # as the trainer's --torch_compile: the prepared model's forward, in place
            compile_backbone(self.model)
        self.accelerator = accelerator

    def inputs(self, batch, cache, flips):
        return training_step_inputs(batch, cache, self.unwrapped, flips, self.accelerator.device)

    def forward(self, images, targets, masks):
        with self.accelerator.autocast():
            predictions = self.model(images)
        return masked_l1(predictions.float(), targets, masks)

    def backward(self, loss) -> None:
        self.accelerator.backward(loss)

    def optimize(self) -> None:
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.trainable, 0.1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, batch, cache, flips) -> None:
        with self.accelerator.accumulate(self.model):
            loss = self.forward(*self.inputs(batch, cache, flips))
            self.backward(loss)
            self.optimize()


def images_per_s(step: Step, batch, cache, flips, warmup: int, steps: int) -> float:
    """Global images/s of `steps` consecutive steps, with no synchronisation inside the timed region."""
    accelerator, device = step.accelerator, step.accelerator.device
    for _ in range(warmup):
        step(batch, cache, flips)
    synchronize(device)
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    for _ in range(steps):
        step(batch, cache, flips)
    synchronize(device)
    accelerator.wait_for_everyone()  # the slowest process ends the timed region
    return accelerator.num_processes * len(batch["image"]) * steps / (time.perf_counter() - start)


def gpu_time(step: Step, batch, cache, flips, steps: int = 3) -> dict:
    """GPU time of `steps` undisturbed steps (torch.profiler's kernels and copies; CUDA only): per image of one
    process, and the slowest kernels in ms per step. Set against `step_ms_per_image`, it says how close the
    step is to GPU-bound, which the synchronised time split cannot (its phases include host time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(batch, cache, flips)
        synchronize(step.accelerator.device)
    kernels, ms_per_step = device_kernels(prof, steps)
    return {
        "gpu_ms_per_image": round(ms_per_step / len(batch["image"]), 3),
        "top_kernels_ms_per_step": top_kernels_ms(kernels, steps, 10),
    }


def _timed(function, totals: dict, name: str, device: torch.device):
    def wrapper(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        out = function(*args, **kwargs)
        synchronize(device)
        totals[name] += time.perf_counter() - start
        return out

    return wrapper


def time_split(step: Step, batch, cache, flips, steps: int) -> dict:
    """Median seconds per phase over `steps` steps, synchronising around each phase. The render and decode
    inside the trainer's `training_step_inputs` are timed by wrapping the functions it calls, so that this
    pass runs the trainer's code rather than a copy of it."""
    device = step.accelerator.device
    samples = {phase: [] for phase in PHASES}
    for _ in range(steps):
        inner = {"render": 0.0, "decode": 0.0}
        with (
            mock.patch.object(
                fit3d_hf.render, "render", _timed(fit3d_hf.render.render, inner, "render", device)
            ),
            mock.patch.object(
                rendered_targets,
                "decode_at_patch_grid",
                _timed(rendered_targets.decode_at_patch_grid, inner, "decode", device),
            ),
            step.accelerator.accumulate(step.model),
        ):
            synchronize(device)
            t0 = time.perf_counter()
            inputs = step.inputs(batch, cache, flips)
            synchronize(device)
            t1 = time.perf_counter()
            loss = step.forward(*inputs)
            synchronize(device)
            t2 = time.perf_counter()
            step.backward(loss)
            synchronize(device)
            t3 = time.perf_counter()
            step.optimize()
            synchronize(device)
            t4 = time.perf_counter()
        samples["render"].append(inner["render"])
        samples["decode"].append(inner["decode"])
        samples["upload_flip"].append(
            t1 - t0 - inner["render"] - inner["decode"]
        )  # H2D copy, mask resampling, flips
        samples["forward"].append(t2 - t1)  # backbone forward and the masked L1
        samples["backward"].append(t3 - t2)  # with DDP: including the gradient all-reduce
        samples["optimizer"].append(t4 - t3)  # clipping, AdamW, zero_grad
    return {phase: float(np.median(values)) for phase, values in samples.items()}


# ----------------------------------------------------------------------------------------------------
# Data loading


def make_frames(folder: Path, width: int, height: int, num_views: int):
    """One synthetic ScanNet++-layout scene read through the `scannetpp` builder, as `load_frames` does (with
    the datasets cache in `folder`)."""
    from dataset_builders.scannetpp import load_scannetpp
    from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_scene, image_ids, scene_id_for_seed

    scene_id = scene_id_for_seed(0)
    config = SyntheticSceneConfig(num_views=num_views, width=width, height=height, test_every=0)
    # generate_dataset has no workers option: render the views in parallel with generate_scene and write the
    # split file that generate_dataset would (every view, "<scene_id>_<image_id>").
    scene = generate_scene(folder, scene_id, config, workers=min(16, os.cpu_count() or 1))
    # ScanNet++ frames have an image and an anonymisation mask only: drop the synthetic depth and label ground
    # truth, which the builder would add as two more PNG columns that `datasets` decodes with every row.
    for extra in ("depth", "labels"):
        shutil.rmtree(scene / extra)
    (folder / "metadata").mkdir()
    samples = "".join(f"{scene_id}_{name}\n" for name in image_ids(num_views))
    (folder / "metadata" / "train_samples.txt").write_text(samples)
    return load_scannetpp(folder, config_name="frames", split="train", cache_dir=folder / "hf_cache")


def loading_frames_per_s(frames, workers: int, batch: int, min_frames: int) -> tuple[float, int]:
    """Steady-state frames/s of the trainer's dataloader (JPEG image + PNG mask, depth and label decode of
    the `datasets` rows, collation) with `workers` processes: the first `workers` batches (worker start-up
    and each worker's first batch) are not timed, then whole rounds of `workers` batches are."""
    from fit3d_hf.finetuning import FinetuningArguments, build_train_dataloader

    skip = max(workers, 1)
    timed = skip * math.ceil(min_frames / (batch * skip))  # whole rounds: workers deliver in lock-step
    rows = np.resize(
        np.arange(len(frames)), (skip + timed) * batch
    )  # the views repeated, as more epochs would
    args = FinetuningArguments(output_dir="unused", train_batch_size=batch, dataloader_num_workers=workers)
    loader = build_train_dataloader(frames.select(rows), args)
    count, start = 0, None
    for index, batch_data in enumerate(loader):
        if index == skip - 1:
            start = time.perf_counter()
        elif index >= skip:
            count += len(batch_data["image"])
    return count / (time.perf_counter() - start), count


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 32], help="frames per process per step")
    parser.add_argument(
        "--lora_rank", type=int, nargs="+", default=[0], help="0: full fine-tuning; R: rank-R LoRA"
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="Gaussians per scene")
    parser.add_argument("--width", type=int, default=876)
    parser.add_argument("--height", type=int, default=584)
    parser.add_argument("--steps", type=int, default=20, help="timed steps for images/s")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--profile_steps", type=int, default=5, help="steps of the time-split pass (0: skip it)"
    )
    parser.add_argument(
        "--backbone", choices=sorted(BACKBONES), default="small", help="'tiny' for a CPU smoke test"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="bf16")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the backbone (as the trainer's --torch_compile)"
    )
    parser.add_argument(
        "--pin", action="store_true", help="pinned CPU batches (as a DataLoader with pin_memory)"
    )
    parser.add_argument(
        "--loader_workers", type=int, nargs="*", default=[4, 8, 16],
        help="worker counts of the data loading measurement (0: in the main process; none: skip it)",
    )  # fmt: skip
    parser.add_argument("--loader_batch", type=int, default=16)
    parser.add_argument(
        "--loader_views", type=int, default=32, help="synthetic views generated (then repeated)"
    )
    parser.add_argument(
        "--loader_frames", type=int, default=512, help="frames timed per worker count (at least)"
    )
    args = parser.parse_args()

    from accelerate import Accelerator

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/finetune.py: no CUDA device; use --device cpu --backbone tiny for a smoke test"
        )
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    device = accelerator.device
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()})"
    work = Path(tempfile.mkdtemp(prefix=f"fit3d_finetune_bench_rank{accelerator.process_index}_"))
    make_bundle(work, args.n, FEATURE_DIM, BACKBONES[args.backbone]["hidden_size"])
    cache = GaussianCache(work, device, 8e9)
    # Each process its own views, as the sharded loader would give it.
    batches = {
        b: batch_of(b, args.width, args.height, first_view=accelerator.process_index * b) for b in args.batch
    }
    if args.pin and device.type == "cuda":
        batches = {
            b: {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            for b, batch in batches.items()
        }

    best_full = None
    for lora_rank in args.lora_rank:
        step = Step(accelerator, args.backbone, lora_rank, args.compile)
        for b, batch in batches.items():
            flips = flip_table(b, 0.5, 0, 0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rate = images_per_s(step, batch, cache, flips, args.warmup, args.steps)
            split = time_split(step, batch, cache, flips, args.profile_steps) if args.profile_steps else None
            gpu = gpu_time(step, batch, cache, flips) if device.type == "cuda" else {}
            if lora_rank == 0:
                best_full = max(best_full or 0.0, rate)
            record = {
                "benchmark": "finetune_step",
                "device": device_name,
                "gpus": accelerator.num_processes if device.type == "cuda" else 0,
                "processes": accelerator.num_processes,
                "backbone": f"dinov2-{args.backbone}-sized (random)",
                "lora_rank": lora_rank,
                "trainable_params": step.num_trainable,
                "frozen_unused": step.frozen_unused,
                "mixed_precision": args.mixed_precision,
                "compiled": args.compile,
                "pinned": args.pin,
                "n": args.n,
                "feature_dim": FEATURE_DIM,
                "width": args.width,
                "height": args.height,
                "batch": b,  # per process
                "images_per_s": round(rate, 1),  # all processes together
                # per image of one process (its own batch), from the synchronised pass
                "ms_per_image": {phase: round(1000 * split[phase] / b, 3) for phase in PHASES}
                if split
                else None,
                "profiled_ms_per_image": round(1000 * sum(split.values()) / b, 3) if split else None,
                "step_ms_per_image": round(
                    1000 * accelerator.num_processes / rate, 3
                ),  # undisturbed, one process
                "gpu_ms_per_image": gpu.get("gpu_ms_per_image"),  # CUDA only
                "top_kernels_ms_per_step": gpu.get("top_kernels_ms_per_step"),
                "peak_mib": round(torch.cuda.max_memory_allocated(device) / 2**20)
                if device.type == "cuda"
                else None,
            }
            if accelerator.is_main_process:
                print(json.dumps(record), flush=True)  # noqa: T201
        del step
        accelerator.free_memory()  # drops the accelerator's references to the prepared model and optimizer

    if args.loader_workers and accelerator.is_main_process:
        frames = make_frames(work / "frames", args.width, args.height, args.loader_views)
        for w in args.loader_workers:
            rate, count = loading_frames_per_s(frames, w, args.loader_batch, args.loader_frames)
            record = {
                "benchmark": "finetune_data_loading",
                "device": device_name,
                "cpus": os.cpu_count(),
                "workers": w,
                "batch": args.loader_batch,
                "width": args.width,
                "height": args.height,
                "frames_timed": count,
                "frames_per_s": round(rate, 1),
                # the best full fine-tuning images/s of this run, for comparison (keeps_up: per process)
                "step_images_per_s": round(best_full, 1) if best_full else None,
                "keeps_up": bool(best_full and rate >= best_full / accelerator.num_processes),
            }
            print(json.dumps(record), flush=True)  # noqa: T201
    accelerator.wait_for_everyone()
    accelerator.end_training()
    shutil.rmtree(work, ignore_errors=True)  # the bundle (about 250 MB at 1M Gaussians) and the frames


if __name__ == "__main__":
    main()
