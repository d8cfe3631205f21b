"""Linear probes on frozen features, and the side-by-side comparison original / fine-tuned / FiT3D.

One frozen forward pass of a `FiT3DModel` per batch feeds three probes at once, one per feature variant:

- ``original``: the original backbone's patch features (D channels);
- ``finetuned``: the 3D-aware fine-tuned backbone's alone (D);
- ``fit3d``: their concatenation (2D), FiT3D's features; for depth with the *original* backbone's CLS token,
  as FiT3D's depth probe does.

(`--baseline` adds a ``baseline`` row for any plain backbone.) The heads are independent, so training them
together on one summed loss gives each exactly the updates it would get alone (AdamW is per parameter;
gradient clipping is done per head), at a third of the backbone cost.

Probes (FiT3D's protocol, see `ProbeArguments` for the defaults):

- segmentation: BatchNorm + 1x1 conv, cross-entropy at label resolution, AdamW lr 1e-3 wd 1e-4, poly schedule
  with linear warm-up, random rescale/crop/flip and photometric distortion; mIoU, mAcc, aAcc;
- depth: 256-bin classification head on un-normed features ⊕ CLS, SigLoss + 0.5 x gradient loss, AdamW lr
  1e-4 wd 0.01, cosine schedule with warm-up, gradient clipping 35; RMSE, AbsRel, δ thresholds;
- correspondence (no training): mutual-nearest-neighbour matching of the dense features between views of a
  scene, recall within 5/10/20 px of the ground truth from depth and poses, binned by viewpoint change;
- normals: BatchNorm + 1x1 conv to unit camera-frame normals, angular loss; mean / median angular error and
  the share within 11.25/22.5/30 degrees (`fit3d_hf.evaluation.normals`, `normals_probe`).

Runs on one device or under `accelerate launch` (the heads train with DDP; metrics are gathered with
`gather_for_metrics`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UsageError
from ..utils import atomic_path
from .correspondence import CorrespondenceProbeOptions, correspondence_probe, parse_floats
from .data import (
    TASKS,
    CachedFeatureDataset,
    ComposeTransforms,
    PhotoMetricDistortion,
    ProbeDataArguments,
    ProbeDataset,
    RandomScaleCropFlip,
    check_local_path,
    collate_cached,
    collate_probe_samples,
    infer_num_classes,
    load_probe_dataset,
    parse_class_names,
    parse_size,
    resolve_split,
)
from .heads import ProbeHeads, build_probe_heads, gradient_loss, sig_loss, variant_inputs
from .metrics import depth_errors, depth_scores, segmentation_areas, segmentation_scores
from .normals import NORMALS_REFERENCE, angular_loss
from .protocol import (
    ColorAug,
    FixedCrop,
    RandomRotate,
    apply_eval_crop,
    apply_preset,
    center_pad,
    onecycle_momentum,
)
from .report import VARIANT_LABELS, build_results, write_report

__all__ = [
    "PROBES",
    "build_train_transform",
    "depth_head_options",
    "FrozenFeatures",
    "ModelArguments",
    "ProbeArguments",
    "cache_features",
    "evaluate_correspondence",
    "evaluate_probe",
    "learning_rate_factor",
    "load_frozen_features",
    "run_probe",
    "train_probe",
]

logger = logging.getLogger(__name__)

PROBES = TASKS  # the probes are the tasks the data loader prepares samples for
# The reference protocol (FiT3D / DINOv2 linear probing, 8 GPUs x 2 images); see ProbeArguments.
_REFERENCE = {
    "segmentation": {
        "max_steps": 40000, "learning_rate": 1e-3, "weight_decay": 1e-4, "warmup_steps": 1500, "warmup_ratio": 1e-6,
        "lr_schedule": "poly", "max_grad_norm": 0.0, "crop_size": "512", "scale_range": "0.5,2.0",
        "train_short_side": 512, "eval_mode": "slide", "eval_flip": False, "photometric_distortion": True,
        "rotate_degrees": 0.0, "color_aug": False, "color_aug_brightness": "0.75,1.25", "fixed_crop": "none",
        "eval_crop": "none", "momentum_schedule": "none", "ce_average": "all",
    },
    "depth": {
        "max_steps": 38400, "learning_rate": 1e-4, "weight_decay": 1e-2, "warmup_steps": 12800, "warmup_ratio": 1e-3,
        "lr_schedule": "cosine", "max_grad_norm": 35.0, "crop_size": "416,544", "scale_range": "1.0,1.0",
        "train_short_side": None, "eval_mode": "whole", "eval_flip": True, "photometric_distortion": False,
        "rotate_degrees": 2.5, "color_aug": True, "color_aug_brightness": "0.75,1.25", "fixed_crop": "none",
        "eval_crop": "none", "momentum_schedule": "onecycle", "ce_average": "all", "max_depth": 10.0,
    },
}  # fmt: skip
_REFERENCE["normals"] = NORMALS_REFERENCE  # after Probe3D's surface-normal probe (see fit3d_hf.evaluation.normals)
_SIG_LOSS_WARMUP_STEPS = 100  # the reference SigLoss's warm-up, out of 38400 iterations


# ----------------------------------------------------------------------------------------------------
# Options (one line per option: the help strings are the documentation of `fit3d evaluate --help`)


# fmt: off
@dataclass
class ModelArguments:
    model: str | None = field(default=None, metadata={"help": "FiT3DModel to evaluate (folder or Hub id): gives the rows original, fine-tuned and FiT3D."})
    baseline: str | None = field(default=None, metadata={"help": "A plain backbone (Hub id, folder or short name like dinov2_small): adds a 'baseline' row."})
    normalization: str = field(default="imagenet", metadata={"help": "Input normalisation of --baseline: 'imagenet' or 'processor'.", "choices": ["imagenet", "processor"]})
    backbone_dtype: str = field(default="float32", metadata={"help": "dtype of the frozen backbones: float32, bfloat16 or float16 (heads train in float32).", "choices": ["float32", "bfloat16", "float16"]})

    def __post_init__(self) -> None:
        if not self.model and not self.baseline:
            raise ValueError("pass --model (a FiT3DModel) and/or --baseline (a plain backbone)")
        if self.backbone_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--backbone_dtype must be float32, bfloat16 or float16, got {self.backbone_dtype!r}")


@dataclass
class ProbeArguments:
    probe: str = field(metadata={"help": "segmentation, depth, correspondence or normals (defaults after Probe3D: 1000 steps, AdamW lr 5e-4 wd 0.01, cosine with 15% warm-up, no crop).", "choices": list(PROBES)})
    output_dir: str = field(metadata={"help": "Where results.md, results.json, the plots and the probe heads go."})
    seed: int = field(default=0, metadata={"help": "Seed of the heads' initialisation, the data order and the augmentation."})
    max_steps: int | None = field(default=None, metadata={"help": "Training iterations (reference: 40000 segmentation, 38400 depth, at 8 GPUs x 2 images: scale with fewer)."})
    train_batch_size: int = field(default=2, metadata={"help": "Images per device per iteration (reference: 2)."})
    eval_batch_size: int = field(default=1, metadata={"help": "Images per device at evaluation (images of different sizes need 1)."})
    learning_rate: float | None = field(default=None, metadata={"help": "AdamW learning rate (reference: 1e-3 segmentation, 1e-4 depth)."})
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW weight decay (reference: 1e-4 segmentation, 0.01 depth)."})
    lr_schedule: str | None = field(default=None, metadata={"help": "poly, cosine or constant (reference: poly segmentation, cosine depth).", "choices": ["poly", "cosine", "constant"]})
    warmup_steps: int | None = field(default=None, metadata={"help": "Linear warm-up iterations (default: the reference's share of max_steps, 1500/40000 or 12800/38400)."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Learning-rate factor at the start of the warm-up (reference: 1e-6 / 1e-3)."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Gradient clipping per head, 0 = off (reference: off segmentation, 35 depth)."})
    augment: bool = field(default=True, metadata={"help": "Training augmentation: random rescale (segmentation), random crop, flip. --no_augment trains on whole images."})
    cache_features: bool = field(default=True, metadata={"help": "Without augmentation, compute the frozen features of the training images once and train on the cache (a big speed-up, above all on CPU; costs memory: N x channels x h x w floats)."})
    crop_size: str | None = field(default=None, metadata={"help": "Training crop 'N' or 'H,W' (reference: 512 segmentation, 416,544 depth)."})
    scale_range: str | None = field(default=None, metadata={"help": "Random rescale range 'min,max' (reference: 0.5,2.0 segmentation; 1,1 depth)."})
    train_short_side: int | None = field(default=None, metadata={"help": "Shorter image side before the random rescale (reference: 512 segmentation; none for depth)."})
    flip_probability: float = field(default=0.5, metadata={"help": "Probability of a horizontal flip in training."})
    photometric_distortion: bool | None = field(default=None, metadata={"help": "With augmentation, mmseg's PhotoMetricDistortion of the training images after the crop and flip: random brightness, contrast, saturation, hue (reference: on for segmentation, off for depth). Pass true/false."})
    eval_mode: str | None = field(default=None, metadata={"help": "Segmentation inference: 'slide' windows (reference) or 'whole' image.", "choices": ["slide", "whole"]})
    eval_crop_size: str | None = field(default=None, metadata={"help": "Sliding-window size (default: crop_size)."})
    eval_stride: str | None = field(default=None, metadata={"help": "Sliding-window stride (default: 2/3 of the window, 341 for 512)."})
    eval_short_side: int | None = field(default=None, metadata={"help": "Resize images to this shorter side for inference (default: train_short_side with augmentation); scores are at label size."})
    eval_flip: bool | None = field(default=None, metadata={"help": "Average with the flipped image's prediction (reference: on for depth). Pass true/false."})
    ignore_index: int = field(default=255, metadata={"help": "Label value without ground truth."})
    min_depth: float = field(default=1e-3, metadata={"help": "Smallest depth (first bin centre; evaluation ignores ground truth below it)."})
    max_depth: float | None = field(default=None, metadata={"help": "Largest depth (last bin centre; evaluation ignores ground truth beyond it): 10 NYU (default), 20 ScanNet++, 80 KITTI (set by --preset)."})
    patch_fit: str = field(default="pad", metadata={"help": "How images reach a multiple of the patch size before the backbones: 'pad' (centred padding with the mean colour, FiT3D's probes: 512 -> 518) or 'resize' (bilinear down to the multiple below: 512 -> 504).", "choices": ["pad", "resize"]})
    rotate_degrees: float | None = field(default=None, metadata={"help": "With augmentation, rotate image and target by up to this many degrees with probability 0.5 (reference: 2.5 depth, 0 segmentation)."})
    color_aug: bool | None = field(default=None, metadata={"help": "With augmentation, the depth toolbox's ColorAug (p 0.5: gamma 0.9-1.1 on the 0-255 scale, brightness, colour 0.9-1.1 per channel) after the crop (reference: on for depth, off for segmentation). Pass true/false."})
    color_aug_brightness: str | None = field(default=None, metadata={"help": "ColorAug's brightness range 'min,max' (reference: 0.75,1.25; KITTI 0.9,1.1)."})
    fixed_crop: str | None = field(default=None, metadata={"help": "Fixed crop of image and target before augmentation: 'nyu' (NYUCrop of training images, rows 45:472, cols 43:608), 'kb' (KITTI's 352 x 1216 bottom-centre crop, training and evaluation) or 'none' (set by --preset).", "choices": ["none", "nyu", "kb"]})
    eval_crop: str | None = field(default=None, metadata={"help": "Depth evaluation region: 'eigen' (NYU, rows 45:471, cols 41:601 of 480 x 640), 'garg' (KITTI) or 'none' (set by --preset).", "choices": ["none", "eigen", "garg"]})
    momentum_schedule: str | None = field(default=None, metadata={"help": "AdamW beta1 schedule: 'onecycle' (mmcv's OneCycle, 0.95 -> 0.85 over 30%% of the run, then back; reference for depth) or 'none' (0.9; reference for segmentation).", "choices": ["none", "onecycle"]})
    ce_average: str | None = field(default=None, metadata={"help": "Segmentation cross-entropy mean: 'all' (over every pixel, ignored ones counting 0: mmseg 0.27's default, the reference) or 'valid' (over labelled pixels only, PyTorch's).", "choices": ["all", "valid"]})
    n_bins: int = field(default=256, metadata={"help": "Depth classes of the depth head."})
    bins_strategy: str = field(default="UD", metadata={"help": "Depth bin centres: UD (uniform, reference) or SID (log-uniform).", "choices": ["UD", "SID"]})
    norm_strategy: str = field(default="linear", metadata={"help": "Bin score normalisation: linear (reference), softmax or sigmoid.", "choices": ["linear", "softmax", "sigmoid"]})
    depth_upsample: int = field(default=4, metadata={"help": "Upsampling of the features before the depth head's conv."})
    gradient_loss_weight: float = field(default=0.5, metadata={"help": "Weight of the gradient loss next to SigLoss."})
    thresholds: str = field(default="5,10,20", metadata={"help": "Correspondence: pixel thresholds of the recall."})
    angle_bins: str = field(default="0,15,30,60,180", metadata={"help": "Correspondence: edges (degrees) of the viewpoint-change bins."})
    pairs_per_scene: int = field(default=60, metadata={"help": "Correspondence: view pairs drawn per scene, spread over the angle bins."})
    min_overlap: float = field(default=0.1, metadata={"help": "Correspondence: least share of A's patches visible in B for a pair to count."})
    max_scenes: int | None = field(default=None, metadata={"help": "Correspondence: use the first N scenes only."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loading worker processes."})
    report_to: str = field(default="none", metadata={"help": "Tracker for the training losses: tensorboard, wandb, ... or none."})
    logging_steps: int = field(default=50, metadata={"help": "Log the training loss every N iterations."})
    save_heads: bool = field(default=True, metadata={"help": "Save the trained probe heads (probe_heads.safetensors)."})

    def __post_init__(self) -> None:
        if self.probe not in PROBES:
            raise ValueError(f"--probe must be one of {PROBES}, got {self.probe!r}")
        if self.train_batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("--train_batch_size and --eval_batch_size must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max_steps must be at least 1, got {self.max_steps}")
        if self.eval_mode not in (None, "slide", "whole"):
            raise ValueError(f"--eval_mode must be 'slide' or 'whole', got {self.eval_mode!r}")
        if self.lr_schedule not in (None, "poly", "cosine", "constant"):
            raise ValueError(f"--lr_schedule must be poly, cosine or constant, got {self.lr_schedule!r}")
        if self.max_depth is not None and not 0 < self.min_depth < self.max_depth:
            raise ValueError(f"need 0 < --min_depth < --max_depth, got {self.min_depth} and {self.max_depth}")
        for name, choices in (("patch_fit", ("pad", "resize")), ("fixed_crop", (None, "none", "nyu", "kb")),
                              ("eval_crop", (None, "none", "eigen", "garg")), ("momentum_schedule", (None, "none", "onecycle")),
                              ("ce_average", (None, "all", "valid"))):  # fmt: skip
            if getattr(self, name) not in choices:
                raise UsageError(f"--{name} must be one of {[c for c in choices if c]}, got {getattr(self, name)!r}")

    def resolved(self) -> ProbeArguments:
        """A copy with every probe-dependent default (None) set to the reference protocol's value."""
        if self.probe == "correspondence":
            return replace(self)
        reference = _REFERENCE[self.probe]
        values = {
            key: (getattr(self, key) if getattr(self, key) is not None else value)
            for key, value in reference.items()
        }
        max_steps = values["max_steps"]
        if self.warmup_steps is None:  # keep the reference's share of the run
            values["warmup_steps"] = round(reference["warmup_steps"] * max_steps / reference["max_steps"])
        if self.eval_short_side is None:  # infer at the scale the head was trained at
            values["eval_short_side"] = values["train_short_side"] if self.augment else None
        return replace(self, **values)

