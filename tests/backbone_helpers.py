"""The tiny backbone the pipeline tests lift and fine-tune with (no Hub here: random weights, saved locally), and
the smallest Stage II workspace built around it."""

from pathlib import Path

import torch
from transformers import Dinov2Config, Dinov2Model

from fit3d_hf.lifting import LiftingArguments
from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset


def tiny_dinov2_config(hidden_size: int = 16, *, patch_size: int = 4, image_size: int = 32) -> Dinov2Config:
    """A 1-layer, 2-head DINOv2 config `hidden_size` wide (MLP twice as wide): the tests' backbone."""
    return Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        patch_size=patch_size,
        image_size=image_size,
    )


def save_tiny_dinov2(folder, *, patch_size: int = 4, image_size: int = 32) -> Path:
    """Saves a 1-layer, 16-wide DINOv2 with seeded random weights (the same weights on every call) to `folder`
    with `save_pretrained`, and returns the folder."""
    config = tiny_dinov2_config(16, patch_size=patch_size, image_size=image_size)
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    return Path(folder)


def tiny_stage2_workspace(root: Path) -> LiftingArguments:
    """Writes one training and one validation synthetic scene of 4 views at 32x24 to `root/data` and the tiny
    backbone (patch 8) to `root/backbone`; returns the arguments of a 4-iteration lift into `root/lifted` (the
    caller lifts the scenes it needs)."""
    generate_dataset(
        root / "data",
        num_scenes=1,
        num_val_scenes=1,
        config=SyntheticSceneConfig(seed=4, num_views=4, width=32, height=24, num_points=300),
    )
    save_tiny_dinov2(root / "backbone", patch_size=8)
    return LiftingArguments(
        backbone=str(root / "backbone"), out=str(root / "lifted"), feature_dim=4, iterations=4, densify_from=100,
        checkpoint_interval=0, previews=False, bundle_sh="fp16", device="cpu",
    )  # fmt: skip
