"""Gradio Space: original vs 3D-aware (FiT3D) patch features of one image, side by side.

For the image given, it shows, for the original backbone and its 3D-aware fine-tuned copy: the PCA of the
patch features as colours, a K-Means segmentation, and (beyond the original FiT3D demo) the cosine similarity
of every patch to a clicked one. Models come from `models.json` (Hub ids or local folders); when none of them
loads, the model `make demo` writes to `demo_output/fit3d` is used, or else a tiny model with random weights,
so the app always starts. Importing this file builds nothing: call `build_demo()` (`python app.py` does).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from fit3d_hf import FiT3DConfig, FiT3DModel
from fit3d_hf.errors import InputError, MissingInputError
from fit3d_hf.images import to_8bit
from fit3d_hf.visualization import cosine_similarity_map, heatmap_rgb, kmeans_segments, label_colors, pca_rgb

__all__ = [
    "DEFAULT_MODELS_FILE",
    "LoadedModel",
    "ModelEntry",
    "ModelRegistry",
    "SpaceSettings",
    "build_demo",
    "build_random_model",
    "load_models",
    "open_image",
    "prepare_image",
    "read_model_entries",
]

logger = logging.getLogger(__name__)

SPACE_DIR = Path(__file__).resolve().parent
DEFAULT_MODELS_FILE = SPACE_DIR / "models.json"
DEFAULT_DEMO_MODEL_DIR = SPACE_DIR.parent / "demo_output" / "fit3d"
EXAMPLES_DIR = SPACE_DIR / "examples"

# Short labels: the model picker shows them in full (longer explanations go into each model's description).
RANDOM_MODEL_LABEL = "Random weights (app test)"
DEMO_MODEL_LABEL = "Demo model (make demo)"
SIMILARITY_CMAP = "inferno"
MARKER_COLOR = (0, 255, 255)  # cyan: absent from inferno, so the marker never reads as a similarity value
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


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One entry of the model picker, as listed in `models.json`."""

    label: str
    source: str | None  # Hub id, or local folder (relative paths are relative to models.json)
    description: str = ""
    # A backbone of the original FiT3D release (yuanwenyue/FiT3D, e.g. "dinov2_small"): when `source` does not
    # load (or is None), the model is built from the release's weights (download, convert, cache).
    release: str | None = None

    @property
    def where(self) -> str:
        """What the entry loads from, for messages."""
        if self.source and self.release:
            return f"{self.source}, else the original release's {self.release}"
        return self.source or f"the original release's {self.release}"


@dataclass
class LoadedModel:
    label: str
    source: str
    description: str
    model: FiT3DModel
    random_weights: bool = False


@dataclass
class ModelRegistry:
    """The models the app offers, and the entries that failed to load (shown in the UI)."""

    models: dict[str, LoadedModel] = field(default_factory=dict)
    failures: list[tuple[ModelEntry, str]] = field(default_factory=list)
    offline: list[ModelEntry] = field(default_factory=list)  # entries that needed the Hub, which is unreachable

    def get(self, label: str) -> LoadedModel:
        if label not in self.models:
            raise gr.Error(f"Unknown model {label!r}; choose one of: {', '.join(self.models)}")
        return self.models[label]


