"""Gradio Space: original vs 3D-aware (FiT3D) patch features of one image, side by side.

For the image given, it shows, for the original backbone and its 3D-aware fine-tuned copy: the PCA of the
patch features as colours, a K-Means segmentation, and (beyond the original FiT3D demo) the cosine similarity
of every patch to a clicked one. Models come from `models.json` (Hub ids or local folders); when none of them
loads, the model `make demo` writes to `demo_output/fit3d` is used, or else a tiny model with random weights,
so the app always starts. Importing this file builds nothing: call `build_demo()` (`python app.py` does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

# The Space's own modules, beside this file (the Space and `python space/app.py` run it as a script; the
# tests put this folder on sys.path). app.py keeps re-exporting what they define for the tests and users.
from space_features import MAX_CLUSTERS, MIN_CLUSTERS, FeatureService, SpaceSettings, compute_features
from space_images import MARKER_COLOR, open_image, prepare_image
from space_models import (
    DEFAULT_DEMO_MODEL_DIR,
    DEMO_MODEL_LABEL,
    RANDOM_MODEL_LABEL,
    LoadedModel,
    ModelEntry,
    ModelRegistry,
    build_random_model,
    load_models,
    read_model_entries,
)

__all__ = [
    "DEFAULT_DEMO_MODEL_DIR",
    "DEFAULT_MODELS_FILE",
    "DEMO_MODEL_LABEL",
    "MARKER_COLOR",
    "RANDOM_MODEL_LABEL",
    "LoadedModel",
    "ModelEntry",
    "ModelRegistry",
    "SpaceSettings",
    "build_demo",
    "build_random_model",
    "compute_features",
    "load_models",
    "open_image",
    "prepare_image",
    "read_model_entries",
]

logger = logging.getLogger(__name__)

SPACE_DIR = Path(__file__).resolve().parent
DEFAULT_MODELS_FILE = SPACE_DIR / "models.json"
EXAMPLES_DIR = SPACE_DIR / "examples"


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
    service = FeatureService(registry, settings)

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
    return _Controls(
        image_input, model_choice, n_clusters, shared_pca, run_button, point_x, point_y, similarity_button
    )


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


def _connect_events(service: FeatureService, controls: _Controls, results: _Results) -> None:
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
