"""FiT3D model: the original and the 3D-aware fine-tuned backbone side by side, features concatenated.

Besides `FiT3DModel` this file holds its image processor and input checks. How dense patch features are read
out of each transformers vision backbone lives in `dense_features_fit3d.py` (re-exported here). Both files
travel with saved checkpoints as remote code (`trust_remote_code=True`), so they may import only
`transformers`, `torch` and each other (and `configuration_fit3d`); `fit3d_hf.backbones` builds on them.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils import logging as transformers_logging

from .configuration_fit3d import FiT3DConfig
from .dense_features_fit3d import (
    POS_EMBED_INTERPOLATIONS,
    SUPPORTED_BACKBONE_TYPES,
    backbone_dense_features,
    backbone_hidden_size,
    backbone_num_prefix_tokens,
    backbone_patch_size,
    backbone_spec,
    extract_vision_tower,
    pos_embed_interpolation_of,
    prepare_backbone_config,
    resample_position_table,
    resize_to_patch_multiple,
    set_pos_embed_interpolation,
)

logger = transformers_logging.get_logger(__name__)

# Float input outside this range is almost surely not an image in [0, 1] (0-255 values, or already normalised).
_PIXEL_RANGE_TOLERATED = (-0.5, 1.5)


IMAGE_PROCESSOR_FILENAME = "preprocessor_config.json"


def fit3d_image_processor_dict(config: FiT3DConfig) -> dict:
    """The `preprocessor_config.json` of a FiT3D model: images to RGB, channels first, scaled to [0, 1],
    neither resized nor normalised (the model resizes down to a patch multiple and normalises inside, so
    images of any size work).

    It names transformers' own `ViTImageProcessor`, which any installation loads without remote code; its
    `image_mean`/`image_std` record the statistics the model applies itself (`do_normalize` is off).
    """
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_convert_rgb": True,
        "do_resize": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": False,
        "image_mean": [float(v) for v in config.image_mean],
        "image_std": [float(v) for v in config.image_std],
    }


def fit3d_image_processor(config: FiT3DConfig):
    """The image processor of a FiT3D model (see `fit3d_image_processor_dict`):
    `processor(images=..., return_tensors="pt")` gives the model's `pixel_values`."""
    from transformers import ViTImageProcessor  # imported here: the image-processing stack is slow to import

    settings = fit3d_image_processor_dict(config)
    settings.pop("image_processor_type")
    return ViTImageProcessor(**settings)


def check_pixel_values(pixel_values: torch.Tensor) -> None:
    """Refuses what is not a batch of images in [0, 1], and warns once about floats far outside that range.

    Args:
        pixel_values: `[B, 3, H, W]` images; float, values in [0, 1].
    """
    if not torch.is_tensor(pixel_values):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(
            f"pixel_values must be [B, 3, H, W] images in [0, 1], got shape {tuple(pixel_values.shape)}"
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values are {pixel_values.dtype}, but the model takes float images in [0, 1]: convert them "
            "with `pixel_values.float() / 255` (8-bit) or `/ 65535` (16-bit), or prepare them with the image "
            "processor saved beside the model (AutoImageProcessor.from_pretrained)"
        )
    if pixel_values.numel() and not torch.compiler.is_compiling():
        low, high = (float(v) for v in torch.aminmax(pixel_values.detach()))
        if low < _PIXEL_RANGE_TOLERATED[0] or high > _PIXEL_RANGE_TOLERATED[1]:
            # One fixed message, so that warning_once shows it once per process whatever the values.
            logger.warning_once(
                "pixel_values fall far outside [0, 1], but the model takes images in [0, 1] and normalises them "
                "itself: divide 0-255 values by 255, and do not normalise them beforehand"
            )


