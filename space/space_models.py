"""The Space's models: the picker's entries (`models.json`), loading each one (a Hub id or folder, else built from
the original FiT3D release's weights), and the fallbacks that keep the app usable (the demo model, or a tiny
model with random weights). Failures are recorded for the page, never raised."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch

from fit3d_hf import FiT3DConfig, FiT3DModel
from fit3d_hf.errors import InputError, MissingInputError

__all__ = [
    "DEFAULT_DEMO_MODEL_DIR",
    "DEMO_MODEL_LABEL",
    "LoadedModel",
    "ModelEntry",
    "ModelRegistry",
    "RANDOM_MODEL_LABEL",
    "build_random_model",
    "load_models",
    "read_model_entries",
]

logger = logging.getLogger(__name__)

DEFAULT_DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_output" / "fit3d"
# Short labels: the model picker shows them in full (longer explanations go into each model's description).
RANDOM_MODEL_LABEL = "Random weights (app test)"
DEMO_MODEL_LABEL = "Demo model (make demo)"


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
    offline: list[ModelEntry] = field(
        default_factory=list
    )  # entries that needed the Hub, which is unreachable

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
            logger.info(
                "%s: %s did not load (%s); building it from the original release",
                entry.label,
                entry.source,
                source_error,
            )
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
