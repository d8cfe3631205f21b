"""FiT3DConfig / FiT3DModel in transformers' conventions: shapes, concatenation, round trips, remote code."""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from precision_helpers import assert_within_bf16_precision
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPVisionConfig,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    ViTMAEConfig,
)

import fit3d_hf
from fit3d_hf import DenseFeatureExtractor, FiT3DConfig, FiT3DModel, FiT3DModelOutput


class FiT3DModelTester:
    """Builds the tiny configuration every test here uses (hidden 32, 2 layers, image 28, patch 14)."""

    hidden_size, patch_size, batch_size = 32, 14, 2

    def backbone_config(self, **overrides):
        kwargs = dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
        )
        return Dinov2Config(**{**kwargs, **overrides})

    def config(self, **kwargs):
        return FiT3DConfig(backbone_config=self.backbone_config(), backbone="facebook/dinov2-small", **kwargs)

    def model(self, **kwargs):
        return FiT3DModel(self.config(**kwargs)).eval()

    def images(self, height=45, width=61):
        return torch.rand(self.batch_size, 3, height, width)


tester = FiT3DModelTester()


def test_config_defaults_and_validation():
    config = FiT3DConfig()
    assert config.backbone_config.model_type == "dinov2" and config.backbone_config.hidden_size == 384
    assert (config.feature_dim, config.backbone, config.normalization) == (
        768,
        "facebook/dinov2-small",
        "imagenet",
    )
    assert config.image_mean == [0.485, 0.456, 0.406] and config.image_std == [0.229, 0.224, 0.225]
    with pytest.raises(ValueError, match="2 \\* hidden_size = 64"):
        FiT3DConfig(backbone_config=tester.backbone_config(), feature_dim=100)
    with pytest.raises(ValueError, match="normalization='imagenet' uses image_mean"):
        FiT3DConfig(backbone_config=tester.backbone_config(), image_mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="needs image_mean and image_std"):
        FiT3DConfig(normalization="processor")
    with pytest.raises(ValueError, match="normalization must be one of"):
        FiT3DConfig(normalization="clip")
    with pytest.raises(ValueError, match="model_type None"):
        FiT3DConfig(backbone_config={"hidden_size": 32})
    custom = FiT3DConfig(normalization="custom", image_mean=[0.5] * 3, image_std=[0.25] * 3)
    assert custom.image_std == [0.25, 0.25, 0.25]


def test_config_round_trip_through_auto_config(tmp_path):
    config = tester.config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "fit3d" and saved["backbone_config"]["model_type"] == "dinov2"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, FiT3DConfig) and isinstance(loaded.backbone_config, Dinov2Config)
    assert loaded.to_diff_dict() == config.to_diff_dict()


def test_output_shapes_for_odd_sizes():
    model = tester.model()
    with torch.no_grad():
        output = model(tester.images(45, 61), output_cls_token=True)
    assert isinstance(output, FiT3DModelOutput)
    assert output.features.shape == (2, 64, 3, 4)  # 45 // 14 = 3, 61 // 14 = 4
    assert output.original_features.shape == output.finetuned_features.shape == (2, 32, 3, 4)
    assert output.original_cls_token.shape == output.finetuned_cls_token.shape == (2, 32)
    assert (model.patch_size, model.hidden_size, model.num_prefix_tokens) == (14, 32, 1)
    with torch.no_grad():
        plain = model(tester.images(28, 28))
    assert plain.features.shape == (2, 64, 2, 2) and plain.original_cls_token is None
    assert list(plain.keys()) == ["features", "original_features", "finetuned_features"]


