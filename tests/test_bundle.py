import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fit3d_hf.gaussians import (
    BundleMismatchError,
    FeatureGaussians,
    bundle_bytes_per_gaussian,
    default_codebook_size,
    load_bundle,
    load_compressed_sh,
    read_bundle_metadata,
    save_bundle,
)
from fit3d_hf.losses import psnr
from fit3d_hf.render import render


def _clustered_rest(n, prototypes=12, amplitude=0.05, noise=1e-3, zero_fraction=0.25, seed=0):
    """`[N, 15, 3]` higher-order SH: prototypes + small noise, the first quarter never trained (zero).

    12 prototypes: fewer than the 15 learned rows of the smallest default codebook (16 rows, up to 3199
    Gaussians), so that k-means can give each its own row."""
    g = torch.Generator().manual_seed(seed)
    centres = amplitude * torch.randn(prototypes, 45, generator=g)
    rest = centres[torch.randint(0, prototypes, (n,), generator=g)] + noise * torch.randn(n, 45, generator=g)
    rest[: int(n * zero_fraction)] = 0
    return rest.reshape(n, 15, 3)


def _gaussians(n=50, feature_dim=8):
    rng = np.random.default_rng(0)
    gaussians = FeatureGaussians.from_points(
        rng.normal(size=(n, 3)), rng.integers(0, 255, (n, 3), dtype=np.uint8), feature_dim
    )
    with torch.no_grad():
        gaussians.features.normal_()
        gaussians.quats.normal_()
        gaussians.sh_rest.copy_(_clustered_rest(n))
    return gaussians


