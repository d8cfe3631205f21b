"""Stage II targets: the decoded feature render, sampled on the backbone's patch grid.

FiT3D decodes the full-resolution 64-channel render with a 3x3 convolution to D channels (D x 584 x 876
per image) and then bilinearly resamples it to the patch grid (e.g. 41 x 62). Both steps are linear, and
bilinear resampling (align_corners=False, no antialiasing) reads only 2 x 2 pixels per output, so the same
numbers come from evaluating the convolution only at those pixels: gather, for each output, the (k+1) x (k+1)
window of the low-dimensional render that its k x k kernel reads at those pixels, blend the window's rows and
then its columns with the resampling's weights (k x k left), and apply the kernel as one D x (F k k) matrix.
That is about 1/200 of the work and never materialises the D x H x W map (whose batch of 16 at 384 channels
overflows `F.interpolate`'s element limit).
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


def _window_weights(
    in_size: int, out_size: int, kernel: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis, for a k-tap convolution (zero padding k // 2) followed by bilinear resampling: each
    output's window of k + 1 source indices `[out, k + 1]` (clamped into the image), and the weights
    `[out, k]` of window positions u and u + 1 in the blend that gives the k inputs the kernel reads.

    Output o reads conv[low] and conv[low + 1] with the bilinear weights; conv[p] reads the inputs
    p - k // 2 ... p + k // 2, so kernel tap y reads low_weight * window[y] + high_weight * window[y + 1] with
    the window starting at low - k // 2. Where resampling clamps its second tap onto the first (the image's
    last pixel, or upsampling), that tap's weight joins the first. Inputs outside the image (the convolution's
    zero padding) get weight 0."""
    taps, tap_weights = _bilinear_taps(in_size, out_size, device, dtype)
    low = taps[:, 0]
    distinct = taps[:, 1] > low
    low_weight = tap_weights[:, 0] + tap_weights[:, 1] * ~distinct
    high_weight = tap_weights[:, 1] * distinct
    window = (low - kernel // 2)[:, None] + torch.arange(kernel + 1, device=device)
    inside = (window >= 0) & (window < in_size)
    return (
        window.clamp(0, in_size - 1),
        (low_weight[:, None] * inside[:, :-1]).to(dtype),
        (high_weight[:, None] * inside[:, 1:]).to(dtype),
    )


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
    device, dtype = feature_map.device, feature_map.dtype
    rows, row_low, row_high = _window_weights(height, size[0], kernel_h, device, dtype)
    cols, col_low, col_high = _window_weights(width, size[1], kernel_w, device, dtype)
    # one gather of every output's window: [B, F, h, k_h + 1, w, k_w + 1]
    window = feature_map[:, :, rows[:, :, None, None], cols[None, None, :, :]]
    # the resampling's rows, then its columns: [B, F, h, k_h, w, k_w + 1], then [B, F, h, k_h, w, k_w]
    row_low, row_high = row_low[:, :, None, None], row_high[:, :, None, None]
    blended = torch.addcmul(window[:, :, :, :-1] * row_low, window[:, :, :, 1:], row_high)
    blended = torch.addcmul(blended[..., :-1] * col_low, blended[..., 1:], col_high)
    return torch.einsum("bfiyjx,dfyx->bdij", blended, weight.to(dtype))


def decode_then_resample(
    feature_map: torch.Tensor, weight: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The original computation (full-resolution decode, then bilinear resampling), kept as the oracle
    of `decode_at_patch_grid`."""
    decoded = F.conv2d(feature_map, weight.to(feature_map.dtype), padding=weight.shape[-1] // 2)
    return F.interpolate(decoded, size=size, mode="bilinear", align_corners=False)
