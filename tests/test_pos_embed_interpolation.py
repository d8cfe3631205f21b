"""Position-embedding resampling: timm's semantics (FiT3D's backbones) against transformers' own.

The expected values come from an implementation of the antialiased bicubic resampling written here in numpy
(PIL's / PyTorch's separable filter: Keys cubic with a = -0.5, stretched by the scale when downsampling,
weights renormalised at the borders), not from `F.interpolate`.
"""

import numpy as np
import pytest
import torch
from transformers import (
    AutoModel,
    CLIPVisionConfig,
    DeiTConfig,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    SiglipVisionConfig,
    ViTConfig,
    ViTMAEConfig,
)

from fit3d_hf import FiT3DConfig, FiT3DModel
from fit3d_hf.backbones import DenseFeatureExtractor, default_pos_embed_interpolation
from fit3d_hf.modeling_fit3d import (
    pos_embed_interpolation_of,
    resample_position_table,
    set_pos_embed_interpolation,
)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _aa_bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """`[size_out, size_in]` weights of antialiased bicubic resampling along one axis."""
    scale = size_in / size_out
    stretch = max(scale, 1.0)  # the kernel widens only when downsampling
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        centre = (i + 0.5) * scale
        first = max(int(centre - 2 * stretch + 0.5), 0)
        last = min(int(centre + 2 * stretch + 0.5), size_in)
        taps = np.arange(first, last)
        w = _cubic((taps - centre + 0.5) / stretch)
        weights[i, first:last] = w / w.sum()  # taps outside the grid are dropped, not clamped
    return weights


def _timm_resample(table: torch.Tensor, grid, num_prefix: int) -> torch.Tensor:
    """timm's resample_abs_pos_embed semantics, in numpy float64."""
    stored = int(round((table.shape[1] - num_prefix) ** 0.5))
    patches = table[0, num_prefix:].double().numpy().reshape(stored, stored, -1)
    rows, cols = _aa_bicubic_matrix(stored, grid[0]), _aa_bicubic_matrix(stored, grid[1])
    resampled = np.einsum("ia,jb,abd->ijd", rows, cols, patches).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([table[:, :num_prefix].double(), torch.from_numpy(resampled)], dim=1).float()


def _randomised(model):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "position" in name:
                parameter.normal_()
    return model.eval()


