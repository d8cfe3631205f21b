"""Pieces of FiT3D's linear-probing configs (`evaluation/configs/*` of ywyue/FiT3D, mmseg 0.27 and the
Monocular-Depth-Estimation-Toolbox) beyond the heads and losses: dataset presets, the depth probe's training
augmentations and fixed crops, its evaluation crops, the OneCycle momentum schedule, and the centre padding of
the backbone input to a patch multiple.

Everything works on `[3, H, W]` float images in [0, 1] and `[H, W]` targets, without torchvision.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..errors import UsageError

__all__ = [
    "DATASET_PRESETS",
    "ColorAug",
    "FixedCrop",
    "RandomRotate",
    "apply_eval_crop",
    "apply_preset",
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
# Depth training augmentation (the toolbox's RandomRotate and ColorAug) and fixed crops


class RandomRotate:
    """The depth toolbox's `RandomRotate(prob, degree)`: with probability `probability`, rotate image and target
    about the image centre by an angle drawn uniformly from [-degrees, degrees] (drawn every call, as there),
    keeping the size; uncovered pixels become 0 (black image, depth 0 = no ground truth). The image is sampled
    bilinearly, the target with nearest neighbours (depth values stay metric)."""

    def __init__(self, probability: float = 0.5, degrees: float = 2.5):
        if not 0 <= probability <= 1 or degrees < 0:
            raise ValueError(f"need 0 <= probability <= 1 and degrees >= 0, got {probability} and {degrees}")
        self.probability, self.degrees = float(probability), float(degrees)

    @staticmethod
    def rotate(
        image: torch.Tensor, target: torch.Tensor, degrees: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`image [3, H, W]`, `target [H, W]` rotated by `degrees` about ((W - 1) / 2, (H - 1) / 2)."""
        height, width = image.shape[-2:]
        angle = math.radians(degrees)
        cos, sin = math.cos(angle), math.sin(angle)
        # Source pixel = R (output pixel - centre) + centre, written in align_corners=True normalised coordinates.
        theta = torch.tensor(
            [
                [cos, -sin * (height - 1) / max(width - 1, 1), 0.0],
                [sin * (width - 1) / max(height - 1, 1), cos, 0.0],
            ],
            dtype=torch.float32,
        )[None]
        grid = F.affine_grid(theta, [1, 1, height, width], align_corners=True)
        rotated = F.grid_sample(
            image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        moved = F.grid_sample(
            target[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=True
        )
        return rotated[0].to(image.dtype), moved[0, 0].to(target.dtype)

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        happens = float(torch.rand(())) < self.probability
        degrees = float(torch.empty(()).uniform_(-self.degrees, self.degrees))
        return self.rotate(image, target, degrees) if happens else (image, target)


class ColorAug:
    """The depth toolbox's `ColorAug`: with probability `probability`, gamma, brightness and per-channel colour
    factors, each drawn uniformly from its range, then clipped.

    As in the toolbox, which applies them to the uint8 image cast to float, the gamma acts on the 0-255 scale:
    `x -> (255 x) ** gamma * brightness * colour / 255`, clipped to [0, 1]. So a gamma of 1.1 also brightens by
    up to 255 ** 0.1 = 1.74 (and 0.9 darkens), a much stronger change than a gamma on [0, 1] would be.
    """

    def __init__(
        self,
        probability: float = 0.5,
        gamma_range: tuple[float, float] = (0.9, 1.1),
        brightness_range: tuple[float, float] = (0.75, 1.25),
        color_range: tuple[float, float] = (0.9, 1.1),
    ):
        for name, (low, high) in (
            ("gamma", gamma_range),
            ("brightness", brightness_range),
            ("color", color_range),
        ):
            if not 0 < low <= high:
                raise ValueError(f"{name} range must be (min, max) with 0 < min <= max, got {(low, high)}")
        if not 0 <= probability <= 1:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        self.probability = float(probability)
        self.gamma_range, self.brightness_range, self.color_range = gamma_range, brightness_range, color_range

    @staticmethod
    def apply(image: torch.Tensor, gamma: float, brightness: float, colors: torch.Tensor) -> torch.Tensor:
        """`[3, H, W]` in [0, 1] -> augmented `[3, H, W]` in [0, 1] (colors: `[3]` per-channel factors)."""
        scaled = (image * 255.0) ** gamma * brightness * colors.to(image.dtype).view(3, 1, 1)
        return scaled.clamp(0, 255) / 255.0

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if float(torch.rand(())) >= self.probability:
            return image, target
        gamma = float(torch.empty(()).uniform_(*self.gamma_range))
        brightness = float(torch.empty(()).uniform_(*self.brightness_range))
        colors = torch.empty(3).uniform_(*self.color_range)
        return self.apply(image, gamma, brightness, colors), target


class FixedCrop:
    """The depth configs' fixed crops, applied to image and target alike.

    - ``"nyu"``: the toolbox's NYUCrop of training images, rows 45:472 and columns 43:608 of the 480 x 640 frame;
    - ``"kb"``: the KITTI benchmark crop (KBCrop), 352 x 1216 at the bottom centre, in training and evaluation.
    """

    def __init__(self, kind: str):
        if kind not in ("nyu", "kb"):
            raise ValueError(f"fixed crop must be 'nyu' or 'kb', got {kind!r}")
        self.kind = kind

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the crop in an image of `height x width`."""
        if self.kind == "nyu":
            return 45, min(472, height), 43, min(608, width)
        top, left = max(height - 352, 0), max((width - 1216) // 2, 0)
        return top, min(top + 352, height), left, min(left + 1216, width)

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, bottom, left, right = self.box(*image.shape[-2:])
        return image[:, top:bottom, left:right].contiguous(), target[top:bottom, left:right].contiguous()


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
