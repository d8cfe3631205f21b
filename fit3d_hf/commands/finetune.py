"""`fit3d finetune`: Stage II in the current process (use `accelerate launch training/finetune.py` for
several GPUs; the options are the same)."""

from __future__ import annotations

import json
import sys

__all__ = ["DESCRIPTION", "main"]

DESCRIPTION = "Stage II: fine-tune a backbone against features rendered from Stage I's Gaussians"


def main(argv: list[str]) -> int:
    from fit3d_hf.cli import parse_args
    from fit3d_hf.finetuning import BackboneArguments, DataArguments, FinetuningArguments, train

    model_args, data_args, training_args = parse_args(
        "fit3d finetune", DESCRIPTION, [BackboneArguments, DataArguments, FinetuningArguments], argv
    )
    metrics = train(model_args, data_args, training_args)
    sys.stdout.write(json.dumps(metrics) + "\n")
    return 0
