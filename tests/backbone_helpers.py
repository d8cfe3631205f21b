"""The tiny backbone the pipeline tests lift and fine-tune with (no Hub here: random weights, saved locally)."""

from pathlib import Path

import torch
from transformers import Dinov2Config, Dinov2Model


def save_tiny_dinov2(folder, *, patch_size: int = 4, image_size: int = 32) -> Path:
    """Saves a 1-layer, 16-wide DINOv2 with seeded random weights (the same weights on every call) to `folder`
    with `save_pretrained`, and returns the folder."""
    config = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        patch_size=patch_size,
        image_size=image_size,
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    return Path(folder)
