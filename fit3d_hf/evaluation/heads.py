"""Linear probe heads on frozen dense features, as in FiT3D's (DINOv2's) linear-probing protocol.

- `LinearSegmentationHead`: BatchNorm + 1x1 convolution, logits bilinearly upsampled to the label size
  (mmseg's `BNHead` with one input level and no dropout).
- `LinearDepthHead`: features concatenated with the CLS token broadcast over the grid, upsampled x`upsample`,
  a 1x1 convolution to `n_bins` scores, turned into a distribution over depth bins ("linear" normalisation:
  ReLU + 0.1, divided by the sum) whose expectation is the depth (the DINOv2 depth `BNHead` with
  `classify=True`). The CLS width is read from the tensors, never assumed (the original FiT3D head
  hard-coded 384 channels, breaking ViT-B).
- `ProbeHeads`: one head per feature variant ("original", "finetuned", "fit3d" = their concatenation,
  "baseline"), each fed by `variant_inputs` from the raw outputs of the frozen models, so that the
  variants of a comparison train side by side on one forward pass of the backbones.
- `sig_loss` and `gradient_loss`: the depth probe's losses (scale-invariant log loss and multi-scale
  gradient matching of log depth), written here because no maintained library ships them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LinearDepthHead",
    "LinearSegmentationHead",
    "ProbeHeads",
    "build_probe_heads",
    "depth_bins",
    "gradient_loss",
    "sig_loss",
    "variant_inputs",
]

# Added to the ReLU'd bin scores before normalising ("linear" strategy of AdaBins/DINOv2): no bin is ever empty.
_LINEAR_NORM_EPS = 0.1
# Inside the logs of both losses: keeps gradients finite where the prediction or target is near 0.
_LOG_EPS = 1e-3


class LinearSegmentationHead(nn.Module):
    """BatchNorm + 1x1 conv on `[B, C, h, w]` features -> class logits.

    Args:
        in_channels: C, the feature channels.
        num_classes: number of classes.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"in_channels and num_classes must be positive, got {in_channels} and {num_classes}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)  # mmseg's init of the last conv
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Class logits.

        Args:
            features: `[B, C, h, w]` frozen features.
            output_size: (H, W) to upsample the logits to (bilinear); None keeps `h x w`.

        Returns:
            `[B, num_classes, H, W]` logits.
        """
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"expected features [B, {self.in_channels}, h, w], got {tuple(features.shape)}")
        logits = self.classifier(self.norm(features))
        if output_size is not None and tuple(output_size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)
        return logits


def depth_bins(min_depth: float, max_depth: float, n_bins: int, strategy: str = "UD") -> torch.Tensor:
    """Centres `[n_bins]` of the depth classes.

    Args:
        min_depth: first bin centre (metres).
        max_depth: last bin centre (metres).
        n_bins: number of bins.
        strategy: "UD" (uniform in depth, FiT3D's choice) or "SID" (uniform in log depth).
    """
    if not 0 < min_depth < max_depth or n_bins < 2:
        raise ValueError(
            f"need 0 < min_depth < max_depth and n_bins >= 2, got {min_depth}, {max_depth}, {n_bins}"
        )
    if strategy == "UD":
        return torch.linspace(min_depth, max_depth, n_bins)
    if strategy == "SID":
        return torch.logspace(
            torch.log10(torch.tensor(min_depth)), torch.log10(torch.tensor(max_depth)), n_bins
        )
    raise ValueError(f"bins strategy must be 'UD' or 'SID', got {strategy!r}")


class LinearDepthHead(nn.Module):
    """Depth as the expectation over `n_bins` depth classes scored by a 1x1 conv on features ⊕ CLS.

    Args:
        feature_channels: channels C of the patch features.
        cls_channels: channels of the CLS token broadcast over the grid and concatenated (0: none).
        min_depth: smallest depth / first bin centre (metres).
        max_depth: largest depth / last bin centre (metres).
        n_bins: number of depth classes (256 in FiT3D).
        bins_strategy: "UD" (uniform) or "SID" (log-uniform) bin centres.
        norm_strategy: "linear" (ReLU + 0.1, normalised by the sum; FiT3D), "softmax" or "sigmoid".
        upsample: the features are bilinearly upsampled by this factor before the conv (4 in FiT3D).
    """

    def __init__(
        self,
        feature_channels: int,
        cls_channels: int = 0,
        *,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        n_bins: int = 256,
        bins_strategy: str = "UD",
        norm_strategy: str = "linear",
        upsample: int = 4,
    ):
        super().__init__()
        if norm_strategy not in ("linear", "softmax", "sigmoid"):
            raise ValueError(f"norm_strategy must be 'linear', 'softmax' or 'sigmoid', got {norm_strategy!r}")
        if feature_channels < 1 or cls_channels < 0 or upsample < 1:
            raise ValueError(
                f"bad head sizes: feature_channels={feature_channels}, cls_channels={cls_channels}, upsample={upsample}"
            )
        self.feature_channels = feature_channels
        self.cls_channels = cls_channels
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.norm_strategy = norm_strategy
        self.upsample = upsample
        self.register_buffer(
            "bins", depth_bins(min_depth, max_depth, n_bins, bins_strategy), persistent=False
        )
        self.conv_depth = nn.Conv2d(feature_channels + cls_channels, n_bins, kernel_size=1)

    @property
    def in_channels(self) -> int:
        """Input channels of the 1x1 conv: features plus CLS."""
        return self.feature_channels + self.cls_channels

    def bin_probabilities(
        self, features: torch.Tensor, cls_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[B, n_bins, upsample*h, upsample*w]` distribution over the depth bins (sums to 1 over dim 1)."""
        if features.ndim != 4 or features.shape[1] != self.feature_channels:
            raise ValueError(
                f"expected features [B, {self.feature_channels}, h, w], got {tuple(features.shape)}"
            )
        if self.cls_channels:
            if cls_token is None or cls_token.shape != (features.shape[0], self.cls_channels):
                got = None if cls_token is None else tuple(cls_token.shape)
                raise ValueError(
                    f"expected a CLS token [{features.shape[0]}, {self.cls_channels}], got {got}"
                )
            cls_map = cls_token[:, :, None, None].expand(-1, -1, *features.shape[-2:])
            features = torch.cat([features, cls_map.to(features.dtype)], dim=1)
        if self.upsample > 1:
            features = F.interpolate(
                features, scale_factor=self.upsample, mode="bilinear", align_corners=False
            )
        scores = self.conv_depth(features)
        if self.norm_strategy == "linear":
            scores = torch.relu(scores) + _LINEAR_NORM_EPS
            return scores / scores.sum(dim=1, keepdim=True)
        if self.norm_strategy == "softmax":
            return scores.softmax(dim=1)
        scores = scores.sigmoid()
        return scores / scores.sum(dim=1, keepdim=True)

    def forward(
        self,
        features: torch.Tensor,
        cls_token: torch.Tensor | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Predicted depth.

        Args:
            features: `[B, C, h, w]` patch features (FiT3D: before the final norm).
            cls_token: `[B, cls_channels]` CLS token (FiT3D: the original backbone's), when `cls_channels > 0`.
            output_size: (H, W) to bilinearly resize the depth map to; None keeps `upsample*h x upsample*w`.

        Returns:
            `[B, 1, H, W]` depth in metres, within `[min_depth, max_depth]` (a convex combination of bins).
        """
        probabilities = self.bin_probabilities(features, cls_token)
        depth = torch.einsum("bkhw,k->bhw", probabilities, self.bins.to(probabilities.dtype))[:, None]
        if output_size is not None and tuple(output_size) != tuple(depth.shape[-2:]):
            depth = F.interpolate(depth, size=tuple(output_size), mode="bilinear", align_corners=False)
        return depth


# ----------------------------------------------------------------------------------------------------
# One head per feature variant

# variant -> (raw feature maps concatenated along channels, raw CLS token of the depth probe).
_VARIANT_SOURCES: dict[str, tuple[tuple[str, ...], str]] = {
    "original": (("original",), "original_cls"),
    "finetuned": (("finetuned",), "finetuned_cls"),
    "fit3d": (("original", "finetuned"), "original_cls"),  # FiT3D's depth probe takes the original's CLS
    "baseline": (("baseline",), "baseline_cls"),
}


def variant_inputs(raw: dict[str, torch.Tensor], variant: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The probe input of one variant from the raw frozen outputs.

    Args:
        raw: `{"original": [B, D, h, w], "finetuned": ..., "original_cls": [B, D], ...}` as returned by
            `FrozenFeatures`.
        variant: "original", "finetuned", "fit3d" or "baseline".

    Returns:
        `(features [B, C, h, w], cls [B, D] or None)`.
    """
    if variant not in _VARIANT_SOURCES:
        raise ValueError(f"unknown feature variant {variant!r}; expected one of {list(_VARIANT_SOURCES)}")
    keys, cls_key = _VARIANT_SOURCES[variant]
    missing = [key for key in keys if key not in raw]
    if missing:
        raise KeyError(f"variant {variant!r} needs the frozen outputs {missing}; got {sorted(raw)}")
    features = raw[keys[0]] if len(keys) == 1 else torch.cat([raw[key] for key in keys], dim=1)
    return features, raw.get(cls_key)


class ProbeHeads(nn.Module):
    """One probe head per feature variant, trained side by side.

    Args:
        heads: variant -> `LinearSegmentationHead` or `LinearDepthHead`.
        task: "segmentation" or "depth".
    """

    def __init__(self, heads: dict[str, nn.Module], task: str):
        super().__init__()
        if task not in ("segmentation", "depth"):
            raise ValueError(f"ProbeHeads task must be segmentation or depth, got {task!r}")
        self.heads = nn.ModuleDict(heads)
        self.task = task

    @property
    def variants(self) -> list[str]:
        return list(self.heads.keys())

    def forward(
        self, raw: dict[str, torch.Tensor], output_size: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """variant -> `[B, num_classes, H, W]` logits or `[B, 1, H, W]` depth at `output_size`."""
        outputs = {}
        for variant, head in self.heads.items():
            features, cls_token = variant_inputs(raw, variant)
            if self.task == "segmentation":
                outputs[variant] = head(features, output_size)
            else:
                outputs[variant] = head(features, cls_token if head.cls_channels else None, output_size)
        return outputs


def build_probe_heads(
    task: str, channels: dict[str, tuple[int, int]], num_classes: int | None = None, **depth_head_options
) -> ProbeHeads:
    """Fresh heads for every variant.

    Args:
        task: "segmentation" or "depth".
        channels: variant -> (feature channels, CLS channels), e.g. from `FrozenFeatures.channels`.
        num_classes: classes of the segmentation probe.
        **depth_head_options: `LinearDepthHead` options (min_depth, max_depth, n_bins, bins_strategy,
            norm_strategy, upsample).

    Returns:
        The `ProbeHeads`.
    """
    heads: dict[str, nn.Module] = {}
    for variant, (feature_channels, cls_channels) in channels.items():
        if task == "segmentation":
            if not num_classes:
                raise ValueError("the segmentation probe needs num_classes")
            heads[variant] = LinearSegmentationHead(feature_channels, num_classes)
        else:
            heads[variant] = LinearDepthHead(feature_channels, cls_channels, **depth_head_options)
    return ProbeHeads(heads, task)


# ----------------------------------------------------------------------------------------------------
# Losses


def _valid(target: torch.Tensor, max_depth: float | None) -> torch.Tensor:
    valid = target > 0
    if max_depth is not None:
        valid &= target <= max_depth
    return valid


def sig_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    max_depth: float | None = None,
    variance_weight: float = 1.0,
    mean_weight: float = 0.15,
    warm_up: bool = False,
) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al.), over all valid pixels of the batch.

    With g = log(pred + eps) - log(target + eps): sqrt(Var(g) + 0.15 * mean(g)^2). During the warm-up the
    reference (and `warm_up=True` here) uses only sqrt(0.15 * mean(g)^2), which first fits the global scale.

    Args:
        prediction: `[B, 1, H, W]` (or any shape) predicted depth, metres.
        target: same shape, metres; pixels <= 0 (or > max_depth) are ignored.
        max_depth: ignore targets beyond it.
        variance_weight: weight of Var(g).
        mean_weight: weight of mean(g)^2 (0.15 in the reference).
        warm_up: use the warm-up form.

    Returns:
        Scalar loss (0 when no pixel is valid).
    """
    valid = _valid(target, max_depth)
    if not valid.any():
        return prediction.sum() * 0.0
    g = torch.log(prediction[valid] + _LOG_EPS) - torch.log(target[valid] + _LOG_EPS)
    if warm_up:
        return torch.sqrt(mean_weight * g.mean() ** 2)
    variance = g.var(unbiased=True) if g.numel() > 1 else g.new_zeros(())
    return torch.sqrt(variance_weight * variance + mean_weight * g.mean() ** 2)


def gradient_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    max_depth: float | None = None,
    strides: tuple[int, ...] = (1, 2, 4, 6),
) -> torch.Tensor:
    """Multi-scale gradient matching of log depth (MegaDepth's loss, as the reference's `GradientLoss`).

    At each stride s (the maps subsampled every s pixels), d = log(pred + eps) - log(target + eps) on valid
    pixels; the loss sums |d[i] - d[i+2]| over vertical and horizontal pixel pairs that are both valid,
    divided by the number of valid pixels, and adds up the strides. Unlike the reference, the subsampling
    runs over each image's spatial axes (the reference squeezed the batch and strode over it too).

    Args:
        prediction: `[B, 1, H, W]` or `[B, H, W]` predicted depth, metres.
        target: same shape, metres; pixels <= 0 (or > max_depth) are ignored.
        max_depth: ignore targets beyond it.
        strides: subsampling steps of the scales.

    Returns:
        Scalar loss.
    """
    if prediction.ndim == 4:
        prediction, target = prediction[:, 0], target[:, 0]
    total = prediction.new_zeros(())
    for stride in strides:
        pred, tgt = prediction[:, ::stride, ::stride], target[:, ::stride, ::stride]
        valid = _valid(tgt, max_depth).to(pred.dtype)
        count = valid.sum()
        if count == 0:
            continue
        difference = (torch.log(pred + _LOG_EPS) - torch.log(tgt.clamp_min(0) + _LOG_EPS)) * valid
        vertical = (difference[:, :-2] - difference[:, 2:]).abs() * valid[:, :-2] * valid[:, 2:]
        horizontal = (difference[:, :, :-2] - difference[:, :, 2:]).abs() * valid[:, :, :-2] * valid[:, :, 2:]
        total = total + (vertical.sum() + horizontal.sum()) / count
    return total
