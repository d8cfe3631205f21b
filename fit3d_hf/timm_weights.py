"""timm DINOv2 weights (as the original FiT3D release saves its fine-tuned backbones) mapped onto transformers'
Dinov2 / Dinov2WithRegisters models, key by key."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from .errors import InputError

__all__ = ["convert_timm_dinov2_state_dict"]

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def convert_timm_dinov2_state_dict(
    timm_state_dict: Mapping[str, torch.Tensor], target: PreTrainedModel
) -> dict[str, torch.Tensor]:
    """Maps a timm DINOv2 ViT state dict (as the original FiT3D release saves it) onto a transformers model.

    timm's fused `blocks.N.attn.qkv` is split into query/key/value, `ls1.gamma` becomes
    `layer_scale1.lambda1`, `norm` the final `layernorm`, `reg_token` the register tokens. timm's register
    variants fold the CLS position embedding into `cls_token` and keep positions for patches only; a zero CLS
    position restores the transformers layout exactly. Keys timm does not have (the mask token) keep the
    target's values.

    Args:
        timm_state_dict: The timm `state_dict()` (`num_classes=0`: no head).
        target: A `Dinov2Model` or `Dinov2WithRegistersModel` of the same size; it is not modified.

    Returns:
        A complete state dict for `target`.
    """
    if target.config.model_type not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(
            f"timm DINOv2 weights convert to Dinov2/Dinov2WithRegisters models, not {type(target).__name__}"
        )
    reference = target.state_dict()
    converted: dict[str, torch.Tensor] = {}
    for key, value in timm_state_dict.items():
        for names, tensor in _transformers_names(key, value, reference, target.config.hidden_size):
            name = _checked_name(names, tensor, key, reference, target)
            converted[name] = tensor

    missing = sorted(set(reference) - set(converted) - {"embeddings.mask_token"})
    if missing:
        raise InputError(
            f"the timm state dict lacks weights for {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    return {**{k: v.clone() for k, v in reference.items() if k not in converted}, **converted}


def _transformers_names(
    key: str, value: torch.Tensor, reference, hidden: int
) -> list[tuple[str | list[str], torch.Tensor]]:
    """The transformers parameters a timm key becomes: `(name or candidate names, tensor)` pairs."""
    match = _BLOCK_KEY.fullmatch(key)
    if key == "cls_token":
        return [("embeddings.cls_token", value)]
    if key == "reg_token":
        return [("embeddings.register_tokens", value)]
    if key == "pos_embed":
        expected = reference["embeddings.position_embeddings"].shape[1]
        if value.shape[1] == expected - 1:  # timm register variants: no CLS position
            value = torch.cat([value.new_zeros(1, 1, value.shape[-1]), value], dim=1)
        return [("embeddings.position_embeddings", value)]
    if key.startswith("patch_embed.proj."):
        return [(key.replace("patch_embed.proj.", "embeddings.patch_embeddings.projection."), value)]
    if key.startswith("norm."):
        return [(key.replace("norm.", "layernorm.", 1), value)]
    if match:
        return _block_names(key, *match.groups(), value, hidden)
    raise InputError(f"unexpected timm key {key!r}: is this a timm DINOv2 ViT state dict?")


def _block_names(
    key: str, index: str, rest: str, value: torch.Tensor, hidden: int
) -> list[tuple[str | list[str], torch.Tensor]]:
    """`_transformers_names` of a key of transformer block `index` (`rest`: the key after `blocks.N.`)."""
    layer = f"encoder.layer.{index}."
    if rest.startswith("attn.qkv."):
        suffix = rest.rsplit(".", 1)[1]
        query, key_, value_ = value.split(hidden, dim=0)
        # Names differ across transformers releases: q_proj/k_proj/v_proj (5.x) or attention.query/...
        return [
            ([f"{layer}attention.{part}_proj.{suffix}", f"{layer}attention.attention.{old}.{suffix}"], tensor)
            for part, tensor, old in (("q", query, "query"), ("k", key_, "key"), ("v", value_, "value"))
        ]
    if rest.startswith("attn.proj."):
        suffix = rest.rsplit(".", 1)[1]
        return [([f"{layer}attention.o_proj.{suffix}", f"{layer}attention.output.dense.{suffix}"], value)]
    if rest in ("ls1.gamma", "ls2.gamma"):
        return [(f"{layer}layer_scale{rest[2]}.lambda1", value)]
    if rest.split(".")[0] in ("norm1", "norm2", "mlp"):
        return [(layer + rest, value)]
    raise InputError(f"unexpected timm key {key!r} (not a DINOv2 ViT block parameter)")


def _checked_name(names: str | list[str], value: torch.Tensor, source: str, reference, target) -> str:
    """The target parameter a converted tensor goes to, refused unless the target has it with that shape."""
    name = _first_present(names, reference) if isinstance(names, list) else names
    if name not in reference:
        raise InputError(f"timm key {source!r} maps to {name!r}, which {type(target).__name__} does not have")
    if tuple(reference[name].shape) != tuple(value.shape):
        raise InputError(
            f"timm key {source!r} has shape {tuple(value.shape)}, but {name!r} in "
            f"{type(target).__name__} has shape {tuple(reference[name].shape)}: is this checkpoint for "
            "another model size?"
        )
    return name


def _first_present(candidates: list[str], keys: Mapping[str, torch.Tensor]) -> str:
    for name in candidates:
        if name in keys:
            return name
    raise InputError(f"the target model has none of the parameters {candidates}")
