"""The Gradio Space (space/app.py) launched on 127.0.0.1 and driven through gradio_client, plus its pieces."""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from space_helpers import free_port, load_space_app

gradio = pytest.importorskip("gradio", reason="the Space needs gradio (pip install fit3d-hf[space])")
gradio_client = pytest.importorskip("gradio_client", reason="the Space tests need gradio_client")

REPO = Path(__file__).resolve().parents[1]
SPACE_DIR = REPO / "space"
TINY_LABEL = "Tiny test FiT3D"
MISSING_LABEL = "Missing model"


def save_tiny_fit3d(folder: Path) -> Path:
    from transformers import Dinov2Config

    from fit3d_hf import FiT3DConfig, FiT3DModel

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=224,
    )
    FiT3DModel(FiT3DConfig(backbone_config=backbone, backbone=None)).save_pretrained(folder)
    return folder


def write_models_file(folder: Path, model_dir: Path) -> Path:
    entries = {
        "models": [
            {"label": TINY_LABEL, "source": model_dir.name, "description": "saved by the test"},
            {"label": MISSING_LABEL, "source": "no-such-org/no-such-fit3d-model"},
        ]
    }
    path = folder / "models.json"
    path.write_text(json.dumps(entries))
    return path


def example(name: str) -> Image.Image:
    return Image.open(SPACE_DIR / "examples" / name).convert("RGB")


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """The app with the tiny model (+ one entry that cannot load), launched; yields (module, demo, client)."""
    app = load_space_app()
    folder = tmp_path_factory.mktemp("space")
    models_file = write_models_file(folder, save_tiny_fit3d(folder / "tiny-fit3d"))
    settings = app.SpaceSettings(max_image_side=224, max_grid_side=16, concurrency_limit=2)
    demo = app.build_demo(models_file=models_file, demo_model_dir=None, settings=settings)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        yield app, demo, client, folder
    finally:
        demo.close()


def visualize(client, path, n_clusters=4, shared_pca=True, label=TINY_LABEL):
    result = client.predict(
        gradio_client.handle_file(str(path)), label, n_clusters, shared_pca, api_name="/visualize"
    )
    *pictures, info = result
    return [np.asarray(Image.open(p).convert("RGB")) for p in pictures], info


def test_visualize_returns_pictures_at_the_display_size(space):
    app, demo, client, folder = space
    small = folder / "small.png"
    example("room_1.png").resize((200, 150)).save(small)
    large = folder / "large.png"
    example("room_1.png").resize((640, 480)).save(large)

    pictures, info = visualize(client, small, n_clusters=4)
    assert [p.shape for p in pictures] == [(150, 200, 3)] * 4
    # 200x150 at 14 px patches: a 14x10 grid (the model floors to patch multiples).
    assert "14×10 patch grid" in info and TINY_LABEL in info
    for segments in pictures[2:]:
        colours = np.unique(segments.reshape(-1, 3), axis=0)
        assert 2 <= len(colours) <= 4  # K-Means with k=4: at most 4 segment colours

    # Larger than max_image_side=224: downscaled, aspect kept.
    pictures, _ = visualize(client, large, n_clusters=4)
    assert [p.shape for p in pictures] == [(168, 224, 3)] * 4


def test_pca_colours_follow_the_image(space):
    app, demo, client, folder = space
    first, second = folder / "first.png", folder / "second.png"
    example("room_1.png").save(first)
    example("room_2.png").save(second)
    (pca_a, pca_a_finetuned, *_), _ = visualize(client, first)
    (pca_b, _, *_), _ = visualize(client, second)
    (pca_a_again, _, *_), _ = visualize(client, first)
    assert np.abs(pca_a.astype(int) - pca_b.astype(int)).mean() > 10
    np.testing.assert_array_equal(pca_a, pca_a_again)  # deterministic: the difference is the image's
    assert not np.array_equal(pca_a, pca_a_finetuned)  # the two backbones of the model differ

    # Shared PCA and per-model PCA differ (one fit on both maps vs one per map) and the text says which.
    (per_model, _, *_), info = visualize(client, first, shared_pca=False)
    assert "fitted per model" in info
    assert not np.array_equal(per_model, pca_a)


