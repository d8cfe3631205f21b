"""Our DINOv2-S equals timm's `vit_small_patch14_dinov2` (what the original FiT3D runs) at FiT3D's patch grid.

Needs timm (and so torchvision), which the CPU setup cannot install; it runs where timm is installed, e.g.
`pip install timm && python -m pytest -q tests/test_timm_parity.py`. Everything runs on the CPU in float32 (no
TF32), with random weights (no Hub access): timm builds the model, we convert its state dict.
"""

import pytest
import torch

timm = pytest.importorskip("timm")

from transformers import AutoModel, Dinov2Config, Dinov2Model  # noqa: E402

from fit3d_hf.backbones import DenseFeatureExtractor, convert_timm_dinov2_state_dict  # noqa: E402
from fit3d_hf.cli import main as fit3d_main  # noqa: E402
from fit3d_hf.configuration_fit3d import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

# FiT3D's Stage II input: 876 x 584 ScanNet++ images resized down to 868 x 574, a 62 x 41 patch grid.
HEIGHT, WIDTH = 574, 868
GRID = (HEIGHT // 14, WIDTH // 14)


def _timm_dinov2_small(seed: int):
    """timm's DINOv2-S as FiT3D builds it (`build_2d_model`), with random weights at a trained model's scale:
    layer scales and position embeddings drawn so that every block and every position matters."""
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        dynamic_img_pad=False,
    ).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                parameter.uniform_(0.05, 0.3)
            elif name in ("pos_embed", "cls_token"):
                parameter.normal_(0.0, 0.5)
    return model


def _ours(timm_model) -> Dinov2Model:
    config = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, image_size=518,
        patch_size=14, layer_norm_eps=1e-6,
    )  # fmt: skip
    model = Dinov2Model(config).eval()
    model.load_state_dict(convert_timm_dinov2_state_dict(timm_model.state_dict(), model))
    return model


def _timm_features(timm_model, images: torch.Tensor) -> torch.Tensor:
    """Last-layer normalised patch tokens on the patch grid (FiT3D's `get_intermediate_layers(norm=True)`)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    tokens = timm_model.forward_features((images - mean) / std)[:, timm_model.num_prefix_tokens :]
    return tokens.transpose(1, 2).reshape(images.shape[0], -1, *GRID)


@pytest.fixture(scope="module")
def images():
    return torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))


def test_dinov2_small_timm_mode_equals_timm(images):
    reference = _timm_dinov2_small(seed=0)
    ours = DenseFeatureExtractor(_ours(reference), pos_embed_interpolation="timm").eval()
    with torch.no_grad():
        expected = _timm_features(reference, images)
        features = ours(images)
        torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)
        # transformers' own resampling is measurably different at this grid: the option matters
        native = DenseFeatureExtractor(_ours(reference), pos_embed_interpolation="native").eval()(images)
    assert (native - expected).abs().max() > 1e-2


def test_convert_original_equals_timm(tmp_path, images):
    """`fit3d convert-original` on a timm state dict: both halves of the FiT3DModel equal timm's features."""
    original, finetuned = _timm_dinov2_small(seed=0), _timm_dinov2_small(seed=1)
    _ours(original).save_pretrained(tmp_path / "original")
    weights = tmp_path / "dinov2_small_finetuned.pth"
    torch.save(finetuned.state_dict(), weights)
    argv = ["convert-original", "--backbone", "dinov2_small", "--weights", str(weights),
            "--original", str(tmp_path / "original"), "--output_dir", str(tmp_path / "fit3d")]  # fmt: skip
    assert fit3d_main(argv) == 0
    model = AutoModel.from_pretrained(tmp_path / "fit3d").eval()
    assert model.config.pos_embed_interpolation == "timm"
    with torch.no_grad():
        output = model(images)
        torch.testing.assert_close(
            output.original_features, _timm_features(original, images), rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(
            output.finetuned_features, _timm_features(finetuned, images), rtol=1e-4, atol=1e-4
        )