# fmt: on


# ----------------------------------------------------------------------------------------------------
# Frozen features


class FrozenFeatures(nn.Module):
    """The frozen models of a comparison, run once per batch.

    Args:
        fit3d_model: a `FiT3DModel` (variants original, finetuned, fit3d), or None.
        baseline: a `DenseFeatureExtractor` (variant baseline), or None.
    """

    def __init__(self, fit3d_model: nn.Module | None = None, baseline: nn.Module | None = None, patch_fit: str = "pad"):
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
        return center_pad(images, model.patch_size, model.image_mean.flatten()) if patch_fit == "pad" else images

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
                self._fit(images, self.baseline, patch_fit), final_norm=not depth_input, return_cls=depth_input
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


def depth_head_options(args: ProbeArguments) -> dict:
    """The `LinearDepthHead` options held by probe options (for `build_probe_heads`)."""
    args = args.resolved()
    return {
        "min_depth": args.min_depth, "max_depth": args.max_depth, "n_bins": args.n_bins,
        "bins_strategy": args.bins_strategy, "norm_strategy": args.norm_strategy, "upsample": args.depth_upsample,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Training


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
    heads, optimizer = accelerator.prepare(heads, optimizer)
    if not loader_is_sharded:
        loader = accelerator.prepare(loader)
    unwrapped = accelerator.unwrap_model(heads)
    sig_warmup = round(_SIG_LOSS_WARMUP_STEPS * args.max_steps / _REFERENCE["depth"]["max_steps"])
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
        batch = next(batches)
        raw = _batch_inputs(batch, features, task, accelerator.device)
        target = batch["target"].to(accelerator.device, non_blocking=True)
        outputs = heads(raw, tuple(target.shape[-2:]))
        losses = _probe_losses(task, outputs, target, step, args, sig_warmup)
        accelerator.backward(sum(losses.values()))
        if args.max_grad_norm:
            for head in unwrapped.heads.values():
                torch.nn.utils.clip_grad_norm_(head.parameters(), args.max_grad_norm)
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
        from accelerate.utils import broadcast

        # DDP keeps parameters equal, but each process's last forward updated its own BatchNorm statistics:
        # take rank 0's everywhere, so that every process evaluates the heads that are saved.
        with torch.no_grad():
            for buffer in unwrapped.buffers():
                buffer.copy_(broadcast(buffer.clone(), from_process=0))
    return unwrapped.eval(), history


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


# ----------------------------------------------------------------------------------------------------
# Evaluation


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


# ----------------------------------------------------------------------------------------------------
# Correspondence probe


@torch.no_grad()
def evaluate_correspondence(
    features: FrozenFeatures, dataset: ProbeDataset, args: ProbeArguments, accelerator
) -> dict:
    """The correspondence probe for every variant of `features` (see `correspondence_probe`)."""
    features.to(accelerator.device)
    variants = features.variants

    def extract(images: torch.Tensor) -> dict[str, torch.Tensor]:
        # resized, not padded: the correspondence geometry maps patch cells onto the whole image
        raw = features(images.to(accelerator.device), patch_fit="resize")
        return {variant: variant_inputs(raw, variant)[0] for variant in variants}

    options = CorrespondenceProbeOptions(
        thresholds=tuple(parse_floats(args.thresholds, "thresholds")), angle_bins=tuple(parse_floats(args.angle_bins, "angle_bins")),
        pairs_per_scene=args.pairs_per_scene, min_overlap=args.min_overlap, max_scenes=args.max_scenes, seed=args.seed,
    )  # fmt: skip
    return correspondence_probe(extract, variants, features.patch_size, dataset, options, accelerator)


# ----------------------------------------------------------------------------------------------------
# The whole comparison


def _check_trackers(report_to: str) -> str | None:
    if report_to in ("none", "", None):
        return None
    import importlib.util

    if importlib.util.find_spec(report_to) is None:
        logger.warning(
            "--report_to %s: the %r package is not installed, so nothing will be logged", report_to, report_to
        )
        return None
    return report_to


def _save_heads_atomic(heads: ProbeHeads, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    state = {key: value.detach().cpu().contiguous() for key, value in heads.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata=metadata)


def build_train_transform(args: ProbeArguments):
    """The training transform of resolved options, in the reference pipelines' order: the fixed crop
    (--fixed_crop), then with --augment the rotation (--rotate_degrees, depth), `RandomScaleCropFlip`,
    `PhotoMetricDistortion` (segmentation) and `ColorAug` (depth). None when nothing applies. Random numbers come
    from torch's global generator (seeded by `set_seed`, per worker by the DataLoader)."""
    steps = [FixedCrop(args.fixed_crop)] if args.fixed_crop not in (None, "none") else []
    if not args.augment:
        return ComposeTransforms(steps) if steps else None
    if args.rotate_degrees:
        steps.append(RandomRotate(0.5, args.rotate_degrees))
    transform = RandomScaleCropFlip(
        parse_size(args.crop_size),
        tuple(parse_floats(args.scale_range, "scale_range")),
        short_side=args.train_short_side,
        flip_probability=args.flip_probability,
        fill=args.ignore_index if args.probe == "segmentation" else 0,
        cat_max_ratio=0.75 if args.probe == "segmentation" else 1.0,
    )
    steps.append(transform)
    if args.photometric_distortion:
        steps.append(PhotoMetricDistortion())
    if args.color_aug:
        brightness = tuple(parse_floats(args.color_aug_brightness, "color_aug_brightness"))
        steps.append(ColorAug(0.5, brightness_range=brightness))
    return steps[0] if len(steps) == 1 else ComposeTransforms(steps)


def _train_and_score(features, splits, eval_split, data_args, args, accelerator, dataset_kwargs, class_names):
    """Segmentation/depth: trains the heads on the training split and scores them on `eval_split`.

    Returns:
        `(train split name, metrics per variant, trained heads, loss history)`.
    """
    channels = {variant: features.channels(variant) for variant in features.variants}
    train_name, train_split = resolve_split(splits, data_args.train_split, "train")
    if data_args.max_train_samples:
        train_split = train_split.select(range(min(data_args.max_train_samples, len(train_split))))
    num_classes = None
    if args.probe == "segmentation":
        num_classes = data_args.num_classes or (len(class_names) if class_names else None)
        if num_classes is None:
            num_classes = infer_num_classes(
                ProbeDataset(train_split, "segmentation", **dataset_kwargs), args.ignore_index
            )
            logger.info("%d classes (largest label id + 1 in the training split)", num_classes)
        if class_names and len(class_names) != num_classes:
            raise ValueError(f"--class_names lists {len(class_names)} names for {num_classes} classes")
    heads = build_probe_heads(args.probe, channels, num_classes, **depth_head_options(args))
    use_cache = args.cache_features and not args.augment
    if args.cache_features and args.augment:
        logger.info("features are computed on the fly: caching needs --no_augment")
    transform = build_train_transform(args)
    train_dataset = ProbeDataset(train_split, args.probe, transform=transform, **dataset_kwargs)
    if use_cache:
        cached = cache_features(
            features, train_dataset, args.probe, accelerator, batch_size=args.eval_batch_size
        )
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + accelerator.process_index)
        loader = torch.utils.data.DataLoader(
            cached,
            batch_size=args.train_batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=collate_cached,
            generator=generator,
        )
    else:
        loader = torch.utils.data.DataLoader(
            train_dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True,
            collate_fn=collate_probe_samples, num_workers=args.dataloader_num_workers,
        )  # fmt: skip
    heads, history = train_probe(heads, loader, args, accelerator, features, loader_is_sharded=use_cache)
    eval_transform = FixedCrop("kb") if args.fixed_crop == "kb" else None  # KITTI crops at evaluation too
    eval_loader = torch.utils.data.DataLoader(
        ProbeDataset(eval_split, args.probe, transform=eval_transform, **dataset_kwargs), batch_size=args.eval_batch_size,
        collate_fn=collate_probe_samples, num_workers=args.dataloader_num_workers,
    )  # fmt: skip
    metrics = evaluate_probe(
        heads, eval_loader, args, accelerator, features, num_classes=num_classes, class_names=class_names
    )
    return train_name, metrics, heads, history


def run_probe(model_args: ModelArguments, data_args: ProbeDataArguments, probe_args: ProbeArguments) -> dict:
    """Evaluates the models of `model_args` with one probe and writes the report to `probe_args.output_dir`.

    Returns:
        The results dictionary written to `results.json` (see `fit3d_hf.evaluation.report`).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    data_args, probe_args = apply_preset(data_args, probe_args)
    args = probe_args.resolved()
    output_dir = Path(args.output_dir)
    tracker = _check_trackers(args.report_to)
    accelerator = Accelerator(
        log_with=tracker,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    features = load_frozen_features(
        model_args.model,
        model_args.baseline,
        normalization=model_args.normalization,
        dtype=model_args.backbone_dtype,
        patch_fit=args.patch_fit,
    )
    with accelerator.main_process_first():
        splits = load_probe_dataset(
            data_args.dataset,
            dataset_format=data_args.dataset_format,
            config_name=data_args.dataset_config,
            cache_dir=data_args.cache_dir,
            holdout_every=data_args.holdout_every,
        )
    eval_name, eval_split = resolve_split(splits, data_args.split, "eval")
    if data_args.max_eval_samples:
        eval_split = eval_split.select(range(min(data_args.max_eval_samples, len(eval_split))))
    if data_args.gaussians and args.probe == "correspondence":
        from .rendered_depth import fill_depth_from_gaussians

        eval_split = fill_depth_from_gaussians(
            eval_split, data_args.gaussians, depth_column=data_args.depth_column, depth_scale=data_args.depth_scale,
            device=accelerator.device,
        )  # fmt: skip
    # Scenes' frames (scannetpp or scenes builder) carry validity masks in a 'mask' column: used by default.
    scenes = "is_test" in eval_split.column_names and "world_to_camera" in eval_split.column_names
    columns = data_args.columns("mask" if scenes and "mask" in eval_split.column_names else None)
    image_size = parse_size(data_args.image_size)
    dataset_kwargs = {
        "columns": columns, "depth_scale": data_args.depth_scale, "reduce_zero_label": data_args.reduce_zero_label,
        "ignore_index": args.ignore_index, "image_size": image_size, "normals_axes": data_args.normals_axes,
    }  # fmt: skip
    if tracker:
        accelerator.init_trackers(
            "fit3d-evaluate",
            config={
                k: v
                for k, v in {**asdict(model_args), **asdict(data_args), **asdict(args)}.items()
                if isinstance(v, (int, float, str, bool))
            },
        )

    channels = {variant: features.channels(variant) for variant in features.variants}
    history: dict[str, list[float]] = {}
    class_names = parse_class_names(data_args.class_names)
    train_name, heads = None, None
    if args.probe == "correspondence":
        metrics = evaluate_correspondence(
            features, ProbeDataset(eval_split, "correspondence", **dataset_kwargs), args, accelerator
        )
    elif args.probe == "normals":
        from .normals_probe import train_and_score_normals

        train_name, metrics, heads, history = train_and_score_normals(
            features, splits, eval_split, data_args, args, accelerator, dataset_kwargs
        )
    else:
        train_name, metrics, heads, history = _train_and_score(
            features, splits, eval_split, data_args, args, accelerator, dataset_kwargs, class_names
        )

    results = build_results(
        args.probe,
        metrics,
        channels=channels,
        history=history,
        settings={
            "model": model_args.model, "baseline": model_args.baseline, "dataset": data_args.dataset,
            "train_split": train_name, "split": eval_name, "num_processes": accelerator.num_processes,
            "probe": {k: v for k, v in asdict(args).items()}, "data": asdict(data_args),
        },
    )  # fmt: skip
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_report(results, output_dir)
        if heads is not None and args.save_heads:
            _save_heads_atomic(
                heads,
                output_dir / "probe_heads.safetensors",
                {"probe": args.probe, "variants": ",".join(heads.variants)},
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
