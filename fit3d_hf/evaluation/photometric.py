"""Photometric training augmentation of the probes, on `[3, H, W]` float images in [0, 1] (the target is left
alone): mmseg's `PhotoMetricDistortion` of the segmentation protocol (random brightness, contrast, saturation and
hue), the depth toolbox's `ColorAug` (gamma, brightness, per-channel colour), and the RGB <-> HSV conversions
they need.
"""

from __future__ import annotations

import torch

__all__ = ["ColorAug", "PhotoMetricDistortion", "hsv_to_rgb", "rgb_to_hsv"]


# Written by hand: torchvision/kornia would be new dependencies for these few lines, and OpenCV works on
# uint8/float32 HWC arrays (a round trip through numpy per sample).
def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, every channel in [0, 1] (hue in turns: OpenCV's 0-180 hue / 180).

    Args:
        image: `[..., 3, H, W]` float RGB in [0, 1].

    Returns:
        `[..., 3, H, W]` (hue, saturation, value); grey pixels get hue 0 and black ones saturation 0.
    """
    red, green, blue = image.unbind(-3)
    value, largest = image.max(dim=-3)
    chroma = value - image.min(dim=-3).values
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        largest == 0,
        ((green - blue) / safe_chroma) % 6,
        torch.where(largest == 1, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4),
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), 0)
    return torch.stack([hue, saturation, value], dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV -> RGB, the inverse of `rgb_to_hsv` (`[..., 3, H, W]`, channels in [0, 1], hue taken modulo 1)."""
    hue, saturation, value = hsv.unbind(-3)
    # Channel n (5 = red, 3 = green, 1 = blue) = V - V S clamp(min(k, 4 - k), 0, 1) with k = (n + 6 H) mod 6.
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device).view(3, 1, 1)
    k = (offsets + 6 * hue.unsqueeze(-3)) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value.unsqueeze(-3) * (1 - saturation.unsqueeze(-3) * ramp)


class PhotoMetricDistortion:
    """mmseg's (0.x) PhotoMetricDistortion on `[3, H, W]` float images in [0, 1]; the target is left alone.

    Each step happens with probability `probability`, in this order: brightness (add a delta drawn from
    [-brightness_delta, brightness_delta] / 255), contrast (multiply by a factor from `contrast_range`) either
    here or last (a coin flip), saturation (multiply HSV saturation by a factor from `saturation_range`), hue
    (shift by a delta from [-hue_delta, hue_delta] in OpenCV's 0-180 hue units, i.e. delta / 180 of a turn),
    and contrast if not done before. Values are clipped to [0, 1] after every step, as mmseg clips to [0, 255].

    Differences from mmseg, which works on uint8 BGR arrays: no rounding to 8 bits between steps, and the hue
    delta is drawn continuously (mmseg draws an integer in [-hue_delta, hue_delta - 1]).

    Args:
        brightness_delta: largest brightness change, on the 0-255 scale (mmseg: 32).
        contrast_range: (min, max) contrast factor (mmseg: 0.5, 1.5).
        saturation_range: (min, max) saturation factor (mmseg: 0.5, 1.5).
        hue_delta: largest hue change in OpenCV hue units, 180 = a full turn (mmseg: 18).
        probability: chance of applying each of the four steps (mmseg: 0.5).
        generator: random numbers for the draws; None uses torch's global generator, which `set_seed` and
            the DataLoader's per-worker seeding make reproducible (a generator of its own would be copied
            unchanged into every worker, which would then repeat the same distortions).
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18.0,
        probability: float = 0.5,
        generator: torch.Generator | None = None,
    ):
        for name, (low, high) in (("contrast_range", contrast_range), ("saturation_range", saturation_range)):
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be (min, max) with 0 <= min <= max, got {(low, high)}")
        if brightness_delta < 0 or hue_delta < 0 or not 0 <= probability <= 1:
            raise ValueError(
                f"need brightness_delta >= 0, hue_delta >= 0 and 0 <= probability <= 1, got {brightness_delta}, "
                f"{hue_delta} and {probability}"
            )
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = tuple(float(v) for v in contrast_range)
        self.saturation_range = tuple(float(v) for v in saturation_range)
        self.hue_delta = float(hue_delta)
        self.probability = float(probability)
        self.generator = generator

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def _happens(self) -> bool:
        return float(torch.rand((), generator=self.generator)) < self.probability

    def sample_parameters(self) -> dict:
        """Draws one distortion: `{"brightness", "contrast", "saturation", "hue", "contrast_first"}` (a step that
        does not happen is None; brightness in [0, 1] units, hue in OpenCV units)."""
        # Every value is drawn whether or not its step happens, so each image uses the same count of numbers.
        params: dict = {}
        brightness = self.brightness_delta / 255.0
        for name, low, high in (
            ("brightness", -brightness, brightness),
            ("contrast", *self.contrast_range),
            ("saturation", *self.saturation_range),
            ("hue", -self.hue_delta, self.hue_delta),
        ):
            happens = self._happens()
            value = self._uniform(low, high)
            params[name] = value if happens else None
        params["contrast_first"] = float(torch.rand((), generator=self.generator)) < 0.5
        return params

    @staticmethod
    def apply(
        image: torch.Tensor,
        brightness: float | None = None,
        contrast: float | None = None,
        saturation: float | None = None,
        hue: float | None = None,
        contrast_first: bool = True,
    ) -> torch.Tensor:
        """One given distortion (None skips a step).

        Args:
            image: `[3, H, W]` float RGB in [0, 1].
            brightness: added value, in [0, 1] units.
            contrast: multiplying factor of all channels.
            saturation: multiplying factor of the HSV saturation.
            hue: hue shift in OpenCV units (180 = a full turn).
            contrast_first: contrast before saturation and hue (else after them).

        Returns:
            `[3, H, W]` in [0, 1].
        """
        if brightness is not None:
            image = (image + brightness).clamp(0, 1)
        if contrast is not None and contrast_first:
            image = (image * contrast).clamp(0, 1)
        if saturation is not None or hue is not None:
            hsv = rgb_to_hsv(image)
            hue_turns, saturation_channel, value = hsv.unbind(-3)
            if saturation is not None:
                saturation_channel = (saturation_channel * saturation).clamp(0, 1)
            if hue is not None:
                hue_turns = (hue_turns + hue / 180.0) % 1.0
            image = hsv_to_rgb(torch.stack([hue_turns, saturation_channel, value], dim=-3)).clamp(0, 1)
        if contrast is not None and not contrast_first:
            image = (image * contrast).clamp(0, 1)
        return image

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`image [3, H, W]`, `target [H, W]` -> distorted image, the same target."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"PhotoMetricDistortion expects an RGB image [3, H, W], got shape {tuple(image.shape)}"
            )
        return self.apply(image, **self.sample_parameters()), target


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
