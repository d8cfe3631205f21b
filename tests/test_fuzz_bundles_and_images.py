"""Property-based tests of the Gaussian bundle loader and of the Space's image input.

Bundle loader: truncated or corrupted safetensors, header surgery (dtypes, shapes, offsets, metadata), and
well-formed files holding tensors of the wrong dtype or shape or missing keys (as a buggy writer would
make them). Each load either refuses the file with a named error naming it, or returns exactly what the
original held (a change that alters nothing, such as header padding whitespace) or, for a well-formed
forgery without verification, a bundle whose tensors agree with each other.

Space: any bytes uploaded, and real images of every mode and format, damaged or not. Each upload either
gives an RGB image no larger than the cap, or a `gr.Error` (shown in the page, not a stack trace).
"""

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzz_helpers import FUZZ_SETTINGS, count
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from fit3d_hf.errors import Fit3DError
from fit3d_hf.gaussians import FeatureGaussians, load_bundle, save_bundle
from fit3d_hf.gaussians.bundle import CHECKSUMS_KEY, tensor_checksums, verify_bundle

BUNDLE_NAMES = ("means", "quats", "log_scales", "opacities", "features", "decoder_weight", "sh")


@pytest.fixture(scope="module")
def bundle_bytes(tmp_path_factory):
    rng = np.random.default_rng(0)
    gaussians = FeatureGaussians.from_points(
        rng.normal(size=(60, 3)), rng.integers(0, 255, (60, 3), dtype=np.uint8), 4
    )
    path = save_bundle(
        tmp_path_factory.mktemp("bundle"), gaussians, torch.randn(8, 4, 3, 3), scene_id="s", backbone="b"
    )
    return path.read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def _header_surgery(header: dict, draw) -> None:
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    op = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "metadata", "drop_metadata"]))
    if op == "dtype":
        header[name]["dtype"] = draw(
            st.sampled_from(["F16", "F32", "F64", "BF16", "U8", "I8", "U16", "I32", "I64", "BOOL", "XX"])
        )
    elif op == "shape":
        header[name]["shape"] = draw(st.lists(st.integers(-2, 300), max_size=4))
    elif op == "offsets":
        header[name]["data_offsets"] = draw(st.lists(st.integers(-5, 10**6), min_size=0, max_size=3))
    elif op == "drop":
        del header[name]
    else:
        metadata = header.setdefault("__metadata__", {})
        key = draw(
            st.sampled_from(
                [
                    "format",
                    "format_version",
                    "feature_dim",
                    "backbone_dim",
                    "num_gaussians",
                    "sh_codec",
                    "extra",
                    CHECKSUMS_KEY,
                ]
            )
        )
        if op == "drop_metadata":
            metadata.pop(key, None)
        else:
            metadata[key] = draw(
                st.sampled_from(
                    ["", "abc", "-1", "0", "1e9", "{", "[]", "4", "3", "1", "fp16", '{"means": 1}']
                )
                | st.text(max_size=8)
            )


