"""Training the probe heads on frozen features: the learning-rate schedule of mmcv's iteration-based hooks, the
per-task losses, the training loop over every feature variant's head at once (`train_probe`, DDP under
`accelerate launch`), and the feature cache that spares the backbones when nothing is augmented
(`cache_features`, `train_heads`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arguments import REFERENCE_SETTINGS, ProbeArguments
from .features import FrozenFeatures
from .heads import ProbeHeads, gradient_loss, sig_loss
from .normals import angular_loss
from .protocol import onecycle_momentum
from .report import VARIANT_LABELS
from .samples import CachedFeatureDataset, ProbeDataset, collate_cached, collate_probe_samples

__all__ = ["cache_features", "learning_rate_factor", "train_heads", "train_probe"]

_SIG_LOSS_WARMUP_STEPS = 100  # the reference SigLoss's warm-up, out of 38400 iterations


def learning_rate_factor(
    step: int,
    max_steps: int,
    warmup_steps: int,
    warmup_ratio: float,
    schedule: str,
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning-rate multiplier at an iteration, as mmcv's iteration-based hooks compute it.

    The decay (poly power 1 or cosine) runs over the whole run and the linear warm-up multiplies it, from
    `warmup_ratio` up to 1 (transformers' schedules instead start the decay after the warm-up).
    """
    progress = min(step / max(max_steps, 1), 1.0)
    if schedule == "poly":
        factor = (1.0 - progress) * (1.0 - min_lr_ratio) + min_lr_ratio
    elif schedule == "cosine":
        factor = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "constant":
        factor = 1.0
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    if step < warmup_steps:
        factor *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
    return factor


def _probe_losses(
    task: str,
    outputs: dict[str, torch.Tensor],
    target: torch.Tensor,
    step: int,
    args: ProbeArguments,
    sig_warmup: int,
) -> dict[str, torch.Tensor]:
    losses = {}
    for variant, output in outputs.items():
        if task == "segmentation":
            if args.ce_average == "valid":
                losses[variant] = F.cross_entropy(output, target.long(), ignore_index=args.ignore_index)
            else:  # mmseg 0.27 (avg_non_ignore=False): ignored pixels count 0 but stay in the mean
                losses[variant] = F.cross_entropy(
                    output, target.long(), ignore_index=args.ignore_index, reduction="none"
                ).mean()
        elif task == "normals":
            losses[variant] = angular_loss(output, target)
        else:
            target_map = target[:, None].to(output.dtype)
            losses[variant] = sig_loss(
                output, target_map, max_depth=args.max_depth, warm_up=step < sig_warmup
            ) + (args.gradient_loss_weight * gradient_loss(output, target_map, max_depth=args.max_depth))
    return losses


def _batch_inputs(batch: dict, features: FrozenFeatures | None, task: str, device) -> dict[str, torch.Tensor]:
    if "raw" in batch:
        return {key: value.to(device, non_blocking=True) for key, value in batch["raw"].items()}
    if features is None:
        raise ValueError("batches of images need the frozen models (features=...)")
    return features(batch["image"].to(device, non_blocking=True), depth_input=task == "depth")


