"""Pictures of dense features: PCA colours, K-Means segments and cosine-similarity maps.

PCA follows the original demo: fit 3 components on the patch features and normalise them with one
global min/max over all three (not per channel). Several feature maps can share one fit, so that the
same colour means the same direction in feature space across them (e.g. rendered vs target features).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["cosine_similarity_map", "heatmap_rgb", "kmeans_segments", "label_colors", "pca_rgb", "save_image"]


def _as_rows(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """`[D, h, w]` -> `[h * w, D]` float64 rows and the grid size."""
    array = (
        features.detach().float().cpu().numpy()
        if isinstance(features, torch.Tensor)
        else np.asarray(features)
    )
    if array.ndim != 3:
        raise ValueError(f"features must have shape (D, h, w), got {array.shape}")
    d, h, w = array.shape
    return array.reshape(d, h * w).T.astype(np.float64), (h, w)


def pca_rgb(*feature_maps: torch.Tensor | np.ndarray, fit_on: int | None = None) -> list[np.ndarray]:
    """PCA colours of one or more `[D, h, w]` feature maps with one shared projection.

    Args:
        feature_maps: maps of the same D (sizes may differ).
        fit_on: index of the map the PCA is fitted on; None fits on all of them together.

    Returns:
        One uint8 `[h, w, 3]` image per map.
    """
    from sklearn.decomposition import PCA

    rows, sizes = zip(*(_as_rows(f) for f in feature_maps), strict=False)
    fit_rows = np.concatenate(rows) if fit_on is None else rows[fit_on]
    pca = PCA(n_components=3, random_state=0).fit(fit_rows)
    projected = [pca.transform(r) for r in rows]
    stacked = np.concatenate(projected)
    low, high = stacked.min(), stacked.max()
    scale = 255.0 / max(high - low, 1e-12)
    return [
        ((p - low) * scale).clip(0, 255).astype(np.uint8).reshape(*size, 3)
        for p, size in zip(projected, sizes, strict=True)
    ]


def kmeans_segments(features: torch.Tensor | np.ndarray, n_clusters: int = 20, seed: int = 0) -> np.ndarray:
    """K-Means on L2-normalised patch features (cosine distance, as the original demo); `[h, w]` labels."""
    from sklearn.cluster import KMeans

    rows, size = _as_rows(features)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    n_clusters = max(1, min(n_clusters, len(rows)))
    labels = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit_predict(rows)
    return labels.reshape(size)


def label_colors(labels: np.ndarray, n_labels: int | None = None) -> np.ndarray:
    """`[h, w]` integer labels -> uint8 `[h, w, 3]` colours from matplotlib's tab20 (cycled)."""
    from matplotlib import colormaps

    n_labels = int(labels.max()) + 1 if n_labels is None else n_labels
    palette = (np.asarray(colormaps["tab20"].colors) * 255).astype(np.uint8)
    return palette[np.asarray(labels) % len(palette)]


def cosine_similarity_map(features: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """Cosine similarity of every patch of a `[D, h, w]` map to the patch at (row, col); `[h, w]`."""
    flat = torch.nn.functional.normalize(features.float().flatten(1), dim=0)
    return (flat[:, row * features.shape[2] + col] @ flat).reshape(features.shape[1:])


def heatmap_rgb(
    values: torch.Tensor | np.ndarray, low: float, high: float, cmap: str = "inferno"
) -> np.ndarray:
    """Colours a `[h, w]` map with a matplotlib colormap on the fixed range [low, high] (values outside clip).

    A fixed range, rather than each map's own min/max, lets several maps share one colour scale.

    Args:
        values: `[h, w]` scalar map.
        low: value shown with the colormap's first colour.
        high: value shown with its last colour; must exceed `low`.
        cmap: matplotlib colormap name.

    Returns:
        uint8 `[h, w, 3]` colours.
    """
    from matplotlib import colormaps

    if not high > low:
        raise ValueError(f"heatmap range needs high > low, got low={low} and high={high}")
    if isinstance(values, torch.Tensor):
        array = values.detach().float().cpu().numpy()
    else:
        array = np.asarray(values, np.float64)
    if array.ndim != 2:
        raise ValueError(f"values must have shape (h, w), got {array.shape}")
    unit = np.clip((array - low) / (high - low), 0.0, 1.0)
    return (colormaps[cmap](unit)[..., :3] * 255).round().astype(np.uint8)


def save_image(path, image: np.ndarray, size: tuple[int, int] | None = None) -> None:
    """Writes a uint8 `[h, w, 3]` image, optionally resized (nearest) to `size` = (width, height)."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image))
    if size is not None:
        picture = picture.resize(size, Image.NEAREST)
    picture.save(path)
