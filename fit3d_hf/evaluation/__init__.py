"""Evaluation: linear probes and the multi-view correspondence probe."""

from .correspondence import Correspondences, feature_consistency, patch_correspondences

__all__ = ["Correspondences", "feature_consistency", "patch_correspondences"]
