import numpy as np
import pytest
import torch

from fit3d_hf.gaussians import (
    BundleMismatchError,
    FeatureGaussians,
    load_bundle,
    read_bundle_metadata,
    save_bundle,
)


def _gaussians(n=50, feature_dim=8):
    rng = np.random.default_rng(0)
    gaussians = FeatureGaussians.from_points(rng.normal(size=(n, 3)), rng.integers(0, 255, (n, 3), dtype=np.uint8), feature_dim)
    with torch.no_grad():
        gaussians.features.normal_()
        gaussians.quats.normal_()
        gaussians.sh_rest.normal_(std=0.1)
    return gaussians


def test_bundle_round_trip(tmp_path):
    gaussians, decoder = _gaussians(), torch.randn(16, 8, 3, 3)
    path = save_bundle(tmp_path / "scene_a", gaussians, decoder, scene_id="scene_a", backbone="tiny-dinov2", extra_metadata={"psnr": 25.0})
    assert path.name == "gaussians.safetensors" and not list(tmp_path.glob("scene_a/.tmp-*"))
    bundle = load_bundle(tmp_path / "scene_a", include_sh=True)
    assert (bundle.scene_id, bundle.backbone, bundle.feature_dim, bundle.backbone_dim, len(bundle)) == ("scene_a", "tiny-dinov2", 8, 16, 50)
    assert bundle.metadata["extra"] == {"psnr": 25.0}
    torch.testing.assert_close(bundle.means, gaussians.means.detach())
    torch.testing.assert_close(bundle.decoder_weight, decoder)
    # fp16 storage: relative error of half precision.
    torch.testing.assert_close(bundle.features.float(), gaussians.features.detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(bundle.quats.float(), gaussians.normalized_quats.detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(bundle.scales, gaussians.scales.detach(), rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(bundle.opacities.float(), gaussians.opacities.detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(bundle.sh.float(), gaussians.sh.detach(), rtol=1e-3, atol=1e-3)
    assert bundle.features.dtype == torch.float16
    on_device = bundle.to("cpu")
    assert on_device.features.dtype == torch.float32


def test_stage2_load_skips_sh_and_is_compact(tmp_path):
    gaussians = _gaussians(n=1000, feature_dim=64)
    path = save_bundle(tmp_path / "b.safetensors", gaussians, torch.randn(384, 64, 3, 3), scene_id="s", backbone="b")
    bundle = load_bundle(path)
    assert bundle.sh is None
    stage2_bytes = sum(t.numel() * t.element_size() for t in (bundle.means, bundle.quats, bundle.log_scales, bundle.opacities, bundle.features))
    assert stage2_bytes / len(bundle) == 156  # vs 492 B per Gaussian in FiT3D's fp32 pickle
    decoder_bytes = 384 * 64 * 9 * 4
    header_allowance = 4096
    assert path.stat().st_size <= 252 * 1000 + decoder_bytes + header_allowance


def test_bundle_refuses_other_backbone_and_bad_files(tmp_path):
    path = save_bundle(tmp_path, _gaussians(), torch.randn(16, 8, 3, 3), scene_id="s", backbone="facebook/dinov2-small")
    with pytest.raises(BundleMismatchError, match="facebook/dinov2-small.*facebook/dinov2-base"):
        load_bundle(path, expected_backbone="facebook/dinov2-base")
    with pytest.raises(BundleMismatchError, match="backbone_dim"):
        load_bundle(path, expected_backbone_dim=768)
    assert read_bundle_metadata(path)["feature_dim"] == "8"
    with pytest.raises(FileNotFoundError, match="no Gaussian bundle"):
        load_bundle(tmp_path / "missing")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_bundle(junk)
    with pytest.raises(ValueError, match="decoder_weight"):
        save_bundle(tmp_path / "x", _gaussians(), torch.randn(16, 4, 3, 3), scene_id="s", backbone="b")
