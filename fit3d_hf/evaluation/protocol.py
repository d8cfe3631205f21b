"""Pieces of FiT3D's linear-probing configs (`evaluation/configs/*` of ywyue/FiT3D, mmseg 0.27 and the
Monocular-Depth-Estimation-Toolbox) beyond the heads and losses: dataset presets, the training pipeline in the
reference order (`build_train_transform`, over the transforms of `fit3d_hf.evaluation.transforms` and
`fit3d_hf.evaluation.photometric`), the depth evaluation crops, the OneCycle momentum schedule, and the centre
padding of the backbone input to a patch multiple. The per-probe defaults of the options are
`fit3d_hf.evaluation.arguments.REFERENCE_SETTINGS`.

Everything works on `[3, H, W]` float images in [0, 1] and `[H, W]` targets, without torchvision.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..errors import UsageError
from .arguments import ProbeArguments, parse_floats, parse_size
from .photometric import ColorAug, PhotoMetricDistortion
from .transforms import ComposeTransforms, FixedCrop, RandomRotate, RandomScaleCropFlip

__all__ = [
    "DATASET_PRESETS",
    "apply_eval_crop",
    "apply_preset",
    "build_train_transform",
    "center_pad",
    "onecycle_momentum",
    "preset_values",
]


# Per data set and task, the values FiT3D's configs set (evaluation/configs/vits_<dataset>_<task>_linear_config.py):
# label handling, depth scale and range, the fixed crop (training, and for KITTI evaluation too), the
# evaluation crop, the training crop size and ColorAug's brightness range. Flags given explicitly win.
DATASET_PRESETS: dict[str, dict[str, dict]] = {
    "nyuv2": {
        "segmentation": {"reduce_zero_label": True, "num_classes": 13},
        "depth": {
            "depth_scale": 1000.0, "max_depth": 10.0, "fixed_crop": "nyu", "eval_crop": "eigen",
            "crop_size": "416,544", "color_aug_brightness": "0.75,1.25",
        },
    },
    "ade20k": {"segmentation": {"reduce_zero_label": True, "num_classes": 150}},
    "scannetpp": {
        "segmentation": {"reduce_zero_label": True, "num_classes": 100},
        "depth": {
            "depth_scale": 1000.0, "max_depth": 20.0, "fixed_crop": "none", "eval_crop": "none",
            "crop_size": "416,544", "color_aug_brightness": "0.75,1.25",
        },
    },
    "kitti": {
        "depth": {
            "depth_scale": 256.0, "max_depth": 80.0, "fixed_crop": "kb", "eval_crop": "garg",
            "crop_size": "352,704", "color_aug_brightness": "0.9,1.1",
        },
    },
}  # fmt: skip


def preset_values(preset: str | None, task: str) -> dict:
    """The values a preset sets for a task (empty without a preset or for a task it does not cover)."""
    if not preset:
        return {}
    if preset not in DATASET_PRESETS:
        raise UsageError(f"--preset must be one of {sorted(DATASET_PRESETS)}, got {preset!r}")
    return dict(DATASET_PRESETS[preset].get(task, {}))


# Data options left unset without a preset: the generic defaults.
_DATA_DEFAULTS = {"depth_scale": 1000.0, "reduce_zero_label": False}


def apply_preset(data_args, probe_args):
    """`(data_args, probe_args)` with every option left unset (None) taken from `data_args.preset` for the
    probe's task, then the data options still unset from the generic defaults (depth scale 1000, labels as
    stored). Explicit flags always win. The probe options still unset are resolved by `ProbeArguments.resolved`.
    """
    values = {**preset_values(getattr(data_args, "preset", None), probe_args.probe)}
    data_updates = {
        key: value
        for key, value in values.items()
        if hasattr(data_args, key) and getattr(data_args, key) is None
    }
    probe_updates = {
        key: value
        for key, value in values.items()
        if hasattr(probe_args, key) and getattr(probe_args, key) is None
    }
    data_args = replace(data_args, **data_updates)
    defaults = {key: value for key, value in _DATA_DEFAULTS.items() if getattr(data_args, key) is None}
    return replace(data_args, **defaults), replace(probe_args, **probe_updates)


# ----------------------------------------------------------------------------------------------------
# Training pipeline and evaluation crops


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


def apply_eval_crop(target: torch.Tensor, crop: str | None) -> torch.Tensor:
    """Ground-truth depth with everything outside the evaluation crop set to 0 (no ground truth).

    - ``"eigen"``: NYU's Eigen crop, rows 45:471 and columns 41:601 (the toolbox's `eval_mask`), defined on the
      480 x 640 frame; other sizes get the same crop scaled to them;
    - ``"garg"``: KITTI's Garg crop, rows 0.40810811 H to 0.99189189 H, columns 0.03594771 W to 0.96405229 W;
    - None / ``"none"``: the whole image.

    Args:
        target: `[..., H, W]` depth in metres.
    """
    if crop in (None, "none"):
        return target
    height, width = target.shape[-2:]
    if crop == "eigen":
        rows = (round(45 * height / 480), round(471 * height / 480))
        cols = (round(41 * width / 640), round(601 * width / 640))
    elif crop == "garg":
        rows = (int(0.40810811 * height), int(0.99189189 * height))
        cols = (int(0.03594771 * width), int(0.96405229 * width))
    else:
        raise ValueError(f"eval crop must be 'none', 'eigen' or 'garg', got {crop!r}")
    mask = torch.zeros(height, width, dtype=torch.bool, device=target.device)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return torch.where(mask, target, torch.zeros_like(target))


# ----------------------------------------------------------------------------------------------------
# Optimisation and backbone input


def onecycle_momentum(
    step: int, max_steps: int, base: float = 0.85, peak: float = 0.95, pct_start: float = 0.3
) -> float:
    """mmcv's `OneCycleMomentumUpdaterHook` (two phases, cosine), which the depth configs' `momentum_config =
    dict(policy="OneCycle")` adds: Adam's beta1 goes from `peak` down to `base` over the first `pct_start` of the
    run, then back up to `peak`. `step` counts from 0, as mmcv's `runner.iter`."""
    first_end = pct_start * max_steps - 1
    last_end = max_steps - 1

    def anneal(start: float, end: float, fraction: float) -> float:
        return end + (start - end) / 2 * (math.cos(math.pi * fraction) + 1)

    if step <= first_end:
        return anneal(peak, base, step / first_end if first_end > 0 else 1.0)
    span = last_end - first_end
    return anneal(base, peak, (step - first_end) / span if span > 0 else 1.0)


def center_pad(images: torch.Tensor, multiple: int, fill: torch.Tensor) -> torch.Tensor:
    """Pads `[B, 3, H, W]` images to the next multiple of `multiple` on each side, centred (the extra pixel, if
    odd, at the bottom / right), as FiT3D's probes do (`evaluation/eval_utils/misc.py`, `CenterPadding`).

    The original pads the *normalised* image with 0; `fill` (`[3]`, the model's normalisation mean) does the same
    for images in [0, 1] that the model normalises itself.
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not pad_h and not pad_w:
        return images
    top, left = pad_h // 2, pad_w // 2
    out = fill.to(images).view(1, 3, 1, 1).expand(images.shape[0], 3, height + pad_h, width + pad_w).clone()
    out[..., top : top + height, left : left + width] = images
    return out