def _endless(loader) -> Iterator[dict]:
    """Batches forever, epoch after epoch (the probes count iterations, not epochs)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError(
                "the training data loader is empty: fewer samples than one batch (lower --train_batch_size)"
            )
        epoch += 1


def train_probe(
    heads: ProbeHeads,
    loader: torch.utils.data.DataLoader,
    args: ProbeArguments,
    accelerator,
    features: FrozenFeatures | None = None,
    *,
    loader_is_sharded: bool = False,
) -> tuple[ProbeHeads, dict[str, list[float]]]:
    """Trains every variant's head for `args.max_steps` iterations on frozen features.

    Args:
        heads: from `build_probe_heads`.
        loader: batches of `{"image" [B, 3, H, W], "target" [B, H, W]}` (features computed on the fly) or of
            `{"raw": {...}, "target"}` (precomputed, see `cache_features`).
        args: resolved options (`ProbeArguments.resolved()`).
        accelerator: an `accelerate.Accelerator`; the heads train with DDP when it is distributed.
        features: the frozen models (needed for image batches).
        loader_is_sharded: the loader already yields only this process's share (a feature cache); otherwise
            it is prepared (sharded) by the accelerator.

    Returns:
        `(trained heads, unwrapped, in eval mode; {variant: loss per iteration on this process})`.
    """
    args = args.resolved()
    task = heads.task
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        # The reference's SyncBN: BatchNorm statistics over the batches of all GPUs.
        heads = nn.SyncBatchNorm.convert_sync_batchnorm(heads)
    optimizer, scheduler = _optimizer_and_schedule(heads, args)
    heads, optimizer = accelerator.prepare(heads, optimizer)
    if not loader_is_sharded:
        loader = accelerator.prepare(loader)
    unwrapped = accelerator.unwrap_model(heads)
    sig_warmup = round(_SIG_LOSS_WARMUP_STEPS * args.max_steps / REFERENCE_SETTINGS["depth"]["max_steps"])
    if features is not None:
        features.to(accelerator.device)
    heads.train()
    history: dict[str, list[float]] = {variant: [] for variant in unwrapped.variants}
    batches = _endless(loader)
    progress = tqdm(
        range(args.max_steps), desc=f"{task} probe", disable=not accelerator.is_local_main_process
    )
    for step in progress:
        if args.momentum_schedule == "onecycle":  # set before the iteration, as mmcv's hook does
            beta1 = onecycle_momentum(step, args.max_steps)
            for group in optimizer.param_groups:
                group["betas"] = (beta1, group["betas"][1])
        losses = _train_step(heads, unwrapped, next(batches), features, step, args, accelerator, sig_warmup)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        values = {variant: float(loss.detach()) for variant, loss in losses.items()}
        for variant, value in values.items():
            history[variant].append(value)
        progress.set_postfix({VARIANT_LABELS.get(v, v): f"{value:.3f}" for v, value in values.items()})
        if (step + 1) % args.logging_steps == 0 or step == 0:
            accelerator.log(
                {f"train/loss_{v}": value for v, value in values.items()}
                | {"train/lr": scheduler.get_last_lr()[0]},
                step=step + 1,
            )
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        _share_batchnorm_statistics(unwrapped)
    return unwrapped.eval(), history


def _optimizer_and_schedule(heads: nn.Module, args: ProbeArguments):
    """AdamW over the heads and the learning-rate schedule of resolved options: `(optimizer, scheduler)`."""
    optimizer = torch.optim.AdamW(heads.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    # Stepped here, not prepared: accelerate would step a prepared scheduler once per process per iteration.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: learning_rate_factor(
            step,
            args.max_steps,
            args.warmup_steps,
            args.warmup_ratio,
            args.lr_schedule,
            1e-8 if args.lr_schedule == "cosine" else 0.0,
        ),
    )
    return optimizer, scheduler


def _train_step(
    heads, unwrapped, batch, features, step, args, accelerator, sig_warmup
) -> dict[str, torch.Tensor]:
    """Forward and backward of every head on one batch (`heads` as prepared, `unwrapped` its module), gradients
    clipped per head; returns the losses per variant. The caller steps the optimizer."""
    task = unwrapped.task
    raw = _batch_inputs(batch, features, task, accelerator.device)
    target = batch["target"].to(accelerator.device, non_blocking=True)
    outputs = heads(raw, tuple(target.shape[-2:]))
    losses = _probe_losses(task, outputs, target, step, args, sig_warmup)
    accelerator.backward(sum(losses.values()))
    if args.max_grad_norm:
        for head in unwrapped.heads.values():
            torch.nn.utils.clip_grad_norm_(head.parameters(), args.max_grad_norm)
    return losses


def _share_batchnorm_statistics(unwrapped: nn.Module) -> None:
    """Rank 0's buffers on every process."""
    from accelerate.utils import broadcast

    # DDP keeps parameters equal, but each process's last forward updated its own BatchNorm statistics:
    # take rank 0's everywhere, so that every process evaluates the heads that are saved.
    with torch.no_grad():
        for buffer in unwrapped.buffers():
            buffer.copy_(broadcast(buffer.clone(), from_process=0))


@torch.no_grad()
def cache_features(
    features: FrozenFeatures, dataset: torch.utils.data.Dataset, task: str, accelerator, batch_size: int = 1
) -> CachedFeatureDataset:
    """Runs the frozen models once over this process's share of the training images (every
    `num_processes`-th sample) and keeps the outputs on the CPU."""
    indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, collate_fn=collate_probe_samples
    )
    features.to(accelerator.device)
    raw_items: list[dict[str, torch.Tensor]] = []
    targets: list[torch.Tensor] = []
    for batch in tqdm(loader, desc="caching features", disable=not accelerator.is_local_main_process):
        raw = features(batch["image"].to(accelerator.device), depth_input=task == "depth")
        for i in range(len(batch["target"])):
            raw_items.append({key: value[i].cpu() for key, value in raw.items()})
            targets.append(batch["target"][i])
    return CachedFeatureDataset(raw_items, targets)


def train_heads(
    heads: ProbeHeads,
    train_dataset: ProbeDataset,
    features: FrozenFeatures,
    args: ProbeArguments,
    accelerator,
) -> tuple[ProbeHeads, dict[str, list[float]]]:
    """`train_probe` on a training data set: on a cache of its frozen features, computed once, with
    --cache_features and without --augment (each process caches and shuffles its own share); else on features
    computed batch by batch.

    Returns:
        `(trained heads, loss history)`, as `train_probe`.
    """
    use_cache = args.cache_features and not args.augment
    if use_cache:
        cached = cache_features(
            features, train_dataset, args.probe, accelerator, batch_size=args.eval_batch_size
        )
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + accelerator.process_index)
        loader = torch.utils.data.DataLoader(
            cached, batch_size=args.train_batch_size, shuffle=True, drop_last=True, collate_fn=collate_cached,
            generator=generator,
        )  # fmt: skip
    else:
        loader = torch.utils.data.DataLoader(
            train_dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True,
            collate_fn=collate_probe_samples, num_workers=args.dataloader_num_workers,
        )  # fmt: skip
    return train_probe(heads, loader, args, accelerator, features, loader_is_sharded=use_cache)
