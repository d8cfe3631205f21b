"""Metrics of the linear probes: semantic segmentation (mIoU, mAcc, aAcc) and monocular depth (RMSE, AbsRel, δ).

Both are computed per sample, as small rows that `accelerate`'s `gather_for_metrics` can collect from every
process (it drops the samples duplicated to even out the last batch), and reduced once at the end:

- segmentation: per image, the per-class pixel counts of intersection, prediction and label
  (`segmentation_areas`, `[B, 3, C]`); summed over the data set they give IoU, accuracy and overall accuracy
  exactly as mmsegmentation's `mean_iou` does (`segmentation_scores`);
- depth: per image, the usual monocular-depth errors over its valid pixels (`depth_errors`, `[B, K]`), averaged
  over images (`depth_scores`), as the Monocular-Depth-Estimation-Toolbox used by FiT3D and DINOv2 does.

Written by hand: torchmetrics would add a dependency for a few lines of bincount, and its depth metrics
average over pixels, not over images as the reference protocol does.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DEPTH_METRICS",
    "depth_errors",
    "depth_scores",
    "segmentation_areas",
    "segmentation_scores",
]

# Column order of `depth_errors` rows.
DEPTH_METRICS: tuple[str, ...] = (
    "rmse",
    "abs_rel",
    "sq_rel",
    "rmse_log",
    "log10",
    "silog",
    "delta1",
    "delta2",
    "delta3",
)


def segmentation_areas(
    predictions: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Per-image, per-class pixel counts: intersection, prediction area and label area.

    Pixels whose label is `ignore_index` (or outside `[0, num_classes)`) are left out of all three counts.

    Args:
        predictions: `[B, H, W]` (or `[H, W]`) predicted class ids.
        labels: `[B, H, W]` (or `[H, W]`) ground-truth class ids.
        num_classes: C.
        ignore_index: label value that marks pixels without ground truth.

    Returns:
        `[B, 3, C]` int64 counts: `[:, 0]` intersection (pred == label == c), `[:, 1]` pixels predicted c,
        `[:, 2]` pixels labelled c.
    """
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape"
        )
    if predictions.ndim == 2:
        predictions, labels = predictions[None], labels[None]
    batch = predictions.shape[0]
    predictions = predictions.reshape(batch, -1).long()
    labels = labels.reshape(batch, -1).long()
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    # One bincount over (image, class) pairs: offsets keep the images apart.
    offsets = torch.arange(batch, device=labels.device)[:, None] * num_classes
    predicted = predictions.clamp(0, num_classes - 1)
    correct = valid & (predictions == labels)
    size = batch * num_classes

    def count(classes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.bincount((classes + offsets)[mask], minlength=size).reshape(batch, num_classes)

    # A prediction outside [0, C) is never correct but still counts as "not the labelled class".
    in_range = valid & (predictions >= 0) & (predictions < num_classes)
    return torch.stack([count(labels, correct), count(predicted, in_range), count(labels, valid)], dim=1)


def segmentation_scores(areas: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """mIoU, mAcc and aAcc from per-class counts (mmsegmentation's definitions).

    IoU_c = I_c / (P_c + L_c - I_c), Acc_c = I_c / L_c; classes absent from the labels have no accuracy and,
    unless predicted, no IoU (NaN), and are left out of the means. aAcc = sum I / sum L.

    Args:
        areas: `[3, C]` counts summed over the data set, or `[N, 3, C]` per-image counts (summed here).
        class_names: optional names of the C classes, for the per-class entries.

    Returns:
        `{"mIoU", "mAcc", "aAcc"}` as fractions in [0, 1], plus `"per_class"`: `{name: {"IoU", "Acc"}}`
        (NaN -> None, so the dict is JSON-serialisable).
    """
    if areas.ndim == 3:
        areas = areas.sum(0)
    if areas.ndim != 2 or areas.shape[0] != 3:
        raise ValueError(f"areas must be [3, C] or [N, 3, C], got {tuple(areas.shape)}")
    intersection, predicted, labelled = areas.double()
    union = predicted + labelled - intersection
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.full_like(union, math.nan))
    accuracy = torch.where(
        labelled > 0, intersection / labelled.clamp_min(1), torch.full_like(labelled, math.nan)
    )
    total = labelled.sum()
    names = class_names or [str(index) for index in range(areas.shape[1])]
    if len(names) != areas.shape[1]:
        raise ValueError(f"{len(names)} class names for {areas.shape[1]} classes")
    return {
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(accuracy),
        "aAcc": float(intersection.sum() / total) if total > 0 else math.nan,
        "per_class": {
            name: {"IoU": _none_if_nan(float(i)), "Acc": _none_if_nan(float(a))}
            for name, i, a in zip(names, iou, accuracy, strict=True)
        },
    }


def depth_errors(
    prediction: torch.Tensor, target: torch.Tensor, min_depth: float = 1e-3, max_depth: float = 10.0
) -> torch.Tensor:
    """Per-image depth errors over the pixels with ground truth in `(min_depth, max_depth)`.

    Predictions are clamped to `[min_depth, max_depth]` first (as the reference evaluation does).

    Args:
        prediction: `[B, H, W]` (or `[B, 1, H, W]`) predicted depth in metres.
        target: ground-truth depth of the same shape, metres; 0 (or anything outside the range) = unknown.
        min_depth: smallest valid depth.
        max_depth: largest valid depth (exclusive), e.g. 10 m indoors, 80 m for KITTI.

    Returns:
        `[B, len(DEPTH_METRICS)]` float64 rows, columns in `DEPTH_METRICS` order: RMSE (m), AbsRel, SqRel,
        RMSE of log depth, mean |log10 error|, SILog (x100), and δ<1.25, δ<1.25², δ<1.25³ as fractions.
        Images without a valid pixel get a row of NaN.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape"
        )
    batch = prediction.shape[0]
    prediction = prediction.reshape(batch, -1).double().clamp(min_depth, max_depth)
    target = target.reshape(batch, -1).double()
    valid = (target > min_depth) & (target < max_depth)
    count = valid.sum(1).double()
    safe_target = torch.where(valid, target, torch.ones_like(target))
    safe_prediction = torch.where(valid, prediction, torch.ones_like(prediction))

    def mean(values: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, values, torch.zeros_like(values)).sum(1) / count.clamp_min(1)

    difference = safe_prediction - safe_target
    log_error = safe_prediction.log() - safe_target.log()
    ratio = torch.maximum(safe_prediction / safe_target, safe_target / safe_prediction)
    rows = torch.stack(
        [
            mean(difference**2).sqrt(),
            mean(difference.abs() / safe_target),
            mean(difference**2 / safe_target),
            mean(log_error**2).sqrt(),
            mean((safe_prediction.log10() - safe_target.log10()).abs()),
            (mean(log_error**2) - mean(log_error) ** 2).clamp_min(0).sqrt() * 100,
            mean((ratio < 1.25).double()),
            mean((ratio < 1.25**2).double()),
            mean((ratio < 1.25**3).double()),
        ],
        dim=1,
    )
    return torch.where(count[:, None] > 0, rows, torch.full_like(rows, math.nan))


def depth_scores(errors: torch.Tensor) -> dict[str, float]:
    """Averages per-image `depth_errors` rows over the images that had ground truth.

    Args:
        errors: `[N, len(DEPTH_METRICS)]` rows.

    Returns:
        `{metric: mean}` in `DEPTH_METRICS` order, plus `"num_images"` (images with a valid pixel).
    """
    if errors.ndim != 2 or errors.shape[1] != len(DEPTH_METRICS):
        raise ValueError(f"errors must be [N, {len(DEPTH_METRICS)}], got {tuple(errors.shape)}")
    kept = errors[~errors.isnan().any(1)]
    scores = {
        name: (float(kept[:, i].mean()) if len(kept) else math.nan) for i, name in enumerate(DEPTH_METRICS)
    }
    scores["num_images"] = len(kept)
    return scores


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.mean()) if kept.numel() else math.nan


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value
