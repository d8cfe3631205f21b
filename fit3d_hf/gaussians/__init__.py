"""Feature Gaussians: the parameters, their initialisation, adaptive density control and bundle I/O."""

from .densify import DensificationConfig, Densifier, quat_to_rotmat
from .model import FeatureGaussians, inverse_sigmoid, rgb_to_sh_dc, sh_dc_to_rgb

__all__ = [
    "DensificationConfig",
    "Densifier",
    "FeatureGaussians",
    "inverse_sigmoid",
    "quat_to_rotmat",
    "rgb_to_sh_dc",
    "sh_dc_to_rgb",
]
