"""Stage II on the CPU: synthetic scenes lifted with a tiny backbone, then a tiny ViT fine-tuned on them."""

import json
from dataclasses import replace

import pytest
import torch
from backbone_helpers import tiny_dinov2_config
from transformers import AutoModel, Dinov2Config, Dinov2Model

import fit3d_hf  # noqa: F401  (registers the fit3d model type)
from fit3d_hf.backbones import DenseFeatureExtractor
from fit3d_hf.finetuning import (
    BackboneArguments,
    DataArguments,
    FinetuningArguments,
    check_frames_against_gaussians,
    freeze_unused_parameters,
    load_frames,
    train,
)
from fit3d_hf.gaussians import BundleMismatchError
from fit3d_hf.lifting import LiftingArguments, lift_scene, resolve_scene_list
from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset


def _save_backbone(folder, hidden_size=32, seed=0):
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=64,
    )
    Dinov2Model(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two synthetic scenes (one train, one val) lifted into Gaussians with the backbone to fine-tune."""
    root = tmp_path_factory.mktemp("stage2")
    data = root / "data"
    generate_dataset(
        data,
        num_scenes=1,
        num_val_scenes=1,
        config=SyntheticSceneConfig(seed=5, num_views=12, width=64, height=48, num_points=3000),
    )
    backbone = _save_backbone(root / "backbone")
    extractor = DenseFeatureExtractor.from_pretrained(backbone)
    lift_args = LiftingArguments(
        backbone=backbone, out=str(root / "gaussians"), feature_dim=16, iterations=400, feature_lr=0.01, decoder_lr=0.01,
        sh_dc_lr=0.01, position_lr_init=1.6e-3, position_lr_final=1.6e-5, position_lr_max_steps=0, densify_from=50, densify_until=300,
        densify_interval=100, max_gaussians=4000, checkpoint_interval=0, previews=False, device="cpu",
    )  # fmt: skip
    for scene in resolve_scene_list(str(data)):
        lift_scene(scene, lift_args, extractor, progress=False)
    return {"root": root, "data": str(data), "gaussians": str(root / "gaussians"), "backbone": backbone}


def _arguments(workspace, output_dir, **overrides):
    model = BackboneArguments(backbone=workspace["backbone"])
    data = DataArguments(frames=workspace["data"], gaussians=workspace["gaussians"], consistency_pairs=6)
    training = FinetuningArguments(
        output_dir=str(output_dir), learning_rate=1e-3, max_train_steps=24, train_batch_size=2, checkpointing_steps=0,
        report_to="none", seed=1,
    )  # fmt: skip
    for key, value in overrides.items():
        if hasattr(model, key):
            model = replace(model, **{key: value})
        elif hasattr(data, key):
            data = replace(data, **{key: value})
        else:
            training = replace(training, **{key: value})
    return model, data, training


def test_finetuning_lowers_the_loss_improves_consistency_and_saves_models(workspace, tmp_path):
    metrics = train(*_arguments(workspace, tmp_path / "run"))
    assert metrics["steps"] == 24
    assert metrics["validation_loss"] < 0.9 * metrics["validation_loss_before"], metrics
    assert metrics["consistency_after"] > metrics["consistency_before"] + 0.02, metrics
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["consistency_after"] == metrics["consistency_after"]
    # The fine-tuned backbone loads as a plain transformers model; the FiT3DModel through AutoModel.
    finetuned = AutoModel.from_pretrained(tmp_path / "run" / "finetuned")
    original = AutoModel.from_pretrained(workspace["backbone"])
    assert type(finetuned).__name__ == "Dinov2Model"
    assert not torch.equal(
        finetuned.embeddings.patch_embeddings.projection.weight,
        original.embeddings.patch_embeddings.projection.weight,
    )
    fit3d = AutoModel.from_pretrained(tmp_path / "run" / "fit3d")
    images = torch.rand(1, 3, 48, 64)
    output = fit3d(images)
    assert output.features.shape == (1, 64, 6, 8)
    expected = DenseFeatureExtractor(finetuned)(images)
    torch.testing.assert_close(output.finetuned_features, expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "run" / "fit3d" / "README.md").is_file()
    assert (
        tmp_path / "run" / "fit3d" / "preprocessor_config.json"
    ).is_file()  # AutoImageProcessor / pipeline


def test_lora_finetuning_improves_and_saves_merged_weights(workspace, tmp_path):
    metrics = train(*_arguments(workspace, tmp_path / "lora", lora_rank=8, learning_rate=1e-2))
    # A real decrease, as for full fine-tuning (measured 2026-12-06 on the 2-core CPU: 0.822 x the starting
    # loss, consistency 0.69 -> 0.94)
    assert metrics["validation_loss"] < 0.9 * metrics["validation_loss_before"], metrics
    assert metrics["consistency_after"] > metrics["consistency_before"] + 0.02, metrics
    state = AutoModel.from_pretrained(tmp_path / "lora" / "finetuned").state_dict()
    assert not any("lora" in key for key in state)  # merged: loading needs no peft
    original = AutoModel.from_pretrained(workspace["backbone"]).state_dict()
    changed = [k for k in state if not torch.equal(state[k], original[k])]
    assert changed and all(
        k.endswith("weight") and "norm" not in k for k in changed
    )  # only adapted linear layers moved


def test_kill_and_resume_gives_the_same_weights(workspace, tmp_path):
    uninterrupted = tmp_path / "a"
    train(*_arguments(workspace, uninterrupted, max_train_steps=4, validation_split=None))
    interrupted = tmp_path / "b"
    train(
        *_arguments(workspace, interrupted, max_train_steps=2, checkpointing_steps=2, validation_split=None)
    )
    assert (interrupted / "checkpoint-2").is_dir()
    train(
        *_arguments(
            workspace,
            interrupted,
            max_train_steps=4,
            checkpointing_steps=2,
            validation_split=None,
            resume_from_checkpoint="latest",
        )
    )
    first = AutoModel.from_pretrained(uninterrupted / "finetuned").state_dict()
    second = AutoModel.from_pretrained(interrupted / "finetuned").state_dict()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_mismatched_gaussians_are_refused_before_training(workspace, tmp_path):
    frames = load_frames(workspace["data"], "train")
    with pytest.raises(FileNotFoundError, match="no Gaussian bundle"):
        check_frames_against_gaussians(set(frames["scene_id"]) | {"missing0000"}, workspace["gaussians"], 32)
    other_backbone = _save_backbone(tmp_path / "wide", hidden_size=48)
    with pytest.raises(BundleMismatchError, match="decodes to 32 channels but the backbone has 48"):
        train(*_arguments(workspace, tmp_path / "x", backbone=other_backbone))
    assert not (tmp_path / "x" / "finetuned").exists()


def test_training_script_under_accelerate_launch(workspace, tmp_path):
    """The thin entry point, as users run it: `accelerate launch training/finetune.py ...` (YAML config)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "backbone": workspace["backbone"], "frames": workspace["data"], "gaussians": workspace["gaussians"],
        "output_dir": str(tmp_path / "run"), "max_train_steps": 2, "report_to": "tensorboard", "logging_steps": 1,
        "validation_split": "",
    }))  # fmt: skip
    repo = Path(__file__).resolve().parents[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(accelerate), "launch", "--cpu", "--num_processes", "1", str(repo / "training" / "finetune.py"), str(config)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'steps': 2" in result.stdout
    assert (tmp_path / "run" / "finetuned" / "model.safetensors").is_file()
    assert AutoModel.from_pretrained(tmp_path / "run" / "fit3d").config.model_type == "fit3d"
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))  # the tensorboard tracker logged


