"""Stage II targets: the decoded feature render, sampled on the backbone's patch grid.

FiT3D decodes the full-resolution 64-channel render with a 3x3 convolution to D channels (D x 584 x 876
per image) and then bilinearly resamples it to the patch grid (e.g. 41 x 62). Both steps are linear, and
bilinear resampling (align_corners=False, no antialiasing) reads only 2 x 2 pixels per output, so the same
numbers come from evaluating the convolution only at those pixels: for each kernel tap, gather the
rows and columns the resampling needs from the low-dimensional render, then apply the kernel's D x F
matrix. That is about 1/200 of the work and never materialises the D x H x W map (whose batch of 16 at
384 channels overflows `F.interpolate`'s element limit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["decode_at_patch_grid", "decode_then_resample"]


def _bilinear_taps(
    in_size: int, out_size: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices `[out, 2]` and weights `[out, 2]` of PyTorch's bilinear resampling along one axis
    (align_corners=False: source = (dst + 0.5) * in / out - 0.5, clamped at 0), computed in the precision
    PyTorch uses for `dtype` (float64 for double, float32 otherwise) so that both agree to rounding."""
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=dtype) + 0.5) * scale - 0.5).clamp_min(0)
    low = src.floor().long().clamp_max(in_size - 1)
    high = (low + 1).clamp_max(in_size - 1)
    frac = src - low
    return torch.stack([low, high], dim=1), torch.stack([1 - frac, frac], dim=1)


def decode_at_patch_grid(
    feature_map: torch.Tensor, weight: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """`F.interpolate(F.conv2d(feature_map, weight, padding=k // 2), size, mode="bilinear")`, computed only
    where the resampling reads.

    Args:
        feature_map: `[B, F, H, W]` rendered low-dimensional features.
        weight: `[D, F, k, k]` decoder convolution weight (odd k, zero padding k // 2, no bias).
        size: (h, w) of the patch grid.

    Returns:
        `[B, D, h, w]` targets.
    """
    if feature_map.ndim != 4 or weight.ndim != 4 or weight.shape[1] != feature_map.shape[1]:
        raise ValueError(
            f"expected feature_map [B, F, H, W] and weight [D, F, k, k] with the same F, got "
            f"{tuple(feature_map.shape)} and {tuple(weight.shape)}"
        )
    _, _, height, width = feature_map.shape
    kernel_h, kernel_w = weight.shape[2:]
    rows_index, rows_weight = _bilinear_taps(height, size[0], feature_map.device, feature_map.dtype)
    cols_index, cols_weight = _bilinear_taps(width, size[1], feature_map.device, feature_map.dtype)
    weight = weight.to(feature_map.dtype)
    output = None
    for ky in range(kernel_h):
        rows = rows_index + ky - kernel_h // 2  # [h, 2]; outside the image = zero padding
        row_weights = (rows_weight * ((rows >= 0) & (rows < height))).to(feature_map.dtype)
        gathered_rows = feature_map[:, :, rows.clamp(0, height - 1)]  # [B, F, h, 2, W]
        blended_rows = (gathered_rows * row_weights[None, None, :, :, None]).sum(dim=3)  # [B, F, h, W]
        for kx in range(kernel_w):
            cols = cols_index + kx - kernel_w // 2  # [w, 2]
            col_weights = (cols_weight * ((cols >= 0) & (cols < width))).to(feature_map.dtype)
            taps = (blended_rows[..., cols.clamp(0, width - 1)] * col_weights).sum(dim=-1)  # [B, F, h, w]
            contribution = torch.einsum("bfhw,df->bdhw", taps, weight[:, :, ky, kx])
            output = contribution if output is None else output + contribution
    return output


def decode_then_resample(
    feature_map: torch.Tensor, weight: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The original computation (full-resolution decode, then bilinear resampling), kept as the oracle
    of `decode_at_patch_grid`."""
    decoded = F.conv2d(feature_map, weight.to(feature_map.dtype), padding=weight.shape[-1] // 2)
    return F.interpolate(decoded, size=size, mode="bilinear", align_corners=False)