def _decode_inferno(picture: np.ndarray, rows: int, cols: int, patch: int) -> np.ndarray:
    """Colormap index (0..255) at each patch centre of an inferno heat map."""
    from matplotlib import colormaps

    lut = (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).round()
    centres = picture[patch // 2 :: patch, patch // 2 :: patch][:rows, :cols].reshape(-1, 1, 3).astype(float)
    distance = np.linalg.norm(centres - lut[None], axis=2)
    assert distance.min(axis=1).max() < 3, "a patch centre does not hold an inferno colour"
    return distance.argmin(axis=1).reshape(rows, cols)


def test_similarity_peaks_at_the_clicked_patch(space):
    app, demo, client, folder = space
    image = folder / "square.png"
    example("room_3.png").resize((448, 448)).save(image)  # shown at 224x224: a 16x16 grid of 14 px patches
    row, col = 5, 9
    x, y = (col + 0.5) * 28, (row + 0.5) * 28  # points are given in the uploaded image's pixels
    original, finetuned, info = client.predict(
        gradio_client.handle_file(str(image)), TINY_LABEL, x, y, api_name="/similarity"
    )
    assert f"patch row {row}, column {col} of 16×16" in info

    # Oracle: the saved model run directly on the downscaled image, cosine similarity by torch.
    import torch

    from fit3d_hf import FiT3DModel

    model = FiT3DModel.from_pretrained(folder / "tiny-fit3d").eval()
    display = np.asarray(app.prepare_image(Image.open(image), 224), dtype=np.float32) / 255.0
    with torch.no_grad():
        output = model(torch.from_numpy(display).permute(2, 0, 1)[None])
    similarities = [
        torch.nn.functional.cosine_similarity(f[0], f[0][:, row, col][:, None, None], dim=0).numpy()
        for f in (output.original_features, output.finetuned_features)
    ]
    low = min(s.min() for s in similarities)  # both maps share one scale: [lowest similarity, 1]

    for path, similarity in zip((original, finetuned), similarities, strict=True):
        picture = np.asarray(Image.open(path).convert("RGB"))
        assert picture.shape == (224, 224, 3)
        levels = _decode_inferno(picture, 16, 16, 14)
        assert levels[row, col] == 255  # cosine similarity 1 with itself: the top of the shared scale
        assert levels.max() == levels[row, col]
        expected = np.clip(
            np.floor((similarity - low) / (1 - low) * 256), 0, 255
        )  # matplotlib's 256-entry lookup
        assert np.abs(levels - expected).max() <= 1
        assert levels.std() > 20  # a map with structure, not a constant
        # The clicked point is marked: a cyan ring around it, off the patch centres.
        ring = picture[int(y / 2) - 14 : int(y / 2) + 14, int(x / 2) - 14 : int(x / 2) + 14]
        assert (np.abs(ring.astype(int) - app.MARKER_COLOR).sum(axis=2) < 30).sum() > 20


def test_similarity_defaults_to_the_centre_and_refuses_outside_points(space):
    app, demo, client, folder = space
    image = folder / "centre.png"
    example("room_2.png").resize((224, 224)).save(image)
    *_, info = client.predict(
        gradio_client.handle_file(str(image)), TINY_LABEL, None, None, api_name="/similarity"
    )
    assert "patch row 8, column 8 of 16×16" in info
    with pytest.raises(gradio_client.exceptions.AppError, match=r"outside the 224×224 image"):
        client.predict(gradio_client.handle_file(str(image)), TINY_LABEL, 300, 10, api_name="/similarity")


def test_bad_inputs_are_refused_with_a_message(space):
    app, demo, client, folder = space
    text = folder / "notes.txt"
    text.write_text("these are notes, not pixels")
    with pytest.raises(gradio_client.exceptions.AppError, match=r"notes\.txt is not an image"):
        visualize(client, text)
    image = folder / "ok.png"
    example("room_1.png").save(image)
    with pytest.raises(gradio_client.exceptions.AppError, match=r"whole number from 2 to 40, got 3.5"):
        visualize(client, image, n_clusters=3.5)
    with pytest.raises(gradio_client.exceptions.AppError, match=r"whole number from 2 to 40, got 0"):
        visualize(client, image, n_clusters=0)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(image.read_bytes()[:200])  # a PNG cut short
    with pytest.raises(
        gradio_client.exceptions.AppError, match=r"corrupt\.png could not be read as an image"
    ):
        visualize(client, corrupt)
    thin = folder / "thin.png"
    Image.new("RGB", (2000, 20), (120, 30, 200)).save(thin)  # 224x2 after downscaling: thinner than a patch
    with pytest.raises(gradio_client.exceptions.AppError, match=r"too thin"):
        visualize(client, thin)


def test_grayscale_with_alpha_runs_as_rgb(space):
    app, demo, client, folder = space
    gray = np.asarray(example("room_2.png").convert("L"))
    alpha = np.full_like(gray, 255)
    path = folder / "gray_alpha.png"
    Image.fromarray(np.stack([gray, alpha], axis=2), mode="LA").save(path)
    pictures, _ = visualize(client, path)
    assert [p.shape for p in pictures] == [(224 * 240 // 320, 224, 3)] * 4


def test_prepare_image_converts_modes_and_caps_size():
    app = load_space_app()
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:10, :, 3] = 255  # top half opaque red, bottom half fully transparent
    out = np.asarray(app.prepare_image(Image.fromarray(rgba, "RGBA"), 1024))
    assert out.shape == (20, 30, 3)
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[-1, -1]) == (255, 255, 255)  # composited on white

    gray = app.prepare_image(Image.fromarray(np.full((8, 8), 77, np.uint8), "L"), 1024)
    assert gray.mode == "RGB" and tuple(np.asarray(gray)[3, 3]) == (77, 77, 77)

    # 16-bit grey pictures are scaled by their bit depth (65535 -> 255), not stretched to their maximum.
    deep = Image.fromarray(np.array([[0, 65535], [128 * 257, 257]], np.int32), "I")  # e.g. a 16-bit PNG
    assert np.asarray(app.prepare_image(deep, 1024))[:, :, 0].tolist() == [[0, 255], [128, 1]]
    dim = Image.fromarray(np.array([[0, 2000], [4000, 1000]], np.int32), "I")  # a dark picture stays dark
    assert np.asarray(app.prepare_image(dim, 1024))[:, :, 0].tolist() == [[0, 8], [16, 4]]
    array16 = np.array([[0, 65535], [128 * 257, 257]], np.uint16)
    assert np.asarray(app.prepare_image(array16, 1024))[:, :, 0].tolist() == [[0, 255], [128, 1]]

    big = app.prepare_image(np.zeros((3000, 1500, 3), np.uint8), 1024)
    assert big.size == (512, 1024)
    with pytest.raises(gradio.Error, match=r"shape"):
        app.prepare_image(np.zeros((4, 4, 2), np.uint8), 1024)


def test_models_fall_back_to_the_demo_model_then_to_random_weights(space, tmp_path):
    app, demo, client, folder = space
    missing = app.ModelEntry("Gone", str(tmp_path / "no-such-folder"))

    registry = app.load_models([missing], demo_model_dir=folder / "tiny-fit3d")
    assert list(registry.models) == [app.DEMO_MODEL_LABEL]
    assert [entry.label for entry, _ in registry.failures] == ["Gone"]

    registry = app.load_models([missing], demo_model_dir=None)
    assert list(registry.models) == [app.RANDOM_MODEL_LABEL]
    assert registry.models[app.RANDOM_MODEL_LABEL].random_weights
    status = app._status_markdown(registry)
    assert "random weights — for testing the app only" in status
    assert f"✗ Model **Gone** did not load: folder {tmp_path / 'no-such-folder'} does not exist" in status

    # The served page of the app built on the test models.json says in one short notice that the Hub model
    # is unavailable offline (no raw error), and offers only the model that loaded.
    import httpx

    config = httpx.get(client.src.rstrip("/") + "/config", timeout=10).json()
    props = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["props"].get("elem_id")}
    assert props["model-status"]["value"] == (
        f"ℹ️ The Hugging Face Hub cannot be reached, so the Hub models ({MISSING_LABEL}) are not available here; "
        f"using the local model(s): **{TINY_LABEL}**."
    )
    assert "random weights" not in props["model-status"]["value"]
    assert [choice[0] for choice in props["model-choice"]["choices"]] == [TINY_LABEL]


