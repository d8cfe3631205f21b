"""`fit3d convert-original`: the original FiT3D release's timm weights -> a FiT3DModel checkpoint.

The release (`<name>_finetuned.pth`) holds plain timm `state_dict`s of the fine-tuned backbones. DINOv2
backbones convert onto native transformers models (`Dinov2Model`, `Dinov2WithRegistersModel`); every backbone
can also go through `TimmWrapperModel` (`--via timm`, needs the `timm` extra).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fit3d_hf.errors import CorruptFileError, InputError, MissingInputError, UsageError

DESCRIPTION = "Convert the original FiT3D release's timm weights (<name>_finetuned.pth) into a FiT3DModel"

logger = logging.getLogger(__name__)

_VIAS = ("transformers", "timm")


@dataclass(
    kw_only=True
)  # lets --backbone/--weights be optional (--from_hub) before the required --output_dir
class ConvertArguments:
    backbone: str | None = field(
        default=None,
        metadata={
            "help": "The release's backbone name: dinov2_small, dinov2_base, dinov2_reg_small, clip_base, "
            "mae_base or deit3_base (with --weights)."
        },
    )
    weights: str | None = field(
        default=None,
        metadata={
            "help": "The release's fine-tuned weights, e.g. dinov2_small_finetuned.pth (a timm state dict; "
            "read with torch.load(weights_only=True)) or a .safetensors file."
        },
    )
    output_dir: str = field(
        metadata={
            "help": "Folder to write the FiT3DModel checkpoint (config.json, model.safetensors, README.md)."
        }
    )
    original: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of the original (not fine-tuned) backbone. Default: the Hub id "
            "for --backbone (facebook/dinov2-small, ...; the timm id with --via timm)."
        },
    )
    via: Literal["transformers", "timm"] = field(
        default="transformers",
        metadata={
            "help": "'transformers': map the timm keys onto a native Dinov2/Dinov2WithRegisters model "
            "(DINOv2 backbones). 'timm': load them into a TimmWrapperModel (any backbone; needs pip install "
            "fit3d-hf[timm])."
        },
    )
    pos_embed_interpolation: Literal["timm", "native"] = field(
        default="timm",
        metadata={
            "help": "How the converted model resamples position embeddings to non-native grids: 'timm' (bicubic with "
            "antialiasing, as the original's timm backbones: reproduces its features) or 'native' (transformers')."
        },
    )
    repo_id: str | None = field(
        default=None, metadata={"help": "Hub repo the checkpoint is meant for; named in its model card."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace output_dir if it already holds files."})
    from_hub: str | None = field(
        default=None,
        metadata={
            "help": "Instead of --backbone and --weights: download <name>_finetuned.pth of the original release "
            "(yuanwenyue/FiT3D on the Hub; the Hub cache is reused) for this backbone name, e.g. dinov2_small.",
        },
    )

    def __post_init__(self) -> None:
        if self.from_hub is not None:
            if self.weights is not None or (self.backbone is not None and self.backbone != self.from_hub):
                raise UsageError(
                    "--from_hub names the backbone and its weights: leave out --backbone and --weights"
                )
            self.backbone = self.from_hub
        elif self.backbone is None or self.weights is None:
            raise UsageError(
                "pass --backbone and --weights, or --from_hub <name> to download the release's weights"
            )


def load_timm_state_dict(path: str | os.PathLike):
    """Reads a timm state dict from a `.pth` (weights only, no pickled code) or `.safetensors` file.

    Training checkpoints of the form `{"model": state_dict, ...}` are unwrapped, and DDP's `module.` prefix is
    dropped.

    Args:
        path: The weights file.

    Returns:
        `dict[str, torch.Tensor]`.
    """
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        state_dict = load_file(str(path))
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            raise CorruptFileError(
                f"{path} cannot be read as a weights-only torch file ({error}). If it is a training "
                "checkpoint holding more than tensors, save its 'model' state dict on its own first."
            ) from error
    if isinstance(state_dict, dict):
        for key in ("model", "state_dict"):
            if isinstance(state_dict.get(key), dict):
                state_dict = state_dict[key]
                break
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise InputError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict


def convert_original_weights(
    backbone: str,
    weights: str | os.PathLike,
    *,
    original: str | os.PathLike | None = None,
    via: str = "transformers",
    pos_embed_interpolation: str = "timm",
):
    """Builds a FiT3DModel from the original backbone and the release's fine-tuned timm weights.

    Args:
        backbone: The release's backbone name (`dinov2_small`, ...) or, with `original`, any label.
        weights: The fine-tuned timm state dict file.
        original: Hub id or local folder of the original backbone; defaults to the one for `backbone`.
        via: `"transformers"` (native Dinov2 models) or `"timm"` (`TimmWrapperModel`).
        pos_embed_interpolation: `"timm"` (the original's features) or `"native"` (see `FiT3DConfig`).

    Returns:
        `(model, changed)`: the `FiT3DModel` and how many fine-tuned tensors differ from the original's.
    """
    import torch

    from fit3d_hf.backbones import (
        BACKBONE_SHORT_NAMES,
        ORIGINAL_TIMM_IDS,
        convert_timm_dinov2_state_dict,
        load_backbone,
    )
    from fit3d_hf.modeling_fit3d import FiT3DModel

    if via not in _VIAS:
        raise UsageError(f"--via must be one of {_VIAS}, got {via!r}")
    known = ORIGINAL_TIMM_IDS if via == "timm" else BACKBONE_SHORT_NAMES
    if original is None and backbone not in known:
        raise UsageError(
            f"--backbone {backbone!r} is not a backbone of the original release: expected one of "
            f"{sorted(known)}, or pass --original"
        )
    source = str(original) if original is not None else known[backbone]
    state_dict = load_timm_state_dict(weights)

    original_model = load_backbone(source).eval()
    finetuned = copy.deepcopy(original_model)
    model_type = original_model.config.model_type
    if via == "transformers":
        if model_type not in ("dinov2", "dinov2_with_registers"):
            raise UsageError(
                f"{source} is a {model_type!r} model; timm weights map onto native transformers models only "
                "for DINOv2 backbones. Use --via timm (pip install fit3d-hf[timm]) for this backbone."
            )
        finetuned.load_state_dict(convert_timm_dinov2_state_dict(state_dict, original_model))
    else:
        if model_type != "timm_wrapper":
            raise UsageError(
                f"--via timm needs a timm model as the original backbone, but {source} is {model_type!r}"
            )
        try:
            finetuned.timm_model.load_state_dict(state_dict)
        except RuntimeError as error:
            raise InputError(f"{weights} does not fit the timm model {source}: {error}") from error

    reference = original_model.state_dict()
    changed = sum(not torch.equal(value, reference[key]) for key, value in finetuned.state_dict().items())
    if changed == 0:
        logger.warning(
            "the weights in %s equal the original backbone's: is this the fine-tuned file?", weights
        )
    hub_id = known.get(backbone) or source
    model = FiT3DModel.from_backbones(
        original_model, finetuned, backbone=hub_id, pos_embed_interpolation=pos_embed_interpolation
    )
    return model, changed


def save_checkpoint_atomically(
    model, output_dir: str | os.PathLike, *, card=None, overwrite: bool = False
) -> Path:
    """`save_pretrained` into a temporary folder beside `output_dir`, then rename it into place."""
    from fit3d_hf.hub import save_model_card
    from fit3d_hf.utils import atomic_folder

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise UsageError(f"--output_dir {output_dir} already holds files; pass --overwrite to replace them")
    with atomic_folder(output_dir) as staging:  # the umask's permissions, unlike mkdtemp
        model.save_pretrained(staging)
        if card is not None:
            save_model_card(card, staging)
    return output_dir


def main(argv: list[str]) -> int:
    from fit3d_hf.cli import parse_args
    from fit3d_hf.hub import make_model_card

    (args,) = parse_args("fit3d convert-original", DESCRIPTION, [ConvertArguments], argv)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        raise UsageError(f"--output_dir {output_dir} already holds files; pass --overwrite to replace them")
    weights = args.weights if args.from_hub is None else _release_weights(args.from_hub)
    model, changed = convert_original_weights(
        args.backbone,
        weights,
        original=args.original,
        via=args.via,
        pos_embed_interpolation=args.pos_embed_interpolation,
    )
    card = make_model_card(
        model.config.backbone,
        repo_id=args.repo_id,
        feature_dim=model.config.feature_dim,
        training_data="ScanNet++ (converted from the original FiT3D release's weights)",
    )
    save_checkpoint_atomically(model, output_dir, card=card, overwrite=args.overwrite)
    summary = {
        "output_dir": str(output_dir),
        "backbone": model.config.backbone,
        "architecture": type(model.original).__name__,
        "feature_dim": model.config.feature_dim,
        "pos_embed_interpolation": model.config.pos_embed_interpolation,
        "changed_tensors": changed,
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _release_weights(name: str) -> str:
    from fit3d_hf.release import download_release_weights

    return str(download_release_weights(name))


__all__ = [
    "DESCRIPTION",
    "ConvertArguments",
    "convert_original_weights",
    "load_timm_state_dict",
    "main",
    "save_checkpoint_atomically",
]