@dataclass
class FiT3DModelOutput(ModelOutput):
    r"""
    Output of [`FiT3DModel`]. h = H' / p and w = W' / p, where H' x W' is the input size floored to a multiple
    of the patch size p, and D is the backbone's hidden size.

    Args:
        features (`torch.FloatTensor` of shape `(batch_size, 2 * D, h, w)`):
            The FiT3D features: the original backbone's patch features followed by the fine-tuned backbone's
            (channels `[:D]` original, `[D:]` fine-tuned).
        original_features (`torch.FloatTensor` of shape `(batch_size, D, h, w)`):
            Patch features of the original backbone.
        finetuned_features (`torch.FloatTensor` of shape `(batch_size, D, h, w)`):
            Patch features of the 3D-aware fine-tuned backbone.
        original_cls_token (`torch.FloatTensor` of shape `(batch_size, D)`, *optional*):
            CLS token of the original backbone, returned when `output_cls_token=True`.
        finetuned_cls_token (`torch.FloatTensor` of shape `(batch_size, D)`, *optional*):
            CLS token of the fine-tuned backbone, returned when `output_cls_token=True`.
    """

    features: torch.FloatTensor | None = None
    original_features: torch.FloatTensor | None = None
    finetuned_features: torch.FloatTensor | None = None
    original_cls_token: torch.FloatTensor | None = None
    finetuned_cls_token: torch.FloatTensor | None = None


class FiT3DPreTrainedModel(PreTrainedModel):
    """Holds the metadata shared by FiT3D models and initialises their own (non-backbone) state."""

    config_class = FiT3DConfig
    base_model_prefix = "fit3d"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FiT3DModel):
            # Non-persistent buffers are not in the checkpoint: rebuild them from the config.
            with torch.no_grad():
                module.image_mean.copy_(torch.tensor(self.config.image_mean).view(1, 3, 1, 1))
                module.image_std.copy_(torch.tensor(self.config.image_std).view(1, 3, 1, 1))


# Config entries that differ between an original and a fine-tuned copy without changing the architecture.
_NON_ARCHITECTURE_KEYS = frozenset(
    {
        "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "id2label",
        "label2id", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
        "initializer_range", "hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout",
        "drop_path_rate", "mask_ratio", "output_hidden_states", "output_attentions", "return_dict",
        "pretrained_cfg", "label_names", "num_labels", "problem_type", "use_cache", "pos_embed_interpolation",
    }
)  # fmt: skip


def _architecture_differences(first: PreTrainedModel, second: PreTrainedModel) -> list[str]:
    differences = []
    if type(first) is not type(second):
        differences.append(f"class {type(first).__name__} vs {type(second).__name__}")
    first_config, second_config = first.config.to_dict(), second.config.to_dict()
    for key in sorted(set(first_config) | set(second_config)):
        if key not in _NON_ARCHITECTURE_KEYS and first_config.get(key) != second_config.get(key):
            differences.append(f"config.{key}: {first_config.get(key)!r} vs {second_config.get(key)!r}")
    first_shapes = {k: tuple(v.shape) for k, v in first.state_dict().items()}
    second_shapes = {k: tuple(v.shape) for k, v in second.state_dict().items()}
    if first_shapes != second_shapes:
        mismatched = sorted(
            k for k in set(first_shapes) | set(second_shapes) if first_shapes.get(k) != second_shapes.get(k)
        )
        differences.append(f"weights {mismatched[:5]}{' ...' if len(mismatched) > 5 else ''}")
    return differences