def _forged_tensors(draw) -> tuple[dict, dict]:
    """A well-formed safetensors file whose tensors contradict the metadata (a buggy writer), with
    checksums recomputed so that only the consistency checks can catch it."""
    n, f, d = 20, 4, 8
    tensors = {
        "means": torch.randn(n, 3), "quats": torch.randn(n, 4).half(), "log_scales": torch.randn(n, 3).half(),
        "opacities": torch.rand(n).half(), "features": torch.randn(n, f).half(), "decoder.weight": torch.randn(d, f, 3, 3).half(),
        "sh.dc_codes": torch.randint(0, 255, (n, 3), dtype=torch.uint8), "sh.dc_offset": torch.zeros(3),
        "sh.dc_step": torch.ones(3) / 255, "sh.rest_codebook": torch.randn(4, 45).half(),
        "sh.rest_codes": torch.randint(0, 4, (n,), dtype=torch.int32).to(torch.uint16),
    }  # fmt: skip
    name = draw(st.sampled_from(sorted(tensors)))
    op = draw(st.sampled_from(["shape", "dtype", "drop", "nan", "codes"]))
    if op == "shape":
        shape = draw(st.lists(st.integers(0, 25), min_size=0, max_size=4))
        tensors[name] = torch.zeros(
            shape, dtype=tensors[name].dtype if tensors[name].dtype != torch.uint16 else torch.int32
        )
    elif op == "dtype":
        tensors[name] = (
            tensors[name]
            .to(torch.int32)
            .to(draw(st.sampled_from([torch.float64, torch.bfloat16, torch.int64, torch.uint8, torch.bool])))
        )
    elif op == "drop":
        del tensors[name]
    elif op == "nan" and tensors[name].is_floating_point():
        tensors[name].view(-1)[0] = float(draw(st.sampled_from(["nan", "inf", "-inf"])))
    else:
        tensors["sh.rest_codes"] = torch.full((n,), draw(st.integers(4, 65535)), dtype=torch.int32).to(
            torch.uint16
        )
    metadata = {"format": "fit3d-gaussian-bundle", "format_version": "4", "scene_id": "s", "backbone": "b", "feature_dim": str(f),
                "backbone_dim": str(d), "sh_degree": "3", "sh_codec": "uint8-dc+vq-rest", "num_gaussians": str(n), "extra": "{}"}  # fmt: skip
    from fit3d_hf.gaussians.bundle_format import METADATA_CHECKSUM
    from fit3d_hf.gaussians.bundle_integrity import metadata_digest

    metadata[CHECKSUMS_KEY] = json.dumps(
        {**tensor_checksums(tensors), METADATA_CHECKSUM: metadata_digest(metadata)}
    )
    return tensors, metadata


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_bundles_get_a_named_error(bundle_bytes, data):
    draw = data.draw
    folder = Path(tempfile.mkdtemp(prefix="fuzz_bundle_"))
    path = folder / "gaussians.safetensors"
    original = folder / "original.safetensors"
    original.write_bytes(bundle_bytes)
    op = draw(st.sampled_from(["truncate", "flip", "header", "forged", "garbage"]))
    if op == "truncate":
        path.write_bytes(bundle_bytes[: draw(st.integers(0, len(bundle_bytes) - 1))])
    elif op == "flip":
        damaged = bytearray(bundle_bytes)
        for _ in range(draw(st.integers(1, 4))):
            damaged[draw(st.integers(0, len(damaged) - 1))] ^= 1 << draw(st.integers(0, 7))
        path.write_bytes(bytes(damaged))
    elif op == "header":
        header, body = _split(bundle_bytes)
        _header_surgery(header, draw)
        path.write_bytes(_join(header, body))
    elif op == "forged":
        tensors, metadata = _forged_tensors(draw)
        save_file(tensors, str(path), metadata=metadata)
    else:
        path.write_bytes(draw(st.binary(max_size=300)))
    verify = draw(st.booleans())
    refused = False
    try:
        try:
            loaded = load_bundle(path, include_sh=True, verify=verify)
        except Fit3DError as error:
            assert "gaussians.safetensors" in str(error), str(error)
            refused = True
        else:
            if op != "forged":
                reference = load_bundle(original, include_sh=True)
                same = all(torch.equal(getattr(loaded, n), getattr(reference, n)) for n in BUNDLE_NAMES)
                # Unverified loads may take damaged tensor bytes (that is what verify is for), never damaged structure.
                assert same or not verify, f"{op}: a verified load returned other tensors"
                assert all(getattr(loaded, n).shape == getattr(reference, n).shape for n in BUNDLE_NAMES)
            n = len(loaded)
            assert loaded.quats.shape == (n, 4) and loaded.features.shape[0] == n and loaded.sh.shape[0] == n
            assert loaded.decoder_weight.shape[1] == loaded.features.shape[1]
        if op == "forged":  # the bulk check reads every value: NaN and inf are refused there
            try:
                verify_bundle(path)
            except Fit3DError as error:
                assert "gaussians.safetensors" in str(error), str(error)
            else:  # what the bulk check passes, the loader takes, and it holds only finite values
                assert not refused
                assert all(
                    torch.isfinite(t).all() for t in (loaded.means, loaded.features, loaded.decoder_weight)
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    count("bundle loader", refused)


# --------------------------------------------------------------------------------------------------------
# The Space's image input


@pytest.fixture(scope="module")
def space_app():
    from space_helpers import load_space_app

    return load_space_app()


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr", "HSV", "I;16B"]
FORMATS = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "TIFF": ".tif",
    "BMP": ".bmp",
    "GIF": ".gif",
    "WEBP": ".webp",
    "PPM": ".ppm",
}


def _encoded_image(draw) -> tuple[bytes, str]:
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    try:
        image = Image.new(mode, size)
    except ValueError:
        image = Image.new("RGB", size)
    noise = np.random.default_rng(draw(st.integers(0, 1000))).integers(
        0, 255, (size[1], size[0], 3), dtype=np.uint8
    )
    try:
        image = Image.fromarray(noise).convert(mode)
    except ValueError:
        pass
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):  # not every format stores every mode
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        fmt = "PNG"
    return buffer.getvalue(), FORMATS[fmt]


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_space_uploads_get_an_image_or_a_message(space_app, data):
    import gradio as gr

    draw = data.draw
    kind = draw(st.sampled_from(["image", "damaged", "bytes"]))
    if kind == "bytes":
        content, suffix = draw(st.binary(max_size=400)), draw(st.sampled_from([".png", ".jpg", ".txt", ""]))
    else:
        content, suffix = _encoded_image(draw)
        if kind == "damaged":
            damaged = bytearray(content)
            if draw(st.booleans()):
                damaged = damaged[: draw(st.integers(0, len(damaged) - 1))]
            else:
                for _ in range(draw(st.integers(1, 6))):
                    damaged[draw(st.integers(0, len(damaged) - 1))] ^= 1 << draw(st.integers(0, 7))
            content = bytes(damaged)
    max_side = 32
    with tempfile.TemporaryDirectory() as folder:
        upload = Path(folder) / f"upload{suffix}"
        upload.write_bytes(content)
        payload = {"path": str(upload), "orig_name": f"holiday{suffix}"}
        refused = False
        try:
            image = space_app.prepare_image(space_app.open_image(payload), max_side)
        except gr.Error as error:
            assert "holiday" in str(error) or "image" in str(error).lower(), str(error)
            refused = True
        else:
            assert image.mode == "RGB" and max(image.size) <= max_side and min(image.size) >= 1
            assert np.asarray(image).shape == (image.height, image.width, 3)
    if kind == "image":
        assert not refused, "an undamaged image was refused"
    count("Space image input", refused)
