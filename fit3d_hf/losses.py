"""Losses and image metrics shared by Stage I, Stage II and evaluation."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .render import feature_l1
from .render._backend import load_extension

__all__ = ["masked_l1", "masked_mse", "psnr", "psnr_of_mse", "ssim", "upsampled_feature_l1"]


@functools.lru_cache(maxsize=8)
def _gaussian_window_1d(
    size: int, sigma: float, channels: int, device: str, dtype: torch.dtype
) -> torch.Tensor:
    """`[channels, 1, size]` normalised 1-D Gaussian taps (the 2-D window is their outer product)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel_1d /= kernel_1d.sum()
    return kernel_1d.to(device=device, dtype=dtype).expand(channels, 1, size).contiguous()


def ssim(
    prediction: torch.Tensor, target: torch.Tensor, window_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Mean SSIM of two `[B, C, H, W]` images in [0, 1] (the 3DGS variant: 11x11 Gaussian window,
    sigma 1.5, C1 = 0.01^2, C2 = 0.03^2, zero padding). Written here because it is a few lines and the
    training loss needs exactly this variant, differentiable, on any device.

    Float32 CUDA images with the default window, whose target takes no gradient, go to a fused kernel of the
    CUDA extension (rasterizer_cuda/ssim.cu: one launch forward and one backward, where the composed ops take
    two convolutions and about 30 elementwise kernels each way); the gradient then reaches `prediction` only.
    Elsewhere (the CPU, float64, other windows, a target that requires grad, no extension) the composed torch
    ops of `_ssim_torch` compute it. Both agree to float32 rounding.
    """
    if _fused_ssim_applies(prediction, target, window_size, sigma) and load_extension() is not None:
        return _FusedSSIM.apply(prediction.contiguous(), target.contiguous())
    return _ssim_torch(prediction, target, window_size, sigma)


def _fused_ssim_applies(
    prediction: torch.Tensor, target: torch.Tensor, window_size: int, sigma: float
) -> bool:
    """Whether the CUDA kernel computes exactly what `_ssim_torch` would (it knows the default window only)."""
    return (
        window_size == 11
        and sigma == 1.5
        and prediction.is_cuda
        and target.device == prediction.device
        and prediction.dtype == torch.float32
        and target.dtype == torch.float32
        and prediction.dim() == 4
        and prediction.shape == target.shape
        and prediction.shape[2] > 0
        and prediction.shape[3] > 0
        and not target.requires_grad
    )


class _FusedSSIM(torch.autograd.Function):
    """`ssim` by the CUDA extension's fused kernels (rasterizer_cuda/ssim.cu). The forward also returns, per
    pixel, the SSIM map's derivatives w.r.t. the local means that the backward blurs back onto `prediction`."""

    @staticmethod
    def forward(ctx, prediction, target):
        value, derivatives = load_extension().ssim_fwd(prediction, target)
        ctx.save_for_backward(prediction, target, derivatives)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        prediction, target, derivatives = ctx.saved_tensors
        grad_output = grad_output.float().reshape(1).contiguous()  # read on the device: no host sync
        return load_extension().ssim_bwd(prediction, target, derivatives, grad_output), None


def _ssim_torch(
    prediction: torch.Tensor, target: torch.Tensor, window_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """`ssim` composed of torch ops, on any device and dtype.

    The window is separable, so the five local means are one column pass and one row pass of 11 taps over
    all five maps at once (with zero padding that equals the 11x11 window exactly, up to rounding).
    """
    channels = prediction.shape[1]
    stacked = torch.cat(
        [prediction, target, prediction * prediction, target * target, prediction * target], dim=1
    )
    taps = _gaussian_window_1d(window_size, sigma, 5 * channels, str(prediction.device), prediction.dtype)
    pad = window_size // 2
    blurred = F.conv2d(stacked, taps[:, :, :, None], padding=(pad, 0), groups=5 * channels)
    blurred = F.conv2d(blurred, taps[:, :, None, :], padding=(0, pad), groups=5 * channels)
    mu_p, mu_t, mean_pp, mean_tt, mean_pt = blurred.split(channels, dim=1)
    var_p = mean_pp - mu_p**2
    var_t = mean_tt - mu_t**2
    covariance = mean_pt - mu_p * mu_t
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * covariance + c2)) / (
        (mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2)
    )
    return ssim_map.mean()


def masked_mse(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error (a float32 scalar tensor: no wait for the device); with a `[B, 1, H, W]` mask, over the
    valid pixels only."""
    error = (prediction.float() - target.float()) ** 2
    if mask is None:
        return error.mean()
    mask = mask.float().expand_as(error)
    return (error * mask).sum() / mask.sum().clamp_min(1)


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of images in [0, 1] from their mean squared error."""
    return float(10 * math.log10(1.0 / max(float(mse), 1e-12)))


def psnr(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of images in [0, 1]; with a `[B, 1, H, W]` mask, over the valid pixels only."""
    return psnr_of_mse(masked_mse(prediction, target, mask))


def masked_l1(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
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


def upsampled_feature_l1(
    decoded: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Stage I's feature loss: mean over channels and pixels of |decoded - up(target)|, where up() is bilinear
    upsampling (align_corners=False) of the patch-resolution target to the decoded map's size (as FiT3D), and
    pixels where `mask` is False count 0 (the mean still divides by all pixels, as the original's masking by
    copying the prediction into the target does).

    Args:
        decoded: `[B, D, H, W]` decoded feature render.
        target: `[B, D, h, w]` backbone features (no gradient).
        mask: `[B, 1, H, W]` bool, or None.

    Returns:
        The loss, a float32 scalar. Where a compiled rasterizer is available (CUDA, or the CPU extension), a
        fused kernel computes it (and its gradient) in one pass over `decoded` (the composed ops take about
        ten, see rasterizer_cuda/feature_loss.cu); elsewhere the composed ops do. `fit3d_hf.render.feature_l1`
        makes that choice and checks the shapes (a mask of another shape is refused by name).
    """
    return feature_l1(decoded, target, mask)
