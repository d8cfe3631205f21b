"""Stage II: `accelerate launch training/finetune.py --backbone ID --frames DATA --gaussians DIR --output_dir DIR`.

Fine-tunes a backbone against features rendered from Stage I's Gaussians (see fit3d_hf/finetuning.py for
the method and every option; `--help` lists them). Options can also come from one JSON or YAML file:
`accelerate launch training/finetune.py config.yaml`.
"""

import sys

from transformers import HfArgumentParser

from fit3d_hf.finetuning import DataArguments, FinetuningArguments, ModelArguments, train


def main() -> None:
    parser = HfArgumentParser([ModelArguments, DataArguments, FinetuningArguments])
    if len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml", ".yml")):
        read = parser.parse_json_file if sys.argv[1].endswith(".json") else parser.parse_yaml_file
        model_args, data_args, training_args = read(sys.argv[1])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    metrics = train(model_args, data_args, training_args)
    print({key: value for key, value in metrics.items() if not isinstance(value, dict)})  # noqa: T201


if __name__ == "__main__":
    main()
