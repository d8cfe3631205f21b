"""The surface-normal probe's pieces: the convention, the probe head, the angular loss and the metrics.

Convention (the one of `fit3d_hf.scene.scene`, which the synthetic generator's analytic normals follow):
a normal is a unit vector in the camera frame of its image with OpenCV axes (x right, y down, z forward),
pointing out of the surface towards the camera (`n . p < 0` at the camera-frame point p). A data set stored in
another convention is mapped to it with `axes` (`--normals_axes`), e.g. "x,-y,-z" for OpenGL-style camera axes
(y up, z backwards). Pixels whose target is not a unit vector (zeros, NaN, black PNG pixels) have no ground
truth and are left out of the loss and of every metric.

- `fit3d_hf.row_decoding.normals_to_tensor` decodes a dataset value (8-bit RGB image `(n + 1) / 2 * 255`, or a float
  array `[H, W, 3]` / `[3, H, W]`) to `[3, H, W]` unit normals, 0 where invalid.
- `LinearNormalsHead` / `NormalsHeads`: BatchNorm + 1x1 convolution to 3 channels on the frozen patch features,
  bilinearly upsampled and normalised to unit length; one head per feature variant, as `ProbeHeads`.
- `angular_loss`: the mean angle (radians) between prediction and target over valid pixels, as Probe3D's
  `angular_loss` without its uncertainty term.
- `normals_rows` / `normals_scores`: mean and median angular error (degrees) and the share of pixels within
  11.25, 22.5 and 30 degrees, pooled over all valid pixels of the data set. Rows per image (a pixel count, an
  error sum, counts within the thresholds, a histogram of the error in 0.01-degree bins for the median) can
  be gathered across processes and summed.
- `NormalsCropFlip`: random crop and horizontal flip of image and normals; a flip negates the normals' x.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..row_decoding import valid_normals

__all__ = [
    "NORMALS_METRICS",
    "NORMALS_REFERENCE",
    "NORMALS_THRESHOLDS",
    "LinearNormalsHead",
    "NormalsCropFlip",
    "NormalsHeads",
    "angular_errors",
    "angular_loss",
    "normals_rows",
    "normals_scores",
]

NORMALS_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
NORMALS_METRICS: tuple[str, ...] = ("mean", "median", "within_11.25", "within_22.5", "within_30")
# The error histogram behind the median: 0.01-degree bins over [0, 180], so the median is exact to 0.005 degrees.
_HISTOGRAM_BINS = 18000
# acos is clamped this far inside [-1, 1]: its gradient is infinite at +-1 (Probe3D's eps).
_ACOS_EPS = 1e-4

# The probe protocol's defaults (`ProbeArguments.resolved`), after Probe3D's surface-normal probe (AdamW lr 5e-4 and
# its default weight decay 0.01, linear warm-up from 1% of the rate over 15% of the run, then cosine decay; 10 epochs
# of NYUv2 at batch 8, about 1000 iterations), on a linear head instead of its DPT head, so that it probes the
# features as the other probes do, and without the uncertainty term of its loss (a linear head has no confidence).
NORMALS_REFERENCE = {
    "max_steps": 1000, "learning_rate": 5e-4, "weight_decay": 1e-2, "warmup_steps": 150, "warmup_ratio": 1e-2,
    "lr_schedule": "cosine", "max_grad_norm": 0.0, "crop_size": None, "scale_range": "1.0,1.0",
    "train_short_side": None, "eval_mode": "whole", "eval_flip": False, "photometric_distortion": False,
}  # fmt: skip


class LinearNormalsHead(nn.Module):
    """BatchNorm + 1x1 conv on `[B, C, h, w]` features -> `[B, 3, H, W]` unit normals (bilinear upsampling).

    The conv starts at (0, 0, -1), facing the camera, the direction every visible surface leans towards: a fresh
    head is then within 90 degrees of almost every target, instead of pointing anywhere (zero weights and bias
    would leave the direction to the noise of the initial weights).

    Args:
        in_channels: C, the feature channels.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        self.in_channels = in_channels
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, 3, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        with torch.no_grad():
            self.conv.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))

    def forward(self, features: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Unit normals `[B, 3, H, W]` at `output_size` (None keeps `h x w`), camera frame, OpenCV axes."""
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"expected features [B, {self.in_channels}, h, w], got {tuple(features.shape)}")
        vectors = self.conv(self.norm(features))
        if output_size is not None and tuple(output_size) != tuple(vectors.shape[-2:]):
            vectors = F.interpolate(vectors, size=tuple(output_size), mode="bilinear", align_corners=False)
        return F.normalize(vectors, dim=1, eps=1e-6)


class NormalsHeads(nn.Module):
    """One `LinearNormalsHead` per feature variant, trained side by side (the interface of `ProbeHeads`).

    Args:
        channels: variant -> (feature channels, CLS channels), e.g. from `FrozenFeatures.channels` (CLS unused).
    """

    task = "normals"

    def __init__(self, channels: dict[str, tuple[int, int]]):
        super().__init__()
        self.heads = nn.ModuleDict({variant: LinearNormalsHead(c) for variant, (c, _) in channels.items()})

    @property
    def variants(self) -> list[str]:
        return list(self.heads.keys())

    def forward(
        self, raw: dict[str, torch.Tensor], output_size: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """variant -> `[B, 3, H, W]` unit normals, from the raw frozen outputs of `FrozenFeatures`."""
        from .heads import variant_inputs

        return {
            variant: head(variant_inputs(raw, variant)[0], output_size)
            for variant, head in self.heads.items()
        }


def angular_errors(prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel angle between predicted and target normals.

    Args:
        prediction: `[B, 3, H, W]` predicted normals (any length; the angle ignores it).
        target: `[B, 3, H, W]` ground truth; non-unit vectors mark pixels without one.

    Returns:
        `([B, H, W]` float64 error in degrees, `[B, H, W]` bool validity`)`.
    """
    if prediction.shape != target.shape or prediction.ndim != 4 or prediction.shape[1] != 3:
        raise ValueError(
            f"expected prediction and target [B, 3, H, W], got {tuple(prediction.shape)} and {tuple(target.shape)}"
        )
    cosine = F.cosine_similarity(prediction.double(), target.double(), dim=1, eps=1e-12).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cosine)), valid_normals(target)