def test_concatenation_order_original_first():
    model = tester.model()
    images = tester.images()
    with torch.no_grad():
        output = model(images)
        original = DenseFeatureExtractor(model.original)(images)
        finetuned = DenseFeatureExtractor(model.finetuned)(images)
    assert (original - finetuned).abs().max() > 1e-2  # two independently initialised backbones
    torch.testing.assert_close(output.features[:, :32], original, rtol=0, atol=0)
    torch.testing.assert_close(output.features[:, 32:], finetuned, rtol=0, atol=0)
    torch.testing.assert_close(output.original_features, original, rtol=0, atol=0)
    as_tuple = model(images, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    torch.testing.assert_close(as_tuple[0], output.features, rtol=0, atol=0)


def test_depth_probe_inputs_without_final_norm():
    model = tester.model()
    images = tester.images()
    with torch.no_grad():
        normed = model(images, output_cls_token=True)
        raw = model(images, output_cls_token=True, final_norm=False)
        expected, expected_cls = DenseFeatureExtractor(model.original)(
            images, final_norm=False, return_cls=True
        )
    torch.testing.assert_close(raw.original_features, expected, rtol=0, atol=0)
    torch.testing.assert_close(raw.original_cls_token, expected_cls, rtol=0, atol=0)
    assert (raw.features - normed.features).abs().max() > 1e-2


def test_eval_mode_is_deterministic_and_train_mode_is_not():
    """With dropout configured, eval() must switch it off in both backbones (and train() on): the same
    input then gives the same features twice, bit for bit, and different ones in training mode."""
    config = FiT3DConfig(
        backbone_config=tester.backbone_config(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5),
        backbone="facebook/dinov2-small",
    )
    model = FiT3DModel(config).eval()
    images = tester.images()
    with torch.no_grad():
        first = model(images)
        second = model(images)
        torch.testing.assert_close(first.features, second.features, rtol=0, atol=0)
        model.train()
        third, fourth = model(images), model(images)
    for name in ("original_features", "finetuned_features"):
        assert not torch.equal(getattr(third, name), getattr(fourth, name)), name


@pytest.mark.parametrize(
    "backbone_config",
    [
        Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
        ),
        Dinov2WithRegistersConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
        ),
        CLIPVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=16,
        ),
        ViTMAEConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=16,
        ),
    ],
    ids=["dinov2", "dinov2_with_registers", "clip_vision_model", "vit_mae"],
)
def test_save_load_round_trip_through_auto_model(tmp_path, backbone_config):
    model = FiT3DModel(FiT3DConfig(backbone_config=backbone_config)).eval()
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "config.json", "configuration_fit3d.py", "dense_features_fit3d.py", "model.safetensors", "modeling_fit3d.py",
        "preprocessor_config.json",
    ]  # fmt: skip
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_fit3d.FiT3DConfig",
        "AutoModel": "modeling_fit3d.FiT3DModel",
    }
    loaded = AutoModel.from_pretrained(
        tmp_path
    ).eval()  # no trust_remote_code: `import fit3d_hf` registered it
    assert type(loaded) is FiT3DModel
    images = torch.rand(2, 3, 45, 61)
    with torch.no_grad():
        assert (loaded(images).features - model(images).features).abs().max() <= 1e-5
    torch.testing.assert_close(loaded.image_mean, model.image_mean)


def test_trust_remote_code_without_fit3d_hf_installed(tmp_path):
    model = tester.model()
    model.save_pretrained(tmp_path / "checkpoint")
    images = tester.images()
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        torch.save(model(images).features, tmp_path / "expected.pt")
    script = textwrap.dedent(
        """
        import sys
        try:
            import fit3d_hf
        except ImportError:
            pass
        else:
            sys.exit("fit3d_hf is importable: the test would prove nothing")
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            features = model(torch.load(sys.argv[2])).features
        difference = (features - torch.load(sys.argv[3])).abs().max().item()
        print("max difference", difference)
        sys.exit(0 if difference <= 1e-5 else 1)
        """
    )
    # -S skips site-packages' .pth files, which is where the editable install of fit3d_hf hooks in; the
    # site-packages folder itself is put back through PYTHONPATH so torch and transformers still import.
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }
    paths = [str(tmp_path / name) for name in ("checkpoint", "images.pt", "expected.pt")]
    result = subprocess.run(
        [sys.executable, "-S", "-c", script, *paths],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max difference" in result.stdout


def test_from_backbones_copies_weights_and_checks_architecture():
    config = tester.backbone_config()
    original, finetuned = Dinov2Model(config).eval(), Dinov2Model(config).eval()
    original.config._name_or_path = "facebook/dinov2-small"
    model = FiT3DModel.from_backbones(original, finetuned)
    assert model.config.backbone == "facebook/dinov2-small" and model.config.feature_dim == 64
    images = tester.images()
    with torch.no_grad():
        output = model(images)
        torch.testing.assert_close(
            output.original_features, DenseFeatureExtractor(original)(images), rtol=0, atol=0
        )
        torch.testing.assert_close(
            output.finetuned_features, DenseFeatureExtractor(finetuned)(images), rtol=0, atol=0
        )
    # Fine-tuning settings that do not change the architecture are fine.
    finetuned.config.drop_path_rate = 0.1
    FiT3DModel.from_backbones(original, finetuned)

    wider = Dinov2Model(tester.backbone_config(hidden_size=48))
    with pytest.raises(ValueError, match="hidden_size: 32 vs 48"):
        FiT3DModel.from_backbones(original, wider)
    registers = AutoModel.from_config(
        Dinov2WithRegistersConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
        )
    )
    with pytest.raises(ValueError, match="class Dinov2Model vs Dinov2WithRegistersModel"):
        FiT3DModel.from_backbones(original, registers)
    with pytest.raises(TypeError, match="finetuned must be a transformers PreTrainedModel"):
        FiT3DModel.from_backbones(original, torch.nn.Linear(2, 2))


