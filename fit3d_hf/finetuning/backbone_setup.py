"""The backbone made ready to train: LoRA adapters (`--lora_rank`), weights that get no gradient frozen, its
optimizer, its forward compiled (`--torch_compile`), and the position-embedding resampling it ends with (recorded in
metrics.json)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import UsageError

if TYPE_CHECKING:
    from .arguments import BackboneArguments

__all__ = [
    "compile_backbone",
    "extractor_interpolation",
    "freeze_unused_parameters",
    "lora_wrap",
    "make_optimizer",
    "uncompile_backbone",
]


def extractor_interpolation(extractor) -> str:
    """The position-embedding resampling of a (possibly LoRA-wrapped) extractor's backbone."""
    backbone = extractor.model
    backbone = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    from ..modeling_fit3d import pos_embed_interpolation_of

    return pos_embed_interpolation_of(backbone)


def freeze_unused_parameters(extractor) -> list[str]:
    """Freezes the trainable weights that get no gradient from the dense features and returns their names.

    Some backbones hold weights the patch features never use (DINOv2's `mask_token`, used only with
    `bool_masked_pos`; poolers). Under DDP a trainable weight without a gradient stops training at the second
    step. Freezing them changes nothing else (AdamW skips weights without a gradient) and, unlike DDP's
    `find_unused_parameters=True`, costs nothing per step: one forward/backward of a zero image, in eval
    mode so that no dropout draws from the random generator.
    """
    was_training = extractor.training
    extractor.eval()
    side = 2 * extractor.patch_size
    device = next(extractor.parameters()).device
    extractor(torch.zeros(1, 3, side, side, device=device)).float().sum().backward()
    unused = [name for name, p in extractor.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in extractor.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    extractor.train(was_training)
    return unused


def make_optimizer(
    parameters, learning_rate: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over the trainable weights, torch's fused implementation where they train on CUDA (`device`: where
    `accelerator.prepare` puts them).

    Fused AdamW updates every weight in one kernel per dtype; the default (foreach) implementation took 0.28 ms
    per image of the DINOv2-S step at batch 32 on an H100 (benchmarks/finetune.py, 2026-12-06). Both compute the
    same update up to float rounding."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay, fused=fused)


def lora_wrap(extractor, model_args: BackboneArguments):
    """Replaces the extractor's backbone by a peft LoRA model (only the adapters train)."""
    from peft import LoraConfig, get_peft_model

    if model_args.lora_target_modules == "all-linear":
        targets = "all-linear"  # peft's own choice: every linear layer of the backbone
    else:
        present = {
            name.rsplit(".", 1)[-1]
            for name, module in extractor.model.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
        unknown = [t for t in targets if t not in present]
        if unknown or not targets:
            raise UsageError(
                f"--lora_target_modules {unknown or targets} are not linear layers of the backbone; it has {sorted(present)}"
            )
    config = LoraConfig(
        r=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha or model_args.lora_rank,
        target_modules=targets,
        lora_dropout=0.0,
    )
    extractor.model = get_peft_model(extractor.model, config)
    return extractor


def compile_backbone(
    model: torch.nn.Module, backend: str = "inductor", mode: str | None = None
) -> torch.nn.Module:
    """Compiles `model`'s forward in place (`nn.Module.compile`) and returns it: the module the training step
    calls, as `accelerator.prepare` returned it (DDP-wrapped when distributed, where dynamo splits the graph at
    the gradient buckets). The trainer (`--torch_compile`) and `benchmarks/finetune.py --compile` both call it.

    Unlike `torch.compile(model)`, which wraps the model in an `OptimizedModule` whose `state_dict` keys gain an
    `_orig_mod.` prefix, the module stays what it was: checkpoints, `unwrap_model` and `save_pretrained` see the
    same names as without compiling."""
    model.compile(backend=backend, mode=mode)
    return model


def uncompile_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes `compile_backbone`: calls run the eager forward again (what `nn.Module.compile` set, cleared)."""
    model._compiled_call_impl = None
    return model
