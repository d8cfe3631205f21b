"""Linear probes: known-answer fits on features that determine the target, the three-way comparison from a tiny
random FiT3DModel on synthetic scenes (Python and CLI), data handling, and DDP evaluation on two processes."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from backbone_helpers import tiny_dinov2_config
from safetensors.torch import load_file

from fit3d_hf import FiT3DConfig, FiT3DModel
from fit3d_hf.evaluation.arguments import ModelArguments, ProbeArguments
from fit3d_hf.evaluation.data import ProbeDataArguments, load_probe_dataset, resolve_split
from fit3d_hf.evaluation.features import load_frozen_features
from fit3d_hf.evaluation.heads import build_probe_heads
from fit3d_hf.evaluation.probes import run_probe
from fit3d_hf.evaluation.samples import CachedFeatureDataset, ProbeDataset, collate_cached
from fit3d_hf.evaluation.segmentation_depth_probe import depth_head_options, evaluate_probe
from fit3d_hf.evaluation.training import train_probe
from fit3d_hf.evaluation.transforms import RandomScaleCropFlip
from fit3d_hf.row_decoding import label_to_tensor
from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset

DEPTH_LEVELS = torch.tensor([1.0, 2.5, 4.0, 6.0])


def _region_labels(generator, classes: int, grid: tuple[int, int], region: int = 4) -> torch.Tensor:
    """A patch-grid label map made of `region x region` patch blocks of one class each."""
    coarse = torch.randint(0, classes, (grid[0] // region, grid[1] // region), generator=generator)
    return coarse.repeat_interleave(region, 0).repeat_interleave(region, 1)


def _one_hot_segmentation_set(
    count: int, seed: int, classes: int = 5, grid=(12, 16), upsample: int = 4, noise: float = 0.1
):
    """Features = one-hot of the patch's class (+3 empty channels) plus noise; labels at 4x the grid."""
    generator = torch.Generator().manual_seed(seed)
    raw, targets = [], []
    for _ in range(count):
        labels = _region_labels(generator, classes, grid)
        features = torch.cat([F.one_hot(labels, classes).permute(2, 0, 1).float(), torch.zeros(3, *grid)])
        features += noise * torch.randn(features.shape, generator=generator)
        target = labels.repeat_interleave(upsample, 0).repeat_interleave(upsample, 1)
        target[0, :5] = 255  # a few pixels without ground truth
        raw.append({"original": features})
        targets.append(target)
    return CachedFeatureDataset(raw, targets)


def test_segmentation_probe_on_separable_features_reaches_miou_one():
    accelerator = Accelerator(cpu=True)
    args = ProbeArguments(
        probe="segmentation",
        output_dir="unused",
        max_steps=60,
        train_batch_size=4,
        learning_rate=3e-2,
        report_to="none",
    )
    heads = build_probe_heads("segmentation", {"original": (8, 0)}, num_classes=5)
    train = torch.utils.data.DataLoader(
        _one_hot_segmentation_set(32, seed=0), batch_size=4, shuffle=True, collate_fn=collate_cached
    )
    heads, history = train_probe(heads, train, args, accelerator, loader_is_sharded=True)
    assert len(history["original"]) == 60 and history["original"][-1] < 0.5 * history["original"][0]
    test = torch.utils.data.DataLoader(
        _one_hot_segmentation_set(8, seed=1), batch_size=4, collate_fn=collate_cached
    )
    scores = evaluate_probe(heads, test, args, accelerator)["original"]
    assert scores["mIoU"] >= 0.95 and scores["aAcc"] >= 0.97


def test_depth_probe_fits_a_depth_map_its_features_determine():
    # Un-normed ViT features are large; one-hot x 30 gives the bin scores a comparable reach.
    generator = torch.Generator().manual_seed(0)

    def dataset(count):
        raw, targets = [], []
        for _ in range(count):
            levels = _region_labels(generator, 4, (8, 8))
            features = 30 * F.one_hot(levels, 4).permute(2, 0, 1).float() + 0.05 * torch.randn(
                4, 8, 8, generator=generator
            )
            raw.append({"original": features, "original_cls": torch.randn(2, generator=generator)})
            targets.append(DEPTH_LEVELS[levels].repeat_interleave(4, 0).repeat_interleave(4, 1))
        return CachedFeatureDataset(raw, targets)

    accelerator = Accelerator(cpu=True)
    args = ProbeArguments(
        probe="depth", output_dir="unused", max_steps=150, train_batch_size=4, learning_rate=0.1, warmup_steps=0,
        max_depth=10.0, report_to="none",
    )  # fmt: skip
    heads = build_probe_heads("depth", {"original": (4, 2)}, **depth_head_options(args))
    assert heads.heads["original"].conv_depth.in_channels == 6 and heads.heads["original"].bins.numel() == 256
    train = torch.utils.data.DataLoader(dataset(32), batch_size=4, shuffle=True, collate_fn=collate_cached)
    heads, _ = train_probe(heads, train, args, accelerator, loader_is_sharded=True)
    scores = evaluate_probe(
        heads,
        torch.utils.data.DataLoader(dataset(8), batch_size=4, collate_fn=collate_cached),
        args,
        accelerator,
    )
    assert (
        scores["original"]["abs_rel"] < 0.1
        and scores["original"]["delta1"] > 0.95
        and scores["original"]["rmse"] < 0.4
    )