def test_weights_without_a_gradient_are_frozen_before_ddp():
    """DDP stops at the second step when a trainable weight gets no gradient (DINOv2's mask token is used
    only with `bool_masked_pos`): the trainer freezes such weights, and only those, before `prepare`.
    (Checked here rather than with two gloo processes: torch's CPU process group can deadlock at teardown.)"""
    config = tiny_dinov2_config(32, patch_size=8, image_size=32)
    extractor = DenseFeatureExtractor(Dinov2Model(config)).train()
    trainable = {name for name, p in extractor.named_parameters() if p.requires_grad}
    assert freeze_unused_parameters(extractor) == ["model.embeddings.mask_token"]
    assert {name for name, p in extractor.named_parameters() if p.requires_grad} == trainable - {
        "model.embeddings.mask_token"
    }
    assert extractor.training and all(p.grad is None for p in extractor.parameters())
    # every remaining trainable weight now gets a gradient
    extractor(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in extractor.parameters() if p.requires_grad)


def test_gaussian_cache_loads_lazily_and_evicts_least_recently_used(tmp_path):
    import numpy as np

    from fit3d_hf.finetuning import GaussianCache
    from fit3d_hf.gaussians import FeatureGaussians, load_bundle, save_bundle

    rng = np.random.default_rng(0)
    for scene in ("a", "b", "c"):
        gaussians = FeatureGaussians.from_points(
            rng.normal(size=(100, 3)), rng.integers(0, 255, (100, 3), dtype=np.uint8), 8
        )
        save_bundle(tmp_path / scene, gaussians, torch.randn(16, 8, 3, 3), scene_id=scene, backbone="b")
    # One scene's size measured from the storage the tensors occupy once on the device (not the cache's formula).
    loaded = load_bundle(tmp_path / "a").to("cpu")
    tensors = (
        loaded.means,
        loaded.quats,
        loaded.log_scales,
        loaded.opacities,
        loaded.features,
        loaded.decoder_weight,
    )
    one_scene = sum(t.untyped_storage().nbytes() for t in tensors)
    assert one_scene == 100 * 4 * (3 + 4 + 3 + 1 + 8) + 16 * 8 * 9 * 4  # all float32 on the device
    cache = GaussianCache(tmp_path, torch.device("cpu"), budget_bytes=2.5 * one_scene)
    assert len(cache) == 0  # nothing is read before it is needed
    first = cache.get("a")
    assert cache.get("a") is first and len(cache) == 1
    cache.get("b")
    cache.get("a")  # "a" is now the most recently used
    cache.get("c")  # over budget: "b" goes
    assert len(cache) == 2 and cache.get("a") is first
    assert "b" not in cache._entries and "c" in cache._entries


