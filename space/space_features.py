"""The Space's computation: both backbones' patch features of an image (on a ZeroGPU GPU when there is one),
kept for repeated clicks, and the PCA, K-Means and similarity pictures drawn from them."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import gradio as gr
import numpy as np
import torch
from PIL import Image
from space_images import downscale_notice, draw_marker, open_image, prepare_image, upscale_patches
from space_models import ModelRegistry

from fit3d_hf import FiT3DModel
from fit3d_hf.visualization import cosine_similarity_map, heatmap_rgb, kmeans_segments, label_colors, pca_rgb

__all__ = ["FeatureService", "MAX_CLUSTERS", "MIN_CLUSTERS", "SpaceSettings", "compute_features"]

SIMILARITY_CMAP = "inferno"
MIN_CLUSTERS, MAX_CLUSTERS = 2, 40


def _on_gpu_when_available(function):
    """ZeroGPU Spaces run functions decorated with `spaces.GPU` on a GPU; elsewhere this changes nothing."""
    try:
        import spaces
    except ImportError:
        return function
    return spaces.GPU(function)


@_on_gpu_when_available
def compute_features(model: FiT3DModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features of one image from both backbones.

    Args:
        model: the FiT3D model.
        pixels: `[1, 3, H, W]` image in [0, 1].

    Returns:
        `(original, finetuned)`, each `[D, h, w]` float32 on the CPU.
    """
    device = next(model.parameters()).device
    with torch.inference_mode():
        output = model(pixels.to(device), return_dict=True)
    return output.original_features[0].float().cpu(), output.finetuned_features[0].float().cpu()


@dataclass(frozen=True)
class SpaceSettings:
    """Limits that keep one request affordable on a CPU Space."""

    max_image_side: int = 1024  # uploads are downscaled to this long side before anything else
    max_grid_side: int = 32  # the model sees at most this many patches along the long side
    concurrency_limit: int = 2  # requests computed at once; the rest wait in the queue
    cache_size: int = 8  # feature maps kept for repeated clicks on the same image


@dataclass
class _Features:
    original: torch.Tensor  # [D, h, w]
    finetuned: torch.Tensor  # [D, h, w]
    display_size: tuple[int, int]  # (W, H) of the downscaled image the pictures are drawn at
    patch_size: int


