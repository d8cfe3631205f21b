"""Frame decoding: the values of one dataset row (images, masks, depth maps, class-id maps, surface normals) as
tensors, the same way for Stage II (`fit3d_hf.finetuning`) and the probes (`fit3d_hf.evaluation`).

A value is whatever a `datasets` row holds: a PIL image (an `Image` column), a numpy array, a tensor or nested
lists. Pictures of any bit depth go through `fit3d_hf.images.to_8bit`, so an 8-bit and a 16-bit copy of a
picture decode alike. The `column` argument only names the column in error messages.

- `image_to_uint8`: a PIL image in a given mode -> uint8 `[C, H, W]` (Stage II's frames and masks);
- `image_to_tensor`: an RGB image -> `[3, H, W]` float in [0, 1];
- `label_to_tensor`: a class-id map -> `[H, W]` int64;
- `depth_to_tensor`: a depth map -> `[H, W]` float32 metres;
- `mask_to_tensor`: a validity mask -> `[H, W]` bool;
- `normals_to_tensor`: a surface-normal map -> `[3, H, W]` unit normals (the camera-frame convention of
  `fit3d_hf.scene.scene`, explained in `fit3d_hf.evaluation.normals`), with `parse_axes` for other axes.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError, UsageError
from .images import to_8bit
from .scene.scene import decode_normals

__all__ = [
    "as_array",
    "depth_to_tensor",
    "image_to_tensor",
    "image_to_uint8",
    "label_to_tensor",
    "mask_to_tensor",
    "normals_to_tensor",
    "parse_axes",
    "valid_normals",
]

# A target vector counts as a normal when its length is within this of 1 (zeros and 8-bit black fail).
_UNIT_TOLERANCE = 0.1


def as_array(value, column: str) -> np.ndarray:
    """A row value (PIL image, tensor, array or nested lists) as a numpy array (16-bit PIL pictures as int32)."""
    if value is None:
        raise ValueError(f"column {column!r} holds None for this row")
    if hasattr(value, "mode") and hasattr(value, "size"):  # PIL image
        if value.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(value).astype(np.int32)
        return np.asarray(value)
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return np.asarray(value)


def image_to_uint8(value, mode: str) -> torch.Tensor:
    """A datasets Image value (PIL) -> uint8 `[C, H, W]` in `mode` (16-bit grey scaled by its bit depth)."""
    array = np.asarray(to_8bit(value).convert(mode))
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def image_to_tensor(value, column: str = "image") -> torch.Tensor:
    """An RGB image value -> `[3, H, W]` float in [0, 1] (16-bit grey pictures scaled by their bit depth)."""
    if hasattr(value, "mode"):  # PIL image: the same decoding as Stage II's frames
        return image_to_uint8(value, "RGB").float() / 255.0
    array = as_array(value, column)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:  # channel-first arrays
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"column {column!r}: expected an RGB image [H, W, 3], got shape {array.shape}")
    image = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)  # PIL arrays are read-only
    return image.float() / 255.0 if not image.is_floating_point() else image.float().clamp(0, 1)


def label_to_tensor(
    value, column: str, *, reduce_zero_label: bool = False, ignore_index: int = 255
) -> torch.Tensor:
    """A class-id map value -> `[H, W]` int64.

    With `reduce_zero_label` (ADE20k's convention), 0 ("other") becomes `ignore_index` and every other id
    moves down by one.
    """
    array = as_array(value, column)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise ValueError(
            f"column {column!r}: expected a class-id map [H, W] (an L/P-mode image), got shape {array.shape}; "
            "colour-coded label images must be converted to class ids first"
        )
    label = torch.from_numpy(array.astype(np.int64))
    if reduce_zero_label:
        label = torch.where(label == 0, ignore_index, label - 1)
        label[label == ignore_index - 1] = ignore_index
    return label


def depth_to_tensor(value, column: str, *, depth_scale: float = 1000.0) -> torch.Tensor:
    """A depth map value -> `[H, W]` float32 metres (stored value / depth_scale; 0 and NaN = unknown)."""
    array = as_array(value, column)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise ValueError(f"column {column!r}: expected a depth map [H, W], got shape {array.shape}")
    depth = torch.from_numpy(array.astype(np.float32)) / float(depth_scale)
    return torch.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)


def mask_to_tensor(value, column: str) -> torch.Tensor:
    """A validity mask value -> `[H, W]` bool, True where the value is non-zero (the first channel of `[H, W, C]`)."""
    valid = torch.from_numpy(as_array(value, column).astype(np.float32)) > 0
    return valid[..., 0] if valid.ndim == 3 else valid


def parse_axes(axes: str) -> tuple[list[int], list[float]]:
    """ "x,-y,-z" -> (source axis per output axis, sign per output axis): output axis i = sign_i * source[axis_i].

    Raises:
        UsageError: not three of x/y/z each once, optionally negated.
    """
    parts = [part.strip().lower() for part in str(axes).split(",")]
    names = [part.lstrip("+-") for part in parts]
    if len(parts) != 3 or sorted(names) != ["x", "y", "z"]:
        raise UsageError(f"--normals_axes must name x, y and z once each, like 'x,-y,-z'; got {axes!r}")
    return ["xyz".index(name) for name in names], [-1.0 if part.startswith("-") else 1.0 for part in parts]


def valid_normals(normals: torch.Tensor) -> torch.Tensor:
    """`[..., 3, H, W]` -> `[..., H, W]` bool: where the vector is a unit normal (ground truth exists)."""
    return ((normals.norm(dim=-3) - 1.0).abs() < _UNIT_TOLERANCE) & normals.isfinite().all(dim=-3)


def normals_to_tensor(value, column: str = "normals", *, axes: str = "x,y,z") -> torch.Tensor:
    """A normal map value -> `[3, H, W]` float32 unit normals in fit3d-hf's convention, 0 where invalid.

    Args:
        value: an 8-bit RGB image (PIL or uint8 array `[H, W, 3]`) storing `(n + 1) / 2 * 255`, or a float array
            `[H, W, 3]` or `[3, H, W]` of vectors (not unit length = no ground truth).
        column: the column's name, for error messages.
        axes: how the stored axes map to ours (see `parse_axes`).
    """
    if value is None:
        raise InputError(f"column {column!r} holds None for this row")
    if hasattr(value, "mode"):  # PIL image
        if value.mode != "RGB":
            raise InputError(
                f"column {column!r}: expected an 8-bit RGB normal map, got a {value.mode!r} image"
            )
        value = np.asarray(value)
    array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[2] != 3:
        raise InputError(f"column {column!r}: expected a normal map [H, W, 3], got shape {array.shape}")
    if array.dtype == np.uint8:
        array = decode_normals(array)[0]
    normals = torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1)
    order, signs = parse_axes(axes)
    normals = normals[order] * torch.tensor(signs)[:, None, None]
    valid = valid_normals(normals)
    normals = torch.where(valid, normals / normals.norm(dim=0).clamp_min(1e-6), torch.zeros_like(normals))
    return torch.nan_to_num(normals, nan=0.0)
