"""Numeric constants of the rasterizer, shared by the reference and (as a copy) `rasterizer_cuda/constants.h`.

`tests/test_render_reference.py` checks that every value here equals its twin in the C++ header. `SH_C0` is
defined once, with the rest of the SH maths, in `fit3d_hf.geometry`; it is listed here for that check.
"""

from fit3d_hf.geometry import SH_C0

__all__ = [
    "ALPHA_THRESHOLD",
    "BLOCK_SIZE",
    "COV2D_BLUR",
    "FRUSTUM_MARGIN",
    "MAX_ALPHA",
    "RADIUS_SIGMAS",
    "SH_C0",
    "TILE_SIZE",
    "TRANSMITTANCE_THRESHOLD",
]

# Side of the square pixel tiles that Gaussians are binned into (one CUDA block of 16x16 threads per tile).
TILE_SIZE = 16
# Pixels (threads) per tile.
BLOCK_SIZE = TILE_SIZE * TILE_SIZE
# A Gaussian whose alpha at a pixel is below this is skipped there (3DGS: 1/255, invisible in 8-bit colour).
ALPHA_THRESHOLD = 1.0 / 255.0
# Alpha is clamped to this so that 1 - alpha stays invertible in the back-to-front backward pass (3DGS).
MAX_ALPHA = 0.99
# A pixel stops compositing before a Gaussian would drop its transmittance below this (3DGS).
TRANSMITTANCE_THRESHOLD = 1e-4
# Variance (px^2) added to the 2D covariance: the EWA low-pass filter, so each splat covers about a pixel.
COV2D_BLUR = 0.3
# The projection's Jacobian is evaluated with x/z, y/z clamped to the image edge plus this fraction of
# tan(half fov) (3DGS's 1.3 x tan(fov/2) for a centred principal point), which keeps it finite off-screen.
FRUSTUM_MARGIN = 0.3
# `radii` (the screen-space size used by densification) is this many standard deviations, as in 3DGS.
RADIUS_SIGMAS = 3.0
