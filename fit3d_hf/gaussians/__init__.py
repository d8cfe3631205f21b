"""Feature Gaussians: the parameters, their initialisation, adaptive density control and bundle I/O."""

from .bundle import (
    BUNDLE_FILENAME,
    BundleMismatchError,
    GaussianBundle,
    load_bundle,
    read_bundle_metadata,
    save_bundle,
)
from .densify import DensificationConfig, Densifier, quat_to_rotmat
from .model import FeatureGaussians, inverse_sigmoid, rgb_to_sh_dc, sh_dc_to_rgb

__all__ = [
    "BUNDLE_FILENAME",
    "BundleMismatchError",
    "GaussianBundle",
    "load_bundle",
    "read_bundle_metadata",
    "save_bundle",
    "DensificationConfig",
    "Densifier",
    "FeatureGaussians",
    "inverse_sigmoid",
    "quat_to_rotmat",
    "rgb_to_sh_dc",
    "sh_dc_to_rgb",
]