# ----------------------------------------------------------------------------------------------------
# The three-way comparison on synthetic scenes


@pytest.fixture(scope="module")
def synthetic_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_data")
    data = generate_dataset(
        root / "data", num_scenes=1, num_val_scenes=1,
        config=SyntheticSceneConfig(num_views=6, width=112, height=84, num_points=100, test_every=0),
    )  # fmt: skip
    backbone = tiny_dinov2_config(32, patch_size=14, image_size=28)
    torch.manual_seed(0)
    model = FiT3DModel(FiT3DConfig(backbone_config=backbone, backbone=None))
    model.save_pretrained(root / "fit3d")
    model.original.save_pretrained(root / "baseline")
    return {"data": data, "model": root / "fit3d", "baseline": root / "baseline", "cache": root / "cache"}


def test_cli_three_way_segmentation_table_from_a_tiny_fit3d_model(synthetic_setup, tmp_path, capsys):
    from fit3d_hf.cli import main

    output = tmp_path / "seg"
    code = main([
        "evaluate", "--model", str(synthetic_setup["model"]), "--probe", "segmentation",
        "--dataset", f"scannetpp:{synthetic_setup['data']}", "--cache_dir", str(synthetic_setup["cache"]),
        "--class_names", "wall,floor,ceiling,box,sphere", "--no_augment", "--max_steps", "8",
        "--output_dir", str(output), "--report_to", "none",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(summary["rows"]) == ["original", "fine-tuned", "FiT3D"]
    markdown = (output / "results.md").read_text().splitlines()
    table = [line for line in markdown if line.startswith("|")]
    assert table[0] == "| features | channels | mIoU ↑ | mAcc ↑ | aAcc ↑ |"
    assert [line.split("|")[1].strip() for line in table[2:]] == ["original", "fine-tuned", "FiT3D"]
    assert [line.split("|")[2].strip() for line in table[2:]] == ["32", "32", "64"]
    results = json.loads((output / "results.json").read_text())
    assert results["settings"]["train_split"] == "train" and results["settings"]["split"] == "val"
    for row in results["rows"]:
        assert 0.0 <= row["mIoU"] <= 1.0 and 0.0 <= row["aAcc"] <= 1.0
        assert set(results["per_class"][row["variant"]]) == {"wall", "floor", "ceiling", "box", "sphere"}
        assert len(results["loss_curves"][row["variant"]]["loss"]) == 8
    for name in ("per_class_iou.png", "training_loss.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heads = load_file(output / "probe_heads.safetensors")
    assert heads["heads.fit3d.classifier.weight"].shape == (5, 64, 1, 1)
    assert heads["heads.original.norm.running_mean"].shape == (32,)


def test_depth_probe_with_augmentation_and_baseline_row(synthetic_setup, tmp_path):
    output = tmp_path / "depth"
    results = run_probe(
        ModelArguments(model=str(synthetic_setup["model"]), baseline=str(synthetic_setup["baseline"])),
        ProbeDataArguments(dataset=f"scannetpp:{synthetic_setup['data']}", cache_dir=str(synthetic_setup["cache"])),
        ProbeArguments(
            probe="depth", output_dir=str(output), max_steps=4, crop_size="56,84", train_batch_size=2, max_depth=20.0,
            report_to="none",
        ),
    )  # fmt: skip
    rows = {row["variant"]: row for row in results["rows"]}
    assert list(rows) == ["original", "finetuned", "fit3d", "baseline"]
    # Features ⊕ CLS: the FiT3D head gets 2 x 32 feature channels + the original's 32-channel CLS.
    assert [rows[v]["channels"] for v in rows] == [64, 64, 96, 64]
    heads = load_file(output / "probe_heads.safetensors")
    assert heads["heads.fit3d.conv_depth.weight"].shape == (256, 96, 1, 1)
    for row in rows.values():
        # Relations every correct computation satisfies, image by image and so on their means (range checks such
        # as 0 < rmse < max_depth would fail only on NaN): an RMS is at least the mean absolute value
        # (rmse_log vs log10, in natural-log units), a standard deviation at most the RMS (silog vs rmse_log),
        # and the delta thresholds are nested.
        assert row["num_images"] == 6
        assert row["rmse_log"] >= math.log(10) * row["log10"] - 1e-9, row
        assert 0 < row["silog"] <= 100 * row["rmse_log"] + 1e-9, row
        assert 0 <= row["delta1"] <= row["delta2"] <= row["delta3"] <= 1, row
        assert row["rmse"] > 0 and row["abs_rel"] > 0 and row["sq_rel"] > 0, row
    # The baseline is the original backbone, so its probe input (un-normed features, CLS) equals the original's.
    features = load_frozen_features(str(synthetic_setup["model"]), str(synthetic_setup["baseline"]))
    raw = features(torch.rand(2, 3, 56, 70), depth_input=True)
    torch.testing.assert_close(raw["baseline"], raw["original"])
    torch.testing.assert_close(raw["baseline_cls"], raw["original_cls"])
    assert not torch.allclose(
        raw["original"], features(torch.rand(2, 3, 56, 70))["original"]
    )  # final norm differs
    table = (output / "results.md").read_text()
    assert "| features | channels | RMSE ↓ | AbsRel ↓ | δ<1.25 ↑ |" in table
    assert (output / "depth_metrics.png").is_file()


def test_correspondence_probe_three_way_report(synthetic_setup, tmp_path):
    output = tmp_path / "corr"
    results = run_probe(
        ModelArguments(model=str(synthetic_setup["model"])),
        ProbeDataArguments(
            dataset=f"scannetpp:{synthetic_setup['data']}", cache_dir=str(synthetic_setup["cache"])
        ),
        ProbeArguments(probe="correspondence", output_dir=str(output), pairs_per_scene=8, report_to="none"),
    )
    assert [row["name"] for row in results["rows"]] == ["original", "fine-tuned", "FiT3D"]
    assert results["bin_labels"] == ["0-15°", "15-30°", "30-60°", ">60°"]
    pairs = results["rows"][0]["pairs"]
    assert 0 < pairs <= 8 and all(row["pairs"] == pairs for row in results["rows"])
    for row in results["rows"]:
        assert 0 <= row["recall@5px"] <= row["recall@10px"] <= row["recall@20px"] <= 1
        assert sum(results["curves"][row["variant"]]["pairs"]) == pairs
    markdown = (output / "results.md").read_text()
    assert (
        "| features | channels | recall@5px ↑ | recall@10px ↑ | recall@20px ↑ | pairs | correspondences |"
        in markdown
    )
    assert "## recall@10px by viewpoint change" in markdown
    assert (output / "recall_vs_viewpoint.png").is_file()


# ----------------------------------------------------------------------------------------------------
# Data


def test_augmentation_keeps_sizes_and_values():
    torch.manual_seed(0)
    image = torch.rand(3, 40, 60)
    labels = torch.randint(0, 4, (40, 60))
    depth = torch.tensor([1.0, 2.0, 3.5])[torch.randint(0, 3, (40, 60))]
    segmentation = RandomScaleCropFlip((32, 48), (0.5, 2.0), short_side=30, fill=255, cat_max_ratio=0.75)
    depth_crop = RandomScaleCropFlip((48, 70), (1.0, 1.0), fill=0)  # larger than the image: padded
    for _ in range(10):
        out_image, out_labels = segmentation(image, labels)
        assert out_image.shape == (3, 32, 48) and out_labels.shape == (32, 48)
        assert set(out_labels.unique().tolist()) <= {0, 1, 2, 3, 255}
        assert 0 <= out_image.min() and out_image.max() <= 1
        _, out_depth = depth_crop(image, depth)
        assert out_depth.shape == (48, 70)
        assert set(out_depth.unique().tolist()) <= {0.0, 1.0, 2.0, 3.5}  # nearest: no invented depths
        assert (out_depth == 0).sum() == 48 * 70 - 40 * 60  # exactly the padding


def test_labels_with_reduce_zero_label():
    label = label_to_tensor(
        np.array([[0, 1, 2], [150, 255, 3]], dtype=np.uint8), "label", reduce_zero_label=True
    )
    assert label.tolist() == [[255, 0, 1], [149, 255, 2]]


def test_parquet_dataset_with_column_mapping_and_masks(tmp_path):
    import datasets
    from PIL import Image

    rows = {"pixels": [], "seg": [], "valid": []}
    for value in range(3):
        rows["pixels"].append(Image.fromarray(np.full((20, 30, 3), 40 * value, dtype=np.uint8)))
        rows["seg"].append(Image.fromarray(np.full((20, 30), value, dtype=np.uint8)))
        valid = np.full((20, 30), 255, dtype=np.uint8)
        valid[:, :10] = 0
        rows["valid"].append(Image.fromarray(valid))
    features = datasets.Features(
        {"pixels": datasets.Image(), "seg": datasets.Image(), "valid": datasets.Image()}
    )
    path = tmp_path / "probe.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))

    splits = load_probe_dataset(str(path))
    assert list(splits) == ["train"]
    with pytest.raises(ValueError, match=r"no eval split .* splits are \['train'\]"):
        resolve_split(splits, None, "eval")
    assert resolve_split(splits, "train", "eval")[0] == "train"
    with pytest.raises(ValueError, match="label_column"):
        ProbeDataset(splits["train"], "segmentation")  # the default column names are not there
    from fit3d_hf.evaluation.columns import ColumnMapping

    dataset = ProbeDataset(
        splits["train"], "segmentation", ColumnMapping(image="pixels", label="seg", mask="valid")
    )
    sample = dataset[2]
    assert sample["image"].shape == (3, 20, 30) and sample["image"][0, 0, 0].item() == pytest.approx(80 / 255)
    assert (sample["target"][:, :10] == 255).all() and (sample["target"][:, 10:] == 2).all()


def test_scannetpp_split_aliases(synthetic_setup):
    splits = load_probe_dataset(
        f"scannetpp:{synthetic_setup['data']}", cache_dir=str(synthetic_setup["cache"])
    )
    assert resolve_split(splits, "validation", "eval")[0] == "val"
    assert resolve_split(splits, None, "eval")[0] == "val"
    dataset = ProbeDataset(splits["val"], "depth")
    sample = dataset[0]
    assert (
        sample["target"].dtype == torch.float32 and 0.3 < sample["target"][sample["target"] > 0].mean() < 10
    )


# ----------------------------------------------------------------------------------------------------
# Two processes


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_training_script_on_two_processes_matches_single_process_evaluation(synthetic_setup, tmp_path):
    """DDP training through `accelerate launch training/evaluate_probe.py` on two CPU processes (gloo); the
    gathered scores equal a one-process evaluation of the saved heads (5 images: one padded duplicate dropped)."""
    import sys
    from pathlib import Path

    from fit3d_hf.evaluation.columns import ColumnMapping
    from fit3d_hf.evaluation.samples import collate_probe_samples

    output = tmp_path / "ddp"
    repo = Path(__file__).resolve().parents[1]
    launcher = Path(sys.executable).parent / "accelerate"
    command = [
        str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(repo / "training" / "evaluate_probe.py"),
        "--model", str(synthetic_setup["model"]), "--probe", "segmentation", "--dataset", f"scannetpp:{synthetic_setup['data']}",
        "--cache_dir", str(synthetic_setup["cache"]), "--no_augment", "--max_steps", "3", "--max_eval_samples", "5",
        "--eval_mode", "whole", "--num_classes", "5", "--output_dir", str(output), "--report_to", "none",
    ]  # fmt: skip
    # Hard timeout; a hang at gloo's teardown fails naming it (see distributed_helpers).
    from distributed_helpers import run_processes

    def written():
        return f"{output / 'results.json'} written" if (output / "results.json").is_file() else None

    run_processes(
        [command],
        [tmp_path / "ddp.log"],
        timeout=300,
        finished=written,
        what="the probe script on 2 gloo processes",
    )
    results = json.loads((output / "results.json").read_text())
    assert results["settings"]["num_processes"] == 2

    accelerator = Accelerator(cpu=True)
    args = ProbeArguments(
        probe="segmentation", output_dir=str(output), eval_mode="whole", augment=False, report_to="none"
    )
    features = load_frozen_features(str(synthetic_setup["model"]))
    heads = build_probe_heads(
        "segmentation", {v: features.channels(v) for v in features.variants}, num_classes=5
    )
    heads.load_state_dict(load_file(output / "probe_heads.safetensors"))
    splits = load_probe_dataset(
        f"scannetpp:{synthetic_setup['data']}", cache_dir=str(synthetic_setup["cache"])
    )
    dataset = ProbeDataset(splits["val"].select(range(5)), "segmentation", ColumnMapping(mask="mask"))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=collate_probe_samples)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # as in the launched processes: the same kernels give the same features, bit for bit
    try:
        single = evaluate_probe(heads, loader, args, accelerator, features)
    finally:
        torch.set_num_threads(threads)
    for row in results["rows"]:
        for key in ("mIoU", "mAcc", "aAcc"):
            assert row[key] == pytest.approx(single[row["variant"]][key], abs=1e-12)