class FiT3DModel(FiT3DPreTrainedModel):
    """Two backbones of one architecture whose patch features are concatenated: the FiT3D features.

    `original` holds the backbone as released, `finetuned` its 3D-aware fine-tuned copy. The forward pass
    takes images in [0, 1] of any size, resizes them (bilinear) down to a multiple of the patch size,
    normalises them with `config.image_mean`/`config.image_std` and runs both backbones.
    """

    def __init__(self, config: FiT3DConfig):
        super().__init__(config)
        backbone_config = prepare_backbone_config(config.backbone_config)
        self.original = AutoModel.from_config(backbone_config)
        self.finetuned = AutoModel.from_config(backbone_config)
        backbone_spec(self.original)  # fail early on an unsupported architecture
        for backbone in (self.original, self.finetuned):
            set_pos_embed_interpolation(backbone, config.pos_embed_interpolation)
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)
        self.post_init()

    @property
    def patch_size(self) -> int:
        """Patch side p of both backbones, in pixels."""
        return backbone_patch_size(self.original)

    def image_processor(self):
        """The image processor of this model (see `fit3d_image_processor`)."""
        return fit3d_image_processor(self.config)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the image processor (`preprocessor_config.json`), so that
        `AutoImageProcessor.from_pretrained` and `pipeline("image-feature-extraction")` work on the folder."""
        if kwargs.get("is_main_process", True):
            os.makedirs(save_directory, exist_ok=True)
            # Written first, so that an upload (push_to_hub=True) includes it.
            with open(
                os.path.join(save_directory, IMAGE_PROCESSOR_FILENAME), "w", encoding="utf-8"
            ) as handle:
                json.dump(fit3d_image_processor_dict(self.config), handle, indent=2)
                handle.write("\n")
        return super().save_pretrained(save_directory, *args, **kwargs)

    @property
    def hidden_size(self) -> int:
        """Channels D of each backbone's features (the FiT3D features have 2D)."""
        return backbone_hidden_size(self.original)

    @property
    def num_prefix_tokens(self) -> int:
        """Non-patch tokens (CLS, registers) each backbone prepends to its patch tokens."""
        return backbone_num_prefix_tokens(self.original)

    @classmethod
    def from_backbones(
        cls,
        original: PreTrainedModel,
        finetuned: PreTrainedModel,
        *,
        backbone: str | None = None,
        normalization: str | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        pos_embed_interpolation: str | None = None,
    ) -> FiT3DModel:
        """Builds a FiT3D model from two loaded backbones of the same architecture (weights are copied).

        Args:
            original: The released backbone, e.g. `Dinov2Model.from_pretrained("facebook/dinov2-small")`, or a
                `DenseFeatureExtractor` around it (its normalisation is then taken over).
            finetuned: Its 3D-aware fine-tuned copy (model or extractor).
            backbone: Hub id of the original backbone, recorded in the config; defaults to the original's
                `name_or_path`.
            normalization: `"imagenet"`, `"processor"` or `"custom"` (see `FiT3DConfig`). Defaults to the
                extractor's when `original` is one, else `"imagenet"`. `"processor"` without `image_mean`/
                `image_std` reads them from the image processor of `backbone`.
            image_mean: Per-channel mean when normalization is not `"imagenet"`.
            image_std: Per-channel std when normalization is not `"imagenet"`.
            pos_embed_interpolation: `"timm"` or `"native"` (see `FiT3DConfig`); defaults to what `original`
                uses (`set_pos_embed_interpolation`).

        Returns:
            A `FiT3DModel` in eval mode on the CPU, holding copies of both backbones' weights.
        """
        extractor_stats = _extractor_normalization(original)
        original = _as_backbone(original, "original")
        finetuned = _as_backbone(finetuned, "finetuned")
        if pos_embed_interpolation is None:
            pos_embed_interpolation = pos_embed_interpolation_of(original)
        differences = _architecture_differences(original, finetuned)
        if differences:
            raise ValueError(
                "original and finetuned backbones must share one architecture; they differ in: "
                + "; ".join(differences)
            )
        backbone = backbone or original.config.name_or_path or None
        if normalization is None:
            normalization = extractor_stats[0] if extractor_stats else "imagenet"
        if normalization != "imagenet" and (image_mean is None or image_std is None):
            if extractor_stats and extractor_stats[0] == normalization:
                image_mean, image_std = extractor_stats[1], extractor_stats[2]
            elif normalization == "processor":
                image_mean, image_std = processor_mean_std(backbone)
        config = FiT3DConfig(
            backbone_config=copy.deepcopy(original.config),
            backbone=backbone,
            normalization=normalization,
            image_mean=image_mean,
            image_std=image_std,
            feature_dim=2 * backbone_hidden_size(original),
            pos_embed_interpolation=pos_embed_interpolation,
        )
        model = cls(config)
        model.original.load_state_dict(original.state_dict())
        model.finetuned.load_state_dict(finetuned.state_dict())
        return model.eval()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_cls_token: bool = False,
        final_norm: bool = True,
        return_dict: bool | None = None,
        **kwargs,
    ) -> FiT3DModelOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
                Images with values in [0, 1], any size of at least one patch. They are resized (bilinear) down
                to a multiple of the patch size and normalised inside the model.
            output_cls_token (`bool`, *optional*, defaults to `False`):
                Also return both backbones' CLS tokens.
            final_norm (`bool`, *optional*, defaults to `True`):
                Take the tokens after the backbones' final norm (the FiT3D features) or before it (the input
                of FiT3D's depth probe).
            return_dict (`bool`, *optional*):
                Return a [`FiT3DModelOutput`] instead of a plain tuple.

        Returns:
            [`FiT3DModelOutput`] or `tuple(torch.FloatTensor)`.
        """
        if kwargs:
            raise TypeError(f"FiT3DModel.forward got unexpected arguments: {sorted(kwargs)}")
        check_pixel_values(pixel_values)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        pixel_values = resize_to_patch_multiple(pixel_values, self.patch_size)
        pixel_values = (pixel_values - self.image_mean) / self.image_std
        pixel_values = pixel_values.to(self.dtype)
        # The two backbones run back to back with no host sync in between: their kernels queue without gaps.
        original, original_cls = backbone_dense_features(
            self.original, pixel_values, final_norm=final_norm, return_cls=output_cls_token
        )
        finetuned, finetuned_cls = backbone_dense_features(
            self.finetuned, pixel_values, final_norm=final_norm, return_cls=output_cls_token
        )
        output = FiT3DModelOutput(
            features=torch.cat([original, finetuned], dim=1),
            original_features=original,
            finetuned_features=finetuned,
            original_cls_token=original_cls,
            finetuned_cls_token=finetuned_cls,
        )
        return output if return_dict else output.to_tuple()


def _extractor_normalization(model) -> tuple[str, list[float], list[float]] | None:
    # A DenseFeatureExtractor carries its normalisation; a bare backbone does not.
    if isinstance(model, PreTrainedModel) or not hasattr(model, "image_mean"):
        return None
    return (
        getattr(model, "normalization", "custom"),
        [float(v) for v in model.image_mean.flatten()],
        [float(v) for v in model.image_std.flatten()],
    )


def processor_mean_std(name_or_path: str | os.PathLike, **kwargs) -> tuple[list[float], list[float]]:
    """Reads the normalisation statistics of a backbone's own image processor (`preprocessor_config.json`).

    Args:
        name_or_path: Hub id or local folder holding the processor config.
        **kwargs: Passed to `AutoImageProcessor.from_pretrained`.

    Returns:
        `(image_mean, image_std)`, three floats each, for images scaled to [0, 1].
    """
    # Imported here: the image-processing stack costs seconds at import and only this path needs it.
    from transformers import AutoImageProcessor

    if not name_or_path:
        raise ValueError(
            "normalization='processor' needs image_mean/image_std or a backbone id to read them from"
        )
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"normalization='processor' needs an image processor config (preprocessor_config.json) in "
            f"{name_or_path}: {error}"
        ) from error
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:  # timm processors keep them in their data config
        data_config = getattr(processor, "data_config", None) or {}
        mean, std = data_config.get("mean"), data_config.get("std")
    if mean is None or std is None:
        raise ValueError(
            f"the image processor of {name_or_path} ({type(processor).__name__}) has no image_mean/image_std"
        )
    if isinstance(mean, (int, float)):
        mean, std = [mean] * 3, [std] * 3
    return [float(v) for v in mean], [float(v) for v in std]


def _as_backbone(model, name: str) -> PreTrainedModel:
    if not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "model", None), PreTrainedModel):
        model = model.model
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{name} must be a transformers PreTrainedModel, got {type(model).__name__}")
    return extract_vision_tower(model)


__all__ = [
    "FiT3DModel",
    "FiT3DModelOutput",
    "FiT3DPreTrainedModel",
    "SUPPORTED_BACKBONE_TYPES",
    "backbone_dense_features",
    "backbone_hidden_size",
    "backbone_num_prefix_tokens",
    "backbone_patch_size",
    "check_pixel_values",
    "extract_vision_tower",
    "fit3d_image_processor",
    "fit3d_image_processor_dict",
    "POS_EMBED_INTERPOLATIONS",
    "pos_embed_interpolation_of",
    "prepare_backbone_config",
    "processor_mean_std",
    "resample_position_table",
    "resize_to_patch_multiple",
    "set_pos_embed_interpolation",
]