class FeatureService:
    """Computes patch features once per (model, image) and keeps the last few for clicks on the same image."""

    def __init__(self, registry: ModelRegistry, settings: SpaceSettings):
        self.registry = registry
        self.settings = settings
        self._cache: OrderedDict[tuple[str, str], _Features] = OrderedDict()
        self._lock = threading.Lock()

    def features(self, image, label: str) -> tuple[_Features, tuple[int, int]]:
        """Returns the features and the size (W, H) of `image` as given (the frame of clicked points)."""
        image = open_image(image)
        if image is None:
            raise gr.Error("Upload an image first (or pick an example).")
        loaded = self.registry.get(label)
        given_size = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
        display = prepare_image(image, self.settings.max_image_side)
        key = (label, hashlib.sha1(display.tobytes() + repr(display.size).encode()).hexdigest())
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key], given_size
        patch = loaded.model.patch_size
        limit = self.settings.max_grid_side * patch
        scale = min(1.0, limit / max(display.size))
        model_size = (max(1, round(display.width * scale)), max(1, round(display.height * scale)))
        if min(model_size) < patch:
            raise gr.Error(
                f"The image ({display.width}x{display.height} px after downscaling) is too thin: each side "
                f"needs at least one {patch}-pixel patch at the model's input size "
                f"{model_size[0]}x{model_size[1]}."
            )
        model_input = (
            display.resize(model_size, Image.Resampling.BICUBIC) if model_size != display.size else display
        )
        pixels = torch.from_numpy(np.asarray(model_input, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        original, finetuned = compute_features(loaded.model, pixels)
        result = _Features(original, finetuned, display.size, patch)
        with self._lock:
            self._cache[key] = result
            while len(self._cache) > self.settings.cache_size:
                self._cache.popitem(last=False)
        return result, given_size

    def visualize(self, image, label: str, n_clusters, shared_pca: bool):
        """PCA colours and K-Means segments of the original and the 3D-aware model's patch features.

        Args:
            image: the input image.
            label: the model's label in the picker.
            n_clusters: number of K-Means clusters (2 to 40).
            shared_pca: one PCA fitted on both models (True) or one per model (False).

        Returns:
            PCA original, PCA 3D-aware, K-Means original, K-Means 3D-aware (uint8 `[H, W, 3]` at the
            downscaled image size) and a caption.
        """
        if (
            n_clusters is None
            or not float(n_clusters).is_integer()
            or not MIN_CLUSTERS <= n_clusters <= MAX_CLUSTERS
        ):
            raise gr.Error(
                f"The number of K-Means clusters must be a whole number from {MIN_CLUSTERS} to "
                f"{MAX_CLUSTERS}, got {n_clusters}."
            )
        n_clusters = int(n_clusters)
        features, given_size = self.features(image, label)
        if shared_pca:
            pca_original, pca_finetuned = pca_rgb(features.original, features.finetuned)
        else:
            (pca_original,), (pca_finetuned,) = pca_rgb(features.original), pca_rgb(features.finetuned)
        segments = [
            label_colors(kmeans_segments(f, n_clusters)) for f in (features.original, features.finetuned)
        ]
        size = features.display_size
        dim, grid_h, grid_w = features.original.shape
        if shared_pca:
            pca_text = "one fit on both models (same colour, same feature direction)"
        else:
            pca_text = "fitted per model, as in the original demo (colours not comparable across models)"
        info = (
            f"**{label}** · shown at {size[0]}×{size[1]} px · features on a {grid_w}×{grid_h} patch grid "
            f"({features.patch_size} px patches, {dim} channels per backbone) · PCA: {pca_text} · K-Means: "
            f"{n_clusters} clusters, cosine distance"
        )
        pictures = [pca_original, pca_finetuned, *segments]
        return (*(upscale_patches(p, size) for p in pictures), downscale_notice(given_size, size) + info)

    def similarity(self, image, label: str, x, y):
        """Cosine similarity of every patch to the patch under the point (x, y), in both models.

        Args:
            image: the input image.
            label: the model's label in the picker.
            x: column of the point in the input image's pixels; None for the centre.
            y: row of the point in the input image's pixels; None for the centre.

        Returns:
            Heat map original, heat map 3D-aware (one shared colour scale, the point circled) and a caption.
        """
        features, (given_w, given_h) = self.features(image, label)
        x = given_w / 2 if _blank(x) else _coordinate(x, "x")
        y = given_h / 2 if _blank(y) else _coordinate(y, "y")
        if not (0 <= x < given_w and 0 <= y < given_h):
            raise gr.Error(f"The point ({x:g}, {y:g}) lies outside the {given_w}×{given_h} image.")
        _, grid_h, grid_w = features.original.shape
        row, col = min(int(y * grid_h / given_h), grid_h - 1), min(int(x * grid_w / given_w), grid_w - 1)
        maps = [cosine_similarity_map(f, row, col) for f in (features.original, features.finetuned)]
        # One colour scale for both maps: from the lowest similarity in either to 1 (the clicked patch).
        low = min(float(m.min()) for m in maps)
        low = min(low, 1.0 - 1e-6)
        size = features.display_size
        px, py = x * size[0] / given_w, y * size[1] / given_h
        radius = max(4.0, 0.75 * size[0] / grid_w)
        pictures = [
            draw_marker(upscale_patches(heatmap_rgb(m, low, 1.0, SIMILARITY_CMAP), size), px, py, radius)
            for m in maps
        ]
        info = downscale_notice((given_w, given_h), size) + (
            f"Point ({x:.0f}, {y:.0f}) → patch row {row}, column {col} of {grid_h}×{grid_w}. Colour scale "
            f"shared by both maps: black = {low:.2f} (lowest), yellow = 1 (the clicked patch). Mean "
            f"similarity: original {float(maps[0].mean()):.2f}, 3D-aware {float(maps[1].mean()):.2f}."
        )
        return pictures[0], pictures[1], info


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _coordinate(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise gr.Error(f"The clicked {name} must be a number of pixels, got {value!r}.") from error