def test_bundles_lifted_with_another_backbone_are_refused_unless_allowed(workspace, tmp_path):
    """Same width is not enough: other weights, another model type or another position-embedding resampling
    than the lifted backbone are refused (the targets would be another model's features)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    scene_ids = set(load_frames(workspace["data"], "train")["scene_id"])
    lifted = DenseFeatureExtractor.from_pretrained(workspace["backbone"])
    check_frames_against_gaussians(
        scene_ids, workspace["gaussians"], 32, provenance=lifted.provenance()
    )  # agrees

    other_weights = DenseFeatureExtractor.from_pretrained(_save_backbone(tmp_path / "other", seed=1))
    registers = DenseFeatureExtractor(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=64,
    )))  # fmt: skip
    timm_resampling = DenseFeatureExtractor.from_pretrained(
        workspace["backbone"], pos_embed_interpolation="timm"
    )
    for extractor, reason in [
        (other_weights, "backbone weights differ"),
        (registers, "backbone_model_type 'dinov2' vs 'dinov2_with_registers'"),
        (timm_resampling, "pos_embed_interpolation 'native' vs 'timm'"),
    ]:
        with pytest.raises(BundleMismatchError, match=reason):
            check_frames_against_gaussians(
                scene_ids, workspace["gaussians"], 32, provenance=extractor.provenance()
            )
        check_frames_against_gaussians(
            scene_ids,
            workspace["gaussians"],
            32,
            provenance=extractor.provenance(),
            allow_backbone_mismatch=True,
        )
    # the trainer refuses before training
    with pytest.raises(BundleMismatchError, match="--allow_backbone_mismatch"):
        train(*_arguments(workspace, tmp_path / "x", backbone=str(tmp_path / "other")))
    assert not (tmp_path / "x" / "finetuned").exists()
    # what the bundle records
    from fit3d_hf.gaussians import read_bundle_metadata

    recorded = read_bundle_metadata(f"{workspace['gaussians']}/{sorted(scene_ids)[0]}")["provenance"]
    assert recorded == lifted.provenance()
    assert recorded["normalization"] == "imagenet" and recorded["resize"].startswith("bilinear")


def test_scaled_learning_rate_rules():
    from fit3d_hf.finetuning import scaled_learning_rate

    assert scaled_learning_rate(1e-5, 32, "none") == 1e-5
    assert scaled_learning_rate(1e-5, 32, "linear") == pytest.approx(1.6e-4)
    assert scaled_learning_rate(1e-5, 32, "sqrt") == pytest.approx(4e-5)
    assert scaled_learning_rate(1e-5, 2, "sqrt") == 1e-5
    with pytest.raises(ValueError, match="scale_lr"):
        FinetuningArguments(output_dir="o", scale_lr="cubic")


def test_stage2_trains_every_weight_with_fit3d_settings(workspace, tmp_path, monkeypatch):
    """transformers' ViT-MAE freezes its position embeddings; timm's (and so FiT3D's) train them. Targets are
    rendered with FiT3D's near plane (0.2). Without --mixed_precision the `accelerate launch` setting decides,
    and the precision and learning rate used are recorded."""
    from accelerate.state import AcceleratorState
    from transformers import ViTMAEConfig, ViTMAEModel

    import fit3d_hf.render

    near_planes = []
    real_render = fit3d_hf.render.render

    def recording_render(*args, **kwargs):
        near_planes.append(kwargs.get("near_plane"))
        return real_render(*args, **kwargs)

    monkeypatch.setattr(fit3d_hf.render, "render", recording_render)

    config = ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=64,
        mask_ratio=0.0, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
    )  # fmt: skip
    mae = ViTMAEModel(config)
    assert not mae.embeddings.position_embeddings.requires_grad
    mae.save_pretrained(tmp_path / "mae")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        metrics = train(*_arguments(
            workspace, tmp_path / "run", backbone=str(tmp_path / "mae"), allow_backbone_mismatch=True,
            max_train_steps=2, validation_split=None, gradient_accumulation_steps=2, scale_lr="sqrt", learning_rate=1e-3,
        ))  # fmt: skip
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert near_planes and set(near_planes) == {0.2}
    assert metrics["mixed_precision"] == "bf16"
    assert metrics["learning_rate"] == pytest.approx(1e-3 * 2**0.5)  # global batch 2 x 2 accumulation = 4
    trained = AutoModel.from_pretrained(tmp_path / "run" / "finetuned").embeddings.position_embeddings
    assert not torch.equal(trained, mae.embeddings.position_embeddings)


def test_optimizer_is_fused_on_cuda_and_steps_as_the_default_adamw():
    from fit3d_hf.finetuning.backbone_setup import make_optimizer

    assert make_optimizer([torch.nn.Parameter(torch.ones(2))], 1e-3, 1e-4, "cuda").defaults["fused"] is True
    assert (
        make_optimizer([torch.nn.Parameter(torch.ones(2))], 1e-3, 1e-4, torch.device("cpu")).defaults["fused"]
        is False
    )
    # the fused kernel computes the default implementation's update (torch runs it on the CPU too)
    torch.manual_seed(0)
    start, grads = torch.randn(64), [torch.randn(64) for _ in range(3)]
    results = []
    for fused in (True, False):
        weight = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.AdamW([weight], lr=1e-2, weight_decay=1e-4, fused=fused)
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
        results.append(weight.detach())
    assert not torch.equal(results[0], start)
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_the_loss_is_read_only_at_logging_steps_and_the_last(workspace, tmp_path, monkeypatch):
    """Reading the loss waits for the GPU (and gathers across processes): it happens at the run's first
    step, every --logging_steps and the last step only, and metrics.json's first and last losses are those
    steps' losses."""
    from accelerate import Accelerator

    from fit3d_hf.finetuning import trainer

    step_losses, logged = [], []
    real_step, real_log = trainer._step, Accelerator.log

    def recording_step(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        step_losses.append(float(loss.detach()))
        return loss

    def recording_log(self, values, step=None, **kwargs):
        if "train/loss" in values:
            logged.append((step, values["train/loss"]))
        return real_log(self, values, step=step, **kwargs)

    monkeypatch.setattr(trainer, "_step", recording_step)
    monkeypatch.setattr(Accelerator, "log", recording_log)
    metrics = train(
        *_arguments(workspace, tmp_path / "run", max_train_steps=7, logging_steps=3, validation_split=None)
    )
    assert len(step_losses) == 7
    assert [step for step, _ in logged] == [1, 3, 6, 7]
    for step, value in logged:
        assert value == pytest.approx(step_losses[step - 1])  # one process: the gathered mean is the loss
    assert metrics["train_loss_first"] == pytest.approx(step_losses[0])
    assert metrics["train_loss_last"] == pytest.approx(step_losses[-1])
