"""The rasterizer's compositing, stated pixel by pixel: the readable specification of `render()`'s images.

`rasterize_per_pixel` is the 3DGS compositing loop written out literally, in Python floats (float64), one
pixel and one Gaussian at a time. It is far too slow to render with; it exists to be read and to be tested
against. The three implementations of `rasterize` must give its values:

* the PyTorch reference, `_reference._rasterize` (pair lists in bounded memory; test_render_reference.py),
* the CPU extension (`rasterizer_cuda/cpu/`; test_render_cpu.py),
* the CUDA kernels (`rasterizer_cuda/rasterize_fwd.cu`; test_render_cuda.py).

Gradients are not stated here: they are those of these values, which autograd takes through the reference
(the oracle of the compiled backward passes). The projection that produces `means2d`, `conics`, `depths` and
`radii` is `_reference._project`.

The maths, per camera and pixel (col, row), with the pixel centre p = (col + 0.5, row + 0.5):

1. The Gaussians with radius > 0, front to back by camera depth (ties by index).
2. For each: d = p - mean2d, sigma = d^T conic d / 2, alpha = min(0.99, opacity * exp(-sigma)); skipped when
   sigma < 0 or alpha < 1/255.
3. Compositing stops before the Gaussian that would bring the transmittance T below 1e-4; otherwise it adds
   alpha * T * (colour, depth, features) and T becomes T * (1 - alpha) (T starts at 1).
4. rgb = the composited colour + T_final * background; depth = sum of alpha_i T_i z_i (not divided by the
   alpha); features = the composited features (no background); alpha = 1 - T_final.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fit3d_hf.render._constants import ALPHA_THRESHOLD, MAX_ALPHA, TRANSMITTANCE_THRESHOLD

__all__ = ["rasterize_per_pixel"]


def rasterize_per_pixel(
    means2d: Tensor,  # [B, N, 2]
    conics: Tensor,  # [B, N, 3]
    depths: Tensor,  # [B, N]
    colors: Tensor,  # [N, 3] or [B, N, 3]
    opacities: Tensor,  # [N]
    features: Tensor,  # [N, F]
    radii: Tensor,  # [B, N]
    width: int,
    height: int,
    background: Tensor | None = None,  # [3]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 3DGS compositing loop, literally: every pixel walks all visible Gaussians front to back.

    Same arguments and outputs as `_reference._rasterize` (forward values only); see the module docstring for
    the maths.

    Returns:
        rgb `[B, 3, H, W]`, depth `[B, 1, H, W]`, features `[B, F, H, W]`, alpha `[B, 1, H, W]`, float64
        on the CPU.
    """
    batch = means2d.shape[0]
    colors = colors.expand(batch, -1, 3)
    channels = 4 + features.shape[1]
    out = torch.zeros(batch, channels, height, width, dtype=torch.float64)
    final_t = torch.ones(batch, height, width, dtype=torch.float64)
    for b in range(batch):
        order = sorted(
            (i for i in range(means2d.shape[1]) if radii[b, i] > 0), key=lambda i: (float(depths[b, i]), i)
        )
        for row in range(height):
            for col in range(width):
                t = 1.0
                for i in order:
                    dx = col + 0.5 - float(means2d[b, i, 0])
                    dy = row + 0.5 - float(means2d[b, i, 1])
                    a, bb, c = (float(v) for v in conics[b, i])
                    sigma = 0.5 * (a * dx * dx + c * dy * dy) + bb * dx * dy
                    alpha = min(MAX_ALPHA, float(opacities[i]) * math.exp(-sigma))
                    if sigma < 0 or alpha < ALPHA_THRESHOLD:
                        continue
                    if t * (1 - alpha) < TRANSMITTANCE_THRESHOLD:
                        break
                    value = torch.cat(
                        [colors[b, i].double(), depths[b, i : i + 1].double(), features[i].double()]
                    )
                    out[b, :, row, col] += alpha * t * value.cpu()
                    t *= 1 - alpha
                final_t[b, row, col] = t
    rgb = out[:, :3]
    if background is not None:
        rgb = rgb + final_t[:, None] * background.double().cpu()[None, :, None, None]
    return rgb, out[:, 3:4], out[:, 4:], 1 - final_t[:, None]
