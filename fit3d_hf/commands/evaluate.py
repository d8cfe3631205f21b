"""`fit3d evaluate`: linear probes (segmentation, depth, surface normals) and the correspondence probe, original vs
fine-tuned vs FiT3D on the same data, in the current process (`accelerate launch training/evaluate_probe.py` takes the same
options on several GPUs).

Examples::

    fit3d evaluate --model out/fit3d --probe segmentation --dataset scannetpp:data/synth --output_dir eval/seg \\
        --max_steps 500 --crop_size 112 --train_short_side 120
    fit3d evaluate --model out/fit3d --probe depth --dataset sayakpaul/nyu_depth_v2 --depth_column depth_map \\
        --preset nyuv2 --depth_scale 1 --output_dir eval/nyu-depth
    fit3d evaluate --model out/fit3d --probe correspondence --dataset scannetpp:data/synth --output_dir eval/corr
    fit3d evaluate --model out/fit3d --probe normals --dataset data/synth/scenes --holdout_every 4 --no_augment \
        --max_steps 200 --output_dir eval/normals
    fit3d evaluate --model runs/mine/fit3d --probe correspondence --dataset captures --gaussians gaussians \
        --holdout_every 8 --output_dir eval/mine     # own captures: depth rendered from Stage I's Gaussians

Defaults follow FiT3D's linear-probing protocol (40000 / 38400 iterations at 8 GPUs x 2 images, crops of
512 / 416x544, ...; `--preset nyuv2|ade20k|scannetpp|kitti` adds the data set's own settings: label reduction,
depth range, crops); pass small values (--max_steps, --crop_size, --train_short_side) for a quick run, and
--no_augment to cache the frozen features once (much faster, above all on CPU). Writes results.md,
results.json, PNG plots and the probe heads to --output_dir.
"""

from __future__ import annotations

import json
import sys

__all__ = ["DESCRIPTION", "main"]

DESCRIPTION = "Probe original vs fine-tuned vs FiT3D features: segmentation, depth, surface normals or multi-view correspondence"
_HELP = (
    DESCRIPTION
    + ". --model is a FiT3DModel (rows original, fine-tuned, FiT3D); --baseline a plain backbone (one row). "
    "--dataset is a Hub id, a local folder or Parquet file, scannetpp:<data_dir> for a ScanNet++ root, or scenes as "
    "`fit3d lift` takes them (own captures, folders of scenes, list files; --holdout_every splits them as Stage I "
    "did); map its columns with --image_column/--label_column/--depth_column/--normals_column. Defaults follow "
    "FiT3D's protocol (40000 / 38400 iterations at 8 GPUs x 2 images, crops 512 / 416,544): pass small --max_steps, "
    "--crop_size and --train_short_side for a quick run, and --no_augment to compute the frozen features once and "
    "train on the cache (much faster, above all on CPU). Writes results.md, results.json, PNG plots and the probe "
    "heads to --output_dir. For several GPUs: accelerate launch training/evaluate_probe.py with the same options."
)


def main(argv: list[str]) -> int:
    from fit3d_hf.cli import parse_args
    from fit3d_hf.evaluation.data import ProbeDataArguments
    from fit3d_hf.evaluation.probes import ModelArguments, ProbeArguments, run_probe
    from fit3d_hf.evaluation.report import metric_columns

    model_args, data_args, probe_args = parse_args(
        "fit3d evaluate", _HELP, [ModelArguments, ProbeDataArguments, ProbeArguments], argv
    )
    results = run_probe(model_args, data_args, probe_args)
    keys = [key for key, _, _ in metric_columns(results)]
    summary = {row["name"]: {key: row.get(key) for key in keys} for row in results["rows"]}
    sys.stdout.write(
        json.dumps({"probe": results["probe"], "output_dir": probe_args.output_dir, "rows": summary}) + "\n"
    )
    return 0