def test_resampling_matches_an_independent_antialiased_bicubic():
    table = torch.randn(1, 1 + 37 * 37, 8)
    for grid in [(41, 62), (20, 30), (37, 37), (12, 12), (50, 20)]:
        expected = _timm_resample(table, grid, 1)
        torch.testing.assert_close(
            resample_position_table(table, grid, (37, 37), 1), expected, rtol=1e-4, atol=1e-4
        )
    # bicubic without antialiasing (a = -0.75, clamped borders) is far from it, even when upsampling
    patches = table[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    plain = torch.nn.functional.interpolate(patches, size=(41, 62), mode="bicubic", align_corners=False)
    plain = plain.permute(0, 2, 3, 1).reshape(1, 41 * 62, 8)
    assert (plain - _timm_resample(table, (41, 62), 1)[:, 1:]).abs().max() > 1e-2
    # timm returns the stored table untouched for a square grid of the stored size
    assert resample_position_table(table, (37, 37), (37, 37), 1) is table


# name -> (config, prefix positions in the stored table)
ARCHITECTURES = {
    "dinov2": (lambda: Dinov2Config(**TINY, image_size=56, patch_size=14), 1),
    "dinov2_with_registers": (
        lambda: Dinov2WithRegistersConfig(**TINY, image_size=56, patch_size=14, num_register_tokens=4),
        1,
    ),
    "vit": (lambda: ViTConfig(**TINY, image_size=64, patch_size=16), 1),
    "deit": (lambda: DeiTConfig(**TINY, image_size=64, patch_size=16), 2),
    "vit_mae": (
        lambda: ViTMAEConfig(
            **TINY,
            image_size=64,
            patch_size=16,
            mask_ratio=0.0,
            decoder_hidden_size=32,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=64,
        ),
        1,
    ),  # fmt: skip
    "clip_vision_model": (lambda: CLIPVisionConfig(**TINY, image_size=64, patch_size=16), 1),
    "siglip_vision_model": (lambda: SiglipVisionConfig(**TINY, image_size=64, patch_size=16), 0),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_timm_mode_resamples_every_architecture_as_timm(name):
    factory, prefix = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = _randomised(AutoModel.from_config(factory()))
    embeddings = getattr(model, "vision_model", model).embeddings
    stored = embeddings.position_embeddings if hasattr(embeddings, "position_embeddings") else (
        embeddings.position_embedding.weight[None]
    )  # fmt: skip
    patch = model.config.patch_size
    height, width = 5 * patch, 7 * patch  # a non-square grid
    dummy = torch.zeros(1, 1, model.config.hidden_size)
    with torch.no_grad():
        native = embeddings.interpolate_pos_encoding(dummy, height, width).clone()
        set_pos_embed_interpolation(model, "timm")
        assert pos_embed_interpolation_of(model) == "timm" and model.config.pos_embed_interpolation == "timm"
        timm = embeddings.interpolate_pos_encoding(dummy, height, width)
        torch.testing.assert_close(
            timm, _timm_resample(stored.detach(), (5, 7), prefix), rtol=1e-5, atol=1e-5
        )
        if name != "dinov2_with_registers":  # transformers already antialiases there; elsewhere it does not
            assert (timm - native).abs().max() > 1e-2
        set_pos_embed_interpolation(model, "native")
        assert pos_embed_interpolation_of(model) == "native"
        torch.testing.assert_close(embeddings.interpolate_pos_encoding(dummy, height, width), native)
    # the extractor runs end to end in both modes on a non-square image
    features = DenseFeatureExtractor(model, pos_embed_interpolation="timm")(torch.rand(1, 3, height, width))
    assert features.shape == (1, 32, 5, 7)


def _dinov2_small_like():
    # DINOv2-S's stored grid (518 px / 14 = 37 x 37), tiny otherwise.
    torch.manual_seed(0)
    return _randomised(Dinov2Model(Dinov2Config(**TINY, image_size=518, patch_size=14)))


def test_extractor_features_use_the_timm_position_embeddings():
    """Whole model: the timm-mode features at a non-native square grid equal those of a copy whose stored table
    is replaced by the independently resampled one (which transformers then adds as it is)."""
    model = _dinov2_small_like()
    images = torch.rand(1, 3, 20 * 14, 20 * 14)
    extractor = DenseFeatureExtractor(model, pos_embed_interpolation="timm")
    reference = Dinov2Model(Dinov2Config(**TINY, image_size=20 * 14, patch_size=14)).eval()
    state = {k: v for k, v in model.state_dict().items() if "position_embeddings" not in k}
    state["embeddings.position_embeddings"] = _timm_resample(
        model.embeddings.position_embeddings.detach(), (20, 20), 1
    )
    reference.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(
            extractor(images), DenseFeatureExtractor(reference)(images), rtol=1e-4, atol=1e-4
        )


def test_timm_and_native_differ_at_fit3d_grid():
    """At FiT3D's 41 x 62 grid (868 x 574 input) the two resamplings of DINOv2-S's 37 x 37 table differ by
    several percent (the reason the option exists)."""
    model = _dinov2_small_like()
    table = model.embeddings.position_embeddings.detach()
    dummy = torch.zeros(1, 1, 32)
    with torch.no_grad():
        native = model.embeddings.interpolate_pos_encoding(dummy, 574, 868)[:, 1:]
    timm = resample_position_table(table, (41, 62), (37, 37), 1)[:, 1:]
    relative = (timm - native).norm() / native.norm()
    assert 0.01 < float(relative) < 0.2, float(relative)


def test_defaults_short_names_timm_others_native(tmp_path):
    assert default_pos_embed_interpolation("dinov2_small") == "timm"
    assert default_pos_embed_interpolation("mae_base") == "timm"
    assert default_pos_embed_interpolation("facebook/dinov2-small") == "native"
    assert (
        default_pos_embed_interpolation("some/model", Dinov2Config(pos_embed_interpolation="timm")) == "timm"
    )
    # A backbone saved by fit3d-hf keeps its choice (recorded in its config.json).
    model = _dinov2_small_like()
    DenseFeatureExtractor(model, pos_embed_interpolation="timm").model.save_pretrained(tmp_path / "saved")
    assert DenseFeatureExtractor.from_pretrained(tmp_path / "saved").pos_embed_interpolation == "timm"
    Dinov2Model(Dinov2Config(**TINY, image_size=56, patch_size=14)).save_pretrained(tmp_path / "plain")
    assert DenseFeatureExtractor.from_pretrained(tmp_path / "plain").pos_embed_interpolation == "native"
    forced = DenseFeatureExtractor.from_pretrained(tmp_path / "plain", pos_embed_interpolation="timm")
    assert forced.pos_embed_interpolation == "timm"
    with pytest.raises(ValueError, match="pos_embed_interpolation"):
        DenseFeatureExtractor.from_pretrained(tmp_path / "plain", pos_embed_interpolation="bicubic")


def test_fit3d_model_round_trip_keeps_the_interpolation(tmp_path):
    original = _dinov2_small_like()
    finetuned = _dinov2_small_like()
    with torch.no_grad():
        finetuned.embeddings.position_embeddings.add_(0.5)
    model = FiT3DModel.from_backbones(
        DenseFeatureExtractor(original, pos_embed_interpolation="timm"), finetuned
    )  # the extractor's choice is taken over
    assert model.config.pos_embed_interpolation == "timm"
    assert pos_embed_interpolation_of(model.original) == pos_embed_interpolation_of(model.finetuned) == "timm"
    model.save_pretrained(tmp_path / "fit3d")
    loaded = AutoModel.from_pretrained(tmp_path / "fit3d").eval()
    assert loaded.config.pos_embed_interpolation == "timm"
    images = torch.rand(1, 3, 5 * 14, 9 * 14)
    with torch.no_grad():
        out = loaded(images)
        expected = DenseFeatureExtractor(_dinov2_small_like(), pos_embed_interpolation="timm")(images)
        torch.testing.assert_close(out.original_features, expected, rtol=1e-5, atol=1e-5)
    # A config without the key (saved before the option existed) means transformers' own resampling.
    assert (
        FiT3DConfig.from_dict(
            {k: v for k, v in model.config.to_dict().items() if k != "pos_embed_interpolation"}
        ).pos_embed_interpolation
        == "native"
    )
    with pytest.raises(ValueError, match="pos_embed_interpolation"):
        FiT3DConfig(pos_embed_interpolation="bilinear")
