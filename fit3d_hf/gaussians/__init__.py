"""Feature Gaussians: the parameters, their initialisation, adaptive density control and bundle I/O."""

from .bundle import (
    BUNDLE_FILENAME,
    BundleMismatchError,
    GaussianBundle,
    bundle_bytes_per_gaussian,
    load_bundle,
    load_compressed_sh,
    read_bundle_metadata,
    save_bundle,
)
from .densify import DensificationConfig, Densifier
from .model import FeatureGaussians, rgb_to_sh_dc, sh_dc_to_rgb
from .sh_codec import CompressedSH, decode_sh, default_codebook_size, encode_sh

__all__ = [
    "BUNDLE_FILENAME",
    "BundleMismatchError",
    "GaussianBundle",
    "bundle_bytes_per_gaussian",
    "load_bundle",
    "load_compressed_sh",
    "read_bundle_metadata",
    "save_bundle",
    "CompressedSH",
    "decode_sh",
    "default_codebook_size",
    "encode_sh",
    "DensificationConfig",
    "Densifier",
    "FeatureGaussians",
    "rgb_to_sh_dc",
    "sh_dc_to_rgb",
]
