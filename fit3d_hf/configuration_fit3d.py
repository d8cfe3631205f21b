"""FiT3D model configuration: one backbone architecture, used twice (original and 3D-aware fine-tuned).

This file travels with saved checkpoints as remote code (`trust_remote_code=True`), so it imports
nothing from `fit3d_hf`: only `transformers`.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# FiT3D normalises every backbone's input with ImageNet statistics, CLIP included.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_NORMALIZATIONS = ("imagenet", "processor", "custom")
_POS_EMBED_INTERPOLATIONS = ("timm", "native")


def _default_backbone_config() -> PreTrainedConfig:
    # The architecture of facebook/dinov2-small (ViT-S/14 at 518 px), the backbone of most FiT3D results.
    return CONFIG_MAPPING["dinov2"](
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14
    )


def _backbone_config_from_dict(config_dict: dict) -> PreTrainedConfig:
    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"backbone_config has model_type {model_type!r}, which this transformers installation does not "
            "know; expected one of the registered types (e.g. 'dinov2', 'clip_vision_model', "
            "'timm_wrapper')."
        )
    return CONFIG_MAPPING[model_type].from_dict(dict(config_dict))


class FiT3DConfig(PreTrainedConfig):
    r"""
    This is the configuration class to store the configuration of a [`FiT3DModel`]: two vision backbones of
    one architecture, the original one and its 3D-aware fine-tuned copy, whose dense patch features are
    concatenated along the channel dimension (FiT3D, Yue et al., ECCV 2024).

    Configuration objects inherit from [`PreTrainedConfig`] and can be used to control the model outputs. Read
    the documentation from [`PreTrainedConfig`] for more information.

    Args:
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            The configuration of the backbone architecture shared by the original and the fine-tuned backbone
            (for example a `Dinov2Config`, `Dinov2WithRegistersConfig`, `CLIPVisionConfig`,
            `SiglipVisionConfig`, `ViTConfig`, `DeiTConfig`, `ViTMAEConfig`, `DINOv3ViTConfig` or
            `TimmWrapperConfig`). A `dict` must hold a `model_type`. Defaults to the architecture of
            `facebook/dinov2-small`.
        backbone (`str`, *optional*, defaults to `"facebook/dinov2-small"`):
            Hub id of the original (not fine-tuned) backbone weights. Informational: recorded in model cards
            as the base model; `config.json` alone rebuilds the architecture from `backbone_config`.
        normalization (`str`, *optional*, defaults to `"imagenet"`):
            Where `image_mean`/`image_std` come from: `"imagenet"` (FiT3D's choice for every backbone),
            `"processor"` (the backbone's own image processor) or `"custom"`.
        image_mean (`list[float]`, *optional*):
            Per-channel mean subtracted from images in [0, 1]. Defaults to the ImageNet mean; must be given
            when `normalization` is not `"imagenet"`.
        image_std (`list[float]`, *optional*):
            Per-channel standard deviation images in [0, 1] are divided by. Defaults to the ImageNet std; must
            be given when `normalization` is not `"imagenet"`.
        feature_dim (`int`, *optional*):
            Channels of the FiT3D features, twice the backbone's hidden size. Derived from `backbone_config`
            when it has a `hidden_size`; required otherwise (e.g. timm backbones).
        pos_embed_interpolation (`str`, *optional*, defaults to `"native"`):
            How both backbones resample their absolute position embeddings to a non-native patch grid:
            `"timm"` (bicubic with antialiasing, timm's `resample_abs_pos_embed`, what the original FiT3D's timm
            backbones do; `fit3d convert-original` and the short backbone names use it) or `"native"`
            (transformers' own `interpolate_pos_encoding`). At FiT3D's 41 x 62 DINOv2 grid the two differ by
            3-9 % in the position embeddings. Checkpoints saved before this option existed load as `"native"`.

    Example:

    ```python
    >>> from transformers import Dinov2Config
    >>> from fit3d_hf import FiT3DConfig, FiT3DModel

    >>> # Initializing a FiT3D configuration around a DINOv2-small architecture
    >>> configuration = FiT3DConfig(backbone_config=Dinov2Config(hidden_size=384, num_attention_heads=6))

    >>> # Initializing a model (with random weights) from the configuration
    >>> model = FiT3DModel(configuration)

    >>> # Accessing the model configuration
    >>> configuration = model.config
    >>> configuration.feature_dim
    768
    ```"""

    model_type = "fit3d"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: PreTrainedConfig | dict | None = None,
        backbone: str | None = "facebook/dinov2-small",
        normalization: str = "imagenet",
        image_mean: list[float] | tuple[float, ...] | None = None,
        image_std: list[float] | tuple[float, ...] | None = None,
        feature_dim: int | None = None,
        pos_embed_interpolation: str = "native",
        **kwargs,
    ):
        if backbone_config is None:
            backbone_config = _default_backbone_config()
        elif isinstance(backbone_config, dict):
            backbone_config = _backbone_config_from_dict(backbone_config)
        elif not isinstance(backbone_config, PreTrainedConfig):
            raise TypeError(
                "backbone_config must be a PreTrainedConfig, a dict or None, "
                f"got {type(backbone_config).__name__}"
            )
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
        if pos_embed_interpolation not in _POS_EMBED_INTERPOLATIONS:
            raise ValueError(
                f"pos_embed_interpolation must be one of {_POS_EMBED_INTERPOLATIONS}, got {pos_embed_interpolation!r}"
            )
        if normalization == "imagenet":
            for name, given, default in (
                ("image_mean", image_mean, IMAGENET_MEAN),
                ("image_std", image_std, IMAGENET_STD),
            ):
                if given is not None and tuple(float(v) for v in given) != default:
                    raise ValueError(
                        f"normalization='imagenet' uses {name}={list(default)}, but {name}={list(given)} was "
                        "given; pass normalization='processor' or 'custom' to use other statistics."
                    )
            image_mean, image_std = IMAGENET_MEAN, IMAGENET_STD
        elif image_mean is None or image_std is None:
            raise ValueError(f"normalization={normalization!r} needs image_mean and image_std")
        image_mean = [float(v) for v in image_mean]
        image_std = [float(v) for v in image_std]
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(
                f"image_mean and image_std need 3 values each (std > 0), got {image_mean} and {image_std}"
            )

        hidden_size = getattr(backbone_config, "hidden_size", None)
        if feature_dim is None:
            if hidden_size is None:
                raise ValueError(
                    f"feature_dim is required: backbone_config ({type(backbone_config).__name__}) has no "
                    "hidden_size"
                )
            feature_dim = 2 * int(hidden_size)
        elif hidden_size is not None and int(feature_dim) != 2 * int(hidden_size):
            raise ValueError(
                f"feature_dim={feature_dim} does not match the backbone: expected 2 * hidden_size = "
                f"{2 * hidden_size}"
            )

        # Set before super().__init__: it propagates attn_implementation into the sub-configs.
        self.backbone_config = backbone_config
        self.backbone = backbone
        self.normalization = normalization
        self.image_mean = image_mean
        self.image_std = image_std
        self.feature_dim = int(feature_dim)
        self.pos_embed_interpolation = pos_embed_interpolation
        super().__init__(**kwargs)


__all__ = ["FiT3DConfig", "IMAGENET_MEAN", "IMAGENET_STD"]