def read_model_entries(path: str | Path) -> list[ModelEntry]:
    """Reads the model picker's entries: `{"models": [{"label", "source", "description"?}, ...]}`.

    A `source` that names an existing folder relative to the file is made absolute; any other is a Hub id.

    Args:
        path: the JSON file.

    Returns:
        The entries, in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"model list {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"model list {path} is not valid JSON: {error}") from error
    items = data.get("models") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise InputError(f'model list {path} must hold {{"models": [{{"label": ..., "source": ...}}, ...]}}')
    from fit3d_hf.release import RELEASE_BACKBONES

    entries = []
    for index, item in enumerate(items):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("label"), str)
            or not isinstance(item.get("source", ""), str)
            or not isinstance(item.get("release", ""), str)
            or not (item.get("source") or item.get("release"))
        ):
            raise InputError(
                f"model list {path}: entry {index} needs a string 'label' and a 'source' and/or 'release', "
                f"got {item!r}"
            )
        release = item.get("release") or None
        if release is not None and release not in RELEASE_BACKBONES:
            raise InputError(
                f"model list {path}: entry {index} names release {release!r}; the original release has "
                f"{', '.join(RELEASE_BACKBONES)}"
            )
        source = item.get("source") or None
        if source is not None:
            local = (path.parent / source).resolve()
            if not Path(source).is_absolute() and local.is_dir():
                source = str(local)
        entries.append(ModelEntry(item["label"], source, str(item.get("description", "")), release))
    labels = [entry.label for entry in entries]
    if len(set(labels)) != len(labels):
        raise InputError(f"model list {path} repeats a label: {labels}")
    return entries


def _load_fit3d(source: str, device: torch.device) -> FiT3DModel:
    from transformers import AutoConfig, AutoModel

    if Path(source).is_absolute() and not Path(source).exists():  # not a Hub id: say so, not "bad repo id"
        raise MissingInputError(f"folder {source} does not exist")
    config = AutoConfig.from_pretrained(source)
    if config.model_type != FiT3DConfig.model_type:
        raise InputError(f"{source} holds a {config.model_type!r} model, not a FiT3D model ('fit3d')")
    return AutoModel.from_pretrained(source, config=config).to(device).eval()


def build_random_model(seed: int = 0) -> FiT3DModel:
    """A tiny FiT3D model (DINOv2 architecture, 2 layers, width 48, patch 14) with random weights.

    Args:
        seed: seed of the weights; the global torch RNG is left untouched.

    Returns:
        The model in eval mode; its two backbones have different weights.
    """
    from transformers import Dinov2Config

    backbone_config = Dinov2Config(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        patch_size=14,
        image_size=224,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FiT3DModel(FiT3DConfig(backbone_config=backbone_config, backbone=None))
    return model.eval()


def _load_entry(entry: ModelEntry, device: torch.device, release_cache: str | Path | None) -> FiT3DModel:
    """The entry's model: from its source, else built from the original release's weights (cached)."""
    from fit3d_hf.release import converted_release_model

    if entry.source:
        try:
            return _load_fit3d(entry.source, device)
        except Exception as source_error:  # noqa: BLE001 - the release (if any) gets its chance below
            if not entry.release:
                raise
            logger.info("%s: %s did not load (%s); building it from the original release", entry.label, entry.source, source_error)
    # A failure here is reported with its own cause (an unreachable Hub, a conversion problem, ...).
    return _load_fit3d(str(converted_release_model(entry.release, release_cache)), device)


def _short_reason(error: Exception) -> str:
    """One line for the page: the project's own messages as they are, others with their type."""
    from fit3d_hf.errors import Fit3DError

    first = (str(error).strip().splitlines() or [""])[0]
    return first if isinstance(error, Fit3DError) else f"{type(error).__name__}: {first}"


