"""`fit3d push`: upload a saved FiT3DModel folder to the Hub in one commit, writing its model card if missing.

The token comes from `hf auth login` or the `HF_TOKEN` environment variable (never a command-line flag, where
other users of the machine could read it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

DESCRIPTION = "Upload a saved FiT3DModel folder to the Hugging Face Hub (writes its model card if missing)"


@dataclass
class PushArguments:
    model_dir: str = field(
        metadata={"help": "Folder written by FiT3DModel.save_pretrained (or fit3d convert-original)."}
    )
    repo_id: str = field(
        metadata={"help": "Target Hub model repo, 'user/name'; created if it does not exist."}
    )
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    commit_message: str = field(
        default="Upload FiT3D model with fit3d-hf", metadata={"help": "Commit message."}
    )
    metrics_file: str | None = field(
        default=None,
        metadata={
            "help": "JSON file of evaluation results for a new card: a list of {task, dataset, metric, "
            "original, fit3d} rows or a {name: value} mapping."
        },
    )


def main(argv: list[str]) -> int:
    from fit3d_hf.cli import parse_args
    from fit3d_hf.errors import InputError, MissingInputError
    from fit3d_hf.hub import model_card_for_checkpoint, push_to_hub, save_model_card, write_image_processor

    (args,) = parse_args("fit3d push", DESCRIPTION, [PushArguments], argv)
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise MissingInputError(f"--model_dir {model_dir} is not a folder")
    if not (model_dir / "README.md").is_file():
        metrics = None
        if args.metrics_file:
            path = Path(args.metrics_file)
            if not path.is_file():
                raise MissingInputError(f"--metrics_file {path} does not exist")
            try:
                metrics = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise InputError(f"--metrics_file {path} is not valid JSON: {error}") from error
        card = model_card_for_checkpoint(model_dir, repo_id=args.repo_id, metrics=metrics)
        save_model_card(card, model_dir)
        sys.stdout.write(f"wrote the model card {model_dir / 'README.md'}\n")
    if not (model_dir / "preprocessor_config.json").is_file() and (model_dir / "config.json").is_file():
        write_image_processor(model_dir)
        sys.stdout.write(f"wrote the image processor {model_dir / 'preprocessor_config.json'}\n")
    commit = push_to_hub(model_dir, args.repo_id, private=args.private, commit_message=args.commit_message)
    sys.stdout.write(
        json.dumps({"repo_id": args.repo_id, "commit_url": str(getattr(commit, "commit_url", commit))}) + "\n"
    )
    return 0


__all__ = ["DESCRIPTION", "PushArguments", "main"]
