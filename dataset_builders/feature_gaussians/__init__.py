"""The `feature_gaussians` datasets builder (Stage I outputs, one row per scene)."""

from .feature_gaussians import (
    FeatureGaussians,
    FeatureGaussiansConfig,
    bundle_from_row,
    load_feature_gaussians,
)

__all__ = ["FeatureGaussians", "FeatureGaussiansConfig", "bundle_from_row", "load_feature_gaussians"]