def _needs_unreachable_hub(error: BaseException) -> bool:
    """Whether loading failed only because the Hub cannot be reached (offline, or no network)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from fit3d_hf.errors import HubUnavailableError
    from fit3d_hf.hub import is_network_error

    while error is not None:
        if isinstance(error, (HubUnavailableError, LocalEntryNotFoundError)) or is_network_error(error):
            return True
        error = error.__cause__
    return False


def load_models(
    entries: list[ModelEntry],
    demo_model_dir: str | Path | None = DEFAULT_DEMO_MODEL_DIR,
    device: torch.device | None = None,
    release_cache: str | Path | None = None,
) -> ModelRegistry:
    """Loads every entry it can; failures are recorded, not raised.

    An entry whose Hub model is missing but that names a backbone of the original release is built from the
    release's weights (downloaded once, converted, cached in `release_cache`). The local demo model (`make
    demo`'s output) joins when its folder exists; when nothing loaded at all, a random tiny model is added so
    the app still starts. Entries that needed the Hub while it is unreachable are listed in
    `registry.offline` (the page shows one short notice for them).

    Args:
        entries: the picker entries.
        demo_model_dir: folder of the demo pipeline's FiT3DModel; None to skip it.
        device: where the models run; CUDA when available by default.
        release_cache: where models built from the original release are kept (default:
            `fit3d_hf.release.default_release_cache()`).

    Returns:
        The registry.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    registry = ModelRegistry()
    candidates = list(entries)
    if demo_model_dir is not None and Path(demo_model_dir).is_dir():
        demo_dir = str(Path(demo_model_dir).resolve())
        if all(entry.source != demo_dir for entry in entries):
            candidates.append(
                ModelEntry(
                    DEMO_MODEL_LABEL,
                    demo_dir,
                    "Trained on the synthetic demo scenes: a test of the pipeline, not a useful model.",
                )
            )
    for entry in candidates:
        try:
            model = _load_entry(entry, device, release_cache)
        # Any failure (no network, missing folder, wrong model type, broken weights) must leave the app
        # usable, with the reason shown next to the picker.
        except Exception as error:  # noqa: BLE001
            if _needs_unreachable_hub(error):
                logger.warning("Model %r (%s) needs the Hub, which is unreachable", entry.label, entry.where)
                registry.offline.append(entry)
                continue
            message = _short_reason(error)
            logger.warning("Model %r (%s) did not load: %s", entry.label, entry.where, message)
            registry.failures.append((entry, message))
            continue
        registry.models[entry.label] = LoadedModel(entry.label, entry.where, entry.description, model)
    if not registry.models:
        logger.warning("No FiT3D model loaded; using a tiny model with random weights")
        registry.models[RANDOM_MODEL_LABEL] = LoadedModel(
            RANDOM_MODEL_LABEL,
            "built in",
            "Random weights: the pictures show nothing about FiT3D.",
            build_random_model().to(device),
            True,
        )
    return registry


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------


def prepare_image(image: Image.Image | np.ndarray, max_side: int) -> Image.Image:
    """Any PIL image or array -> an RGB image whose long side is at most `max_side`.

    Transparent pixels are composited onto white; grayscale, palette, CMYK and 16-bit images become RGB
    (16-bit ones scaled by their bit depth, as the scene readers do, not stretched to their maximum).

    Args:
        image: PIL image, or `[H, W]` / `[H, W, 3|4]` array (uint8, uint16, or float in [0, 1]).
        max_side: cap on the long side in pixels (larger images are downscaled, aspect kept).

    Returns:
        A new RGB `PIL.Image`.
    """
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype == np.uint16:  # scaled by the bit depth, like 16-bit files
            array = (array.astype(np.float64) * (255.0 / 65535.0)).round().astype(np.uint8)
        elif array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise gr.Error(
                f"Expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}"
            )
        image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    image = ImageOps.exif_transpose(image)
    # High-bit-depth grey pictures: scaled by their bit depth, as the scene readers do (PIL's convert would
    # clip them at 255), so an 8-bit and a 16-bit copy of a picture give the same features.
    image = to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    try:
        image = image.convert("RGB")
    except ValueError as error:
        raise gr.Error(f"Cannot convert a {image.mode} image to RGB: {error}") from error
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def open_image(value) -> Image.Image | np.ndarray | None:
    """Decodes what an image handler receives into a PIL image, refusing non-images with a clear message.

    The app's events run with `preprocess=False`, so handlers get gradio's raw upload payload (a dict with the
    cached file's `path` and the user's `orig_name`) and decode it here: gradio's own decoding would turn a
    non-image file into an anonymous server error. Calls from Python may pass a PIL image, an array or a path.

    Args:
        value: upload payload, PIL image, array, file path, or None.

    Returns:
        The PIL image (decoded) or the array; None for None.
    """
    if value is None or isinstance(value, (Image.Image, np.ndarray)):
        return value
    if isinstance(value, (str, Path)):
        source, name = value, Path(value).name
    elif isinstance(value, dict) and (value.get("path") or str(value.get("url") or "").startswith("data:")):
        name = value.get("orig_name") or Path(value.get("path") or "upload").name
        if value.get("path"):
            source = value["path"]
        else:  # an inline data URL
            source = io.BytesIO(base64.b64decode(value["url"].split(",", 1)[1]))
    else:
        raise gr.Error(f"Expected an image upload, got {type(value).__name__}.")
    try:
        image = Image.open(source)
        image.load()
    except UnidentifiedImageError as error:
        raise gr.Error(
            f"{name} is not an image: its format was not recognised. Upload a PNG, JPEG, WebP, BMP, GIF or "
            "TIFF image."
        ) from error
    except Image.DecompressionBombError as error:
        raise gr.Error(f"{name} is too large to decode safely: {error}") from error
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt files
        raise gr.Error(f"{name} could not be read as an image: {error}") from error
    return image


def _downscale_notice(given_size: tuple[int, int], shown_size: tuple[int, int]) -> str:
    """A visible line when the upload was larger than the Space computes on (empty otherwise)."""
    if tuple(given_size) == tuple(shown_size):
        return ""
    return (
        f"**Note: your {given_size[0]}×{given_size[1]} image was downscaled to {shown_size[0]}×{shown_size[1]} px** "
        "(the Space's size limit). · "
    )


def _upscale(picture: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 `[h, w, 3]` patch picture -> `[H, W, 3]` for `size` = (W, H), each patch a solid block."""
    return np.asarray(Image.fromarray(picture).resize(size, Image.Resampling.NEAREST))


def _draw_marker(picture: np.ndarray, x: float, y: float, radius: float) -> np.ndarray:
    canvas = Image.fromarray(picture)
    draw = ImageDraw.Draw(canvas)
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=MARKER_COLOR, width=2)
    return np.asarray(canvas)


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------


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


class _FeatureService:
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
        return (*(_upscale(p, size) for p in pictures), _downscale_notice(given_size, size) + info)

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
            _draw_marker(_upscale(heatmap_rgb(m, low, 1.0, SIMILARITY_CMAP), size), px, py, radius)
            for m in maps
        ]
        info = _downscale_notice((given_w, given_h), size) + (
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


def check_upload(value):
    """Upload-time check of the input image: a file that is not an image is removed at once, with a message,
    instead of staying as a broken preview. Returns the value unchanged (gradio skips the update) or None."""
    if value is None:
        return gr.skip()
    try:
        open_image(value)
    except gr.Error as error:
        gr.Warning(error.message)
        return None
    return gr.skip()


def _captioned_image(caption: str, elem_id: str, **kwargs) -> gr.Image:
    """An image with its caption above it, never over it (gradio floats labels over the picture's corner,
    where they hide part of it and get cut off on narrow screens)."""
    gr.Markdown(caption, elem_id=f"{elem_id}-caption", elem_classes=["picture-caption"])
    return gr.Image(label=caption, show_label=False, elem_id=elem_id, **kwargs)


def _picture_row(*pictures: tuple[str, str]) -> list[gr.Image]:
    """Result pictures side by side, each `(elem_id, caption)` with its caption above it."""
    images = []
    with gr.Row():
        for elem_id, caption in pictures:
            with gr.Column():
                images.append(_captioned_image(caption, elem_id, format="png"))
    return images


def _status_markdown(registry: ModelRegistry) -> str:
    lines = []
    if registry.offline:
        names = ", ".join(entry.label for entry in registry.offline)
        local = ", ".join(f"**{label}**" for label in registry.models) or "none"
        lines.append(
            f"ℹ️ The Hugging Face Hub cannot be reached, so the Hub models ({names}) are not available here; "
            f"using the local model(s): {local}."
        )
    for loaded in registry.models.values():
        if loaded.random_weights:
            lines.append(
                "⚠️ No FiT3D checkpoint could be loaded, so the app runs a tiny model with **random weights — "
                "for testing the app only**: its pictures say nothing about FiT3D."
            )
    for entry, message in registry.failures:
        lines.append(f"✗ Model **{entry.label}** did not load: {message}")
    return "\n\n".join(lines)


_INTRO = """# FiT3D: original vs 3D-aware features
[FiT3D](https://arxiv.org/abs/2407.20229) (ECCV 2024) fine-tunes 2D vision backbones with features lifted to
3D Gaussians. Upload an image (or use the webcam or clipboard), pick a model and press **Run**: each row
compares the original backbone (left) with its 3D-aware fine-tuned copy (right). **Click a point on the input
image** to see how similar every patch is to the clicked one in both models."""


def build_demo(
    models_file: str | Path | None = DEFAULT_MODELS_FILE,
    demo_model_dir: str | Path | None = DEFAULT_DEMO_MODEL_DIR,
    settings: SpaceSettings | None = None,
    registry: ModelRegistry | None = None,
    release_cache: str | Path | None = None,
) -> gr.Blocks:
    """Loads the models and builds the app (not launched).

    Args:
        models_file: JSON list of the picker's models (see `read_model_entries`); None for no entries.
        demo_model_dir: folder of `make demo`'s FiT3DModel, offered when it exists; None to skip.
        settings: size and concurrency limits.
        registry: already loaded models (overrides `models_file` and `demo_model_dir`).
        release_cache: where models built from the original release's weights are kept (see `load_models`).

    Returns:
        The `gr.Blocks`, with its queue configured. API endpoints: `/visualize` (image, model, clusters,
        shared PCA -> 4 pictures + text) and `/similarity` (image, model, x, y -> 2 heat maps + text).
    """
    settings = settings or SpaceSettings()
    if registry is None:
        entries = read_model_entries(models_file) if models_file is not None else []
        registry = load_models(entries, demo_model_dir, release_cache=release_cache)
    service = _FeatureService(registry, settings)

    with gr.Blocks(title="FiT3D: original vs 3D-aware features", analytics_enabled=False) as demo:
        gr.Markdown(_INTRO)
        gr.Markdown(_status_markdown(registry), elem_id="model-status")
        with gr.Row():
            with gr.Column(scale=1):
                controls = _input_column(list(registry.models), sorted(EXAMPLES_DIR.glob("*.png")))
            with gr.Column(scale=2):
                results = _result_column()
        _connect_events(service, controls, results)
    demo.queue(default_concurrency_limit=settings.concurrency_limit, max_size=32)
    return demo


@dataclass
class _Controls:
    """The input column's components."""

    image: gr.Image
    model: gr.Dropdown
    n_clusters: gr.Slider
    shared_pca: gr.Checkbox
    run_button: gr.Button
    point_x: gr.Textbox
    point_y: gr.Textbox
    similarity_button: gr.Button


@dataclass
class _Results:
    """The result column's components: the run's text and pictures, and the similarity maps'."""

    info: gr.Markdown
    pictures: list[gr.Image]  # PCA original, PCA fine-tuned, K-Means original, K-Means fine-tuned
    similarity_info: gr.Markdown
    similarity: list[gr.Image]  # original, fine-tuned


def _input_column(labels: list[str], examples: list[Path]) -> _Controls:
    """The input image, the model picker and options, the buttons and the clicked point (inside a column)."""
    image_input = _captioned_image(
        "**Input image** (click a point for the similarity maps)",
        "input-image",
        sources=["upload", "webcam", "clipboard"],
    )
    model_choice = gr.Dropdown(labels, value=labels[0], label="Model", elem_id="model-choice")
    n_clusters = gr.Slider(MIN_CLUSTERS, MAX_CLUSTERS, value=20, step=1, label="Number of K-Means clusters")
    shared_pca = gr.Checkbox(
        True,
        label="One PCA for both models (same colour = same feature direction); untick to fit one "
        "PCA per model, as the original demo does",
    )
    run_button = gr.Button("Run", variant="primary", elem_id="run-button")
    with gr.Row():
        # Text boxes, not gr.Number (which shows 0 before any click): empty until a point is clicked.
        point_x = gr.Textbox("", label="Clicked x (px)", placeholder="click the image", elem_id="point-x")
        point_y = gr.Textbox("", label="Clicked y (px)", placeholder="click the image", elem_id="point-y")
    similarity_button = gr.Button("Similarity at this point", size="sm")
    if examples:
        gr.Examples([[str(path)] for path in examples], inputs=[image_input], label="Synthetic example rooms")
    return _Controls(image_input, model_choice, n_clusters, shared_pca, run_button, point_x, point_y, similarity_button)


def _result_column() -> _Results:
    """The run's text, the PCA and K-Means rows, and the similarity maps (inside a column)."""
    info = gr.Markdown(elem_id="run-info")
    pca = _picture_row(("pca-original", "PCA · original"), ("pca-finetuned", "PCA · 3D-aware (FiT3D)"))
    kmeans = _picture_row(
        ("kmeans-original", "K-Means · original"), ("kmeans-finetuned", "K-Means · 3D-aware (FiT3D)")
    )
    similarity_info = gr.Markdown(elem_id="similarity-info")
    similarity = _picture_row(
        ("similarity-original", "Similarity to the clicked patch · original"),
        ("similarity-finetuned", "Similarity to the clicked patch · 3D-aware (FiT3D)"),
    )
    return _Results(info, [*pca, *kmeans], similarity_info, similarity)


def _connect_events(service: _FeatureService, controls: _Controls, results: _Results) -> None:
    """The app's events: Run (then the similarity maps), a click on the image, the similarity button, uploads."""
    visual_outputs = [*results.pictures, results.info]
    similarity_inputs = [controls.image, controls.model, controls.point_x, controls.point_y]
    similarity_outputs = [*results.similarity, results.similarity_info]

    def pick_point(event: gr.SelectData):
        return event.index[0], event.index[1]

    def clear_point():
        return "", ""

    # Handlers get the raw upload (preprocess=False) and decode it in open_image, so that a file that is
    # not an image is refused with a message. The public endpoint is registered first so that it gets
    # the plain name "/similarity".
    raw = {"preprocess": False}
    controls.similarity_button.click(
        service.similarity, similarity_inputs, similarity_outputs, api_name="similarity", **raw
    )
    controls.run_button.click(
        service.visualize,
        [controls.image, controls.model, controls.n_clusters, controls.shared_pca],
        visual_outputs,
        api_name="visualize",
        **raw,
    ).success(
        service.similarity,
        similarity_inputs,
        similarity_outputs,
        api_name="similarity_after_run",
        api_visibility="private",
        **raw,
    )
    point = [controls.point_x, controls.point_y]
    controls.image.select(pick_point, None, point, api_visibility="private").then(
        service.similarity,
        similarity_inputs,
        similarity_outputs,
        api_name="similarity_on_click",
        api_visibility="private",
        **raw,
    )
    controls.image.change(clear_point, None, point, api_visibility="private")
    controls.image.upload(check_upload, controls.image, controls.image, api_visibility="private", **raw)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    build_demo().launch(theme=gr.themes.Soft())
