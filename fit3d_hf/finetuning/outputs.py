"""What a Stage II run leaves: `finetuned/` (the backbone, `AutoModel`-loadable), `fit3d/` (the FiT3DModel and
its model card), `metrics.json`, and their Hub upload (`--push_to_hub`)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["save_outputs"]


def save_outputs(extractor, original, model_args, data_args, args, metrics) -> None:
    from ..hub import make_model_card, push_to_hub
    from ..modeling_fit3d import FiT3DModel

    output_dir = Path(args.output_dir)
    backbone = extractor.model
    if hasattr(backbone, "merge_and_unload"):  # LoRA: fold the adapters in, so loading needs no peft
        backbone = backbone.merge_and_unload()
        extractor.model = backbone
    finetuned_dir, fit3d_dir = output_dir / "finetuned", output_dir / "fit3d"
    backbone.save_pretrained(finetuned_dir)
    model = FiT3DModel.from_backbones(original.model, backbone, normalization=model_args.normalization)
    model.save_pretrained(fit3d_dir)
    card = make_model_card(
        base_model=model_args.backbone,
        datasets=[str(data_args.frames)],
        metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
        training={
            "lora_rank": model_args.lora_rank,
            "learning_rate": metrics.get("learning_rate", args.learning_rate),
            "steps": metrics.get("steps"),
        },
        repo_id=args.hub_model_id,
    )
    card.save(fit3d_dir / "README.md")
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if args.push_to_hub:
        push_to_hub(fit3d_dir, args.hub_model_id, token=args.hub_token)
        push_to_hub(finetuned_dir, f"{args.hub_model_id}-backbone", token=args.hub_token)
