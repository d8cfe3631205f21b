"""Stage II's training run: `train`, in the order of the diffusers/accelerate example scripts.

Accelerator and seed -> the backbone and its frozen original -> frames checked against the Gaussians -> the
prepared model, optimizer and loader (the model's forward compiled with `--torch_compile`) -> validation
before -> resume -> the epoch loop (accumulate, clip, log, checkpoint) -> validation after (eager) -> outputs
-> teardown. Each step is a function below.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..distributed import end_run
from ..errors import UsageError
from ..losses import masked_l1
from ..trackers import available_tracker
from ..utils import deterministic_algorithms
from .arguments import BackboneArguments, DataArguments, FinetuningArguments
from .backbone_setup import (
    compile_backbone,
    extractor_interpolation,
    freeze_unused_parameters,
    lora_wrap,
    make_optimizer,
    uncompile_backbone,
)
from .bundles import check_frames_against_gaussians, check_gaussians_dir, drop_scenes_without_bundles
from .checkpointing import resolve_resume_checkpoint, rotate_checkpoints
from .frames import build_train_dataloader, load_frames
from .outputs import save_outputs
from .rendered_targets import GaussianCache, flip_table, training_step_inputs
from .validation import multiview_consistency, validation_loss

__all__ = ["scaled_learning_rate", "train"]

logger = logging.getLogger(__name__)


def scaled_learning_rate(
    learning_rate: float, global_batch: int, rule: str, reference_batch: int = 2
) -> float:
    """The learning rate for a global batch under `rule`: "none" (unchanged), "linear" (x batch / 2) or "sqrt"
    (x sqrt(batch / 2)), relative to FiT3D's batch of 2. Neither rule is validated against the paper."""
    if rule == "none":
        return learning_rate
    ratio = global_batch / reference_batch
    if rule == "linear":
        return learning_rate * ratio
    if rule == "sqrt":
        return learning_rate * math.sqrt(ratio)
    raise UsageError(f"--scale_lr must be 'none', 'linear' or 'sqrt', got {rule!r}")


def train(model_args: BackboneArguments, data_args: DataArguments, args: FinetuningArguments) -> dict:
    """Runs Stage II and writes `<output_dir>/finetuned` (the backbone, `AutoModel`-loadable),
    `<output_dir>/fit3d` (the FiT3DModel with its card) and `<output_dir>/metrics.json`.

    On the CPU the run is deterministic: the same seed gives the same weights, also across a resume."""
    with deterministic_algorithms(not torch.cuda.is_available()):
        return _train(model_args, data_args, args)


@dataclass
class _Trainee:
    """The model side of a run, as `accelerator.prepare` returned it."""

    extractor: torch.nn.Module | None  # DDP-wrapped when distributed; dropped at teardown
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    trainable: list[torch.nn.Parameter]


