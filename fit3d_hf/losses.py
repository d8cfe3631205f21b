"""Losses and image metrics shared by Stage I, Stage II and evaluation."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["masked_l1", "psnr", "ssim"]


@functools.lru_cache(maxsize=8)
def _gaussian_window(size: int, sigma: float, channels: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel_1d /= kernel_1d.sum()
    kernel = torch.outer(kernel_1d, kernel_1d).to(device=device, dtype=dtype)
    return kernel.expand(channels, 1, size, size).contiguous()


def ssim(prediction: torch.Tensor, target: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of two `[B, C, H, W]` images in [0, 1] (the 3DGS variant: 11x11 Gaussian window,
    sigma 1.5, C1 = 0.01^2, C2 = 0.03^2, zero padding). Written here because it is a few lines and the
    training loss needs exactly this variant, differentiable, on any device.
    """
    channels = prediction.shape[1]
    window = _gaussian_window(window_size, sigma, channels, str(prediction.device), prediction.dtype)
    pad = window_size // 2

    def blur(x):
        return F.conv2d(x, window, padding=pad, groups=channels)

    mu_p, mu_t = blur(prediction), blur(target)
    var_p = blur(prediction * prediction) - mu_p**2
    var_t = blur(target * target) - mu_t**2
    covariance = blur(prediction * target) - mu_p * mu_t
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * covariance + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return ssim_map.mean()


def psnr(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of images in [0, 1]; with a `[B, 1, H, W]` mask, over the valid pixels only."""
    error = (prediction.float() - target.float()) ** 2
    if mask is not None:
        mask = mask.float().expand_as(error)
        mse = (error * mask).sum() / mask.sum().clamp_min(1)
    else:
        mse = error.mean()
    return float(10 * math.log10(1.0 / max(float(mse), 1e-12)))


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error over valid positions and all channels.

    Args:
        prediction, target: `[B, C, H, W]`.
        mask: `[B, 1, H, W]` weights in [0, 1] (a soft mask after resampling), or None.

    Returns `sum(|p - t| * mask) / (sum(mask) * C)`, FiT3D's Stage II loss.
    """
    error = (prediction - target).abs()
    if mask is None:
        return error.mean()
    mask = mask.to(error.dtype)
    return (error * mask).sum() / (mask.sum() * prediction.shape[1]).clamp_min(1e-8)