def test_random_model_is_deterministic_and_leaves_the_global_rng_alone():
    import torch

    app = load_space_app()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, second = app.build_random_model(seed=0), app.build_random_model(seed=0)
    assert torch.equal(torch.rand(3), expected)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.original.embeddings.patch_embeddings.projection.weight,
                           first.finetuned.embeddings.patch_embeddings.projection.weight)  # fmt: skip


def test_read_model_entries(tmp_path):
    app = load_space_app()
    entries = app.read_model_entries(SPACE_DIR / "models.json")
    # The shipped list builds real models from the original release (no Hub ids that do not exist).
    assert [(entry.label, entry.source, entry.release) for entry in entries] == [
        ("FiT3D DINOv2-small", None, "dinov2_small"),
        ("FiT3D DINOv2-reg-small", None, "dinov2_reg_small"),
    ]
    (tmp_path / "bad.json").write_text(json.dumps({"models": [{"label": "a", "release": "dinov2_large"}]}))
    with pytest.raises(
        ValueError, match="names release 'dinov2_large'; the original release has dinov2_small"
    ):
        app.read_model_entries(tmp_path / "bad.json")

    (tmp_path / "local-model").mkdir()
    path = tmp_path / "models.json"
    path.write_text(
        json.dumps(
            {"models": [{"label": "a", "source": "local-model"}, {"label": "b", "source": "org/name"}]}
        )
    )
    local, hub = app.read_model_entries(path)
    assert local.source == str((tmp_path / "local-model").resolve()) and hub.source == "org/name"

    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"models\.json is not valid JSON"):
        app.read_model_entries(path)
    path.write_text(json.dumps({"models": [{"label": "a"}]}))
    with pytest.raises(ValueError, match=r"entry 0 needs a string 'label' and a 'source' and/or 'release'"):
        app.read_model_entries(path)