def angular_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean angle (radians) between `[B, 3, H, W]` predictions and targets over the valid target pixels (0 if none)."""
    valid = valid_normals(target)
    if not valid.any():
        return prediction.sum() * 0.0
    cosine = F.cosine_similarity(prediction, target, dim=1, eps=1e-6)
    return torch.acos(cosine.clamp(-1 + _ACOS_EPS, 1 - _ACOS_EPS))[valid].mean()


def normals_rows(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image sums for `normals_scores`: `[B, 2 + len(NORMALS_THRESHOLDS) + 18000]` float64 rows of (valid
    pixels, sum of errors in degrees, pixels within each threshold, histogram of errors in 0.01-degree bins)."""
    errors, valid = angular_errors(prediction, target)
    batch = errors.shape[0]
    errors = torch.where(valid, errors, torch.zeros_like(errors)).reshape(batch, -1)
    valid = valid.reshape(batch, -1)
    within = [((errors < t) & valid).sum(1) for t in NORMALS_THRESHOLDS]
    bins = (errors / 180.0 * _HISTOGRAM_BINS).long().clamp(0, _HISTOGRAM_BINS - 1)
    offsets = torch.arange(batch, device=bins.device)[:, None] * _HISTOGRAM_BINS
    histogram = torch.bincount((bins + offsets)[valid], minlength=batch * _HISTOGRAM_BINS)
    return torch.cat(
        [
            torch.stack([valid.sum(1), errors.sum(1), *within], dim=1).double(),
            histogram.reshape(batch, -1).double(),
        ],
        dim=1,
    )


def normals_scores(rows: torch.Tensor) -> dict[str, float]:
    """Mean and median angular error (degrees) and the shares within 11.25, 22.5 and 30 degrees (fractions),
    over every valid pixel of `normals_rows` rows (`[N, K]`, or their sum `[K]`), plus `num_pixels`.

    The mean and the shares are exact; the median is taken from the 0.01-degree histogram (each error at the
    middle of its bin, so exact to 0.005 degrees; for an even count, the mean of the two middle errors).
    """
    totals = rows.sum(0) if rows.ndim == 2 else rows
    count = int(totals[0])
    if count == 0:
        return {**{name: math.nan for name in NORMALS_METRICS}, "num_pixels": 0}
    cumulative = totals[2 + len(NORMALS_THRESHOLDS) :].cumsum(0)
    middle = torch.tensor([(count + 1) // 2, count // 2 + 1], dtype=cumulative.dtype)  # 1-based ranks
    median_bins = torch.searchsorted(cumulative, middle).double()
    scores = {
        "mean": float(totals[1]) / count,
        "median": float((median_bins + 0.5).mean()) * 180.0 / _HISTOGRAM_BINS,
    }
    for threshold, within in zip(NORMALS_THRESHOLDS, totals[2 : 2 + len(NORMALS_THRESHOLDS)], strict=True):
        scores[f"within_{threshold:g}"] = float(within) / count
    scores["num_pixels"] = count
    return scores


class NormalsCropFlip:
    """Training augmentation of the normals probe: a random `crop_size` window (None: the whole image; images
    smaller than the crop are padded with 0, i.e. no ground truth) and a horizontal flip, which mirrors the
    normals too (x -> -x). The normals stay valid under both: the camera does not rotate.

    Args:
        crop_size: (H, W) of the crops, or None.
        flip_probability: probability of a horizontal flip.
    """

    def __init__(self, crop_size: tuple[int, int] | None = None, flip_probability: float = 0.5):
        if crop_size is not None and min(crop_size) < 1:
            raise UsageError(f"crop size must be positive, got {crop_size}")
        self.crop_size = None if crop_size is None else tuple(int(v) for v in crop_size)
        self.flip_probability = flip_probability

    def __call__(self, image: torch.Tensor, normals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`image [3, H, W]`, `normals [3, H, W]` -> the augmented pair."""
        if self.crop_size is not None:
            crop_h, crop_w = self.crop_size
            pad_h, pad_w = max(crop_h - image.shape[-2], 0), max(crop_w - image.shape[-1], 0)
            if pad_h or pad_w:
                image = F.pad(image, (0, pad_w, 0, pad_h))
                normals = F.pad(normals, (0, pad_w, 0, pad_h))
            top = int(torch.randint(0, image.shape[-2] - crop_h + 1, ()))
            left = int(torch.randint(0, image.shape[-1] - crop_w + 1, ()))
            image = image[:, top : top + crop_h, left : left + crop_w]
            normals = normals[:, top : top + crop_h, left : left + crop_w]
        if float(torch.rand(())) < self.flip_probability:
            image = image.flip(-1)
            normals = normals.flip(-1) * torch.tensor([-1.0, 1.0, 1.0], dtype=normals.dtype)[:, None, None]
        return image.contiguous(), normals.contiguous()
