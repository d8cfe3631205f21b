"""Stage I benchmark: one synthetic 876x584 scene with ~300 views lifted for 30k iterations with a
DINOv2-small-sized random backbone (feature dim 64). Prints one JSON line (minutes per scene, bundle
bytes per Gaussian, held-out PSNR of the bundle as saved, i.e. with compressed SH, and before compression).

    python benchmarks/lift.py --views 300 --iterations 30000 --workers 16
    python benchmarks/lift.py --views 300 --iterations 30000 --workers 16 --points_per_sample 5   # ~1M Gaussians

`--points_per_sample K` replaces each sparse point by K copies jittered by `--jitter` metres: a scene that starts
from ~1M Gaussians (ScanNet++'s size) without the generator casting visibility rays for 1M points (its cost grows
with points x views: hours for 1M points and 300 views, ~3 min for 200k on 16 processes).

A scene generated here ahead of a device call travels with it instead (`--base_scene`; `device_all.sh`:
`LIFT_SCENE=.liftscene/bench00000`, carried as `.liftscene`): what the run reads, with points3D.txt cut to
its first eight columns (the tracks make it 124 MB; 44 MB in all without them):

    python benchmarks/lift.py --views 300 --workers 2 --work_dir /tmp/liftbench --generate_only  # ~9 min, 2 cores
    REPO=$PWD; mkdir -p .liftscene/bench00000 && cd /tmp/liftbench/data/scenes/bench00000  # from the repository
    cp -r images masks transforms_train.json $REPO/.liftscene/bench00000/
    awk '/^#/ {print; next} {print $1,$2,$3,$4,$5,$6,$7,$8}' points3D.txt > $REPO/.liftscene/bench00000/points3D.txt
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

from fit3d_hf.cli import show_status_lines
from fit3d_hf.lifting import LiftingArguments, lift_scene
from fit3d_hf.scene.colmap_text import read_colmap_points
from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_scene


def dinov2_small_config() -> Dinov2Config:
    """DINOv2-S/14's sizes (the Stage I benchmarks' backbone, with random weights)."""
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=14,
        image_size=518,
    )


def replicate_points(path: Path, copies: int, jitter: float, seed: int = 0) -> None:
    """Rewrites a COLMAP points3D.txt with `copies` points per point, offset by Gaussian noise of std `jitter`
    (tracks dropped: Stage I reads positions and colours only)."""
    xyz, rgb = read_colmap_points(path)
    rng = np.random.default_rng(seed)
    xyz = np.repeat(xyz, copies, axis=0) + rng.normal(scale=jitter, size=(len(xyz) * copies, 3))
    rgb = np.repeat(rgb, copies, axis=0)
    rows = [
        f"{i + 1} {x:.9g} {y:.9g} {z:.9g} {r} {g} {b} 0\n"
        for i, ((x, y, z), (r, g, b)) in enumerate(zip(xyz, rgb, strict=True))
    ]
    path.write_text("# 3D point list: POINT3D_ID, X, Y, Z, R, G, B, ERROR\n" + "".join(rows))


def add_scene_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the benchmark scene (its size, its Gaussians' start, where it is generated or copied
    from), shared with lift_node.py."""
    parser.add_argument("--views", type=int, default=300)
    parser.add_argument("--width", type=int, default=876)
    parser.add_argument("--height", type=int, default=584)
    parser.add_argument(
        "--num_points", type=int, default=200_000, help="sparse points the Gaussians start from"
    )
    parser.add_argument(
        "--points_per_sample",
        type=int,
        default=1,
        help="copies of each sparse point (jittered) the Gaussians start from",
    )
    parser.add_argument("--jitter", type=float, default=0.005, help="std of the copies' offsets, metres")
    parser.add_argument("--workers", type=int, default=8, help="processes generating the synthetic views")
    parser.add_argument("--work_dir", default=None, help="reused where it holds this scene already")
    parser.add_argument(
        "--base_scene",
        default=None,
        help="a scene folder this script generated earlier with --points_per_sample 1 and the same size options, "
        "copied instead of generated (generating takes ~3 min on 16 processes)",
    )