def test_from_backbones_takes_over_an_extractors_normalization():
    config = tester.backbone_config()
    original = DenseFeatureExtractor(
        Dinov2Model(config), image_mean=[0.5] * 3, image_std=[0.2] * 3, normalization="processor"
    )
    finetuned = DenseFeatureExtractor(
        Dinov2Model(config), image_mean=[0.5] * 3, image_std=[0.2] * 3, normalization="processor"
    )
    model = FiT3DModel.from_backbones(original, finetuned)
    assert model.config.normalization == "processor"
    assert model.config.image_mean == [0.5] * 3 and model.config.image_std == pytest.approx([0.2] * 3)
    images = tester.images()
    with torch.no_grad():
        torch.testing.assert_close(model(images).finetuned_features, finetuned(images), rtol=1e-6, atol=1e-6)


def test_bf16_autocast_and_training_gradients():
    model = tester.model()
    images = tester.images()
    with torch.no_grad():
        reference = model(images).features
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images).features
    assert_within_bf16_precision(low, reference, num_layers=2)
    model.train()
    model(images).finetuned_features.mean().backward()
    assert model.finetuned.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert model.original.embeddings.patch_embeddings.projection.weight.grad is None


def test_bad_inputs():
    model = tester.model()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(2, 1, 28, 28))
    with pytest.raises(TypeError, match="unexpected arguments"):
        model(tester.images(), output_attentions=True)
    with pytest.raises(ValueError, match="Unsupported backbone"):
        FiT3DModel(
            FiT3DConfig(backbone_config=AutoConfig.for_model("bert", hidden_size=32, num_attention_heads=2))
        )


def test_package_registers_the_model_type():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    assert CONFIG_MAPPING["fit3d"] is FiT3DConfig
    assert MODEL_MAPPING[FiT3DConfig] is FiT3DModel
    assert fit3d_hf.FiT3DModel is FiT3DModel


def test_timm_backbones_round_trip(tmp_path):
    pytest.importorskip("timm")
    from transformers import TimmWrapperConfig, TimmWrapperModel

    model_args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28, "dynamic_img_size": True}
    config = TimmWrapperConfig(
        architecture="vit_small_patch14_reg4_dinov2", model_args=model_args, num_labels=0
    )
    original, finetuned = TimmWrapperModel(config).eval(), TimmWrapperModel(config).eval()
    model = FiT3DModel.from_backbones(
        original, finetuned, backbone="timm/vit_small_patch14_reg4_dinov2.lvd142m"
    )
    assert (model.config.feature_dim, model.patch_size, model.num_prefix_tokens) == (64, 14, 5)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    images = tester.images()
    with torch.no_grad():
        output = loaded(images)
        tokens = finetuned.timm_model.forward_features(
            (torch.nn.functional.interpolate(images, (42, 56), mode="bilinear") - model.image_mean)
            / model.image_std
        )
    assert output.features.shape == (2, 64, 3, 4)
    torch.testing.assert_close(
        output.finetuned_features.flatten(2).transpose(1, 2), tokens[:, 5:], rtol=1e-5, atol=1e-5
    )


@pytest.mark.cuda
def test_cuda_matches_cpu_and_runs_in_bf16():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = tester.model()
    images = tester.images()
    with torch.no_grad():
        expected = model(images).features
        on_gpu = model.to("cuda")
        # fp32 on the GPU: cuDNN runs the patch-embedding convolution in TF32 by default; max abs difference
        # 1.1e-3 on an H100 (tolerance calibrated there).
        torch.testing.assert_close(on_gpu(images.cuda()).features.cpu(), expected, rtol=1e-2, atol=5e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = on_gpu(images.cuda()).features
    assert_within_bf16_precision(low.cpu(), expected, num_layers=2)
