"""Dense patch features `B x D x h x w` from any supported transformers vision backbone.

`DenseFeatureExtractor` loads a backbone by Hub id, short name or local folder through `AutoModel`, resizes
images in [0, 1] down to a multiple of the patch size, normalises them (ImageNet statistics by default, as
FiT3D does for every backbone, or the backbone's own image processor's) and returns the last layer's patch
tokens, prefix tokens dropped. The per-architecture knowledge lives in `dense_features_fit3d` (it must travel
with saved FiT3D checkpoints as remote code); this module adds loading, normalisation and the errors that say
what was tried. timm weight conversion is `fit3d_hf.timm_weights` (re-exported here).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from .configuration_fit3d import IMAGENET_MEAN, IMAGENET_STD
from .dense_features_fit3d import (
    POS_EMBED_INTERPOLATIONS,
    SUPPORTED_BACKBONE_TYPES,
    backbone_dense_features,
    backbone_hidden_size,
    backbone_num_prefix_tokens,
    backbone_patch_size,
    extract_vision_tower,
    pos_embed_interpolation_of,
    prepare_backbone_config,
    resize_to_patch_multiple,
    set_pos_embed_interpolation,
)
from .errors import HubUnavailableError, InputError, MissingInputError, UsageError
from .modeling_fit3d import processor_mean_std
from .timm_weights import convert_timm_dinov2_state_dict

logger = logging.getLogger(__name__)

# The original FiT3D release's backbone names -> Hub ids loadable with transformers' AutoModel.
BACKBONE_SHORT_NAMES: dict[str, str] = {
    "dinov2_small": "facebook/dinov2-small",
    "dinov2_base": "facebook/dinov2-base",
    "dinov2_reg_small": "facebook/dinov2-with-registers-small",
    "clip_base": "timm/vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
    "mae_base": "facebook/vit-mae-base",
    "deit3_base": "timm/deit3_base_patch16_224.fb_in1k",
}

# The timm models the original release fine-tuned; its `<name>_finetuned.pth` files are their state dicts.
ORIGINAL_TIMM_IDS: dict[str, str] = {
    "dinov2_small": "timm/vit_small_patch14_dinov2.lvd142m",
    "dinov2_base": "timm/vit_base_patch14_dinov2.lvd142m",
    "dinov2_reg_small": "timm/vit_small_patch14_reg4_dinov2.lvd142m",
    "clip_base": "timm/vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
    "mae_base": "timm/vit_base_patch16_224.mae",
    "deit3_base": "timm/deit3_base_patch16_224.fb_in1k",
}

_NORMALIZATIONS = ("imagenet", "processor")
# from_pretrained arguments that locate files; they also apply to the config and the image processor.
_HUB_KWARGS = (
    "revision",
    "token",
    "cache_dir",
    "local_files_only",
    "subfolder",
    "force_download",
    "trust_remote_code",
)


def default_pos_embed_interpolation(name_or_path: str | os.PathLike, config=None) -> str:
    """The position-embedding resampling a backbone gets when none is asked for.

    `"timm"` for the original release's short names (`dinov2_small`, ...: FiT3D ran them through timm), else what
    the backbone's saved config records (`pos_embed_interpolation`, written by fit3d-hf when it saves a backbone),
    else `"native"` (transformers' own).
    """
    if str(name_or_path) in BACKBONE_SHORT_NAMES:
        return "timm"
    recorded = getattr(config, "pos_embed_interpolation", None)
    return recorded if recorded in POS_EMBED_INTERPOLATIONS else "native"


def resolve_backbone_name(name_or_path: str | os.PathLike) -> str:
    """Maps a short name of the original release (`dinov2_small`, ...) to its Hub id; keeps anything else."""
    name = str(name_or_path)
    return BACKBONE_SHORT_NAMES.get(name, name)


def load_backbone(name_or_path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """Loads a supported backbone ready for dense features, by short name, Hub id or local folder.

    A full CLIP/SigLIP checkpoint yields its vision tower; ViT-MAE loads with masking off and timm models
    with dynamic image sizes.

    Args:
        name_or_path: Short name (see `BACKBONE_SHORT_NAMES`), Hub id or local folder.
        **kwargs: Passed to `AutoModel.from_pretrained` (e.g. `dtype`, `attn_implementation`, `revision`).

    Returns:
        The backbone, a `PreTrainedModel` whose `config.model_type` is in `SUPPORTED_BACKBONE_TYPES`.
    """
    path = resolve_backbone_name(name_or_path)
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    with explain_load_errors(name_or_path, path):
        config = AutoConfig.from_pretrained(path, **hub_kwargs)
    if config.model_type in SUPPORTED_BACKBONE_TYPES:
        with explain_load_errors(name_or_path, path):
            return AutoModel.from_pretrained(path, config=prepare_backbone_config(config), **kwargs)
    if getattr(config, "vision_config", None) is None:
        raise InputError(
            f"{path} holds a {config.model_type!r} model, which is not a supported vision backbone "
            f"({', '.join(SUPPORTED_BACKBONE_TYPES)}, or a CLIP/SigLIP-style model with a vision tower)"
        )
    logger.info("Taking the vision tower of the %s model in %s", config.model_type, path)
    with explain_load_errors(name_or_path, path):
        model = AutoModel.from_pretrained(path, config=config, **kwargs)
    return extract_vision_tower(model)


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "namespace/name"; anything else with a separator or a leading dot or tilde is a path.
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


@contextlib.contextmanager
def explain_load_errors(
    name: str | os.PathLike, path: str | os.PathLike | None = None, what: str = "backbone"
):
    """Turns transformers' loading errors into messages that say what was tried: a short name (with a
    suggestion for typos), a local folder, or a Hub id (and whether the Hub could be reached).

    Args:
        name: The name as the user gave it.
        path: What it resolved to (a short name's Hub id); `name` by default.
        what: How messages call it ("backbone", "--model", ...).
    """
    try:
        yield
    except (OSError, ValueError) as error:  # transformers: OSError for files, ValueError for a bad config
        raise _load_error(str(name), str(path if path is not None else name), error, what) from error


def _load_error(name: str, path: str, error: Exception, what: str = "backbone") -> Exception:
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    from .hub import is_network_error

    # Short names only mean something for backbones; other models (a FiT3DModel for --model) get no list.
    backbone = what == "backbone"
    short_names = f" Short names: {', '.join(BACKBONE_SHORT_NAMES)}" if backbone else ""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    local = Path(path).expanduser()
    if local.is_dir():
        return MissingInputError(
            f"{what} folder {local} cannot be loaded ({first_line}): is it a save_pretrained folder with "
            "config.json and the weights?"
        )
    close = difflib.get_close_matches(name, BACKBONE_SHORT_NAMES, n=1, cutoff=0.75) if backbone else []
    if close and name not in BACKBONE_SHORT_NAMES and "/" not in name:
        return InputError(f"unknown {what} {name!r}; did you mean {close[0]}?{short_names}")
    if _looks_like_local_path(name) or local.exists():
        return MissingInputError(f"{what} folder {name} does not exist")
    cause = error.__cause__
    if isinstance(cause, LocalEntryNotFoundError) or is_network_error(error):
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no connection"
        hub_id = f"{name!r}" if name == path else f"{name!r} (Hub id {path})"
        return HubUnavailableError(
            f"{what} {hub_id} is not a local folder and the Hub is unreachable ({why}), and it is not in the "
            f"local cache ({constants.HF_HUB_CACHE}). Pass a local folder written by save_pretrained, or connect "
            f"and try again.{short_names}"
        )
    if (
        isinstance(cause, RepositoryNotFoundError)
        or "is not a local folder and is not a valid model" in first_line
    ):
        hint = f"; did you mean {close[0]}?" if close else "."
        return InputError(
            f"{what} {name!r} is neither a local folder nor a model on the Hub{hint}{short_names}"
        )
    return InputError(f"{what} {name!r} ({path}) cannot be loaded: {first_line}")


class DenseFeatureExtractor(nn.Module):
    """Images in [0, 1] of any size -> last-layer patch features `B x D x h x w` of a vision backbone.

    Images are resized (bilinear) down to `(H // p) * p x (W // p) * p`, normalised, and run through the
    backbone; prefix tokens (CLS, distillation, registers) are dropped. Differentiable end to end, so it can
    be trained through, and safe under bf16 autocast.

    Args:
        model: A supported transformers backbone (`SUPPORTED_BACKBONE_TYPES`) or a CLIP/SigLIP-style model,
            whose vision tower is taken.
        image_mean: Per-channel mean for images in [0, 1]; ImageNet's by default, as in FiT3D.
        image_std: Per-channel std for images in [0, 1]; ImageNet's by default.
        final_norm: Default for `forward`: features after the backbone's final norm (FiT3D's features) or
            before it (FiT3D's depth probe).
        return_cls: Default for `forward`: also return the CLS token.
        normalization: Label of where the statistics came from (`"imagenet"`, `"processor"`, `"custom"`).
        pos_embed_interpolation: `"timm"` (timm's bicubic-with-antialias resampling of the position embeddings,
            as the original FiT3D's backbones) or `"native"` (transformers'); None: what the model's config
            records (`config.pos_embed_interpolation`, written when fit3d-hf saves a backbone), else native.
            See `fit3d_hf.dense_features_fit3d.set_pos_embed_interpolation`.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        image_mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
        image_std: tuple[float, ...] | list[float] = IMAGENET_STD,
        final_norm: bool = True,
        return_cls: bool = False,
        normalization: str = "imagenet",
        pos_embed_interpolation: str | None = None,
    ):
        super().__init__()
        model = extract_vision_tower(model)
        if pos_embed_interpolation is None:  # a backbone saved by fit3d-hf records its choice in its config
            pos_embed_interpolation = getattr(model.config, "pos_embed_interpolation", None)
        if pos_embed_interpolation is not None:
            set_pos_embed_interpolation(model, pos_embed_interpolation)
        if getattr(model.config, "mask_ratio", 0.0) != 0.0:
            # The embeddings read the ratio from this same config object at every forward.
            logger.info("Switching off ViT-MAE token masking (mask_ratio %s -> 0.0)", model.config.mask_ratio)
            model.config.mask_ratio = 0.0
        timm_model = getattr(model, "timm_model", None)
        if timm_model is not None and not getattr(timm_model, "dynamic_img_size", True):
            logger.warning(
                "%s was built without dynamic_img_size; it only takes images of its native size. Load it "
                "with DenseFeatureExtractor.from_pretrained (or model_args={'dynamic_img_size': True}).",
                timm_model.__class__.__name__,
            )
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values each, got {image_mean} and {image_std}")
        self.model = model
        self.final_norm = final_norm
        self.return_cls = return_cls
        self.normalization = normalization
        # What the backbone was loaded by (`from_pretrained` sets them), for `provenance`.
        self.name_or_path = str(getattr(model.config, "_name_or_path", "") or "")
        self.revision: str | None = None
        self.register_buffer(
            "image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "image_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        normalization: str = "imagenet",
        final_norm: bool = True,
        return_cls: bool = False,
        pos_embed_interpolation: str | None = None,
        **kwargs,
    ) -> DenseFeatureExtractor:
        """Loads a backbone by short name (`dinov2_small`, ...), Hub id or local folder.

        Args:
            name_or_path: Short name (see `BACKBONE_SHORT_NAMES`), Hub id or local folder.
            normalization: `"imagenet"` (FiT3D's choice for every backbone) or `"processor"` (the statistics
                in the backbone's `preprocessor_config.json`).
            final_norm: Default for `forward` (see the class docstring).
            return_cls: Default for `forward`.
            pos_embed_interpolation: `"timm"` or `"native"`; None: `default_pos_embed_interpolation` (`"timm"`
                for the short names, as the original FiT3D, else what the saved config records, else
                `"native"`).
            **kwargs: Passed to `AutoModel.from_pretrained` (e.g. `dtype`, `attn_implementation`).

        Returns:
            The extractor, with the backbone in eval mode.
        """
        if normalization not in _NORMALIZATIONS:
            raise UsageError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
        if pos_embed_interpolation not in (None, *POS_EMBED_INTERPOLATIONS):
            raise UsageError(
                f"pos_embed_interpolation must be one of {POS_EMBED_INTERPOLATIONS}, got {pos_embed_interpolation!r}"
            )
        model = load_backbone(name_or_path, **kwargs)
        if pos_embed_interpolation is None:
            pos_embed_interpolation = default_pos_embed_interpolation(name_or_path, model.config)
        if normalization == "processor":
            hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            mean, std = processor_mean_std(resolve_backbone_name(name_or_path), **hub_kwargs)
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        extractor = cls(
            model,
            image_mean=mean,
            image_std=std,
            final_norm=final_norm,
            return_cls=return_cls,
            normalization=normalization,
            pos_embed_interpolation=pos_embed_interpolation,
        )
        extractor.name_or_path = str(name_or_path)
        extractor.revision = kwargs.get("revision") or getattr(model.config, "_commit_hash", None)
        return extractor

    def weights_fingerprint(self) -> str:
        """SHA-256 of the backbone's weights (state dict, sorted by name, as float32 bytes): the same for the same
        weights whatever they were loaded by."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def provenance(self) -> dict:
        """What makes this extractor's features what they are, as JSON-serialisable values: recorded in Stage I
        bundles and compared by Stage II (`fit3d_hf.gaussians.bundle.check_provenance`).

        Keys: backbone (as given), backbone_id (short names resolved to Hub ids), revision (when known),
        backbone_model_type, backbone_dim, patch_size, normalization, image_mean, image_std, resize (the rule
        that brings images to a patch multiple), pos_embed_interpolation, weights_sha256.
        """
        return {
            "backbone": self.name_or_path,
            "backbone_id": resolve_backbone_name(self.name_or_path) if self.name_or_path else "",
            "revision": self.revision,
            "backbone_model_type": self.model.config.model_type,
            "backbone_dim": self.hidden_size,
            "patch_size": self.patch_size,
            "normalization": self.normalization,
            "image_mean": [round(float(v), 6) for v in self.image_mean.flatten()],
            "image_std": [round(float(v), 6) for v in self.image_std.flatten()],
            "resize": "bilinear down to a patch multiple, then normalise",
            "pos_embed_interpolation": self.pos_embed_interpolation,
            "weights_sha256": self.weights_fingerprint(),
        }

    @property
    def pos_embed_interpolation(self) -> str:
        """`"timm"` or `"native"`: how the backbone resamples its position embeddings (see the class docstring)."""
        return pos_embed_interpolation_of(self.model)

    @property
    def patch_size(self) -> int:
        """Patch side p in pixels."""
        return backbone_patch_size(self.model)

    @property
    def hidden_size(self) -> int:
        """Feature channels D."""
        return backbone_hidden_size(self.model)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (CLS, distillation, registers); dropped from the features."""
        return backbone_num_prefix_tokens(self.model)

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """The `(h, w)` feature grid for an image of `height x width` pixels."""
        return height // self.patch_size, width // self.patch_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resizes `[B, 3, H, W]` images in [0, 1] to a patch multiple and normalises them."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        images = resize_to_patch_multiple(images, self.patch_size)
        return (images - self.image_mean) / self.image_std

    def forward(
        self, images: torch.Tensor, *, final_norm: bool | None = None, return_cls: bool | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Dense patch features of images in [0, 1].

        Args:
            images: `[B, 3, H, W]` float images in [0, 1], any size of at least one patch.
            final_norm: Override the instance default (features after / before the final norm).
            return_cls: Override the instance default (also return the CLS token).

        Returns:
            features `[B, D, H // p, W // p]`, or `(features, cls [B, D])` when `return_cls`.
        """
        final_norm = self.final_norm if final_norm is None else final_norm
        return_cls = self.return_cls if return_cls is None else return_cls
        pixel_values = self.preprocess(images)
        pixel_values = pixel_values.to(next(self.model.parameters()).dtype)
        features, cls_token = backbone_dense_features(
            self.model, pixel_values, final_norm=final_norm, return_cls=return_cls
        )
        return (features, cls_token) if return_cls else features


__all__ = [
    "BACKBONE_SHORT_NAMES",
    "DenseFeatureExtractor",
    "ORIGINAL_TIMM_IDS",
    "convert_timm_dinov2_state_dict",
    "explain_load_errors",
    "default_pos_embed_interpolation",
    "load_backbone",
    "processor_mean_std",
    "resolve_backbone_name",
]