def prepare_scene(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Path, Path, float]:
    """Writes the benchmark scene (generated, or copied from --base_scene, then its points replicated) into the
    work folder, or finds it there; returns (work folder, scene folder, seconds taken)."""
    if args.base_scene:
        # the recipe marker below vouches for the scene: one of another size would be timed as this one
        images = Path(args.base_scene) / "images"
        views = len(list(images.iterdir())) if images.is_dir() else 0
        if views != args.views:
            parser.error(
                f"--base_scene {args.base_scene}: {views} images in images/, --views is {args.views}"
            )

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fit3d-lift-bench-"))
    start = time.perf_counter()
    config = SyntheticSceneConfig(
        seed=0, num_views=args.views, width=args.width, height=args.height, num_points=args.num_points
    )
    # a --work_dir that holds this scene already (a marker written once it is whole) is reused: generating a
    # 300-view scene takes minutes, a device call at most ten
    recipe = json.dumps([repr(config), args.points_per_sample, args.jitter])
    marker = work / "scene_recipe.json"
    scene_dir = work / "data" / "scenes" / "bench00000"
    if not (marker.is_file() and marker.read_text() == recipe and scene_dir.is_dir()):
        marker.unlink(missing_ok=True)
        if args.base_scene:
            shutil.rmtree(scene_dir, ignore_errors=True)
            shutil.copytree(args.base_scene, scene_dir)
        else:
            scene_dir = generate_scene(work / "data", "bench00000", config, workers=args.workers)
        if args.points_per_sample > 1:
            replicate_points(scene_dir / "points3D.txt", args.points_per_sample, args.jitter)
        marker.write_text(recipe)
    return work, scene_dir, time.perf_counter() - start


def save_random_backbone(path: Path) -> Path:
    """A DINOv2-small-sized backbone with random weights (no Hub here), saved for `LiftingArguments.backbone`."""
    torch.manual_seed(0)
    Dinov2Model(dinov2_small_config()).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_scene_arguments(parser)
    parser.add_argument("--iterations", type=int, default=30_000)
    parser.add_argument("--feature_dim", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--generate_only", action="store_true", help="write the scene to --work_dir and stop")
    parser.add_argument(
        "--mixed_precision", default="bf16", choices=("no", "bf16"), help="decoder + feature loss precision"
    )
    lift_default = LiftingArguments.checkpoint_interval  # the dataclass field's default
    parser.add_argument(
        "--checkpoint_interval",
        type=int,
        default=lift_default,
        help=f"Stage I checkpoints every N iterations (default: {lift_default}, as `fit3d lift`; 0: none, the "
        "setting of the figures before session 15)",
    )
    args = parser.parse_args()
    show_status_lines()  # the lift's INFO lines (phases, where the scene data's time goes) in the log, as `fit3d lift`
    work, scene_dir, generation_s = prepare_scene(parser, args)
    if args.generate_only:
        record = {"benchmark": "lift", "scene": str(scene_dir), "scene_generation_s": round(generation_s, 1)}
        print(json.dumps(record))  # noqa: T201
        return

    backbone = save_random_backbone(work / "backbone")
    lift_args = LiftingArguments(
        backbone=str(backbone), out=str(work / "lifted"), feature_dim=args.feature_dim, iterations=args.iterations,
        holdout_every=8, checkpoint_interval=args.checkpoint_interval, previews=False, device=args.device, mixed_precision=args.mixed_precision,
    )  # fmt: skip
    metrics = lift_scene(scene_dir, lift_args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    record = {
        "benchmark": "lift",
        "device": device,
        "views": args.views,
        "points_per_sample": args.points_per_sample,
        "image_size": [args.width, args.height],
        "iterations": args.iterations,
        "mixed_precision": args.mixed_precision,
        "checkpoint_interval": args.checkpoint_interval,
        "gaussians": metrics["num_gaussians"],
        "gaussians_initial": metrics["num_gaussians_initial"],
        "minutes_per_scene": round(metrics["seconds_total"] / 60, 2),
        "minutes_training": round(metrics["seconds_training"] / 60, 2),
        "ms_per_iteration": round(1000 * metrics["seconds_training"] / args.iterations, 2),
        "seconds_by_phase": metrics["seconds_by_phase"],
        # the whole file (header, decoder weight and SH codebook included) / N: the figure against FiT3D's 492 B
        "bundle_bytes_per_gaussian": round(metrics["bundle_bytes"] / metrics["num_gaussians"], 1),
        # without the per-scene decoder weight (384 x 64 x 3 x 3 fp16 = 0.44 MB), which small scenes can't amortise
        "gaussian_bytes_per_gaussian": round(
            (metrics["bundle_bytes"] - metrics["backbone_dim"] * args.feature_dim * 9 * 2)
            / metrics["num_gaussians"],
            1,
        ),
        "original_bytes_per_gaussian": 492,
        "psnr_train": round(metrics["psnr_train"], 2),
        "psnr_heldout": round(metrics["psnr_heldout"], 2),
        "psnr_heldout_uncompressed": round(metrics["psnr_heldout_uncompressed"], 2),
        "feature_l1_start": round(metrics["feature_l1_train_start"], 4),
        "feature_l1_end": round(metrics["feature_l1_train"], 4),
        "scene_generation_s": round(generation_s, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20)
        if torch.cuda.is_available()
        else None,
    }
    print(json.dumps(record), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
