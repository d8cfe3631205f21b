"""Geometric transforms of probe samples, on tensors (`[3, H, W]` float images in [0, 1], `[H, W]` targets)
so that they need no torchvision: resizing (`resize_tensor`, `resize_sample`), the reference protocol's training
augmentation (`RandomScaleCropFlip`: random rescale, random crop that avoids crops dominated by one class,
horizontal flip), the depth toolbox's `RandomRotate` and fixed crops (`FixedCrop`), and `ComposeTransforms` to
chain `(image, target) -> (image, target)` transforms. The photometric ones are in
`fit3d_hf.evaluation.photometric`; `fit3d_hf.evaluation.protocol.build_train_transform` puts them in the
reference pipelines' order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "ComposeTransforms",
    "FixedCrop",
    "RandomRotate",
    "RandomScaleCropFlip",
    "resize_sample",
    "resize_tensor",
]


def resize_tensor(tensor: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resizes `[C, H, W]` or `[H, W]`; "nearest" for labels and depth, "bilinear" (antialiased) for images."""
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    squeeze = tensor.ndim == 2
    batch = tensor[None, None] if squeeze else tensor[None]
    dtype = batch.dtype
    if mode == "nearest":
        out = F.interpolate(batch.float(), size=size, mode="nearest-exact")
    else:
        out = F.interpolate(batch.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    out = out.to(dtype) if not dtype.is_floating_point else out
    return out[0, 0] if squeeze else out[0]


def resize_sample(sample: dict, size: tuple[int, int]) -> dict:
    """Resizes a sample's image (bilinear), target and depth (nearest) to `size` = (H, W) and scales K."""
    height, width = sample["image"].shape[-2:]
    out = dict(sample)
    out["image"] = resize_tensor(sample["image"], size, "bilinear").clamp(0, 1)
    for key in ("target", "depth"):
        if key in sample:
            out[key] = resize_tensor(sample[key], size, "nearest")
    if "K" in sample:
        scale = torch.tensor([size[1] / width, size[0] / height, 1.0], dtype=sample["K"].dtype)
        out["K"] = sample["K"] * scale[:, None]
    return out


# ----------------------------------------------------------------------------------------------------
# Augmentation


class RandomScaleCropFlip:
    """The reference's training augmentation on tensors: random rescale, random crop, horizontal flip.

    The image is first scaled so that its shorter side is `short_side` (if given) times a factor drawn
    uniformly from `scale_range`, then a `crop_size` window is cut at a random position (images smaller than
    the crop are padded: image with 0, target with `fill`); for segmentation up to 10 windows are tried to
    find one where no class covers more than `cat_max_ratio` of the labelled pixels (mmseg's RandomCrop).
    Labels and depth are resampled with nearest neighbours, so depth values stay metric.

    Args:
        crop_size: (H, W) of the crops.
        scale_range: (min, max) rescale factor; (1, 1) disables rescaling (the depth protocol).
        short_side: shorter side before the random factor (512 in the segmentation protocol); None = native.
        flip_probability: probability of a horizontal flip.
        fill: target value of padded pixels (the ignore index for labels, 0 for depth).
        cat_max_ratio: largest share of one class in a crop (segmentation; 1 disables the check).
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        short_side: int | None = None,
        flip_probability: float = 0.5,
        fill: float = 255,
        cat_max_ratio: float = 1.0,
    ):
        if min(crop_size) < 1 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"bad augmentation settings: crop_size={crop_size}, scale_range={scale_range}")
        self.crop_size = tuple(int(v) for v in crop_size)
        self.scale_range = tuple(float(v) for v in scale_range)
        self.short_side = short_side
        self.flip_probability = flip_probability
        self.fill = fill
        self.cat_max_ratio = cat_max_ratio

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`image [3, H, W]`, `target [H, W]` -> augmented `[3, h, w]`, `[h, w]` with (h, w) = crop_size."""
        height, width = image.shape[-2:]
        scale = (
            float(torch.empty(()).uniform_(*self.scale_range))
            if self.scale_range[0] < self.scale_range[1]
            else self.scale_range[0]
        )
        if self.short_side:
            scale *= self.short_side / min(height, width)
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            image, target = (
                resize_tensor(image, size, "bilinear").clamp(0, 1),
                resize_tensor(target, size, "nearest"),
            )
        crop_h, crop_w = self.crop_size
        pad_h, pad_w = max(crop_h - image.shape[-2], 0), max(crop_w - image.shape[-1], 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            target = F.pad(target[None], (0, pad_w, 0, pad_h), value=self.fill)[0]
        for _attempt in range(10):
            top = int(torch.randint(0, image.shape[-2] - crop_h + 1, ()))
            left = int(torch.randint(0, image.shape[-1] - crop_w + 1, ()))
            crop = target[top : top + crop_h, left : left + crop_w]
            if self.cat_max_ratio >= 1.0 or self._balanced(crop):
                break
        image = image[:, top : top + crop_h, left : left + crop_w]
        target = crop
        if float(torch.rand(())) < self.flip_probability:
            image, target = image.flip(-1), target.flip(-1)
        return image.contiguous(), target.contiguous()

    def _balanced(self, crop: torch.Tensor) -> bool:
        labelled = crop[crop != self.fill]
        if labelled.numel() == 0:
            return False
        counts = torch.bincount(labelled.long().flatten().clamp_min(0))
        counts = counts[counts > 0]
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio


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


class ComposeTransforms:
    """Applies `(image, target) -> (image, target)` transforms one after the other."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target
