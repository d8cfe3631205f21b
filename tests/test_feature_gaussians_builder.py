import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dataset_builders.feature_gaussians import FeatureGaussians, bundle_from_row, load_feature_gaussians
from fit3d_hf.gaussians import FeatureGaussians as Gaussians
from fit3d_hf.gaussians import load_bundle, save_bundle
from fit3d_hf.gaussians.bundle import load_compressed_sh


def _gaussians(n, seed, sh_rest):
    rng = np.random.default_rng(seed)
    gaussians = Gaussians.from_points(
        rng.normal(size=(n, 3)), rng.integers(0, 255, (n, 3), dtype=np.uint8), 8
    )
    with torch.no_grad():
        gaussians.features.normal_()
        if sh_rest:
            gaussians.sh_rest.normal_(std=0.02)
    return gaussians


def _write_scene(root, scene_id, n, seed, sh_rest=False):
    save_bundle(
        root / scene_id,
        _gaussians(n, seed, sh_rest),
        torch.randn(16, 8, 3, 3),
        scene_id=scene_id,
        backbone="tiny",
    )
    (root / scene_id / "metrics.json").write_text('{"psnr_train": 30.5}')


def _write_version_1_scene(root, scene_id, n, seed):
    """A bundle as written before SH compression: one fp16 "sh" tensor, format_version 1."""
    gaussians = _gaussians(n, seed, sh_rest=True)
    tensors = {
        "means": gaussians.means, "quats": gaussians.normalized_quats.half(), "log_scales": gaussians.log_scales.half(),
        "opacities": gaussians.opacities.half(), "features": gaussians.features.half(),
        "decoder.weight": torch.randn(16, 8, 3, 3), "sh": gaussians.sh.half(),
    }  # fmt: skip
    metadata = {
        "format": "fit3d-gaussian-bundle", "format_version": "1", "scene_id": scene_id, "backbone": "tiny",
        "feature_dim": "8", "backbone_dim": "16", "sh_degree": "3", "num_gaussians": str(n), "extra": "{}",
    }  # fmt: skip
    (root / scene_id).mkdir(parents=True)
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        str(root / scene_id / "gaussians.safetensors"),
        metadata=metadata,
    )
    (root / scene_id / "metrics.json").write_text(json.dumps({"psnr_train": 28.0}))
    return tensors["sh"].detach()


def test_builder_rows_equal_bundles(tmp_path):
    root = tmp_path / "lifted"
    _write_scene(root, "scene_a", 40, 0)
    _write_scene(root, "scene_b", 250, 1, sh_rest=True)
    dataset = load_feature_gaussians(str(root), cache_dir=str(tmp_path / "cache"))
    assert dataset["scene_id"] == ["scene_a", "scene_b"] and dataset["num_gaussians"] == [40, 250]
    # Rows carry the SH in the bundles' compressed form (uint8 DC, uint16 codes, fp16 codebook).
    assert dataset.features["sh_dc_codes"].feature.feature.dtype == "uint8"
    assert dataset.features["sh_rest_codes"].feature.dtype == "uint16"
    assert dataset["sh_degree"] == [3, 3]
    assert [len(book) for book in dataset["sh_rest_codebook"]] == [
        1,
        16,
    ]  # scene_a's higher orders are all zero
    rows = dataset.with_format("numpy")
    for i, scene in enumerate(["scene_a", "scene_b"]):
        from_row = bundle_from_row(rows[i])
        original = load_bundle(root / scene, include_sh=True)
        for name in ("means", "quats", "log_scales", "opacities", "features", "decoder_weight", "sh"):
            assert torch.equal(getattr(from_row, name), getattr(original, name)), name
        assert from_row.metadata["metrics"] == {"psnr_train": 30.5}


def test_builder_compresses_version_1_bundles(tmp_path):
    root = tmp_path / "lifted"
    _write_scene(root, "scene_new", 30, 0)
    sh_fp16 = _write_version_1_scene(root, "scene_old", 200, 2)
    dataset = load_feature_gaussians(str(root), cache_dir=str(tmp_path / "cache"))
    assert dataset["scene_id"] == ["scene_new", "scene_old"]
    from_row = bundle_from_row(dataset.with_format("numpy")[1])
    assert torch.equal(from_row.sh, load_compressed_sh(root / "scene_old").decode())
    assert torch.equal(from_row.features, load_bundle(root / "scene_old").features)
    assert from_row.metadata["metrics"] == {"psnr_train": 28.0}
    # Unstructured SH of std 0.02 on a 16-row codebook: near the 8-bit DC step at most, and unbiased.
    error = from_row.sh - sh_fp16.float()
    assert float(error[:, 0].abs().max()) < 0.02 and float(error[:, 1:].abs().mean()) < 0.02


def test_builder_needs_bundles(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no <scene_id>/gaussians.safetensors"):
        FeatureGaussians(data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))
