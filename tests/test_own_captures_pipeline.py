"""Own captures end to end, through the `fit3d` commands, on two synthetic captures in one run: one written as
nerfstudio `transforms.json` with OPENCV lens distortion, one as a COLMAP text model. Lift -> fine-tune ->
evaluate correspondence, every stage given the same kind of scene spec, with no conversion step; and depth
rendered from the Gaussians for a capture that has none."""

import json

import numpy as np
import pytest
import torch
from backbone_helpers import tiny_dinov2_config
from transformers import AutoModel, Dinov2Model

import fit3d_hf  # noqa: F401  (registers the fit3d model type)
from fit3d_hf.cli import main
from fit3d_hf.errors import MissingInputError
from fit3d_hf.evaluation.rendered_depth import fill_depth_from_gaussians, render_depth
from fit3d_hf.finetuning import GaussianCache, load_frames
from fit3d_hf.row_decoding import depth_to_tensor
from fit3d_hf.scene import read_scene
from fit3d_hf.scene.synthetic import SyntheticSceneConfig
from fit3d_hf.scene.synthetic_captures import generate_capture


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on these tiny images a second only waits, and on a shared machine it made the run
    ten times slower (127 s against 11 s with 5 jobs on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_captures")
    captures = root / "captures"
    config = SyntheticSceneConfig(num_views=8, width=48, height=32, num_points=250)
    generate_capture(
        captures / "kitchen",
        SyntheticSceneConfig(**{**vars(config), "seed": 11}),
        distortion=(-0.06, 0.015, 0.001, -0.001),
    )
    generate_capture(
        captures / "office", SyntheticSceneConfig(**{**vars(config), "seed": 12}), layout="colmap"
    )
    torch.manual_seed(0)
    backbone = tiny_dinov2_config(32, patch_size=8, image_size=32)
    Dinov2Model(backbone).save_pretrained(root / "backbone")
    return {"root": root, "captures": captures, "backbone": str(root / "backbone")}


def test_lift_finetune_and_evaluate_mixed_formats(workspace, capsys):
    root, captures, backbone = workspace["root"], workspace["captures"], workspace["backbone"]
    # Stage I on the folder of captures: both scenes, every 2nd view held out.
    lift = [
        "lift", "--scene", str(captures), "--backbone", backbone, "--out", str(root / "gaussians"), "--device", "cpu",
        "--iterations", "40", "--feature_dim", "8", "--holdout_every", "2", "--max_gaussians", "800", "--densify_from", "1000",
        "--checkpoint_interval", "0", "--bundle_sh_refine_steps", "0", "--no_previews", "--feature_lr", "0.01", "--decoder_lr", "0.01",
    ]  # fmt: skip
    assert main(lift) == 0
    lifted = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [m["scene_id"] for m in lifted] == ["kitchen", "office"]
    for m in lifted:
        metrics = json.loads((root / "gaussians" / m["scene_id"] / "metrics.json").read_text())
        assert (
            metrics["views_train"] == 4
            and metrics["views_heldout"] == 4
            and metrics["image_size"] == [48, 32]
        )
        assert (
            np.isfinite(m["psnr_heldout"]) and metrics["feature_l1_train"] < metrics["feature_l1_train_start"]
        )

    # Stage II on a comma-separated spec naming the two captures differently (a transforms.json, a COLMAP model
    # folder); its validation frames are the views Stage I held out.
    spec = f"{captures / 'kitchen' / 'transforms.json'},{captures / 'office' / 'sparse' / '0'}"
    validation = load_frames(spec, "val", holdout_every=2)
    assert list(zip(validation["scene_id"], validation["image_id"], strict=True)) == [
        (scene, f"frame_{view:05d}") for scene in ("kitchen", "office") for view in (2, 4, 6, 8)
    ]
    finetune = [
        "finetune", "--backbone", backbone, "--frames", spec, "--holdout_every", "2", "--gaussians", str(root / "gaussians"),
        "--output_dir", str(root / "run"), "--max_train_steps", "3", "--train_batch_size", "2", "--learning_rate", "1e-3",
        "--checkpointing_steps", "0", "--report_to", "none", "--consistency_pairs", "1",
    ]  # fmt: skip
    assert main(finetune) == 0
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert (
        metrics["steps"] == 3
        and np.isfinite(metrics["validation_loss"])
        and np.isfinite(metrics["consistency_after"])
    )
    assert type(AutoModel.from_pretrained(root / "run" / "fit3d")).__name__ == "FiT3DModel"
    capsys.readouterr()

    # The correspondence probe on a list file of the captures: ground truth from their (undistorted) depth.
    listing = root / "scenes.txt"
    listing.write_text("captures/kitchen\ncaptures/office\n")
    evaluate = [
        "evaluate", "--model", str(root / "run" / "fit3d"), "--probe", "correspondence", "--dataset", str(listing),
        "--split", "train", "--pairs_per_scene", "4", "--output_dir", str(root / "eval"), "--report_to", "none",
    ]  # fmt: skip
    assert main(evaluate) == 0
    results = json.loads((root / "eval" / "results.json").read_text())
    assert [row["name"] for row in results["rows"]] == ["original", "fine-tuned", "FiT3D"]
    for row in results["rows"]:
        assert 4 < row["pairs"] <= 8 and row["correspondences"] > 20  # pairs from both scenes
        assert 0 <= row["recall@5px"] <= row["recall@10px"] <= row["recall@20px"] <= 1
    # A capture without depth maps (what COLMAP and ns-process-data give): --gaussians renders its depth from Stage I.
    meta = json.loads((captures / "kitchen" / "transforms.json").read_text())
    for frame in meta["frames"]:
        del frame["depth_file_path"]
        frame["file_path"] = f"../../captures/kitchen/{frame['file_path']}"
        frame["normal_path"] = f"../../captures/kitchen/{frame['normal_path']}"
    meta["ply_file_path"] = "../../captures/kitchen/sparse_pc.ply"
    (root / "no_depth" / "kitchen").mkdir(parents=True)
    (root / "no_depth" / "kitchen" / "transforms.json").write_text(json.dumps(meta))
    no_depth = str(root / "no_depth" / "kitchen")
    evaluate = [
        "evaluate", "--model", str(root / "run" / "fit3d"), "--probe", "correspondence", "--dataset", no_depth,
        "--gaussians", str(root / "gaussians"), "--split", "train", "--pairs_per_scene", "4",
        "--output_dir", str(root / "eval_rendered"), "--report_to", "none",
    ]  # fmt: skip
    assert main(evaluate) == 0
    rows = json.loads((root / "eval_rendered" / "results.json").read_text())["rows"]
    assert all(0 < row["pairs"] <= 4 and row["correspondences"] > 0 for row in rows)
    frames = load_frames(no_depth, "train", holdout_every=0)
    assert frames[0]["depth"] is None
    filled = fill_depth_from_gaussians(frames, root / "gaussians")
    bundle = GaussianCache(root / "gaussians", torch.device("cpu"), 1e9).get("kitchen")
    for index in (0, 5):
        row = filled[index]
        expected = render_depth(bundle, torch.tensor(row["K"]), torch.tensor(row["world_to_camera"]), 48, 32)
        assert (expected > 0).float().mean() > 0.5  # the Gaussians cover most of the view
        torch.testing.assert_close(
            depth_to_tensor(row["depth"], "depth"), expected, atol=5e-4 + 1e-6, rtol=0
        )  # 16-bit mm: half a millimetre of rounding, plus float32's error at about 1.4 m
    with_depth = load_frames(spec, "val", holdout_every=2)
    assert (
        fill_depth_from_gaussians(with_depth, root / "gaussians")[0]["depth"] == with_depth[0]["depth"]
    )  # kept
    with pytest.raises(MissingInputError, match="no bundle for scene"):
        fill_depth_from_gaussians(frames, root / "missing")

    # the distorted capture was read through its undistorted cache, as pinhole frames with the centre principal point
    kitchen = read_scene(captures / "kitchen")
    assert (kitchen.frames[0].camera.cx, kitchen.frames[0].camera.cy) == (24.0, 16.0)
    assert all(".fit3d_undistorted" in frame.image_path.parts for frame in kitchen.frames)
