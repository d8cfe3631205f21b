"""The segmentation and depth probes: heads trained on the training split and scored on the evaluation split
(`train_and_score`); scoring (`evaluate_probe`) by whole-image or sliding-window inference (segmentation) and
flip averaging (depth), with the metrics gathered across processes.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .arguments import ProbeArguments, parse_size
from .data import first_rows, resolve_split
from .features import FrozenFeatures
from .heads import ProbeHeads, build_probe_heads
from .metrics import depth_errors, depth_scores, segmentation_areas, segmentation_scores
from .protocol import apply_eval_crop, build_train_transform
from .samples import ProbeDataset, collate_probe_samples, infer_num_classes
from .training import train_heads
from .transforms import FixedCrop

__all__ = ["depth_head_options", "evaluate_probe", "train_and_score"]

logger = logging.getLogger(__name__)


def depth_head_options(args: ProbeArguments) -> dict:
    """The `LinearDepthHead` options held by probe options (for `build_probe_heads`)."""
    args = args.resolved()
    return {
        "min_depth": args.min_depth, "max_depth": args.max_depth, "n_bins": args.n_bins,
        "bins_strategy": args.bins_strategy, "norm_strategy": args.norm_strategy, "upsample": args.depth_upsample,
    }  # fmt: skip


def train_and_score(features, splits, eval_split, data_args, args, accelerator, dataset_kwargs, class_names):
    """Segmentation/depth: trains the heads on the training split and scores them on `eval_split`.

    Returns:
        `(train split name, metrics per variant, trained heads, loss history)`.
    """
    channels = {variant: features.channels(variant) for variant in features.variants}
    train_name, train_split = resolve_split(splits, data_args.train_split, "train")
    train_split = first_rows(train_split, data_args.max_train_samples)
    num_classes = None
    if args.probe == "segmentation":
        num_classes = _num_classes(train_split, data_args, args, dataset_kwargs, class_names)
    heads = build_probe_heads(args.probe, channels, num_classes, **depth_head_options(args))
    if args.cache_features and args.augment:
        logger.info("features are computed on the fly: caching needs --no_augment")
    transform = build_train_transform(args)
    train_dataset = ProbeDataset(train_split, args.probe, transform=transform, **dataset_kwargs)
    heads, history = train_heads(heads, train_dataset, features, args, accelerator)
    eval_transform = FixedCrop("kb") if args.fixed_crop == "kb" else None  # KITTI crops at evaluation too
    eval_loader = torch.utils.data.DataLoader(
        ProbeDataset(eval_split, args.probe, transform=eval_transform, **dataset_kwargs), batch_size=args.eval_batch_size,
        collate_fn=collate_probe_samples, num_workers=args.dataloader_num_workers,
    )  # fmt: skip
    metrics = evaluate_probe(
        heads, eval_loader, args, accelerator, features, num_classes=num_classes, class_names=class_names
    )
    return train_name, metrics, heads, history


def _num_classes(train_split, data_args, args, dataset_kwargs, class_names: list[str] | None) -> int:
    """Segmentation classes: --num_classes, else the number of --class_names, else read from the labels."""
    num_classes = data_args.num_classes or (len(class_names) if class_names else None)
    if num_classes is None:
        num_classes = infer_num_classes(
            ProbeDataset(train_split, "segmentation", **dataset_kwargs), args.ignore_index
        )
        logger.info("%d classes (largest label id + 1 in the training split)", num_classes)
    if class_names and len(class_names) != num_classes:
        raise ValueError(f"--class_names lists {len(class_names)} names for {num_classes} classes")
    return num_classes


# ----------------------------------------------------------------------------------------------------
# Scoring


def _resize_short_side(images: torch.Tensor, short_side: int | None) -> torch.Tensor:
    if not short_side:
        return images
    height, width = images.shape[-2:]
    scale = short_side / min(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if size == (height, width):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=scale < 1).clamp(
        0, 1
    )


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    # mmseg's slide inference: windows every `stride`, the last one flush with the border.
    count = max(length - window + stride - 1, 0) // stride + 1
    return sorted({min(i * stride, max(length - window, 0)) for i in range(count)})


def _segmentation_logits(
    heads: ProbeHeads,
    features: FrozenFeatures,
    images: torch.Tensor,
    label_size: tuple[int, int],
    args: ProbeArguments,
) -> dict[str, torch.Tensor]:
    """variant -> `[B, C, H_label, W_label]` logits by whole-image or sliding-window inference."""
    images = _resize_short_side(images, args.eval_short_side)
    if args.eval_mode != "slide":
        return heads(features(images), label_size)
    height, width = images.shape[-2:]
    window = parse_size(args.eval_crop_size or args.crop_size)
    window = (min(window[0], height), min(window[1], width))
    stride = (
        parse_size(args.eval_stride)
        if args.eval_stride
        else (max(1, round(window[0] * 2 / 3)), max(1, round(window[1] * 2 / 3)))
    )
    sums: dict[str, torch.Tensor] = {}
    counts = images.new_zeros(1, 1, height, width)
    for top in _window_starts(height, window[0], stride[0]):
        for left in _window_starts(width, window[1], stride[1]):
            crop = images[..., top : top + window[0], left : left + window[1]]
            for variant, logits in heads(features(crop), window).items():
                if variant not in sums:
                    sums[variant] = images.new_zeros(images.shape[0], logits.shape[1], height, width)
                sums[variant][..., top : top + window[0], left : left + window[1]] += logits
            counts[..., top : top + window[0], left : left + window[1]] += 1
    return {
        variant: F.interpolate(total / counts, size=label_size, mode="bilinear", align_corners=False)
        if (height, width) != tuple(label_size) else total / counts
        for variant, total in sums.items()
    }  # fmt: skip


def _depth_predictions(
    heads: ProbeHeads,
    features: FrozenFeatures | None,
    batch: dict,
    raw: dict | None,
    target_size,
    args: ProbeArguments,
    device,
) -> dict[str, torch.Tensor]:
    if raw is not None:
        return heads(raw, target_size)
    images = batch["image"].to(device)
    predictions = heads(features(images, depth_input=True), target_size)
    if args.eval_flip:
        flipped = heads(features(images.flip(-1), depth_input=True), target_size)
        predictions = {v: 0.5 * (p + flipped[v].flip(-1)) for v, p in predictions.items()}
    return predictions


@torch.no_grad()
def evaluate_probe(
    heads: ProbeHeads,
    loader: torch.utils.data.DataLoader,
    args: ProbeArguments,
    accelerator,
    features: FrozenFeatures | None = None,
    *,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> dict[str, dict]:
    """Scores every variant's head on a data set (all processes; metrics gathered with `gather_for_metrics`).

    Args:
        heads: trained heads.
        loader: batches of `{"image", "target"}` (or `{"raw", "target"}`, whole-image inference only).
        args: resolved options.
        accelerator: the `Accelerator` (prepares the loader).
        features: the frozen models, for image batches.
        num_classes: segmentation classes (default: the heads').
        class_names: names for the per-class scores.

    Returns:
        variant -> `segmentation_scores` (mIoU, mAcc, aAcc, per_class) or `depth_scores` (rmse, abs_rel, ...).
    """
    args = args.resolved()
    task = heads.task
    heads = heads.to(accelerator.device).eval()
    if features is not None:
        features.to(accelerator.device)
    if task == "segmentation":
        num_classes = num_classes or next(iter(heads.heads.values())).num_classes
    loader = accelerator.prepare(loader)
    collected: dict[str, list[torch.Tensor]] = {variant: [] for variant in heads.variants}
    for batch in tqdm(loader, desc=f"evaluating {task}", disable=not accelerator.is_local_main_process):
        target = batch["target"].to(accelerator.device)
        raw = {k: v.to(accelerator.device) for k, v in batch["raw"].items()} if "raw" in batch else None
        if task == "segmentation":
            if raw is not None:
                logits = heads(raw, tuple(target.shape[-2:]))
            else:
                logits = _segmentation_logits(
                    heads, features, batch["image"].to(accelerator.device), tuple(target.shape[-2:]), args
                )
            rows = {
                v: segmentation_areas(out.argmax(1), target, num_classes, args.ignore_index)
                for v, out in logits.items()
            }
        else:
            predictions = _depth_predictions(
                heads, features, batch, raw, tuple(target.shape[-2:]), args, accelerator.device
            )
            target = apply_eval_crop(target, args.eval_crop)
            rows = {
                v: depth_errors(out[:, 0], target, args.min_depth, args.max_depth)
                for v, out in predictions.items()
            }
        for variant, value in accelerator.gather_for_metrics(rows).items():
            collected[variant].append(value.cpu())
    if task == "segmentation":
        return {v: segmentation_scores(torch.cat(rows).sum(0), class_names) for v, rows in collected.items()}
    return {v: depth_scores(torch.cat(rows)) for v, rows in collected.items()}
