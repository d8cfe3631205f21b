"""Pictures of any bit depth to RGB in [0, 1], the same way everywhere (scene readers, Stage II frames, probes,
the Space), so that an 8-bit and a 16-bit copy of a picture give the same features.

Pillow's own `convert("RGB")` clips 16-bit grey values at 255 (almost every pixel turns white); here such
pictures are scaled by their bit depth instead, never stretched to their maximum. (Pillow already reads 16-bit
RGB files as 8-bit RGB by their high byte, which is the same scaling.)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["HIGH_BIT_DEPTH_MODES", "to_8bit", "to_float_rgb", "to_rgb_array"]

# Pillow modes of grey pictures deeper than 8 bits -> the largest value of their bit depth. Pillow opens 16-bit
# PNG and TIFF files as "I;16*" or "I" (32-bit int, holding the 16-bit values), so "I" counts as 16-bit.
HIGH_BIT_DEPTH_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}


def _grey_fraction(image: Image.Image) -> np.ndarray | None:
    """`[H, W]` float64 in [0, 1] for a high-bit-depth or float grey picture; None for any other mode."""
    if image.mode in HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64) / HIGH_BIT_DEPTH_MODES[image.mode]
    elif image.mode == "F":  # float pictures are taken to hold values in [0, 1]
        values = np.asarray(image, dtype=np.float64)
    else:
        return None
    return np.clip(np.nan_to_num(values), 0.0, 1.0)


def to_8bit(image: Image.Image) -> Image.Image:
    """The picture with 8-bit channels: high-bit-depth grey pictures scaled by their bit depth (mode "L");
    any other picture unchanged (Pillow's `convert` then handles it)."""
    fraction = _grey_fraction(image)
    if fraction is None:
        return image
    return Image.fromarray((fraction * 255.0).round().astype(np.uint8), mode="L")


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """`[H, W, 3]` RGB without loss: uint8 through Pillow's `convert("RGB")` (alpha dropped) for 8-bit
    pictures, float32 in [0, 1] for high-bit-depth and float grey ones (scaled by their bit depth). Its values
    / 255 (uint8) or as they are (float32) are `to_float_rgb`'s: a caller that keeps the uint8 image anyway
    skips converting the whole picture to float on the host. The uint8 array may be read-only."""
    fraction = _grey_fraction(image)
    if fraction is not None:
        return np.repeat(fraction.astype(np.float32)[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))  # read-only (a view of Pillow's bytes): no copy


def to_float_rgb(image: Image.Image) -> np.ndarray:
    """`[H, W, 3]` float32 RGB in [0, 1]; grey pictures of any bit depth scaled by their bit depth (kept at
    full precision), everything else through Pillow's `convert("RGB")` (alpha dropped)."""
    rgb = to_rgb_array(image)
    return rgb if rgb.dtype == np.float32 else rgb.astype(np.float32) / 255.0