def test_space_metadata_and_requirements():
    readme = (SPACE_DIR / "README.md").read_text()
    header = re.match(r"---\n(.*?)\n---\n", readme, re.S)
    assert header, "space/README.md must start with the Space metadata block"
    import yaml

    metadata = yaml.safe_load(header.group(1))
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "app.py" and metadata["license"] == "mit"
    assert str(metadata["sdk_version"]) == gradio.__version__  # the version the app is tested with

    # The Space installs the library's own requirements (it ships fit3d_hf next to app.py).
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    needed = {
        re.split(r"[<>=!~ \[]", line.strip())[0].lower()
        for line in config["options"]["install_requires"].split("\n")
        if line.strip()
    }
    listed = {
        re.split(r"[<>=!~ \[]", line.strip())[0].lower()
        for line in (SPACE_DIR / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert needed <= listed, f"space/requirements.txt lacks {sorted(needed - listed)}"
    assert "matplotlib" in listed


def test_oversized_cmyk_and_16_bit_uploads_run_with_a_notice(space):
    """An 8000x6000 photo is downscaled before anything else (the caption says so); CMYK and 16-bit files run."""
    app, demo, client, folder = space
    big = folder / "huge.png"
    gradient = np.linspace(0, 255, 8000, dtype=np.float32).astype(np.uint8)
    Image.fromarray(np.broadcast_to(gradient[None, :, None], (6000, 8000, 3)).copy()).save(
        big, compress_level=1
    )
    pictures, info = visualize(client, big)
    assert [p.shape for p in pictures] == [(168, 224, 3)] * 4
    assert "your 8000×6000 image was downscaled to 224×168 px" in info
    cmyk = folder / "print.jpg"
    example("room_1.png").convert("CMYK").save(cmyk)
    deep = folder / "deep.png"
    Image.fromarray((np.asarray(example("room_2.png").convert("L"), np.uint16) * 257), "I;16").save(deep)
    for path in (cmyk, deep):
        pictures, info = visualize(client, path)
        assert [p.shape for p in pictures] == [(224 * 240 // 320, 224, 3)] * 4, path
        assert "downscaled to 224×168" in info  # the examples are 320x240
