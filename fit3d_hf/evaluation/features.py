"""The frozen models of a probe comparison (`FrozenFeatures`): a `FiT3DModel` (feature variants original,
fine-tuned and FiT3D) and/or a plain backbone (variant baseline), run once per batch, and their loading
(`load_frozen_features`).
"""

from __future__ import annotations

import torch
from torch import nn

from .data import check_local_path
from .protocol import center_pad

__all__ = ["FrozenFeatures", "load_frozen_features"]


class FrozenFeatures(nn.Module):
    """The frozen models of a comparison, run once per batch.

    Args:
        fit3d_model: a `FiT3DModel` (variants original, finetuned, fit3d), or None.
        baseline: a `DenseFeatureExtractor` (variant baseline), or None.
    """

    def __init__(
        self, fit3d_model: nn.Module | None = None, baseline: nn.Module | None = None, patch_fit: str = "pad"
    ):
        super().__init__()
        if fit3d_model is None and baseline is None:
            raise ValueError("FrozenFeatures needs a FiT3D model and/or a baseline backbone")
        if patch_fit not in ("pad", "resize"):
            raise ValueError(f"patch_fit must be 'pad' or 'resize', got {patch_fit!r}")
        self.fit3d = fit3d_model.eval().requires_grad_(False) if fit3d_model is not None else None
        self.baseline = baseline.eval().requires_grad_(False) if baseline is not None else None
        self.patch_fit = patch_fit

    @property
    def variants(self) -> list[str]:
        """Feature variants, in table order."""
        return (["original", "finetuned", "fit3d"] if self.fit3d is not None else []) + (
            ["baseline"] if self.baseline is not None else []
        )

    @property
    def patch_size(self) -> int:
        """Patch side p (all models must share it, so that every variant sees the same grid)."""
        sizes = {m.patch_size for m in (self.fit3d, self.baseline) if m is not None}
        if len(sizes) > 1:
            raise ValueError(
                f"--model and --baseline have different patch sizes {sorted(sizes)}; compare them in separate runs"
            )
        return sizes.pop()

    def channels(self, variant: str) -> tuple[int, int]:
        """`(feature channels, CLS channels)` of a variant's probe input."""
        if variant in ("original", "finetuned", "fit3d") and self.fit3d is not None:
            hidden = self.fit3d.hidden_size
            return (2 * hidden if variant == "fit3d" else hidden), hidden
        if variant == "baseline" and self.baseline is not None:
            return self.baseline.hidden_size, self.baseline.hidden_size
        raise ValueError(f"variant {variant!r} is not available; have {self.variants}")

    def train(self, mode: bool = True) -> FrozenFeatures:
        return super().train(False)  # frozen: BatchNorm/dropout of the backbones never switch to training

    def _fit(self, images: torch.Tensor, model: nn.Module, patch_fit: str) -> torch.Tensor:
        # Centred padding with the model's mean colour = the original's zero padding of normalised images; the
        # model then has nothing to resize. With "resize" the model resizes down to the multiple itself.
        return (
            center_pad(images, model.patch_size, model.image_mean.flatten()) if patch_fit == "pad" else images
        )

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, *, depth_input: bool = False, patch_fit: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Raw frozen outputs, float32.

        Args:
            images: `[B, 3, H, W]` in [0, 1].
            depth_input: features before the final norm plus the CLS tokens (the depth probe's input)
                instead of the final normed features.
            patch_fit: override of the instance's "pad" / "resize" (see `ProbeArguments.patch_fit`).

        Returns:
            `{"original", "finetuned" [B, D, h, w], "original_cls", "finetuned_cls" [B, D] (depth_input)}`
            for a FiT3D model and/or `{"baseline", "baseline_cls"}`.
        """
        raw: dict[str, torch.Tensor] = {}
        patch_fit = patch_fit or self.patch_fit
        if self.fit3d is not None:
            output = self.fit3d(
                self._fit(images, self.fit3d, patch_fit),
                output_cls_token=depth_input,
                final_norm=not depth_input,
                return_dict=True,
            )
            raw["original"], raw["finetuned"] = output.original_features, output.finetuned_features
            if depth_input:
                raw["original_cls"], raw["finetuned_cls"] = (
                    output.original_cls_token,
                    output.finetuned_cls_token,
                )
        if self.baseline is not None:
            output = self.baseline(
                self._fit(images, self.baseline, patch_fit),
                final_norm=not depth_input,
                return_cls=depth_input,
            )
            raw["baseline"], raw["baseline_cls"] = output if depth_input else (output, None)
        # Token grids reshape to channels-last strides; contiguous float32 keeps the heads' gradients dense.
        return {key: value.float().contiguous() for key, value in raw.items() if value is not None}


def load_frozen_features(
    model: str | None = None,
    baseline: str | None = None,
    *,
    normalization: str = "imagenet",
    dtype: str = "float32",
    patch_fit: str = "pad",
) -> FrozenFeatures:
    """Loads the models of a comparison.

    Args:
        model: a FiT3DModel folder or Hub id (loaded with `AutoModel`; `fit3d_hf` registers the type).
        baseline: a plain backbone for `DenseFeatureExtractor.from_pretrained`.
        normalization: the baseline's input normalisation.
        dtype: "float32", "bfloat16" or "float16".
        patch_fit: "pad" (centred padding to a patch multiple, FiT3D's probes) or "resize".
    """
    from transformers import AutoConfig, AutoModel

    from ..backbones import DenseFeatureExtractor, explain_load_errors
    from ..modeling_fit3d import FiT3DModel

    torch_dtype = getattr(torch, dtype)
    for name, option in ((model, "--model"), (baseline, "--baseline")):
        if name:
            check_local_path(str(name), option)
    fit3d_model = None
    if model:
        with explain_load_errors(model, what="--model"):
            config = AutoConfig.from_pretrained(model)
        if config.model_type != "fit3d":
            raise ValueError(
                f"--model {model} holds a {config.model_type!r} model, not a FiT3DModel; pass a plain backbone as --baseline"
            )
        fit3d_model = AutoModel.from_pretrained(model, dtype=torch_dtype)
        if not isinstance(fit3d_model, FiT3DModel):
            raise ValueError(f"--model {model} loaded as {type(fit3d_model).__name__}, expected FiT3DModel")
    extractor = (
        DenseFeatureExtractor.from_pretrained(baseline, normalization=normalization, dtype=torch_dtype)
        if baseline
        else None
    )
    return FrozenFeatures(fit3d_model, extractor, patch_fit=patch_fit)
