"""The Stage II benchmark (benchmarks/finetune.py) in its tiny CPU mode: full and LoRA records with a time
split that adds up, and a data loading record (a few seconds; the GPU numbers come from the device)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from transformers import Dinov2Config, Dinov2Model

REPO = Path(__file__).resolve().parents[1]


def test_finetune_benchmark_tiny_cpu_run():
    command = [
        sys.executable, str(REPO / "benchmarks" / "finetune.py"), "--device", "cpu", "--backbone", "tiny",
        "--mixed_precision", "no", "--n", "2000", "--width", "112", "--height", "84", "--batch", "2", "--steps", "2",
        "--warmup", "1", "--profile_steps", "2", "--lora_rank", "0", "4", "--loader_workers", "0",
        "--loader_views", "8", "--loader_batch", "4", "--loader_frames", "32",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    full, lora, loading = records

    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=518,
    )
    # every weight but DINOv2's mask token (no gradient without bool_masked_pos: frozen for DDP)
    assert full["trainable_params"] == sum(p.numel() for p in Dinov2Model(config).parameters()) - 32
    assert full["frozen_unused"] == ["model.embeddings.mask_token"]
    assert (lora["lora_rank"], lora["frozen_unused"]) == (4, [])
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 10
    for record in (full, lora):
        assert record["benchmark"] == "finetune_step" and record["processes"] == 1 and record["batch"] == 2
        assert record["images_per_s"] > 0
        phases = record["ms_per_image"]
        assert set(phases) == {"upload_flip", "render", "decode", "forward", "backward", "optimizer"}
        assert all(value > 0 for value in phases.values())  # the render/decode wrappers saw their calls
        assert abs(sum(phases.values()) - record["profiled_ms_per_image"]) < 0.01
        assert record["gpu_ms_per_image"] is None and record["top_kernels_ms_per_step"] is None  # CUDA only
    # workers=0: one batch untimed, then ceil(32 / 4) batches of 4 timed
    assert loading["benchmark"] == "finetune_data_loading"
    assert (loading["workers"], loading["frames_timed"]) == (0, 32)
    assert loading["frames_per_s"] > 0 and loading["step_images_per_s"] == full["images_per_s"]
