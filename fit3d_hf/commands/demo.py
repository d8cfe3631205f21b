"""`fit3d demo`: the pipeline on generated synthetic scenes (for now: generate them and load them back).

Each step is a small function so that later stages (lifting, fine-tuning, evaluation) slot in as further
steps of `run_demo`.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DESCRIPTION", "DemoArguments", "generate_data", "load_data", "main", "run_demo", "summarize"]

DESCRIPTION = "Run the demo on small generated synthetic ScanNet++-style scenes"

NUM_TRAIN_SCENES = 2
NUM_VAL_SCENES = 1


@dataclass
class DemoArguments:
    output_dir: str = field(
        default="demo_output", metadata={"help": "Folder for the generated data and results."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic scenes (and of everything after)."})


def generate_data(output_dir: Path, seed: int) -> Path:
    """Step 1: writes the synthetic scenes in FiT3D's ScanNet++ layout under `<output_dir>/data`."""
    from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset

    return generate_dataset(
        output_dir / "data",
        num_scenes=NUM_TRAIN_SCENES,
        num_val_scenes=NUM_VAL_SCENES,
        config=SyntheticSceneConfig(seed=seed),
    )


def load_data(data_root: Path, cache_dir: Path) -> dict:
    """Step 2: loads frames and points through the `scannetpp` datasets builder."""
    from dataset_builders.scannetpp import load_scannetpp

    # The data were just (re)generated, so an older cache can only be stale.
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        "frames": load_scannetpp(data_root, "frames", cache_dir=cache_dir),
        "points": load_scannetpp(data_root, "points", cache_dir=cache_dir),
    }


def summarize(data_root: Path, datasets: dict) -> str:
    """A few lines describing what was loaded: scenes, frames per split, image size, points."""
    frames, points = datasets["frames"], datasets["points"]
    lines = [f"synthetic ScanNet++-style data in {data_root}"]
    for split in frames:
        rows = frames[split]
        scene_ids = sorted(set(rows["scene_id"]))
        sizes = sorted(set(zip(rows["width"], rows["height"], strict=True)))
        num_points = sum(len(xyz) for xyz in points[split].with_format("numpy")["xyz"])
        lines.append(
            f"{split}: {len(scene_ids)} scenes ({', '.join(scene_ids)}), {len(rows)} frames "
            f"({sum(rows['is_test'])} test frames), image size {', '.join(f'{w}x{h}' for w, h in sizes)}, "
            f"{num_points} sparse points"
        )
    return "\n".join(lines)


def run_demo(args: DemoArguments) -> str:
    output_dir = Path(args.output_dir)
    data_root = generate_data(output_dir, args.seed)
    datasets = load_data(data_root, output_dir / "hf_cache")
    return summarize(data_root, datasets)


def main(argv: list[str]) -> int:
    from fit3d_hf.cli import parse_args

    (args,) = parse_args("fit3d demo", DESCRIPTION, [DemoArguments], argv)
    sys.stdout.write(run_demo(args) + "\n")
    return 0
