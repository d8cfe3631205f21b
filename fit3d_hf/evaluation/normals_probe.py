"""The surface-normal probe (`fit3d evaluate --probe normals`): linear heads on frozen features, trained with the
angular loss and scored by mean / median angular error and the share of pixels within 11.25, 22.5 and 30
degrees, for every feature variant side by side (original, fine-tuned, FiT3D), as the other probes are.

Probe3D (El Banani et al., CVPR 2024) and the 3D-awareness papers after it report surface normals beside depth
and correspondence. The training loop is the other probes' (`fit3d_hf.evaluation.training.train_probe`), with the
heads, the loss, the metric and the augmentation of `fit3d_hf.evaluation.normals`; the normals convention is
explained there.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from .arguments import parse_size
from .data import first_rows, resolve_split
from .normals import NormalsCropFlip, NormalsHeads, normals_rows, normals_scores
from .samples import ProbeDataset, collate_probe_samples
from .training import train_heads

__all__ = ["build_normals_transform", "evaluate_normals", "train_and_score_normals"]

logger = logging.getLogger(__name__)


def build_normals_transform(args) -> NormalsCropFlip | None:
    """The training augmentation of resolved probe options: None without --augment, else a random crop
    (`--crop_size`; none by default) and a flip that mirrors the normals."""
    if not args.augment:
        return None
    return NormalsCropFlip(parse_size(args.crop_size), args.flip_probability)


@torch.no_grad()
def evaluate_normals(heads: NormalsHeads, loader, accelerator, features=None) -> dict[str, dict]:
    """Scores every variant's head on a data set (all processes; per-image sums gathered with
    `gather_for_metrics` and added up as they come).

    Args:
        heads: trained `NormalsHeads`.
        loader: batches of `{"image", "target"}` or `{"raw", "target"}` (targets `[B, 3, H, W]`).
        accelerator: the `Accelerator` (prepares the loader).
        features: the frozen models, for image batches.

    Returns:
        variant -> `normals_scores` (mean, median, within_11.25, within_22.5, within_30, num_pixels).
    """
    heads = heads.to(accelerator.device).eval()
    if features is not None:
        features.to(accelerator.device)
    loader = accelerator.prepare(loader)
    totals: dict[str, torch.Tensor] = {}
    for batch in tqdm(loader, desc="evaluating normals", disable=not accelerator.is_local_main_process):
        target = batch["target"].to(accelerator.device)
        if "raw" in batch:
            raw = {key: value.to(accelerator.device) for key, value in batch["raw"].items()}
        else:
            raw = features(batch["image"].to(accelerator.device))
        rows = {
            variant: normals_rows(out, target)
            for variant, out in heads(raw, tuple(target.shape[-2:])).items()
        }
        for variant, value in accelerator.gather_for_metrics(rows).items():
            total = value.sum(0).cpu()
            totals[variant] = totals[variant] + total if variant in totals else total
    return {variant: normals_scores(total) for variant, total in totals.items()}


def train_and_score_normals(features, splits, eval_split, data_args, args, accelerator, dataset_kwargs):
    """Trains the normals heads on the training split and scores them on `eval_split`.

    Args:
        features: the `FrozenFeatures`.
        splits: the data set's `DatasetDict`.
        eval_split: the split evaluated.
        data_args: the `ProbeDataArguments`.
        args: resolved `ProbeArguments`.
        accelerator: the `Accelerator`.
        dataset_kwargs: `ProbeDataset` options (columns, image size, normals axes).

    Returns:
        `(train split name, metrics per variant, trained heads, loss history)`.
    """
    train_name, train_split = resolve_split(splits, data_args.train_split, "train")
    train_split = first_rows(train_split, data_args.max_train_samples)
    heads = NormalsHeads({variant: features.channels(variant) for variant in features.variants})
    train_dataset = ProbeDataset(
        train_split, "normals", transform=build_normals_transform(args), **dataset_kwargs
    )
    heads, history = train_heads(heads, train_dataset, features, args, accelerator)
    eval_loader = torch.utils.data.DataLoader(
        ProbeDataset(eval_split, "normals", **dataset_kwargs), batch_size=args.eval_batch_size,
        collate_fn=collate_probe_samples, num_workers=args.dataloader_num_workers,
    )  # fmt: skip
    return train_name, evaluate_normals(heads, eval_loader, accelerator, features), heads, history
