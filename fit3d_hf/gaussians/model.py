"""The feature-Gaussian model of Stage I: 3D Gaussians with SH colours and a low-dimensional feature.

Parameters are stored unconstrained (as in 3DGS) and activated in one place, `FeatureGaussians`'
properties: `scales = exp(log_scales)`, `opacities = sigmoid(opacity_logits)`, `quats` normalised.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..geometry import SH_C0

__all__ = ["FeatureGaussians", "rgb_to_sh_dc", "sh_dc_to_rgb"]


def rgb_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    """Colour in [0, 1] -> the DC SH coefficient that renders it (3DGS adds 0.5 after evaluation)."""
    return (rgb - 0.5) / SH_C0


def sh_dc_to_rgb(sh_dc: torch.Tensor) -> torch.Tensor:
    return sh_dc * SH_C0 + 0.5


def mean_distance_to_neighbours(points: np.ndarray, k: int = 3) -> np.ndarray:
    """Mean squared distance of each point to its `k` nearest neighbours (3DGS's scale initialisation)."""
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=np.float64)
    if len(points) <= 1:
        return np.full(len(points), 1e-2)
    k = min(k, len(points) - 1)
    # the first neighbour is the point itself; the query on all cores (the same result: each point's query is
    # independent): seconds on one core for a ScanNet++-sized 1M points
    distances, _ = cKDTree(points).query(points, k=k + 1, workers=-1)
    return (distances[:, 1:] ** 2).mean(axis=1)


class FeatureGaussians(nn.Module):
    """N Gaussians, each with position, rotation, scale, opacity, SH colour and an F-dim feature.

    Args:
        means: `[N, 3]` positions.
        quats: `[N, 4]` rotations as (w, x, y, z) quaternions.
        log_scales: `[N, 3]` log of the standard deviations along the rotated axes.
        opacity_logits: `[N]` logits of the opacities.
        sh: `[N, (max_sh_degree + 1) ** 2, 3]` SH coefficients (DC first).
        features: `[N, F]` features (F may be 0).
        max_sh_degree: highest SH degree (3 in 3DGS and FiT3D); the active degree starts at 0.
    """

    def __init__(
        self,
        means: torch.Tensor,
        quats: torch.Tensor,
        log_scales: torch.Tensor,
        opacity_logits: torch.Tensor,
        sh: torch.Tensor,
        features: torch.Tensor,
        max_sh_degree: int = 3,
    ) -> None:
        super().__init__()
        n = means.shape[0]
        expected = {
            "means": (means, (n, 3)),
            "quats": (quats, (n, 4)),
            "log_scales": (log_scales, (n, 3)),
            "opacity_logits": (opacity_logits, (n,)),
            "sh": (sh, (n, (max_sh_degree + 1) ** 2, 3)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if features.ndim != 2 or features.shape[0] != n:
            raise ValueError(f"features must have shape ({n}, F), got {tuple(features.shape)}")
        self.max_sh_degree = max_sh_degree
        self.active_sh_degree = 0
        self.means = nn.Parameter(means.float().contiguous())
        self.quats = nn.Parameter(quats.float().contiguous())
        self.log_scales = nn.Parameter(log_scales.float().contiguous())
        self.opacity_logits = nn.Parameter(opacity_logits.float().contiguous())
        # DC and higher orders are separate parameters because they have different learning rates.
        self.sh_dc = nn.Parameter(sh[:, :1].float().contiguous())
        self.sh_rest = nn.Parameter(sh[:, 1:].float().contiguous())
        self.features = nn.Parameter(features.float().contiguous())

    # Names of the per-Gaussian parameters, in the order densification edits them.
    PARAMETER_NAMES = ("means", "quats", "log_scales", "opacity_logits", "sh_dc", "sh_rest", "features")

    @classmethod
    def from_points(
        cls,
        points: np.ndarray,
        colors: np.ndarray,
        feature_dim: int,
        *,
        max_sh_degree: int = 3,
        initial_opacity: float = 0.1,
        random_features: bool = False,
        generator: torch.Generator | None = None,
    ) -> FeatureGaussians:
        """Initialises one Gaussian per sparse point, as 3DGS and FiT3D do.

        Scales are isotropic, sqrt of the mean squared distance to the 3 nearest neighbours; rotations
        are the identity; opacities `initial_opacity`; SH DC from the point colour, higher orders zero.
        Features are zeros (FiT3D's code) unless `random_features` (what its paper describes).

        Args:
            points: `[M, 3]` world positions.
            colors: `[M, 3]` colours, uint8 in [0, 255] or float in [0, 1].
            feature_dim: F, the length of each Gaussian's feature.
        """
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
            raise ValueError(f"points must be a non-empty (M, 3) array, got shape {points.shape}")
        colors = np.asarray(colors)
        rgb = colors.astype(np.float32) / 255.0 if colors.dtype == np.uint8 else colors.astype(np.float32)
        n = len(points)
        distances = np.maximum(mean_distance_to_neighbours(points), 1e-7)
        log_scales = torch.from_numpy(np.log(np.sqrt(distances))).float()[:, None].repeat(1, 3)
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1.0
        sh = torch.zeros(n, (max_sh_degree + 1) ** 2, 3)
        sh[:, 0] = rgb_to_sh_dc(torch.from_numpy(rgb))
        if random_features:
            features = torch.randn(n, feature_dim, generator=generator) * 0.1
        else:
            features = torch.zeros(n, feature_dim)
        return cls(
            torch.from_numpy(points).float(),
            quats,
            log_scales,
            torch.logit(torch.as_tensor(initial_opacity, dtype=torch.float32)).expand(n).clone(),
            sh,
            features,
            max_sh_degree=max_sh_degree,
        )

    @classmethod
    def random_in_box(
        cls,
        count: int,
        low: np.ndarray,
        high: np.ndarray,
        feature_dim: int,
        *,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> FeatureGaussians:
        """Initialises `count` Gaussians uniformly inside the box [low, high] with random colours
        (for scenes without sparse points)."""
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        low = torch.as_tensor(np.asarray(low), dtype=torch.float32)
        high = torch.as_tensor(np.asarray(high), dtype=torch.float32)
        points = low + (high - low) * torch.rand(count, 3, generator=generator)
        colors = torch.rand(count, 3, generator=generator)
        return cls.from_points(points.numpy(), colors.numpy(), feature_dim, generator=generator, **kwargs)

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.features.shape[1]

    @property
    def scales(self) -> torch.Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def normalized_quats(self) -> torch.Tensor:
        return torch.nn.functional.normalize(self.quats, dim=-1)

    @property
    def sh(self) -> torch.Tensor:
        """`[N, (max_sh_degree + 1) ** 2, 3]` all SH coefficients."""
        return torch.cat([self.sh_dc, self.sh_rest], dim=1)

    def active_sh(self) -> torch.Tensor:
        """`[N, (active_sh_degree + 1) ** 2, 3]` the coefficients of the degrees in use."""
        return self.sh[:, : (self.active_sh_degree + 1) ** 2]

    def raise_sh_degree(self) -> None:
        self.active_sh_degree = min(self.active_sh_degree + 1, self.max_sh_degree)

    def extent_stats(self) -> dict[str, float]:
        with torch.no_grad():
            return {
                "count": float(len(self)),
                "mean_scale": float(self.scales.mean()) if len(self) else math.nan,
                "mean_opacity": float(self.opacities.mean()) if len(self) else math.nan,
            }
