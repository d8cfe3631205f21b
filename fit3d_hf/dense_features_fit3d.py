"""Dense patch features out of transformers vision backbones: the small per-architecture knowledge of which
norm is final, how many prefix tokens come before the patches, which forward arguments keep the token grid
intact, and how absolute position embeddings are resampled to the input's patch grid.

Like `modeling_fit3d.py`, which imports it, this file travels with saved FiT3D checkpoints as remote code
(`trust_remote_code=True`), so it may import only `torch` and `transformers`. `fit3d_hf.backbones` builds
loading and normalisation on it.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel

__all__ = [
    "POS_EMBED_INTERPOLATIONS",
    "SUPPORTED_BACKBONE_TYPES",
    "backbone_dense_features",
    "backbone_hidden_size",
    "backbone_num_prefix_tokens",
    "backbone_patch_size",
    "backbone_spec",
    "extract_vision_tower",
    "pos_embed_interpolation_of",
    "prepare_backbone_config",
    "resample_position_table",
    "resize_to_patch_multiple",
    "set_pos_embed_interpolation",
]


def _unwrap(model: nn.Module) -> nn.Module:
    # Some transformers releases keep the CLIP/SigLIP vision layers one level down, in `.vision_model`.
    return getattr(model, "vision_model", model)


def _interpolate_pos_encoding(model, pixel_values, num_patches) -> dict:
    return {"interpolate_pos_encoding": True}


def _mae_identity_order(model, pixel_values, num_patches) -> dict:
    # ViT-MAE shuffles tokens by argsort(noise) even when nothing is masked; ascending noise keeps the
    # identity order, so the output tokens stay on the patch grid.
    noise = torch.arange(num_patches, device=pixel_values.device, dtype=torch.float32)
    return {"noise": noise.expand(pixel_values.shape[0], num_patches), "interpolate_pos_encoding": True}


def _timm_no_pooling(model, pixel_values, num_patches) -> dict:
    return {"do_pooling": False}


def _no_kwargs(model, pixel_values, num_patches) -> dict:
    return {}


@dataclass(frozen=True)
class _BackboneSpec:
    """How to read dense features out of one transformers vision architecture."""

    final_norm: Callable[[nn.Module], nn.Module]  # the norm FiT3D's features are taken after
    num_prefix_tokens: Callable[[nn.Module], int]  # CLS, distillation and register tokens before the patches
    forward_kwargs: Callable[[nn.Module, torch.Tensor, int], dict] = field(default=_no_kwargs)
    output_is_normed: bool = True  # whether `last_hidden_state` already went through `final_norm`
    # Positions before the patch grid in the stored absolute position table (resampled as they are); None: the
    # architecture has no table transformers resamples (RoPE, or timm models, which resample as timm does).
    position_prefix: int | None = None


def _config_patch_size(model: nn.Module) -> int:
    patch_size = model.config.patch_size
    return int(patch_size if isinstance(patch_size, int) else patch_size[0])


_BACKBONE_SPECS: dict[str, _BackboneSpec] = {
    "dinov2": _BackboneSpec(
        final_norm=lambda m: m.layernorm, num_prefix_tokens=lambda m: 1, position_prefix=1
    ),
    "dinov2_with_registers": _BackboneSpec(
        final_norm=lambda m: m.layernorm,
        num_prefix_tokens=lambda m: 1 + m.config.num_register_tokens,
        position_prefix=1,  # the registers have no position
    ),
    "dinov3_vit": _BackboneSpec(
        final_norm=lambda m: m.norm, num_prefix_tokens=lambda m: 1 + m.config.num_register_tokens
    ),
    "vit": _BackboneSpec(
        final_norm=lambda m: m.layernorm,
        num_prefix_tokens=lambda m: 1,
        forward_kwargs=_interpolate_pos_encoding,
        position_prefix=1,
    ),
    # DeiT (distilled) carries a CLS and a distillation token.
    "deit": _BackboneSpec(
        final_norm=lambda m: m.layernorm,
        num_prefix_tokens=lambda m: 2,
        forward_kwargs=_interpolate_pos_encoding,
        position_prefix=2,
    ),
    "vit_mae": _BackboneSpec(
        final_norm=lambda m: m.layernorm,
        num_prefix_tokens=lambda m: 1,
        forward_kwargs=_mae_identity_order,
        position_prefix=1,
    ),
    # CLIP applies its post-layernorm to the pooled CLS token only; timm (and FiT3D) normalise every token.
    "clip_vision_model": _BackboneSpec(
        final_norm=lambda m: _unwrap(m).post_layernorm,
        num_prefix_tokens=lambda m: 1,
        forward_kwargs=_interpolate_pos_encoding,
        output_is_normed=False,
        position_prefix=1,
    ),
    # SigLIP has no CLS token: every output token is a patch.
    "siglip_vision_model": _BackboneSpec(
        final_norm=lambda m: _unwrap(m).post_layernorm,
        num_prefix_tokens=lambda m: 0,
        forward_kwargs=_interpolate_pos_encoding,
        position_prefix=0,
    ),
    "timm_wrapper": _BackboneSpec(
        final_norm=lambda m: m.timm_model.norm,
        num_prefix_tokens=lambda m: int(m.timm_model.num_prefix_tokens),
        forward_kwargs=_timm_no_pooling,
    ),
}

SUPPORTED_BACKBONE_TYPES = tuple(_BACKBONE_SPECS)


def backbone_spec(model: nn.Module) -> _BackboneSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _BACKBONE_SPECS:
        raise ValueError(
            f"Unsupported backbone {type(model).__name__} (model_type={model_type!r}); supported model "
            f"types: {', '.join(SUPPORTED_BACKBONE_TYPES)}. For CLIP/SigLIP pass the vision tower "
            "(CLIPVisionModel)."
        )
    return _BACKBONE_SPECS[model_type]


def prepare_backbone_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """Returns a copy of a backbone config set up to produce dense patch features on any image size.

    ViT-MAE gets `mask_ratio=0.0` (no token is dropped) and timm models get `dynamic_img_size=True`
    (position embeddings resampled to the input's patch grid).

    Args:
        config: The backbone's configuration.

    Returns:
        The adjusted copy (the input is not modified).
    """
    config = copy.deepcopy(config)
    if config.model_type == "vit_mae":
        config.mask_ratio = 0.0
    elif config.model_type == "timm_wrapper":
        config.model_args = {**(config.model_args or {}), "dynamic_img_size": True}
    return config


def extract_vision_tower(model: PreTrainedModel) -> PreTrainedModel:
    """Returns the model itself if it is a supported backbone, else the vision tower of a CLIP/SigLIP model.

    Args:
        model: A supported backbone, or a two-tower model with a `vision_model` and `config.vision_config`.

    Returns:
        A backbone whose `config.model_type` is in `SUPPORTED_BACKBONE_TYPES`.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in _BACKBONE_SPECS:
        return model
    tower = getattr(model, "vision_model", None)
    vision_config = getattr(config, "vision_config", None)
    if tower is None or vision_config is None:
        backbone_spec(model)  # raises the unsupported-backbone error
    if isinstance(tower, PreTrainedModel) and tower.config.model_type in _BACKBONE_SPECS:
        return tower
    # Older transformers keep a bare transformer module here: wrap it in its *VisionModel, sharing weights.
    wrapper = AutoModel.from_config(vision_config)
    wrapper.vision_model = tower
    backbone_spec(wrapper)
    return wrapper


POS_EMBED_INTERPOLATIONS = ("timm", "native")


def resample_position_table(
    table: torch.Tensor, grid: tuple[int, int], stored_grid: tuple[int, int], num_prefix: int
) -> torch.Tensor:
    """timm's `resample_abs_pos_embed`: the patch part of an absolute position table resampled to a new grid.

    Bicubic *with* antialiasing (PyTorch's antialiased bicubic kernel, a = -0.5, also when upsampling), computed
    in float32 from the stored grid; prefix positions (CLS, ...) are kept as they are. Unchanged when the grid
    is square and already has the stored number of positions, as in timm.

    Args:
        table: `[1, num_prefix + h0 * w0, D]` stored position embeddings.
        grid: `(h, w)` patch grid of the input.
        stored_grid: `(h0, w0)` grid the table was trained for.
        num_prefix: positions before the patch grid in `table`.

    Returns:
        `[1, num_prefix + h * w, D]` in the table's dtype.
    """
    height, width = grid
    if height * width + num_prefix == table.shape[1] and height == width:
        return table
    prefix, patches = table[:, :num_prefix], table[:, num_prefix:]
    dim = table.shape[-1]
    patches = patches.float().reshape(1, stored_grid[0], stored_grid[1], dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(height, width), mode="bicubic", antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, height * width, dim).to(table.dtype)
    return torch.cat([prefix, patches], dim=1)


def _position_table(embeddings: nn.Module) -> torch.Tensor:
    # DINOv2, ViT, DeiT, ViT-MAE keep a parameter; CLIP and SigLIP an nn.Embedding.
    table = getattr(embeddings, "position_embeddings", None)
    if isinstance(table, torch.Tensor):
        return table
    return embeddings.position_embedding.weight.unsqueeze(0)


def _timm_interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # Bound to a backbone's embeddings module in place of transformers' `interpolate_pos_encoding`.
    table = _position_table(self)
    num_prefix, patch_size = self._fit3d_position_prefix, self._fit3d_patch_size
    stored = int(round((table.shape[1] - num_prefix) ** 0.5))
    grid = (height // patch_size, width // patch_size)
    return resample_position_table(table, grid, (stored, stored), num_prefix)


def set_pos_embed_interpolation(model: nn.Module, mode: str) -> None:
    """Chooses how a backbone resamples its absolute position embeddings to a non-native patch grid.

    - ``"timm"``: as timm does (`resample_position_table`: bicubic with antialiasing), i.e. as the original
      FiT3D's timm backbones do. At FiT3D's 41 x 62 grid it changes DINOv2's position embeddings by 3-9 %
      against transformers' own resampling.
    - ``"native"``: transformers' own `interpolate_pos_encoding` (bicubic without antialiasing for DINOv2, ViT,
      DeiT, ViT-MAE, CLIP, SigLIP; DINOv2 with registers already antialiases).

    Architectures without a resampled table (DINOv3's RoPE, timm models, which always resample as timm) are
    the same either way. The choice is recorded in `model.config.pos_embed_interpolation`, so that a saved
    backbone keeps it.

    Args:
        model: A supported backbone (see `SUPPORTED_BACKBONE_TYPES`), modified in place.
        mode: ``"timm"`` or ``"native"``.
    """
    if mode not in POS_EMBED_INTERPOLATIONS:
        raise ValueError(f"pos_embed_interpolation must be one of {POS_EMBED_INTERPOLATIONS}, got {mode!r}")
    spec = backbone_spec(model)
    model.config.pos_embed_interpolation = mode
    if spec.position_prefix is None:
        return
    embeddings = _unwrap(model).embeddings
    if mode == "native":
        embeddings.__dict__.pop("interpolate_pos_encoding", None)  # back to the class's method
        return
    embeddings._fit3d_position_prefix = spec.position_prefix
    embeddings._fit3d_patch_size = backbone_patch_size(model)
    embeddings.interpolate_pos_encoding = types.MethodType(_timm_interpolate_pos_encoding, embeddings)


def pos_embed_interpolation_of(model: nn.Module) -> str:
    """The position-embedding resampling a backbone uses now (see `set_pos_embed_interpolation`)."""
    spec = backbone_spec(model)
    if spec.position_prefix is None:  # the same either way: report what was asked for
        return getattr(model.config, "pos_embed_interpolation", "native")
    patched = "interpolate_pos_encoding" in _unwrap(model).embeddings.__dict__
    return "timm" if patched else "native"


def backbone_patch_size(model: nn.Module) -> int:
    """Side of the square patches of a supported backbone, in pixels."""
    if backbone_spec(model) is _BACKBONE_SPECS["timm_wrapper"]:
        patch_size = model.timm_model.patch_embed.patch_size
        return int(patch_size if isinstance(patch_size, int) else patch_size[0])
    return _config_patch_size(model)


def backbone_hidden_size(model: nn.Module) -> int:
    """Channels D of a supported backbone's patch features."""
    if backbone_spec(model) is _BACKBONE_SPECS["timm_wrapper"]:
        return int(model.timm_model.num_features)
    return int(model.config.hidden_size)


def backbone_num_prefix_tokens(model: nn.Module) -> int:
    """Number of non-patch tokens (CLS, distillation, registers) that precede the patch tokens."""
    return backbone_spec(model).num_prefix_tokens(model)


def resize_to_patch_multiple(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Bilinearly resizes images down to the nearest multiple of the patch size, as FiT3D does.

    Args:
        images: `[B, C, H, W]` images.
        patch_size: Patch side p in pixels.

    Returns:
        `[B, C, (H // p) * p, (W // p) * p]` images (the input itself when already a multiple).
    """
    height, width = images.shape[-2:]
    target = ((height // patch_size) * patch_size, (width // patch_size) * patch_size)
    if min(target) == 0:
        raise ValueError(f"images of {height}x{width} pixels are smaller than one {patch_size}-pixel patch")
    if target == (height, width):
        return images
    return F.interpolate(images, size=target, mode="bilinear", align_corners=False)


def backbone_dense_features(
    model: nn.Module,
    pixel_values: torch.Tensor,
    *,
    final_norm: bool = True,
    return_cls: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs a supported backbone and returns its last-layer patch tokens as a feature map.

    Args:
        model: A supported backbone (`SUPPORTED_BACKBONE_TYPES`), e.g. a `Dinov2Model`.
        pixel_values: `[B, 3, H, W]` normalised images; H and W must be multiples of the patch size.
        final_norm: Take the tokens after the backbone's final norm (FiT3D's features) or before it (the
            input of FiT3D's depth probe).
        return_cls: Also return the CLS token (from the same normed or un-normed tokens).

    Returns:
        `(features, cls)`: features `[B, D, H/p, W/p]` with prefix tokens dropped; cls `[B, D]` or None.
    """
    spec = backbone_spec(model)
    if getattr(model.config, "mask_ratio", 0.0) != 0.0:
        raise ValueError(
            f"{type(model).__name__} drops {model.config.mask_ratio:.0%} of the patch tokens; set "
            "config.mask_ratio = 0.0 (see prepare_backbone_config) to get dense features"
        )
    patch_size = backbone_patch_size(model)
    batch, _, height, width = pixel_values.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"pixel_values of {height}x{width} are not multiples of the patch size {patch_size}; "
            "resize them first (resize_to_patch_multiple)"
        )
    grid_h, grid_w = height // patch_size, width // patch_size
    norm = spec.final_norm(model)

    captured: list[torch.Tensor] = []
    hook = None
    if not final_norm and spec.output_is_normed:
        # The un-normed tokens are the final norm's input; a pre-hook reads them without a second forward.
        hook = norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        outputs = model(pixel_values, **spec.forward_kwargs(model, pixel_values, grid_h * grid_w))
    finally:
        if hook is not None:
            hook.remove()
    tokens = outputs.last_hidden_state
    if hook is not None:
        if len(captured) != 1:
            raise RuntimeError(
                f"expected the final norm to run once per forward, it ran {len(captured)} times"
            )
        tokens = captured[0]
    elif final_norm and not spec.output_is_normed:
        tokens = norm(tokens)

    num_prefix = spec.num_prefix_tokens(model)
    if tokens.shape[1] != num_prefix + grid_h * grid_w:
        raise ValueError(
            f"{type(model).__name__} returned {tokens.shape[1]} tokens for a {grid_h}x{grid_w} patch grid; "
            f"expected {num_prefix} prefix + {grid_h * grid_w} patch tokens"
        )
    if return_cls and num_prefix == 0:
        raise ValueError(f"{type(model).__name__} has no CLS token; call it with return_cls=False")
    features = tokens[:, num_prefix:].transpose(1, 2).reshape(batch, tokens.shape[-1], grid_h, grid_w)
    return features, (tokens[:, 0] if return_cls else None)
