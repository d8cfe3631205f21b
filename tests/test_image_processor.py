"""The HF habits: a saved FiT3DModel folder loads with AutoImageProcessor (with and without remote code, and
where fit3d-hf is not installed), works in pipeline("image-feature-extraction"), and loads in bfloat16 and
with device_map="auto"."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, Dinov2Config, pipeline

from fit3d_hf import FiT3DConfig, FiT3DModel
from fit3d_hf.hub import write_image_processor

# Runs in a fresh interpreter where `import fit3d_hf` fails: what a Hub user without fit3d-hf gets.
_WITHOUT_FIT3D = """
import sys
sys.modules["fit3d_hf"] = None  # not importable
import numpy as np, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, pipeline

folder = sys.argv[1]
image = Image.open(sys.argv[2])
results = {}
for trust in (False, True):
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust)
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    results[f"processor_{trust}"] = type(processor).__name__
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    results[f"pixel_values_equal_{trust}"] = bool(torch.allclose(pixel_values, expected, atol=1e-6))
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    features = model(**processor(images=image, return_tensors="pt")).features
extractor = pipeline("image-feature-extraction", model=folder, trust_remote_code=True)
piped = extractor(image, return_tensors=True)
results["model"] = type(model).__name__
results["shape"] = list(piped.shape)
results["pipeline_equals_model"] = bool(torch.allclose(piped, features, atol=1e-6))
print(results)
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fit3d")
    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        patch_size=7,
        image_size=28,
    )
    torch.manual_seed(0)
    model = FiT3DModel(FiT3DConfig(backbone_config=backbone, backbone=None)).eval()
    model.save_pretrained(folder / "model")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(30, 37, 3), dtype=np.uint8))
    image.save(folder / "image.png")
    return {"model": model, "folder": folder / "model", "image": image, "image_path": folder / "image.png"}


def test_save_pretrained_writes_an_image_processor_that_feeds_the_model(saved):
    config = json.loads((saved["folder"] / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "ViTImageProcessor"
    assert config["do_resize"] is False and config["do_normalize"] is False and config["do_rescale"] is True
    assert config["image_mean"] == pytest.approx([0.485, 0.456, 0.406])  # what the model applies inside
    processor = AutoImageProcessor.from_pretrained(saved["folder"])
    inputs = processor(images=saved["image"], return_tensors="pt")
    expected = torch.from_numpy(np.asarray(saved["image"], dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    torch.testing.assert_close(inputs["pixel_values"], expected)
    with torch.no_grad():
        torch.testing.assert_close(saved["model"](**inputs).features, saved["model"](expected).features)
    # In-process pipeline (fit3d_hf imported: no remote code needed); images of any size.
    features = pipeline("image-feature-extraction", model=str(saved["folder"]))(
        saved["image"], return_tensors=True
    )
    assert tuple(features.shape) == (1, 32, 30 // 7, 37 // 7)


def test_processor_and_pipeline_work_where_fit3d_hf_is_not_installed(saved, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_FIT3D, str(saved["folder"]), str(saved["image_path"])],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = eval(result.stdout.strip().splitlines()[-1])  # noqa: S307 - our own dict literal
    assert results["processor_False"] == results["processor_True"]
    assert results["processor_False"].startswith("ViTImageProcessor")
    assert results["pixel_values_equal_False"] and results["pixel_values_equal_True"]
    assert results["model"] == "FiT3DModel" and results["shape"] == [1, 32, 4, 5]
    assert results["pipeline_equals_model"]


def test_bfloat16_and_device_map_auto(saved):
    pixel_values = torch.rand(1, 3, 28, 35)
    with torch.no_grad():
        reference = saved["model"](pixel_values).features
        half = AutoModel.from_pretrained(saved["folder"], dtype=torch.bfloat16).eval()
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
        features = half(pixel_values).features
        assert features.dtype == torch.bfloat16
        torch.testing.assert_close(features.float(), reference, rtol=0.05, atol=0.05)
        mapped = AutoModel.from_pretrained(saved["folder"], device_map="auto").eval()
        assert {p.device.type for p in mapped.parameters()} == {
            "cuda" if torch.cuda.is_available() else "cpu"
        }
        torch.testing.assert_close(mapped(pixel_values.to(mapped.device)).features.cpu(), reference)


def test_older_checkpoints_get_the_processor_written(saved, tmp_path):
    old = tmp_path / "old"  # a checkpoint saved before the processor was written
    old.mkdir()
    for name in ("config.json", "model.safetensors"):
        (old / name).write_bytes((saved["folder"] / name).read_bytes())
    path = write_image_processor(old)
    assert json.loads(path.read_text()) == json.loads(
        (saved["folder"] / "preprocessor_config.json").read_text()
    )
    assert AutoImageProcessor.from_pretrained(old).do_normalize is False
