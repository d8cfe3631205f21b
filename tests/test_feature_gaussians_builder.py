import numpy as np
import pytest
import torch

from dataset_builders.feature_gaussians import FeatureGaussians, bundle_from_row, load_feature_gaussians
from fit3d_hf.gaussians import FeatureGaussians as Gaussians
from fit3d_hf.gaussians import load_bundle, save_bundle


def _write_scene(root, scene_id, n, seed):
    rng = np.random.default_rng(seed)
    gaussians = Gaussians.from_points(rng.normal(size=(n, 3)), rng.integers(0, 255, (n, 3), dtype=np.uint8), 8)
    with torch.no_grad():
        gaussians.features.normal_()
    save_bundle(root / scene_id, gaussians, torch.randn(16, 8, 3, 3), scene_id=scene_id, backbone="tiny")
    (root / scene_id / "metrics.json").write_text('{"psnr_train": 30.5}')


def test_builder_rows_equal_bundles(tmp_path):
    root = tmp_path / "lifted"
    _write_scene(root, "scene_a", 40, 0)
    _write_scene(root, "scene_b", 25, 1)
    dataset = load_feature_gaussians(str(root), cache_dir=str(tmp_path / "cache"))
    assert dataset["scene_id"] == ["scene_a", "scene_b"] and dataset["num_gaussians"] == [40, 25]
    rows = dataset.with_format("numpy")
    for i, scene in enumerate(["scene_a", "scene_b"]):
        from_row = bundle_from_row(rows[i])
        original = load_bundle(root / scene, include_sh=True)
        for name in ("means", "quats", "log_scales", "opacities", "features", "decoder_weight", "sh"):
            assert torch.equal(getattr(from_row, name), getattr(original, name)), name
        assert from_row.metadata["metrics"] == {"psnr_train": 30.5}


def test_builder_needs_bundles(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no <scene_id>/gaussians.safetensors"):
        FeatureGaussians(data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))
