"""What Stage I writes into a scene's folder: the bundle (with compressed colours), metrics.json (written last,
it marks the scene done), preview PNGs, and the resume state that is dropped once the scene is done."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..gaussians import load_bundle, save_bundle
from ..gaussians.bundle import BUNDLE_FILENAME
from ..utils import atomic_path_leftovers, atomic_write_text
from .lifter import Lifter

__all__ = [
    "CHECKPOINT_FILENAME",
    "INITIAL_METRICS_FILENAME",
    "METRICS_FILENAME",
    "PREVIEW_FILENAMES",
    "PhaseClock",
    "finish_scene",
    "remove_outputs",
    "write_previews",
]

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.json"
CHECKPOINT_FILENAME = "checkpoint.pt"
INITIAL_METRICS_FILENAME = "initial_metrics.json"
PREVIEW_FILENAMES = ("preview_rgb.png", "preview_features.png")


class PhaseClock:
    """Wall seconds per phase of a scene's lift (metrics.json's `seconds_by_phase`), each taken once the device
    has finished the phase's queued work, so that a phase is not billed for the one before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        """Ends `phase`: the time since the previous lap (or since the clock started) is added to it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


def finish_scene(
    lifter: Lifter,
    extractor,
    folder: Path,
    views: tuple[list[int], list[int]],
    initial: dict,
    clock: PhaseClock,
    progress: bool,
) -> dict:
    """A trained scene's results: evaluations, the bundle, previews and metrics.json, then its resume state
    removed (unless `--keep_checkpoint`). Returns the metrics.

    Args:
        views: `(train, holdout)` view indices.
        initial: the evaluation of the training views before training (`feature_l1` is reported).
        clock: the scene's clock, its phases so far lapped (`training` among them); this adds the rest.
    """
    args, scene_id = lifter.args, lifter.data.scene_id
    train, holdout = views
    label = (lambda what: f"{scene_id}: {what}") if progress else (lambda what: None)
    final_train = lifter.evaluate(train, desc=label("evaluating the training views"))
    final_holdout = lifter.evaluate(holdout, desc=label("evaluating the held-out views"))
    clock.lap("evaluation")
    bundle_path = _save_scene_bundle(lifter, extractor, folder, clock, progress)
    # Held-out PSNR of the bundle as saved (fp16 geometry, compressed SH): one more pass over the held-out views.
    saved_holdout = (
        _evaluate_saved_bundle(lifter, bundle_path, holdout, label("evaluating the saved bundle"))
        if holdout
        else {}
    )
    clock.lap("saved_bundle_evaluation")
    if args.previews:
        write_previews(lifter, holdout[0] if holdout else train[0], folder)
        clock.lap("previews")
    evaluations = {
        "initial": initial,
        "train": final_train,
        "holdout": final_holdout,
        "saved_holdout": saved_holdout,
    }
    metrics = _scene_metrics(lifter, views, evaluations, bundle_path, clock)
    atomic_write_text(
        folder / METRICS_FILENAME, json.dumps(metrics, indent=2)
    )  # written last: marks the scene done
    if not args.keep_checkpoint:  # resume state, no longer needed once metrics.json marks the scene done
        (folder / CHECKPOINT_FILENAME).unlink(missing_ok=True)
        (folder / INITIAL_METRICS_FILENAME).unlink(missing_ok=True)
    return metrics


