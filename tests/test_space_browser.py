"""The Gradio Space in a real browser: headless Debian Chromium driven by Playwright.

Upload an image, press Run, click a point on the image; the result pictures and the similarity maps must
appear, and the maps must mark the clicked point. The page is also checked as a person sees it: a short
notice (no raw error) for the unreachable Hub model, model names shown in full without markdown backticks,
the clicked x/y empty until a click, captions above the pictures (not over them, not cut off), and a file
that is not an image refused at upload. The screenshots are kept in test-artifacts/.
"""

from __future__ import annotations

import io
import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from space_helpers import free_port, load_space_app

pytest.importorskip("gradio", reason="the Space needs gradio (pip install fit3d-hf[space])")

REPO = Path(__file__).resolve().parents[1]
SPACE_DIR = REPO / "space"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
TINY_LABEL = "Tiny browser-test FiT3D"


def fetch_image(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=10) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


PICTURES = (
    "input-image", "pca-original", "pca-finetuned", "kmeans-original", "kmeans-finetuned", "similarity-original",
    "similarity-finetuned",
)  # fmt: skip
ERROR_WORDS = ("error", "did not load", "couldn't connect", "traceback", "oserror", "exception")


def _check_clean_start(page) -> None:
    """No error text anywhere on a clean start; the unreachable Hub model gets one short notice."""
    text = page.locator("body").inner_text()
    assert not [word for word in ERROR_WORDS if word in text.lower()], text
    status = page.locator("#model-status").inner_text()
    assert status.strip() == (
        "ℹ️ The Hugging Face Hub cannot be reached, so the Hub models (Unreachable) are not available here; using "
        f"the local model(s): {TINY_LABEL}, {_demo_label()}."
    ), status


def _demo_label() -> str:
    return load_space_app().DEMO_MODEL_LABEL


def _check_model_names(page, expected: list[str]) -> None:
    """Every model name: listed without markdown backticks, and shown in full once chosen."""
    field = page.locator("#model-choice input")
    field.click()
    # Each option reads "✓" (selected) or nothing, then the name.
    options = [
        text.replace("✓", "").strip() for text in page.locator("ul[role=listbox] li").all_inner_texts()
    ]
    assert options == expected and not any("`" in option for option in options)
    page.keyboard.press("Escape")
    # The width each name takes in the field's own font, against the room the field has for text.
    fits = field.evaluate(
        """(e, labels) => {
            const style = getComputedStyle(e);
            const context = document.createElement("canvas").getContext("2d");
            context.font = style.font;
            const room = e.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
            return labels.map(label => context.measureText(label).width <= room);
        }""",
        expected,
    )
    assert all(fits), (
        f"cut off in the picker: {[label for label, ok in zip(expected, fits, strict=True) if not ok]}"
    )


def _check_captions(page) -> None:
    """Each picture's caption is visible, above the picture (not over it) and not cut off."""
    for elem_id in PICTURES:
        caption = page.locator(f"#{elem_id}-caption")
        assert caption.is_visible(), elem_id
        assert caption.evaluate("e => e.scrollWidth <= e.clientWidth"), f"{elem_id}: caption cut off"
        picture = page.locator(f"#{elem_id} img").first
        below, above = picture.bounding_box(), caption.bounding_box()
        assert above["y"] + above["height"] <= below["y"] + 1, f"{elem_id}: the caption covers the picture"
        floating = page.locator(f"#{elem_id} [data-testid=block-label]:visible")
        assert floating.count() == 0, f"{elem_id}: a label floats over the picture"