def _train(model_args: BackboneArguments, data_args: DataArguments, args: FinetuningArguments) -> dict:
    output_dir = Path(args.output_dir)
    check_gaussians_dir(data_args.gaussians)  # before anything loads: a wrong path is the commonest mistake
    # A checkpoint asked for that does not exist is refused before anything loads (not a silent fresh run).
    resume_path = (
        resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
        if args.resume_from_checkpoint
        else None
    )
    tracker = available_tracker(args.report_to)
    accelerator = _make_accelerator(args, output_dir, tracker)
    learning_rate = _learning_rate(accelerator, args)
    extractor, original, provenance = _load_backbones(model_args)
    train_frames, validation_frames = _load_checked_frames(
        accelerator, data_args, extractor.hidden_size, provenance
    )
    trainee = _prepare(accelerator, extractor, model_args, train_frames, learning_rate, args)
    extractor = None  # prepared (and wrapped) in `trainee` from here on
    steps_per_epoch = math.ceil(len(trainee.loader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or steps_per_epoch * args.num_train_epochs
    cache = GaussianCache(data_args.gaussians, accelerator.device, data_args.gaussian_cache_gb * 1e9)
    if tracker:
        accelerator.init_trackers(
            args.tracker_project_name, config={**asdict(model_args), **asdict(data_args), **asdict(args)}
        )

    metrics: dict = {}
    if validation_frames is not None:
        original.to(accelerator.device)
        metrics.update(
            _validate(original, validation_frames, cache, accelerator, data_args, args, when="before")
        )
    start = _resume(accelerator, resume_path, output_dir, steps_per_epoch, args)
    global_step, losses = _train_epochs(
        accelerator, trainee, cache, len(train_frames), start, max_steps, args
    )
    accelerator.wait_for_everyone()

    # Validation "after" runs the eager forward, as "before" did (and as the unwrapped module of a DDP run,
    # which was not the compiled one, would anyway): no recompiling for the no-grad evaluation shapes.
    uncompile_backbone(trainee.extractor)
    unwrapped = accelerator.unwrap_model(trainee.extractor)
    unwrapped.eval()
    metrics.update(_training_metrics(accelerator, unwrapped, cache, global_step, losses, learning_rate, args))
    if validation_frames is not None:
        metrics.update(
            _validate(unwrapped, validation_frames, cache, accelerator, data_args, args, when="after")
        )
    if accelerator.is_main_process:
        save_outputs(unwrapped, original, model_args, data_args, args, metrics)
    accelerator.log({k: v for k, v in metrics.items() if isinstance(v, float)}, step=global_step)
    _teardown(accelerator, trainee)
    return metrics


def _make_accelerator(args: FinetuningArguments, output_dir: Path, tracker: str | None):
    """The run's `Accelerator` (precision, accumulation, tracker, seedable sampler), with the seed set."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=tracker,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        # non_blocking: with the pinned batches of `build_train_dataloader` (on CUDA), the upload overlaps the
        # host work of the step (session 3, H200: 0.49 -> 0.13 ms per image).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
    )
    set_seed(args.seed)
    return accelerator


def _learning_rate(accelerator, args: FinetuningArguments) -> float:
    """`--learning_rate` after `--scale_lr` for the global batch; prints it, the precision and torch.compile."""
    precision = accelerator.mixed_precision
    accelerator.print(
        f"Stage II precision: {'fp32' if precision == 'no' else precision} (--mixed_precision {precision})"
    )
    accelerator.print(
        f"Stage II torch.compile: backend {args.torch_compile_backend}, mode {args.torch_compile_mode or 'default'}"
        " (--torch_compile; the first steps are slower while it compiles)"
        if args.torch_compile
        else "Stage II torch.compile: off (--torch_compile)"
    )
    learning_rate = scaled_learning_rate(
        args.learning_rate,
        args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        args.scale_lr,
    )
    if learning_rate != args.learning_rate:
        accelerator.print(
            f"--scale_lr {args.scale_lr}: learning rate {args.learning_rate:g} -> {learning_rate:g}"
        )
    return learning_rate


def _load_backbones(model_args: BackboneArguments):
    """`(extractor, original, provenance)`: the trainable backbone, a frozen copy of it as loaded (for the
    FiT3DModel and the "before" measurements) and what the bundles must have been lifted with."""
    from ..backbones import DenseFeatureExtractor

    extractor = DenseFeatureExtractor.from_pretrained(
        model_args.backbone,
        normalization=model_args.normalization,
        pos_embed_interpolation=model_args.pos_embed_interpolation,
    )
    provenance = extractor.provenance()
    # Every weight trains, as in FiT3D (timm models have no frozen weights; transformers' ViT-MAE freezes its
    # position embeddings, which timm's MAE, and so the original, fine-tunes).
    extractor.model.requires_grad_(True)
    original = copy.deepcopy(extractor).eval().requires_grad_(False)
    return extractor, original, provenance


def _load_checked_frames(accelerator, data_args: DataArguments, backbone_dim: int, provenance: dict):
    """`(train_frames, validation_frames or None)`, checked against the Gaussians before anything trains."""
    with accelerator.main_process_first():
        train_frames = load_frames(
            data_args.frames, data_args.train_split, holdout_every=data_args.holdout_every
        )
        if data_args.max_train_samples:
            train_frames = train_frames.select(range(min(data_args.max_train_samples, len(train_frames))))
        validation_frames = _load_validation_frames(data_args)
    if data_args.skip_scenes_without_bundles:
        train_frames, validation_frames = drop_scenes_without_bundles(
            train_frames, validation_frames, data_args.gaussians
        )
    scene_ids = set(train_frames["scene_id"]) | (
        set(validation_frames["scene_id"]) if validation_frames is not None else set()
    )
    check_frames_against_gaussians(
        scene_ids, data_args.gaussians, backbone_dim, provenance=provenance,
        allow_backbone_mismatch=data_args.allow_backbone_mismatch,
    )  # fmt: skip
    return train_frames, validation_frames


def _load_validation_frames(data_args: DataArguments):
    """The validation split (at most `--max_validation_samples` frames), or None: none asked for, or none found."""
    if not data_args.validation_split:
        return None
    try:
        frames = load_frames(
            data_args.frames, data_args.validation_split, holdout_every=data_args.holdout_every
        )
    except (FileNotFoundError, ValueError, KeyError) as error:
        logger.warning("no validation split %r (%s): skipping validation", data_args.validation_split, error)
        return None
    if data_args.max_validation_samples:
        frames = frames.select(range(min(data_args.max_validation_samples, len(frames))))
    return frames


def _prepare(
    accelerator, extractor, model_args: BackboneArguments, train_frames, learning_rate: float, args
) -> _Trainee:
    """LoRA (if asked for), unused weights frozen, AdamW and the shuffled loader, through `accelerator.prepare`;
    then, with `--torch_compile`, the prepared model's forward compiled in place (as `benchmarks/finetune.py
    --compile` does), so that its state_dict keys, and the checkpoints', stay those of the eager model."""
    if model_args.lora_rank > 0:
        extractor = lora_wrap(extractor, model_args)
    unused = freeze_unused_parameters(extractor)
    if unused:
        logger.info("frozen (they get no gradient from dense features): %s", ", ".join(unused))
    extractor.train()
    trainable = [p for p in extractor.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, learning_rate, args.weight_decay, accelerator.device)
    loader = build_train_dataloader(train_frames, args)
    if len(loader) == 0:
        raise UsageError(
            f"{len(train_frames)} training frames are fewer than one batch of --train_batch_size {args.train_batch_size}"
        )
    extractor, optimizer, loader = accelerator.prepare(extractor, optimizer, loader)
    if args.torch_compile:
        compile_backbone(extractor, args.torch_compile_backend, args.torch_compile_mode)
    return _Trainee(extractor, optimizer, loader, trainable)


def _validate(extractor, frames, cache, accelerator, data_args: DataArguments, args, *, when: str) -> dict:
    """The validation loss, and on the main process the multi-view consistency, of `extractor` ("before" or
    "after" training: the keys of metrics.json)."""
    metrics = {
        "validation_loss_before" if when == "before" else "validation_loss": validation_loss(
            extractor, frames, cache, accelerator, args
        )
    }
    if accelerator.is_main_process:
        metrics[f"consistency_{when}"] = multiview_consistency(
            extractor, frames, cache, data_args.consistency_pairs, accelerator.device, args.near_plane
        )
    return metrics


def _resume(
    accelerator, resume_path: Path | None, output_dir: Path, steps_per_epoch: int, args
) -> tuple[int, int, int]:
    """`(global step, first epoch, batches of it to skip)`: where `--resume_from_checkpoint` starts (zeros for a new run)."""
    if not args.resume_from_checkpoint:
        return 0, 0, 0
    if resume_path is None:
        accelerator.print(f"no checkpoint in {output_dir} yet: starting a new run")
        return 0, 0, 0
    accelerator.load_state(str(resume_path))
    global_step = int(resume_path.name.split("-")[1])
    accelerator.print(f"resumed from {resume_path} at step {global_step}")
    return (
        global_step,
        global_step // steps_per_epoch,
        (global_step % steps_per_epoch) * args.gradient_accumulation_steps,
    )


def _train_epochs(
    accelerator, trainee: _Trainee, cache, num_frames: int, start, max_steps: int, args
) -> tuple[int, tuple[float | None, float | None]]:
    """The epoch loop from `start` (see `_resume`) up to `max_steps`; returns the last step and the losses of
    this run's first and last steps (averaged over processes; None if no step ran)."""
    global_step, first_epoch, resume_batches = start
    epochs = math.ceil(max_steps / math.ceil(len(trainee.loader) / args.gradient_accumulation_steps))
    unwrapped = accelerator.unwrap_model(trainee.extractor)
    progress = tqdm(
        total=max_steps,
        initial=global_step,
        desc="fine-tuning",
        disable=not accelerator.is_local_main_process,
    )
    first_loss = last_loss = loss = read_step = None
    for epoch in range(first_epoch, epochs):
        if hasattr(trainee.loader, "set_epoch"):
            trainee.loader.set_epoch(epoch)
        flips = flip_table(num_frames, args.flip_probability, args.seed, epoch)
        skip = epoch == first_epoch and resume_batches
        for batch in (
            accelerator.skip_first_batches(trainee.loader, resume_batches) if skip else trainee.loader
        ):
            loss = _step(accelerator, trainee, unwrapped, batch, cache, flips, args)
            if accelerator.sync_gradients:
                global_step += 1
                # the loss is read (a wait for the GPU and a collective) at the run's first step and every
                # --logging_steps only: the same steps on every process, and no wait at the others
                if read_step is None or global_step % args.logging_steps == 0:
                    last_loss = _read_loss(accelerator, loss, global_step, progress)
                    if read_step is None:
                        first_loss = last_loss
                    read_step = global_step
                _after_step(accelerator, global_step, progress, args)
                if global_step >= max_steps:
                    break
        if global_step >= max_steps:
            break
    if read_step is not None and read_step != global_step:  # the last step's loss, unless already read
        last_loss = _read_loss(accelerator, loss, global_step, progress)
    progress.close()
    return global_step, (first_loss, last_loss)


def _step(accelerator, trainee: _Trainee, unwrapped, batch, cache, flips, args) -> torch.Tensor:
    """One batch: render the targets, regress them (masked L1), and step the optimizer when gradients sync."""
    with accelerator.accumulate(trainee.extractor):
        images, targets, masks = training_step_inputs(
            batch, cache, unwrapped, flips, accelerator.device, args.near_plane
        )
        with accelerator.autocast():
            predictions = trainee.extractor(images)
        loss = masked_l1(predictions.float(), targets, masks)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(trainee.trainable, args.max_grad_norm)
        trainee.optimizer.step()
        trainee.optimizer.zero_grad(set_to_none=True)
    return loss


def _read_loss(accelerator, loss: torch.Tensor, global_step: int, progress) -> float:
    """The step's loss averaged over processes, shown and logged."""
    loss_value = accelerator.gather(loss.detach()[None]).mean().item()
    progress.set_postfix(loss=f"{loss_value:.4f}")
    accelerator.log({"train/loss": loss_value}, step=global_step)
    return loss_value


def _after_step(accelerator, global_step: int, progress, args) -> None:
    """After an optimisation step: the progress bar and, every `--checkpointing_steps`, a checkpoint (the
    oldest ones rotated out)."""
    from ..checkpoints import save_state_atomically

    progress.update(1)
    if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
        output_dir = Path(args.output_dir)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and args.checkpoints_total_limit:
            rotate_checkpoints(output_dir, args.checkpoints_total_limit - 1)  # room for the new one
        save_state_atomically(accelerator, output_dir / f"checkpoint-{global_step}")


def _training_metrics(
    accelerator,
    unwrapped,
    cache,
    global_step: int,
    losses: tuple[float | None, float | None],
    learning_rate: float,
    args,
) -> dict:
    """The run's own numbers for metrics.json: first and last loss, steps, precision, torch.compile, learning
    rate, resampling."""
    metrics = {
        "train_loss_first": losses[0],
        "train_loss_last": losses[1],
        "steps": global_step,
    }
    metrics.update(
        {
            "mixed_precision": accelerator.mixed_precision,
            "torch_compile": args.torch_compile,
            "learning_rate": learning_rate,
            "pos_embed_interpolation": extractor_interpolation(unwrapped),
        }
    )
    if args.torch_compile:
        metrics["torch_compile_backend"] = args.torch_compile_backend
        metrics["torch_compile_mode"] = args.torch_compile_mode
    if cache.verify_seconds:  # what checking each bundle's checksums once cost (read included), per scene
        metrics["bundle_verify_seconds_per_scene"] = {
            k: round(v, 4) for k, v in sorted(cache.verify_seconds.items())
        }
    return metrics


def _teardown(accelerator, trainee: _Trainee) -> None:
    trainee.extractor = None  # the DDP wrapper goes before the process group (see `end_run`)
    end_run(accelerator)
