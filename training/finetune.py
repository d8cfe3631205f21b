"""Stage II: `accelerate launch training/finetune.py --backbone ID --frames DATA --gaussians DIR --output_dir DIR`.

Fine-tunes a backbone against features rendered from Stage I's Gaussians (see fit3d_hf/finetuning/ for
the method and every option; `--help` lists them). Options can also come from one JSON or YAML file:
`accelerate launch training/finetune.py config.yaml`.
"""

import sys

from accelerate import PartialState

from fit3d_hf.cli import parse_args, run_command
from fit3d_hf.finetuning import BackboneArguments, DataArguments, FinetuningArguments, train


def main(argv: list[str]) -> None:
    model_args, data_args, training_args = parse_args(
        "finetune.py", __doc__, [BackboneArguments, DataArguments, FinetuningArguments], argv
    )
    metrics = train(model_args, data_args, training_args)
    if PartialState().is_main_process:  # one line, not one per process
        print({key: value for key, value in metrics.items() if not isinstance(value, dict)})  # noqa: T201


if __name__ == "__main__":
    sys.exit(run_command("finetune.py", main, sys.argv[1:]))