def test_upload_run_and_click_in_chromium(tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian chromium is not installed (apt-get install chromium; .ci/run does it)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    from transformers import Dinov2Config

    from fit3d_hf import FiT3DConfig, FiT3DModel

    app = load_space_app()
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=224,
    )
    FiT3DModel(FiT3DConfig(backbone_config=backbone, backbone=None)).save_pretrained(tmp_path / "tiny")
    FiT3DModel(FiT3DConfig(backbone_config=backbone, backbone=None)).save_pretrained(tmp_path / "tiny-demo")
    (tmp_path / "notes.png").write_text("not an image, despite its name")
    models_file = tmp_path / "models.json"
    models_file.write_text(
        json.dumps(
            {
                "models": [
                    {"label": TINY_LABEL, "source": "tiny"},
                    {"label": "Unreachable", "source": "no-such-org/no-model"},
                ]
            }
        )
    )
    demo = app.build_demo(models_file=models_file, demo_model_dir=tmp_path / "tiny-demo")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    outside_requests: list[str] = []
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1250})
                page.on(
                    "request",
                    lambda r: (
                        None
                        if r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
                        else outside_requests.append(r.url)
                    ),
                )
                page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle", timeout=30_000)
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "space_browser_start.png"), full_page=True)
                _check_clean_start(page)
                _check_model_names(page, [TINY_LABEL, app.DEMO_MODEL_LABEL])
                for point in ("#point-x", "#point-y"):  # empty until a click
                    assert page.locator(f"{point} textarea").input_value() == ""

                # A file that is not an image is refused when it is uploaded, with a message.
                page.locator("#input-image input[type=file]").set_input_files(str(tmp_path / "notes.png"))
                page.get_by_text("notes.png is not an image").first.wait_for(timeout=15_000)
                page.wait_for_function(
                    "() => !document.querySelector('#input-image img')", timeout=15_000
                )  # no broken preview left

                page.locator("#input-image input[type=file]").set_input_files(
                    str(SPACE_DIR / "examples" / "room_2.png")
                )
                shown = page.locator("#input-image img").first
                shown.wait_for(timeout=15_000)
                page.locator("#run-button").click()
                for elem_id in (
                    "pca-original",
                    "pca-finetuned",
                    "kmeans-original",
                    "kmeans-finetuned",
                    "similarity-original",
                ):
                    page.locator(f"#{elem_id} img").wait_for(timeout=30_000)
                assert (
                    "22×17 patch grid" in page.locator("#run-info").inner_text()
                )  # 320x240 at 14 px patches
                # Run also draws the similarity to the centre until a point is clicked.
                page.get_by_text("Point (160, 120)").wait_for(timeout=15_000)
                pca = fetch_image(page.locator("#pca-original img").get_attribute("src"))
                assert pca.shape == (240, 320, 3) and len(np.unique(pca.reshape(-1, 3), axis=0)) > 20

                # Click at 80% across and 25% down the displayed image: pixel (256, 60) of the 320x240 upload.
                box = shown.bounding_box()
                shown.click(position={"x": 0.8 * box["width"], "y": 0.25 * box["height"]})
                point_x = page.locator("#point-x textarea")
                page.wait_for_function("e => e.value !== ''", arg=point_x.element_handle(), timeout=15_000)
                # The browser rounds the click to whole CSS pixels of the page: allow a pixel either way.
                x, y = int(point_x.input_value()), int(page.locator("#point-y textarea").input_value())
                assert abs(x - 256) <= 1 and abs(y - 60) <= 1
                page.get_by_text(f"Point ({x}, {y})").wait_for(timeout=15_000)
                for elem_id in ("similarity-original", "similarity-finetuned"):
                    heat = fetch_image(page.locator(f"#{elem_id} img").get_attribute("src"))
                    assert heat.shape == (240, 320, 3)
                    cyan = np.abs(heat.astype(int) - app.MARKER_COLOR).sum(axis=2) < 30
                    rows, cols = np.nonzero(cyan)
                    assert len(rows) > 20, "the clicked point is not marked"
                    assert (
                        abs(rows.mean() - y) < 2 and abs(cols.mean() - x) < 2
                    )  # the ring is centred on the click

                page.screenshot(path=str(ARTIFACTS / "space_browser.png"), full_page=True)
                _check_captions(page)
                assert not [w for w in ERROR_WORDS if w in page.locator("body").inner_text().lower()]
            finally:
                browser.close()
    finally:
        demo.close()
    assert outside_requests == []  # the page works offline: nothing requested beyond the app itself