def _save_scene_bundle(lifter: Lifter, extractor, folder: Path, clock: PhaseClock, progress: bool) -> Path:
    """Writes the scene's bundle (colours compressed first with `--bundle_sh compressed`); returns its path."""
    args, data = lifter.args, lifter.data
    compressed = None
    if args.bundle_sh == "compressed":
        steps = args.bundle_sh_refine_steps
        compressed = lifter.compress_colours()
        clock.lap("colour_kmeans")
        compressed = lifter.refine_compressed_colours(
            compressed, min(1000, args.iterations // 10) if steps is None else steps, progress
        )
        clock.lap("colour_refinement")
    logger.info("%s: writing the bundle (%d Gaussians)", data.scene_id, len(lifter.gaussians))
    bundle_path = save_bundle(
        folder / BUNDLE_FILENAME, lifter.gaussians, lifter.decoder.weight.detach(),
        scene_id=data.scene_id, backbone=args.backbone,
        extra_metadata={"image_size": [data.width, data.height], "iterations": args.iterations}, seed=args.seed,
        sh_storage=args.bundle_sh, compressed_sh=compressed, provenance=extractor.provenance(),
    )  # fmt: skip
    clock.lap("bundle_writing")
    return bundle_path


def _evaluate_saved_bundle(lifter: Lifter, bundle_path: Path, holdout: list[int], desc: str | None) -> dict:
    """The held-out evaluation of the bundle as saved, rendered in place of the trained Gaussians."""
    trained = lifter.gaussians
    saved = load_bundle(bundle_path, include_sh=True).to_gaussians(trained.active_sh_degree)
    lifter.gaussians = saved.to(lifter.device)
    try:
        return lifter.evaluate(holdout, desc=desc)
    finally:
        lifter.gaussians = trained


def _scene_metrics(lifter: Lifter, views, evaluations: dict, bundle_path: Path, clock: PhaseClock) -> dict:
    """metrics.json of a scene."""
    args, data = lifter.args, lifter.data
    train, holdout = views
    return {
        "scene_id": data.scene_id,
        "backbone": args.backbone,
        "feature_dim": args.feature_dim,
        "backbone_dim": int(data.targets.shape[1]),
        "iterations": args.iterations,
        "num_gaussians": len(lifter.gaussians),
        "num_gaussians_initial": len(data.points) if len(data.points) else args.random_init_points,
        "densification": lifter.densification_totals,
        "views_train": len(train),
        "views_heldout": len(holdout),
        "image_size": [data.width, data.height],
        "psnr_train": evaluations["train"]["psnr"],
        "psnr_heldout": evaluations["saved_holdout"].get("psnr"),
        "psnr_heldout_uncompressed": evaluations["holdout"].get("psnr"),
        "feature_l1_train_start": evaluations["initial"]["feature_l1"],
        "feature_l1_train": evaluations["train"]["feature_l1"],
        "feature_l1_heldout": evaluations["holdout"].get("feature_l1"),
        "bundle_bytes": bundle_path.stat().st_size,
        "seconds_training": clock.seconds["training"],
        "seconds_total": time.perf_counter() - clock.start,
        # where the rest of seconds_total went: scene_data (images and the backbone's targets), evaluations, the
        # colours' compression and refinement, writing the bundle
        "seconds_by_phase": {phase: round(seconds, 3) for phase, seconds in clock.seconds.items()},
        "device": str(lifter.device),
        "arguments": asdict(args),
    }


def write_previews(lifter: Lifter, view: int, folder: Path) -> None:
    from ..visualization import pca_rgb, save_image

    data = lifter.data
    out = lifter.render(view, with_grad=False)
    rendered = (out.rgb[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    ground_truth = data.images[view].permute(1, 2, 0).cpu().numpy()
    save_image(folder / "preview_rgb.png", np.concatenate([ground_truth, rendered], axis=1))
    target = data.targets[view].float()
    decoded = lifter.decoder(out.features)
    decoded_low = F.interpolate(decoded, size=target.shape[1:], mode="bilinear", align_corners=False)[0]
    target_colors, rendered_colors = pca_rgb(target, decoded_low, fit_on=0)
    size = (data.width, data.height)
    from PIL import Image

    pictures = [
        np.asarray(Image.fromarray(c).resize(size, Image.NEAREST)) for c in (target_colors, rendered_colors)
    ]
    save_image(folder / "preview_features.png", np.concatenate(pictures, axis=1))


def _output_names() -> tuple[str, ...]:
    from ..reruns import SETTINGS_FILENAME

    return (
        METRICS_FILENAME,
        CHECKPOINT_FILENAME,
        INITIAL_METRICS_FILENAME,
        BUNDLE_FILENAME,
        SETTINGS_FILENAME,
        *PREVIEW_FILENAMES,
    )


def remove_outputs(folder: Path) -> None:
    """Deletes the files a lift writes into `folder` (only those: `--out` may share a folder with anything),
    and what a killed write of them left (`remove_partial_writes`)."""
    for name in _output_names():
        (folder / name).unlink(missing_ok=True)
    remove_partial_writes(folder)


def remove_partial_writes(folder: Path) -> list[Path]:
    """Deletes the temporary files of writes that a killed lift left in `folder` (`fit3d_hf.utils.
    atomic_path_leftovers`; a checkpoint's is ~1.5 GB at 1M Gaussians, and a job killed while one is written,
    e.g. preempted, would leave it behind at every kill). Called when the scene's lift starts: one
    process lifts a scene at a time (its claim), so no write of another process is in flight. Returns them."""
    removed = [leftover for name in _output_names() for leftover in atomic_path_leftovers(folder / name)]
    for leftover in removed:
        leftover.unlink(missing_ok=True)
    return removed
