"""Probes on several GPUs: `accelerate launch training/evaluate_probe.py --model DIR --probe segmentation|depth|normals|correspondence
--dataset DATA --output_dir DIR [options]`.

The same options as `fit3d evaluate` (see fit3d_hf/evaluation/arguments.py and data.py; `--help` lists them). The probe heads
train with DDP (SyncBatchNorm on GPUs) and every process evaluates its share of the data; the metrics are gathered
with `gather_for_metrics`. The reference protocol ran 8 GPUs x 2 images for 40000 (segmentation) or 38400 (depth)
iterations: with fewer GPUs, scale --max_steps up linearly. Options can also come from one JSON or YAML file.
On a CPU machine, `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...` runs two processes.
"""

import sys

from fit3d_hf.cli import parse_args, run_command
from fit3d_hf.evaluation.arguments import ModelArguments, ProbeArguments
from fit3d_hf.evaluation.data import ProbeDataArguments
from fit3d_hf.evaluation.probes import run_probe


def main(argv: list[str]) -> None:
    model_args, data_args, probe_args = parse_args(
        "evaluate_probe.py", __doc__, [ModelArguments, ProbeDataArguments, ProbeArguments], argv
    )
    results = run_probe(model_args, data_args, probe_args)
    from accelerate import PartialState

    if PartialState().is_main_process:
        rows = {
            row["name"]: {k: v for k, v in row.items() if isinstance(v, float)} for row in results["rows"]
        }
        print(rows)  # noqa: T201


if __name__ == "__main__":
    sys.exit(run_command("evaluate_probe.py", main, sys.argv[1:]))
