"""Stage I and Stage II on the GPU (CUDA rasterizer): the same known answers as the CPU tests."""

import pytest
import torch

from fit3d_hf.render import backend

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available() or backend() != "cuda":
    pytest.skip("needs a CUDA device and the compiled rasterizer extension", allow_module_level=True)

from test_finetuning import _arguments, workspace  # noqa: E402,F401  (fixture reused on the GPU)
from test_lifting import _args, backbone_dir, scene_root  # noqa: E402,F401

from fit3d_hf.finetuning import train  # noqa: E402
from fit3d_hf.lifting import lift_scene, resolve_scene_list  # noqa: E402


def test_lifting_on_cuda_fits_rgb_and_features(scene_root, backbone_dir, tmp_path):  # noqa: F811
    metrics = lift_scene(
        resolve_scene_list(str(scene_root))[0], _args(tmp_path, backbone_dir, device="cuda"), progress=False
    )
    assert metrics["device"].startswith("cuda")
    assert metrics["psnr_heldout"] >= 22.0, metrics
    assert metrics["feature_l1_train"] <= 0.5 * metrics["feature_l1_train_start"], metrics


def test_finetuning_on_cuda_improves_consistency(workspace, tmp_path):  # noqa: F811
    metrics = train(*_arguments(workspace, tmp_path / "run", mixed_precision="bf16"))
    assert metrics["validation_loss"] < 0.9 * metrics["validation_loss_before"], metrics
    assert metrics["consistency_after"] > metrics["consistency_before"], metrics
