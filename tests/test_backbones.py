"""Dense features from every supported backbone architecture, normalisation, and timm weight conversion."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from precision_helpers import assert_within_bf16_precision
from transformers import (
    AutoModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    DeiTConfig,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    ViTConfig,
    ViTMAEConfig,
)

from fit3d_hf.backbones import (
    BACKBONE_SHORT_NAMES,
    DenseFeatureExtractor,
    convert_timm_dinov2_state_dict,
    load_backbone,
    resolve_backbone_name,
)
from fit3d_hf.cli import main as fit3d_main
from fit3d_hf.configuration_fit3d import IMAGENET_MEAN, IMAGENET_STD

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _mae_config():
    return ViTMAEConfig(
        **TINY, image_size=32, patch_size=16, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=64,
    )  # fmt: skip


def _dinov3_config():
    if not hasattr(transformers, "DINOv3ViTConfig"):
        pytest.skip("this transformers release has no DINOv3ViTModel")
    return transformers.DINOv3ViTConfig(**TINY, patch_size=16, num_register_tokens=4, image_size=32)


# name -> (config factory, patch size, prefix tokens, forward kwargs of the model's own call,
#          whether the model's last_hidden_state still lacks the final norm (CLIP applies it to CLS only))
ARCHITECTURES = {
    "dinov2": (lambda: Dinov2Config(**TINY, image_size=28, patch_size=14), 14, 1, {}, False),
    "dinov2_with_registers": (
        lambda: Dinov2WithRegistersConfig(**TINY, image_size=28, patch_size=14, num_register_tokens=4),
        14,
        5,
        {},
        False,
    ),
    "dinov3_vit": (_dinov3_config, 16, 5, {}, False),
    "clip_vision_model": (
        lambda: CLIPVisionConfig(**TINY, image_size=32, patch_size=16),
        16,
        1,
        {"interpolate_pos_encoding": True},
        True,
    ),
    "siglip_vision_model": (
        lambda: SiglipVisionConfig(**TINY, image_size=32, patch_size=16),
        16,
        0,
        {"interpolate_pos_encoding": True},
        False,
    ),
    "vit": (
        lambda: ViTConfig(**TINY, image_size=32, patch_size=16),
        16,
        1,
        {"interpolate_pos_encoding": True},
        False,
    ),
    "deit": (
        lambda: DeiTConfig(**TINY, image_size=32, patch_size=16),
        16,
        2,
        {"interpolate_pos_encoding": True},
        False,
    ),
}


def _normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _tokens_to_grid(tokens, prefix, grid_h, grid_w):
    """Oracle: patch token prefix + i * w + j is the feature at row i, column j."""
    batch, _, dim = tokens.shape
    grid = torch.empty(batch, dim, grid_h, grid_w)
    for i in range(grid_h):
        for j in range(grid_w):
            grid[:, :, i, j] = tokens[:, prefix + i * grid_w + j]
    return grid


def _final_norm(model):
    return (
        getattr(model, "layernorm", None)
        or getattr(model, "norm", None)
        or getattr(model, "vision_model", model).post_layernorm
    )


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_features_match_the_models_own_forward(name):
    make_config, patch, prefix, kwargs, unnormed_output = ARCHITECTURES[name]
    model = AutoModel.from_config(make_config()).eval()
    extractor = DenseFeatureExtractor(model)
    assert (extractor.patch_size, extractor.hidden_size, extractor.num_prefix_tokens) == (patch, 32, prefix)

    # Odd size: floored to the patch grid, bilinearly resized first.
    images = torch.rand(2, 3, 45, 61)
    height, width = (45 // patch) * patch, (61 // patch) * patch
    with torch.no_grad():
        features = extractor(images)
        resized = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
        tokens = model(_normalize(resized), **kwargs).last_hidden_state
        if unnormed_output:
            tokens = (
                model.post_layernorm(tokens)
                if hasattr(model, "post_layernorm")
                else model.vision_model.post_layernorm(tokens)
            )
    assert features.shape == (2, 32, 45 // patch, 61 // patch)
    torch.testing.assert_close(
        features, _tokens_to_grid(tokens, prefix, 45 // patch, 61 // patch), rtol=1e-5, atol=1e-5
    )

    # Without the final norm: the norm applied to those features gives the normed ones back.
    with torch.no_grad():
        unnormed = extractor(images, final_norm=False)
        renormed = _final_norm(model)(unnormed.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert (unnormed - features).abs().max() > 1e-2
    torch.testing.assert_close(renormed, features, rtol=1e-5, atol=1e-5)
    if prefix:
        with torch.no_grad():
            _, cls_token = extractor(images, return_cls=True)
        torch.testing.assert_close(cls_token, tokens[:, 0], rtol=1e-5, atol=1e-5)


def test_vit_mae_keeps_token_order_and_drops_nothing():
    config = _mae_config()
    assert config.mask_ratio > 0  # the default masks 75% of the tokens
    model = AutoModel.from_config(config).eval()
    extractor = DenseFeatureExtractor(model)
    images = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        features = extractor(images)
        # Oracle: a randomly shuffled run, put back in patch order with the model's own ids_restore.
        noise = torch.rand(2, 12)
        shuffled = model(_normalize(images), noise=noise, interpolate_pos_encoding=True)
        restored = torch.gather(
            shuffled.last_hidden_state[:, 1:], 1, shuffled.ids_restore[..., None].expand(-1, -1, 32)
        )
    assert not torch.equal(shuffled.ids_restore, torch.arange(12).expand(2, 12))
    assert features.shape == (2, 32, 3, 4)
    torch.testing.assert_close(features, _tokens_to_grid(restored, 0, 3, 4), rtol=1e-5, atol=1e-5)


def test_perturbing_one_patch_changes_that_patch_most():
    # With no attention mixing (a zero-layer ViT-MAE), only the perturbed patch's feature may change: the
    # token order matches the image layout.
    config = _mae_config()
    config.num_hidden_layers = 0
    extractor = DenseFeatureExtractor(AutoModel.from_config(config).eval())
    images = torch.rand(1, 3, 48, 64)
    perturbed = images.clone()
    perturbed[:, :, 16:32, 48:64] = torch.rand(1, 3, 16, 16)  # row 1, column 3
    with torch.no_grad():
        change = (extractor(perturbed) - extractor(images)).abs().sum(dim=1)[0]
    assert change[1, 3] > 0
    change[1, 3] = 0
    assert change.max() == 0


def test_differentiable_and_bf16_autocast():
    extractor = DenseFeatureExtractor(Dinov2Model(Dinov2Config(**TINY, image_size=28, patch_size=14)))
    images = torch.rand(2, 3, 42, 56, requires_grad=True)
    features = extractor(images)
    features.square().mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert extractor.model.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = extractor(images)
    assert_within_bf16_precision(low, features.detach(), num_layers=TINY["num_hidden_layers"])


def test_processor_normalization_reads_preprocessor_config(tmp_path):
    Dinov2Model(Dinov2Config(**TINY, image_size=28, patch_size=14)).save_pretrained(tmp_path)
    images = torch.rand(1, 3, 28, 42)
    imagenet = DenseFeatureExtractor.from_pretrained(tmp_path).eval()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        DenseFeatureExtractor.from_pretrained(tmp_path, normalization="processor")

    processor = {
        "image_processor_type": "BitImageProcessor",
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.3],
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    own = DenseFeatureExtractor.from_pretrained(tmp_path, normalization="processor").eval()
    torch.testing.assert_close(own.image_mean.flatten(), torch.tensor([0.5, 0.4, 0.3]))
    torch.testing.assert_close(imagenet.image_std.flatten(), torch.tensor(IMAGENET_STD))
    with torch.no_grad():
        expected = own.model(_normalize(images, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])).last_hidden_state
        own_features, imagenet_features = own(images), imagenet(images)
    torch.testing.assert_close(own_features, _tokens_to_grid(expected, 1, 2, 3), rtol=1e-5, atol=1e-5)
    assert (own_features - imagenet_features).abs().max() > 1e-2
    with pytest.raises(ValueError, match="normalization"):
        DenseFeatureExtractor.from_pretrained(tmp_path, normalization="clip")


def test_local_folder_round_trip_and_short_names(tmp_path):
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY, image_size=28, patch_size=14)).eval()
    model.save_pretrained(tmp_path)
    loaded = DenseFeatureExtractor.from_pretrained(str(tmp_path))
    images = torch.rand(1, 3, 30, 44)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), DenseFeatureExtractor(model)(images), rtol=0, atol=1e-6)
    assert resolve_backbone_name("dinov2_small") == "facebook/dinov2-small"
    assert resolve_backbone_name("dinov2_reg_small") == "facebook/dinov2-with-registers-small"
    assert resolve_backbone_name("clip_base") == "timm/vit_base_patch16_clip_384.laion2b_ft_in12k_in1k"
    assert resolve_backbone_name("org/any-model") == "org/any-model"
    assert set(BACKBONE_SHORT_NAMES) == {
        "dinov2_small",
        "dinov2_base",
        "dinov2_reg_small",
        "clip_base",
        "mae_base",
        "deit3_base",
    }


def test_full_clip_model_gives_its_vision_tower(tmp_path):
    config = CLIPConfig(
        text_config=dict(TINY, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(TINY, image_size=32, patch_size=16),
        projection_dim=16,
    )
    clip = CLIPModel(config).eval()
    clip.save_pretrained(tmp_path)
    from_folder = DenseFeatureExtractor.from_pretrained(tmp_path)
    in_memory = DenseFeatureExtractor(clip)
    assert from_folder.model.config.model_type == "clip_vision_model"
    images = torch.rand(2, 3, 40, 50)
    with torch.no_grad():
        tokens = clip.vision_model(
            _normalize(F.interpolate(images, (32, 48), mode="bilinear")), interpolate_pos_encoding=True
        )
        tower = clip.vision_model
        normed = (
            tower.post_layernorm if hasattr(tower, "post_layernorm") else tower.vision_model.post_layernorm
        )(tokens.last_hidden_state)
        expected = _tokens_to_grid(normed, 1, 2, 3)
        torch.testing.assert_close(from_folder(images), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(in_memory(images), expected, rtol=1e-5, atol=1e-5)


def test_unsupported_backbone_and_bad_images():
    with pytest.raises(ValueError, match="Unsupported backbone"):
        DenseFeatureExtractor(transformers.BertModel(transformers.BertConfig(**TINY, vocab_size=50)))
    extractor = DenseFeatureExtractor(Dinov2Model(Dinov2Config(**TINY, image_size=28, patch_size=14)))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        extractor(torch.rand(3, 28, 28))
    with pytest.raises(ValueError, match="smaller than one 14-pixel patch"):
        extractor(torch.rand(1, 3, 10, 40))
    with pytest.raises(ValueError, match="no CLS token"):
        DenseFeatureExtractor(AutoModel.from_config(ARCHITECTURES["siglip_vision_model"][0]()))(
            torch.rand(1, 3, 32, 32), return_cls=True
        )


# ---- timm -> transformers weight conversion -------------------------------------------------------------


def _to_timm_state_dict(model):
    """Inverse of the conversion, the way timm stores a DINOv2 ViT (register variants: no_embed_class)."""
    sd = model.state_dict()
    registers = "embeddings.register_tokens" in sd
    timm = {"patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
            "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}  # fmt: skip
    if registers:
        timm["cls_token"] = sd["embeddings.cls_token"] + sd["embeddings.position_embeddings"][:, :1]
        timm["pos_embed"] = sd["embeddings.position_embeddings"][:, 1:]
        timm["reg_token"] = sd["embeddings.register_tokens"]
    else:
        timm["cls_token"] = sd["embeddings.cls_token"]
        timm["pos_embed"] = sd["embeddings.position_embeddings"]
    for i in range(model.config.num_hidden_layers):
        layer, block = f"encoder.layer.{i}.", f"blocks.{i}."
        # Newer transformers name them q_proj/.../o_proj, older ones attention.query/.../output.dense.
        new_names = f"{layer}attention.q_proj.weight" in sd
        qkv = [f"{layer}attention.{p}_proj" for p in "qkv"] if new_names else [
            f"{layer}attention.attention.{p}" for p in ("query", "key", "value")
        ]  # fmt: skip
        out = f"{layer}attention.o_proj" if new_names else f"{layer}attention.output.dense"
        for part in ("weight", "bias"):
            timm[f"{block}attn.qkv.{part}"] = torch.cat([sd[f"{name}.{part}"] for name in qkv])
            timm[f"{block}attn.proj.{part}"] = sd[f"{out}.{part}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                timm[f"{block}{name}.{part}"] = sd[f"{layer}{name}.{part}"]
        timm[f"{block}ls1.gamma"] = sd[f"{layer}layer_scale1.lambda1"]
        timm[f"{block}ls2.gamma"] = sd[f"{layer}layer_scale2.lambda1"]
    return {key: value.clone() for key, value in timm.items()}


@pytest.mark.parametrize(
    "model_class,config_class",
    [(Dinov2Model, Dinov2Config), (Dinov2WithRegistersModel, Dinov2WithRegistersConfig)],
)
def test_convert_timm_dinov2_state_dict(model_class, config_class):
    config = config_class(**TINY, image_size=28, patch_size=14, layerscale_value=0.5)
    source = model_class(config).eval()
    with torch.no_grad():  # non-trivial position embeddings, CLS position and layer scales
        for name, parameter in source.named_parameters():
            if "position_embeddings" in name or "lambda1" in name or "cls_token" in name:
                parameter.normal_()
    target = model_class(config).eval()
    converted = convert_timm_dinov2_state_dict(_to_timm_state_dict(source), target)
    target.load_state_dict(converted)
    images = torch.rand(2, 3, 45, 61)  # not the native size: position embeddings get interpolated too
    with torch.no_grad():
        torch.testing.assert_close(
            DenseFeatureExtractor(target)(images), DenseFeatureExtractor(source)(images), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            target(images).last_hidden_state, source(images).last_hidden_state, rtol=1e-5, atol=1e-5
        )


def test_convert_rejects_wrong_sizes_and_keys():
    source = Dinov2Model(Dinov2Config(**TINY, image_size=28, patch_size=14))
    bigger = Dinov2Model(
        Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
    )
    with pytest.raises(ValueError, match="another model size"):
        convert_timm_dinov2_state_dict(_to_timm_state_dict(source), bigger)
    timm = _to_timm_state_dict(source)
    with pytest.raises(ValueError, match="unexpected timm key 'head.weight'"):
        convert_timm_dinov2_state_dict({**timm, "head.weight": torch.zeros(2, 32)}, source)
    del timm["blocks.1.ls2.gamma"]
    with pytest.raises(ValueError, match="lacks weights"):
        convert_timm_dinov2_state_dict(timm, source)


def test_convert_original_command(tmp_path, capsys):
    config = Dinov2Config(**TINY, image_size=28, patch_size=14)
    original, finetuned = Dinov2Model(config).eval(), Dinov2Model(config).eval()
    original.save_pretrained(tmp_path / "original")
    weights = tmp_path / "dinov2_small_finetuned.pth"
    torch.save(_to_timm_state_dict(finetuned), weights)
    argv = ["convert-original", "--backbone", "dinov2_small", "--weights", str(weights),
            "--output_dir", str(tmp_path / "out"), "--original", str(tmp_path / "original")]  # fmt: skip
    assert fit3d_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["backbone"] == "facebook/dinov2-small" and summary["changed_tensors"] > 0
    assert summary["pos_embed_interpolation"] == "timm"  # the original's timm resampling, by default

    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "config.json", "configuration_fit3d.py", "dense_features_fit3d.py", "model.safetensors",
        "modeling_fit3d.py", "preprocessor_config.json",
    ]  # fmt: skip
    assert "base_model: facebook/dinov2-small" in (tmp_path / "out" / "README.md").read_text()
    images = torch.rand(1, 3, 45, 61)
    with torch.no_grad():
        output = model(images)
        torch.testing.assert_close(
            output.original_features,
            DenseFeatureExtractor(original, pos_embed_interpolation="timm")(images),
            rtol=1e-5,
            atol=1e-5,
        )
        torch.testing.assert_close(
            output.finetuned_features,
            DenseFeatureExtractor(finetuned, pos_embed_interpolation="timm")(images),
            rtol=1e-5,
            atol=1e-5,
        )
    capsys.readouterr()
    assert fit3d_main(argv) == 2  # an existing output is a usage error: the remedy is --overwrite
    assert capsys.readouterr().err == (
        f"fit3d convert-original: error: --output_dir {tmp_path / 'out'} already holds files; pass --overwrite "
        "to replace them\n"
    )
    bad = tmp_path / "bad.pth"
    torch.save({"args": "not a tensor"}, bad)
    assert (
        fit3d_main([*argv[:3], "--weights", str(bad), "--output_dir", str(tmp_path / "out2"), *argv[-2:]])
        == 1
    )
    assert capsys.readouterr().err == (
        f"fit3d convert-original: error: {bad} does not hold a state dict (a mapping of parameter names to "
        "tensors)\n"
    )
    assert not (tmp_path / "out2").exists()


# ---- timm (optional extra; runs where timm and torchvision are installed) --------------------------


def _timm_folder(tmp_path, timm, architecture="vit_small_patch14_reg4_dinov2"):
    model_args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28}
    model = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args).eval()
    from safetensors.torch import save_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    pretrained_cfg = {
        "input_size": [3, 28, 28],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "num_classes": 0,
    }
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return model, model_args


def test_timm_wrapper_dense_features(tmp_path):
    timm = pytest.importorskip("timm")
    reference, model_args = _timm_folder(tmp_path, timm)
    extractor = DenseFeatureExtractor.from_pretrained(tmp_path).eval()
    assert extractor.model.config.model_type == "timm_wrapper"
    assert (extractor.patch_size, extractor.hidden_size, extractor.num_prefix_tokens) == (14, 32, 5)
    dynamic = timm.create_model(
        "vit_small_patch14_reg4_dinov2", num_classes=0, dynamic_img_size=True, **model_args
    ).eval()
    dynamic.load_state_dict(reference.state_dict())
    images = torch.rand(2, 3, 45, 61)
    with torch.no_grad():
        tokens = dynamic.forward_features(_normalize(F.interpolate(images, (42, 56), mode="bilinear")))
        torch.testing.assert_close(extractor(images), _tokens_to_grid(tokens, 5, 3, 4), rtol=1e-5, atol=1e-5)
    loaded = load_backbone(tmp_path)
    assert loaded.timm_model.dynamic_img_size


def test_convert_original_via_timm(tmp_path):
    timm = pytest.importorskip("timm")
    _timm_folder(tmp_path / "original", timm)
    finetuned, model_args = _timm_folder(tmp_path / "other", timm)
    weights = tmp_path / "dinov2_reg_small_finetuned.pth"
    torch.save(finetuned.state_dict(), weights)
    argv = ["convert-original", "--backbone", "dinov2_reg_small", "--weights", str(weights), "--via", "timm",
            "--output_dir", str(tmp_path / "out"), "--original", str(tmp_path / "original")]  # fmt: skip
    assert fit3d_main(argv) == 0
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    dynamic = timm.create_model(
        "vit_small_patch14_reg4_dinov2", num_classes=0, dynamic_img_size=True, **model_args
    ).eval()
    dynamic.load_state_dict(finetuned.state_dict())
    images = torch.rand(1, 3, 42, 56)
    with torch.no_grad():
        expected = _tokens_to_grid(dynamic.forward_features(_normalize(images)), 5, 3, 4)
        torch.testing.assert_close(model(images).finetuned_features, expected, rtol=1e-5, atol=1e-5)
