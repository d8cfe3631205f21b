"""The probe options of `fit3d evaluate` (`ModelArguments`: which models; `ProbeArguments`: which probe and how it
trains and scores; the data options are `fit3d_hf.evaluation.data.ProbeDataArguments`), the reference protocol's
value of every option left unset, and the parsers of the options' string values ("416,544", "5,10,20").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..errors import UsageError
from .columns import TASKS
from .normals import NORMALS_REFERENCE

__all__ = ["PROBES", "REFERENCE_SETTINGS", "ModelArguments", "ProbeArguments", "parse_floats", "parse_size"]

PROBES = TASKS  # the probes are the tasks the data loader prepares samples for
# The reference protocol (FiT3D / DINOv2 linear probing, 8 GPUs x 2 images); see ProbeArguments.
REFERENCE_SETTINGS = {
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
REFERENCE_SETTINGS["normals"] = (
    NORMALS_REFERENCE  # after Probe3D's surface-normal probe (see fit3d_hf.evaluation.normals)
)


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
        reference = REFERENCE_SETTINGS[self.probe]
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
# Parsers of option values


def parse_size(value: str | int | None) -> tuple[int, int] | None:
    """ "512" -> (512, 512); "416,544" -> (416, 544); None -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return (value, value)
    parts = [int(v) for v in str(value).replace("x", ",").split(",") if v.strip()]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1 or math.prod(parts) <= 0:
        raise ValueError(f"a size must be 'N' or 'H,W' with positive integers, got {value!r}")
    return parts[0], parts[1]


def parse_floats(value: str, name: str) -> list[float]:
    """Comma-separated numbers of an option, e.g. "5,10,20" -> [5.0, 10.0, 20.0]."""
    try:
        numbers = [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError as error:
        raise ValueError(f"--{name} must be comma-separated numbers, got {value!r}") from error
    if not numbers:
        raise ValueError(f"--{name} is empty")
    return numbers