def test_bundle_round_trip(tmp_path):
    gaussians, decoder = _gaussians(n=400), torch.randn(16, 8, 3, 3)
    path = save_bundle(
        tmp_path / "scene_a", gaussians, decoder, scene_id="scene_a", backbone="tiny-dinov2",
        extra_metadata={"psnr": 25.0}, sh_codebook_size=64,  # instead of the 16 rows N = 400 gets by default
    )  # fmt: skip
    assert path.name == "gaussians.safetensors" and not list(tmp_path.glob("scene_a/.tmp-*"))
    bundle = load_bundle(tmp_path / "scene_a", include_sh=True)
    assert (bundle.scene_id, bundle.backbone, bundle.feature_dim, bundle.backbone_dim, len(bundle)) == (
        "scene_a",
        "tiny-dinov2",
        8,
        16,
        400,
    )
    assert bundle.metadata["extra"] == {"psnr": 25.0}
    torch.testing.assert_close(bundle.means, gaussians.means.detach())
    # The decoder weight is stored in fp16 and loaded as float32.
    assert bundle.decoder_weight.dtype == torch.float32
    assert torch.equal(bundle.decoder_weight, decoder.half().float())
    # fp16 storage: relative error of half precision.
    torch.testing.assert_close(bundle.features.float(), gaussians.features.detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(
        bundle.quats.float(), gaussians.normalized_quats.detach(), rtol=1e-3, atol=1e-3
    )
    torch.testing.assert_close(bundle.scales, gaussians.scales.detach(), rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(bundle.opacities.float(), gaussians.opacities.detach(), rtol=1e-3, atol=1e-3)
    # SH: uint8 DC within half a quantisation step; higher orders from a 64-row codebook (12 clusters of
    # noise 1e-3 here), exact where they are zero.
    sh, original = bundle.sh, gaussians.sh.detach()
    assert sh.shape == (400, 16, 3) and sh.dtype == torch.float32
    step = (original[:, 0].amax(dim=0) - original[:, 0].amin(dim=0)) / 255
    assert ((sh[:, 0] - original[:, 0]).abs().amax(dim=0) <= step / 2 + 1e-6).all()
    assert torch.equal(sh[:100, 1:], torch.zeros(100, 15, 3))
    assert float((sh[100:, 1:] - original[100:, 1:]).abs().max()) < 5e-3
    metadata = read_bundle_metadata(path)
    assert (metadata["format_version"], metadata["sh_codebook_size"]) == ("4", "64")
    assert torch.equal(load_compressed_sh(path).decode(), sh)
    assert bundle.features.dtype == torch.float16
    # As FeatureGaussians (what the held-out evaluation of Stage I renders).
    restored = bundle.to_gaussians()
    assert restored.active_sh_degree == 3 and len(restored) == 400
    torch.testing.assert_close(restored.opacities, gaussians.opacities.detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(restored.sh, sh)
    with pytest.raises(ValueError, match="include_sh=True"):
        load_bundle(path).to_gaussians()
    on_device = bundle.to("cpu")
    assert on_device.features.dtype == on_device.decoder_weight.dtype == torch.float32


def test_fp16_sh_storage_keeps_the_colours_exact_to_half_precision(tmp_path):
    gaussians, decoder = _gaussians(n=300), torch.randn(16, 8, 3, 3)
    path = save_bundle(
        tmp_path / "b.safetensors", gaussians, decoder, scene_id="s", backbone="b", sh_storage="fp16"
    )
    metadata = read_bundle_metadata(path)
    assert metadata["sh_codec"] == "fp16" and "sh_codebook_size" not in metadata
    bundle = load_bundle(path, include_sh=True)
    assert bundle.sh.dtype == torch.float16
    assert torch.equal(bundle.sh, gaussians.sh.detach().half())
    torch.testing.assert_close(bundle.to_gaussians().sh, gaussians.sh.detach().half().float())
    # the Stage II part is stored as with compressed colours; the file is 96 - 5 B per Gaussian larger
    compressed = save_bundle(tmp_path / "c.safetensors", gaussians, decoder, scene_id="s", backbone="b")
    assert torch.equal(load_bundle(path).features, load_bundle(compressed).features)
    assert load_compressed_sh(path).decode().shape == (300, 16, 3)  # compressed on the fly for dataset rows
    with pytest.raises(ValueError, match="sh_storage"):
        save_bundle(
            tmp_path / "d.safetensors", gaussians, decoder, scene_id="s", backbone="b", sh_storage="fp8"
        )


def test_stage2_load_skips_sh_and_is_compact(tmp_path):
    gaussians = _gaussians(n=1000, feature_dim=64)
    path = save_bundle(
        tmp_path / "b.safetensors", gaussians, torch.randn(384, 64, 3, 3), scene_id="s", backbone="b"
    )
    bundle = load_bundle(path)
    assert bundle.sh is None and bundle.decoder_weight.dtype == torch.float32
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_slice("decoder.weight").get_dtype() == "F16"
    stage2_bytes = sum(
        t.numel() * t.element_size()
        for t in (bundle.means, bundle.quats, bundle.log_scales, bundle.opacities, bundle.features)
    )
    assert stage2_bytes / len(bundle) == 156  # vs 492 B per Gaussian in FiT3D's fp32 pickle
    # Stage II does not need the SH at all: a copy of the file without them loads the same.
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        kept = {key: handle.get_tensor(key) for key in handle.keys() if not key.startswith("sh")}
    stripped = tmp_path / "no_sh.safetensors"
    save_file(kept, str(stripped), metadata=metadata)
    without_sh = load_bundle(stripped)
    for name in ("means", "quats", "log_scales", "opacities", "features", "decoder_weight"):
        assert torch.equal(getattr(without_sh, name), getattr(bundle, name)), name
    with pytest.raises(ValueError, match=r"no_sh.safetensors: lacks the tensors \['sh.dc_codes'"):
        load_bundle(stripped, include_sh=True)


def _data_bytes(path):
    """Bytes of a safetensors file after its 8-byte length and JSON header (padding included)."""
    with open(path, "rb") as handle:
        return path.stat().st_size - 8 - int.from_bytes(handle.read(8), "little")


@pytest.mark.parametrize(
    ("n", "codebook_size", "expected"),
    [(196_000, 1024, 163.74), (229_439, 2048, 163.74), (1_000_000, 4096, 161.81)],
)
def test_bundle_byte_budget(tmp_path, n, codebook_size, expected):
    """At most 164 B per Gaussian (a third of FiT3D's 492), SH colours, decoder, codebook and header included,
    at F = 64, D = 384 and the sizes of the Stage I benchmark scene (196k-229k Gaussians) and of a 1M scene.

    Real files at the real N (under a second each): 161 B per Gaussian plus the per-scene part, with the
    codebook size N gets. The higher orders hold exactly C - 1 distinct non-zero vectors, so the codebook
    is full (C rows) without a k-means fit, which would take minutes on a CPU at these sizes.
    """
    feature_dim, backbone_dim = 64, 384
    assert default_codebook_size(n) == codebook_size
    g = torch.Generator().manual_seed(0)
    sh = torch.zeros(n, 16, 3)
    sh[:, 0] = torch.randn(n, 3, generator=g)
    sh[1:codebook_size, 1:] = 0.05 * torch.randn(codebook_size - 1, 15, 3, generator=g)
    gaussians = FeatureGaussians(
        torch.randn(n, 3, generator=g), torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g),
        torch.randn(n, generator=g), sh, torch.randn(n, feature_dim, generator=g),
    )  # fmt: skip
    path = save_bundle(
        tmp_path, gaussians, torch.randn(backbone_dim, feature_dim, 3, 3), scene_id="s", backbone="b"
    )
    assert int(read_bundle_metadata(path)["sh_codebook_size"]) == codebook_size
    # The format as the module docstring specifies it, tensor by tensor (dtype, shape), read back from the file.
    expected_layout = {
        "means": (torch.float32, (n, 3)), "quats": (torch.float16, (n, 4)), "log_scales": (torch.float16, (n, 3)),
        "opacities": (torch.float16, (n,)), "features": (torch.float16, (n, feature_dim)),
        "decoder.weight": (torch.float16, (backbone_dim, feature_dim, 3, 3)), "sh.dc_codes": (torch.uint8, (n, 3)),
        "sh.dc_offset": (torch.float32, (3,)), "sh.dc_step": (torch.float32, (3,)),
        "sh.rest_codebook": (torch.float16, (codebook_size, 45)), "sh.rest_codes": (torch.uint16, (n,)),
    }  # fmt: skip
    with safe_open(str(path), framework="pt") as handle:
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    assert {key: (t.dtype, tuple(t.shape)) for key, t in stored.items()} == expected_layout
    assert _data_bytes(path) == sum(
        t.numel() * t.element_size() for t in stored.values()
    )  # nothing else in the data
    header_bytes = path.stat().st_size - _data_bytes(path)
    assert header_bytes < 2048
    value = bundle_bytes_per_gaussian(path)
    print(f"{n} Gaussians, {codebook_size} codes: {value:.3f} B per Gaussian")  # noqa: T201
    assert value <= 164 and value == pytest.approx(expected, abs=0.005)


def test_bundle_bytes_are_deterministic(tmp_path):
    gaussians, decoder = _gaussians(n=2000), torch.randn(16, 8, 3, 3)
    first = save_bundle(tmp_path / "a", gaussians, decoder, scene_id="s", backbone="b")
    second = save_bundle(tmp_path / "b", gaussians, decoder, scene_id="s", backbone="b")
    assert first.read_bytes() == second.read_bytes()
    third = save_bundle(tmp_path / "c", gaussians, decoder, scene_id="s", backbone="b", seed=1)
    assert third.read_bytes() != first.read_bytes()  # the seed reaches the k-means


def test_version_1_bundles_still_load(tmp_path):
    """Bundles written before the SH compression (one fp16 "sh" tensor, format_version 1)."""
    gaussians, decoder = _gaussians(n=300), torch.randn(16, 8, 3, 3)
    tensors = {
        "means": gaussians.means.detach(), "quats": gaussians.normalized_quats.detach().half(),
        "log_scales": gaussians.log_scales.detach().half(), "opacities": gaussians.opacities.detach().half(),
        "features": gaussians.features.detach().half(), "decoder.weight": decoder, "sh": gaussians.sh.detach().half(),
    }  # fmt: skip
    metadata = {
        "format": "fit3d-gaussian-bundle", "format_version": "1", "scene_id": "old", "backbone": "b",
        "feature_dim": "8", "backbone_dim": "16", "sh_degree": "3", "num_gaussians": "300", "extra": json.dumps({}),
    }  # fmt: skip
    path = tmp_path / "old" / "gaussians.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    stage2 = load_bundle(path.parent)
    assert stage2.sh is None and torch.equal(stage2.features, tensors["features"])
    bundle = load_bundle(path.parent, include_sh=True)
    assert bundle.sh.dtype == torch.float16 and torch.equal(bundle.sh, tensors["sh"])
    compressed = load_compressed_sh(path)  # compressed on the fly (for the datasets builder)
    assert len(compressed) == 300 and compressed.rest_codebook.shape == (default_codebook_size(300), 45) == (
        16,
        45,
    )
    assert float((compressed.decode() - tensors["sh"].float()).abs().max()) < 0.02
    metadata["format_version"] = "5"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="format version '5'"):
        load_bundle(path)


def test_version_2_bundles_still_load(tmp_path):
    """Bundles written with an fp32 decoder weight (format_version 2): the weight loads as stored."""
    gaussians, decoder = _gaussians(n=300), torch.randn(16, 8, 3, 3)
    new = save_bundle(tmp_path / "new", gaussians, decoder, scene_id="old", backbone="b")
    with safe_open(str(new), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors["decoder.weight"] = decoder
    metadata["format_version"] = "2"
    path = tmp_path / "old" / "gaussians.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path), metadata=metadata)
    for include_sh in (False, True):
        bundle = load_bundle(path.parent, include_sh=include_sh)
        assert bundle.decoder_weight.dtype == torch.float32 and torch.equal(bundle.decoder_weight, decoder)
        assert torch.equal(bundle.features, load_bundle(new).features)
    assert torch.equal(bundle.sh, load_bundle(new, include_sh=True).sh)
    assert torch.equal(load_compressed_sh(path).rest_codes, load_compressed_sh(new).rest_codes)


@pytest.mark.parametrize("rest", ["clustered", "unstructured"])
def test_sh_compression_costs_little_rendered_psnr(tmp_path, rest):
    """Renders a small scene (reference backend) from three views with the original SH and with the SH of
    the saved bundle: the compression must not show (> 40 dB between the two).

    Higher orders: "clustered" (12 prototypes of rms 0.05 + noise, fewer than the 15 learned rows of the
    16-row default codebook at 3000 Gaussians; measured 65.8 dB) or "unstructured" (i.i.d. Gaussian of
    rms 0.011, the magnitude of short CPU lifts, nothing for k-means to exploit: the worst case; measured
    47.7 dB with the 16 default rows, 49.5 dB with 512, against 47.5 dB for dropping the higher orders
    altogether). The 8-bit DC alone costs nothing visible (68 dB).
    """
    n = 3000
    g = torch.Generator().manual_seed(0)
    means = torch.cat(
        [(torch.rand(n, 2, generator=g) - 0.5) * 2.0, 2.0 + 2.0 * torch.rand(n, 1, generator=g)], dim=1
    )
    colours = torch.rand(n, 3, generator=g)
    higher = _clustered_rest(n, seed=1) if rest == "clustered" else 0.011 * torch.randn(n, 15, 3, generator=g)
    sh = torch.cat([((colours - 0.5) / 0.28209479177387814)[:, None], higher], dim=1)
    gaussians = FeatureGaussians(
        means, torch.randn(n, 4, generator=g), torch.log(0.02 + 0.04 * torch.rand(n, 3, generator=g)),
        torch.logit(0.3 + 0.6 * torch.rand(n, generator=g)), sh, torch.zeros(n, 0),
    )  # fmt: skip
    path = save_bundle(tmp_path, gaussians, torch.randn(4, 0, 3, 3), scene_id="s", backbone="b")
    decoded = load_bundle(path, include_sh=True).sh
    K = torch.tensor([[60.0, 0.0, 40.0], [0.0, 60.0, 30.0], [0.0, 0.0, 1.0]]).expand(3, 3, 3)
    poses = []
    for angle in (
        -0.3,
        0.0,
        0.3,
    ):  # cameras around the cloud's centre (0, 0, 3): the view-dependent terms vary
        c, s = math.cos(angle), math.sin(angle)
        rotation = torch.tensor([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])
        pose = torch.eye(4)
        pose[:3, :3] = rotation
        pose[:3, 3] = torch.tensor([0.0, 0.0, 3.0]) - rotation @ torch.tensor([0.0, 0.0, 3.0])
        poses.append(pose)
    poses = torch.stack(poses)

    def rgb(coefficients):
        out = render(
            gaussians.means.detach(), gaussians.quats.detach(), gaussians.scales.detach(), gaussians.opacities.detach(),
            coefficients, None, K, poses, 80, 60, sh_degree=3, backend="reference",
        )  # fmt: skip
        return out.rgb.clamp(0, 1)

    original, compressed = rgb(sh), rgb(decoded)
    assert float(original.std()) > 0.1  # the views show the scene
    value = psnr(compressed, original)
    print(f"rendered PSNR, compressed vs original SH: {value:.1f} dB")  # noqa: T201
    assert value > (60 if rest == "clustered" else 45)


def test_bundle_refuses_other_backbone_and_bad_files(tmp_path):
    path = save_bundle(
        tmp_path, _gaussians(), torch.randn(16, 8, 3, 3), scene_id="s", backbone="facebook/dinov2-small"
    )
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


def test_check_provenance_compares_what_changes_the_targets():
    from fit3d_hf.gaussians.bundle import check_provenance

    lifted = {
        "backbone": "dinov2_small", "backbone_id": "facebook/dinov2-small", "backbone_model_type": "dinov2",
        "backbone_dim": 384, "patch_size": 14, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "resize": "bilinear down to a patch multiple, then normalise", "pos_embed_interpolation": "timm",
        "weights_sha256": "a" * 64,
    }  # fmt: skip
    metadata = {"backbone": "dinov2_small", "provenance": dict(lifted)}
    assert check_provenance(metadata, lifted) == []
    # the same weights under another name are the same backbone; other weights are not, whatever the name
    assert (
        check_provenance(
            metadata, {**lifted, "backbone": "/models/dinov2-small", "backbone_id": "/models/dinov2-small"}
        )
        == []
    )
    assert check_provenance(metadata, {**lifted, "weights_sha256": "b" * 64})[0].startswith(
        "backbone weights differ"
    )
    assert check_provenance(metadata, {**lifted, "pos_embed_interpolation": "native"}) == [
        "pos_embed_interpolation 'timm' vs 'native'"
    ]
    assert check_provenance(metadata, {**lifted, "image_mean": [0.5, 0.5, 0.5]})[0].startswith("image_mean")
    # a bundle written before provenance existed: compared by the backbone it names
    old = {"backbone": "dinov2_small", "provenance": {}}
    assert check_provenance(old, lifted) == []
    assert check_provenance(
        old,
        {
            **lifted,
            "backbone": "facebook/dinov2-with-registers-small",
            "backbone_id": "facebook/dinov2-with-registers-small",
        },
    ) == ["backbone 'dinov2_small' vs 'facebook/dinov2-with-registers-small'"]


def test_provenance_is_stored_in_the_bundle_header(tmp_path):
    gaussians = _gaussians()
    provenance = {"backbone_id": "facebook/dinov2-small", "weights_sha256": "c" * 64, "patch_size": 14}
    path = save_bundle(
        tmp_path, gaussians, torch.randn(16, 8, 3, 3), scene_id="s", backbone="b", provenance=provenance
    )
    assert read_bundle_metadata(path)["provenance"] == provenance
    plain = save_bundle(tmp_path / "plain", gaussians, torch.randn(16, 8, 3, 3), scene_id="s", backbone="b")
    assert read_bundle_metadata(plain)["provenance"] == {}
