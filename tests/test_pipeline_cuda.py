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
    # the compressed colours, refined with the training's one-launch Adam, render as the exact ones (CPU test too)
    assert abs(metrics["psnr_heldout"] - metrics["psnr_heldout_uncompressed"]) <= 0.5, metrics


def test_scene_data_on_cuda_holds_the_cpu_images_and_targets(scene_root, backbone_dir):  # noqa: F811
    """On CUDA the views travel as uint8, become floats on the device and meet the backbone 8 at a time (24
    views: three batches): the same images as the CPU's one view at a time, and the same targets up to rounding
    (the patch embedding's convolution runs in TF32 under cuDNN's default; a view out of place would be off by
    the features' own scale)."""
    from fit3d_hf.backbones import DenseFeatureExtractor
    from fit3d_hf.lifting import load_scene_data
    from fit3d_hf.scene import read_scene

    scene = read_scene(resolve_scene_list(str(scene_root))[0])
    extractor = DenseFeatureExtractor.from_pretrained(backbone_dir)
    on_cpu = load_scene_data(scene, extractor, 1.0, torch.device("cpu"), progress=False)
    on_cuda = load_scene_data(scene, extractor.to("cuda"), 1.0, torch.device("cuda"), progress=False)
    assert torch.equal(on_cuda.images.cpu(), on_cpu.images)
    torch.testing.assert_close(on_cuda.targets.cpu(), on_cpu.targets, atol=1e-2, rtol=1e-2)


def test_finetuning_on_cuda_improves_consistency(workspace, tmp_path):  # noqa: F811
    metrics = train(*_arguments(workspace, tmp_path / "run", mixed_precision="bf16"))
    assert metrics["validation_loss"] < 0.9 * metrics["validation_loss_before"], metrics
    assert metrics["consistency_after"] > metrics["consistency_before"], metrics


def test_lifting_on_cuda_resumes_from_a_background_checkpoint(scene_root, backbone_dir, tmp_path):  # noqa: F811
    """On CUDA the checkpoints are written on a thread (CheckpointWriter): a run stopped after one has it whole
    on disk (checksums verified on loading, every tensor on the CPU), and the next run resumes from it."""
    from fit3d_hf.checkpoints import load_torch_checkpoint, map_tensors

    scene = resolve_scene_list(str(scene_root))[0]
    args = _args(tmp_path, backbone_dir, device="cuda", iterations=300, checkpoint_interval=100)
    assert lift_scene(scene, args, max_iterations_this_run=200, progress=False) is None
    checkpoint = tmp_path / scene.name / "checkpoint.pt"
    state = load_torch_checkpoint(checkpoint)
    assert state["iteration"] == 200
    devices = set()
    map_tensors(state, lambda tensor: devices.add(tensor.device.type))
    assert devices == {"cpu"}
    assert len(state["gaussians"]["means"]) == len(state["optimizer"]["state"][0]["exp_avg"])
    metrics = lift_scene(scene, args, progress=False)
    assert metrics["iterations"] == 300 and not checkpoint.exists()
    assert metrics["feature_l1_train"] < metrics["feature_l1_train_start"], metrics
