"""Running Stage I on scenes: `lift_scene` (one scene into its folder, reusing or resuming an earlier result made
with the same settings) and `lift_many` (a process's share of many scenes, one backbone shared)."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoints import load_torch_checkpoint
from ..scene.specs import heldout_view_indices
from ..utils import atomic_write_text, deterministic_algorithms
from .arguments import LiftingArguments, lifting_settings, resolve_device
from .checkpoint_writer import CheckpointWriter
from .lifter import Lifter
from .results import (
    CHECKPOINT_FILENAME,
    INITIAL_METRICS_FILENAME,
    METRICS_FILENAME,
    PhaseClock,
    finish_scene,
    remove_outputs,
    remove_partial_writes,
)
from .scene_data import load_scene_data

__all__ = ["lift_many", "lift_scene"]

logger = logging.getLogger(__name__)


def lift_scene(
    scene,
    args: LiftingArguments,
    extractor=None,
    *,
    max_iterations_this_run: int | None = None,
    progress: bool = True,
) -> dict | None:
    """Runs Stage I on one scene and writes `<out>/<scene_id>/` (bundle, metrics.json, settings.json, previews).

    An earlier result in that folder is reused when it was made with the same settings (`lifting_settings`):
    a finished scene is skipped and its metrics returned, an unfinished one resumes from its last
    checkpoint. With other settings the call is refused (`UsageError` naming them) unless `args.overwrite`.
    `max_iterations_this_run` stops early after a checkpoint (used to test resuming); the function then
    returns None. Nothing is written before the scene, the device and the backbone have loaded.

    Args:
        scene: a scene folder (any layout `fit3d_hf.scene.read_scene` reads) or a loaded `Scene`.
        args: the options.
        extractor: a `DenseFeatureExtractor`, or a function returning one (called only when the scene needs
            lifting); built from `args.backbone` when None.
    """
    from ..reruns import check_previous_result, write_settings
    from ..scene import read_scene

    device = resolve_device(args.device)
    if isinstance(scene, (str, os.PathLike)):
        scene = read_scene(scene)
    folder = Path(args.out) / scene.scene_id
    metrics_path = folder / METRICS_FILENAME
    settings = lifting_settings(args)
    previous = check_previous_result(
        folder, settings, finished=metrics_path.is_file(), unfinished=(folder / CHECKPOINT_FILENAME).is_file(),
        overwrite=args.overwrite, what="lifted scene",
    )  # fmt: skip
    if previous == "finished":
        logger.info(
            "%s: already lifted with these settings (%s): skipping it; --overwrite redoes it",
            scene.scene_id,
            folder,
        )
        return json.loads(metrics_path.read_text())
    torch.manual_seed(args.seed)
    if extractor is None:
        extractor = _load_extractor(args)
    elif not isinstance(extractor, torch.nn.Module):  # a loader (lift_many shares one backbone over scenes)
        extractor = extractor()
    if previous == "overwrite":
        logger.info("%s: replacing the earlier result in %s (--overwrite)", scene.scene_id, folder)
        remove_outputs(folder)
    created = _missing_ancestors(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in remove_partial_writes(folder):
        logger.info(
            "%s: removed %s, left by a write that a killed run did not finish", scene.scene_id, leftover
        )
    write_settings(folder, settings)
    try:
        with deterministic_algorithms(device.type == "cpu"):
            return _lift(scene, args, extractor, folder, device, max_iterations_this_run, progress)
    except BaseException:
        if not (folder / CHECKPOINT_FILENAME).is_file():  # nothing to resume: leave no litter behind
            remove_outputs(folder)
            for path in created:  # innermost first; only folders this call created, and only when empty
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
        raise


def _load_extractor(args: LiftingArguments):
    from ..backbones import DenseFeatureExtractor

    return DenseFeatureExtractor.from_pretrained(
        args.backbone, normalization=args.normalization, pos_embed_interpolation=args.pos_embed_interpolation
    )


def _missing_ancestors(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, innermost first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _lift(scene, args, extractor, folder, device, max_iterations_this_run, progress) -> dict | None:
    extractor = extractor.to(device).eval()
    for param in extractor.parameters():
        param.requires_grad_(False)

    clock = PhaseClock(device)
    bf16 = args.mixed_precision == "bf16"
    data = load_scene_data(scene, extractor, args.image_scale, device, progress=progress, bf16=bf16)
    clock.lap("scene_data")
    views = list(range(len(data.image_ids)))
    holdout = heldout_view_indices(len(views), args.holdout_every)  # the `scenes` builder's val split too
    train = [v for v in views if v not in holdout]
    lifter = Lifter(args, data, train, device)
    initial = _resume_or_evaluate(lifter, folder, train, progress)
    clock.lap("initial_evaluation")
    if not _optimise(lifter, folder / CHECKPOINT_FILENAME, max_iterations_this_run, progress):
        return None
    clock.lap("training")
    return finish_scene(lifter, extractor, folder, (train, holdout), initial, clock, progress)


def _resume_or_evaluate(lifter: Lifter, folder: Path, train: list[int], progress: bool) -> dict:
    """Resumes `lifter` from the folder's checkpoint, if any; returns the training views' evaluation before
    training (saved beside the checkpoint, so that a resumed run reports the same)."""
    scene_id = lifter.data.scene_id
    checkpoint_path = folder / CHECKPOINT_FILENAME
    if checkpoint_path.is_file():
        lifter.load_state_dict(load_torch_checkpoint(checkpoint_path))
        logger.info("%s: resumed from %s at iteration %d", scene_id, checkpoint_path, lifter.iteration)
        return json.loads((folder / INITIAL_METRICS_FILENAME).read_text())
    initial = lifter.evaluate(train, desc=f"{scene_id}: initial evaluation" if progress else None)
    atomic_write_text(folder / INITIAL_METRICS_FILENAME, json.dumps(initial))
    return initial


def _optimise(
    lifter: Lifter, checkpoint_path: Path, max_iterations_this_run: int | None, progress: bool
) -> bool:
    """Steps `lifter` up to `--iterations`, checkpointing every `--checkpoint_interval`. False when it stopped
    early: after a checkpoint, once `max_iterations_this_run` steps were taken (used to test resuming)."""
    args = lifter.args
    bar = tqdm(
        total=args.iterations,
        initial=lifter.iteration,
        desc=f"{lifter.data.scene_id}: lifting",
        disable=not progress,
    )
    steps_this_run, shown = 0, 0.0
    # atomic files with tensor checksums, written while the next steps run on a GPU (see CheckpointWriter)
    with CheckpointWriter(background=lifter.device.type == "cuda") as writer:
        while lifter.iteration < args.iterations:
            losses = lifter.step()
            steps_this_run += 1
            bar.update(1)
            # reading the loss waits for the GPU to finish every queued step: once a second, not every few steps
            if progress and time.monotonic() - shown >= 1.0:
                bar.set_postfix(loss=f"{float(losses['loss']):.4f}", gaussians=len(lifter.gaussians))
                shown = time.monotonic()
            interval = args.checkpoint_interval
            if interval and lifter.iteration % interval == 0 and lifter.iteration < args.iterations:
                writer.submit(lifter.state_dict(), checkpoint_path)
                if max_iterations_this_run is not None and steps_this_run >= max_iterations_this_run:
                    bar.close()
                    return False  # once the writer has finished
    bar.close()
    return True


def lift_many(
    scene_paths: list[Path],
    args: LiftingArguments,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    claims=None,
) -> list[dict]:
    """Lifts this process's share of the scenes (every `num_processes`-th, from `process_index`), one
    after the other; finished scenes are skipped and unfinished ones resume (see `lift_scene`).

    With `claims` (a `fit3d_hf.scene_claims.SceneClaims`), the processes claim scenes one at a time instead
    (balanced, and a dead process's scenes are taken over once its lease expires); the index and count
    are then unused."""

    @functools.cache
    def extractor():  # loaded once, for the first scene that needs it (a finished scene needs none)
        return _load_extractor(args)

    if claims is not None:
        return [
            lift_scene(path, args, extractor, progress=progress) for path in claims.scenes(list(scene_paths))
        ]
    share = list(scene_paths)[process_index::num_processes]
    results = []
    for path in tqdm(share, desc=f"scenes (process {process_index})", disable=not progress or len(share) < 2):
        results.append(lift_scene(path, args, extractor, progress=progress))
    return results
