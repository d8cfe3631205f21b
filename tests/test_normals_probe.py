"""The surface-normal probe: the metric by hand, the convention (synthetic analytic normals agree with the normals
of their own depth maps), features that encode the normals give ~0 error, random features give chance level, the
column mapping of NYUv2-style data, and `fit3d evaluate --probe normals` on synthetic scenes."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from backbone_helpers import tiny_dinov2_config
from datasets import Dataset
from safetensors.torch import load_file

from fit3d_hf import FiT3DConfig, FiT3DModel
from fit3d_hf.errors import UsageError
from fit3d_hf.evaluation.arguments import ProbeArguments
from fit3d_hf.evaluation.columns import ColumnMapping
from fit3d_hf.evaluation.normals import (
    NormalsCropFlip,
    NormalsHeads,
    angular_errors,
    angular_loss,
    normals_rows,
    normals_scores,
)
from fit3d_hf.evaluation.normals_probe import evaluate_normals
from fit3d_hf.evaluation.samples import CachedFeatureDataset, ProbeDataset, collate_cached
from fit3d_hf.evaluation.training import train_probe
from fit3d_hf.row_decoding import normals_to_tensor, parse_axes
from fit3d_hf.scene import decode_normals, encode_normals, load_normals, read_scene
from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset, make_scene_spec, render_view


def _tilted(degrees: float) -> list[float]:
    """A unit vector `degrees` away from (0, 0, -1), tilted towards +x."""
    angle = math.radians(degrees)
    return [math.sin(angle), 0.0, -math.cos(angle)]


def test_metric_matches_a_hand_computation():
    # five pixels with ground truth at 0, 10, 25, 40 and 90 degrees from the prediction, one without
    target = torch.tensor([_tilted(a) for a in (0, 10, 25, 40, 90)] + [[0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 6)
    prediction = torch.tensor([0.0, 0.0, -3.0]).view(1, 3, 1, 1).expand(1, 3, 1, 6)  # length does not matter
    errors, valid = angular_errors(prediction, target)
    assert valid.tolist() == [[[True] * 5 + [False]]]
    np.testing.assert_allclose(errors[valid].numpy(), [0, 10, 25, 40, 90], atol=1e-6)
    scores = normals_scores(normals_rows(prediction, target))
    assert scores["num_pixels"] == 5
    assert scores["mean"] == pytest.approx((0 + 10 + 25 + 40 + 90) / 5, abs=1e-6)
    assert scores["median"] == pytest.approx(25.0, abs=0.01)
    assert (scores["within_11.25"], scores["within_22.5"], scores["within_30"]) == pytest.approx(
        (0.4, 0.4, 0.6)
    )
    # an even count: the mean of the two middle errors; rows of two batches add up to the rows of one
    rows = torch.cat(
        [
            normals_rows(prediction[..., :2], target[..., :2]),
            normals_rows(prediction[..., 2:4], target[..., 2:4]),
        ]
    )
    even = normals_scores(rows)
    assert even["median"] == pytest.approx((10 + 25) / 2, abs=0.01) and even["mean"] == pytest.approx(75 / 4)
    assert math.isnan(normals_scores(normals_rows(prediction[..., 5:], target[..., 5:]))["mean"])
    # the loss is the mean angle in radians over valid pixels (a perfect pixel costs acos(1 - 1e-4): the clamp)
    expected = (math.acos(1 - 1e-4) + math.radians(10 + 25 + 40 + 90)) / 5
    assert float(angular_loss(prediction, target)) == pytest.approx(expected, abs=1e-5)


def test_stored_normals_decode_to_the_convention():
    rng = np.random.default_rng(0)
    normals = rng.normal(size=(6, 7, 3))
    normals /= np.linalg.norm(normals, axis=2, keepdims=True)
    normals[0, 0] = 0.0  # no surface
    encoded = encode_normals(normals)
    assert encoded.dtype == np.uint8 and encoded[0, 0].tolist() == [0, 0, 0]
    decoded, valid = decode_normals(encoded)
    assert not valid[0, 0] and valid.sum() == 41
    assert np.degrees(np.arccos(np.clip((decoded * normals).sum(-1)[valid], -1, 1))).max() < 0.5
    # dataset values: 8-bit images, float arrays in either layout, another axis convention
    target = normals_to_tensor(encoded, "n")
    assert target.shape == (3, 6, 7) and float(target[:, 0, 0].abs().sum()) == 0.0
    opengl = normals * [1, -1, -1]  # x right, y up, z backwards
    torch.testing.assert_close(
        normals_to_tensor(opengl.transpose(2, 0, 1), "n", axes="x,-y,-z"),
        torch.from_numpy(normals).float().permute(2, 0, 1),
    )
    assert parse_axes("-z,x,y") == ([2, 0, 1], [-1.0, 1.0, 1.0])
    with pytest.raises(UsageError, match="normals_axes"):
        parse_axes("x,x,z")


def test_synthetic_normals_are_analytic_and_agree_with_their_depth():
    """Camera frame, OpenCV axes, unit, towards the camera: the normals of the back-projected depth map agree."""
    room = make_scene_spec(SyntheticSceneConfig(seed=4, num_views=3, width=160, height=120))
    camera = room.cameras[1]
    view = render_view(room, camera)
    normals, depth = view["normals"].astype(np.float64), view["depth"].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=2), 1.0, atol=1e-6)
    rows, cols = np.mgrid[0 : camera.height, 0 : camera.width] + 0.5
    points = np.stack(
        [(cols - camera.cx) / camera.fx * depth, (rows - camera.cy) / camera.fy * depth, depth], axis=2
    )
    assert ((normals * points).sum(-1) < 0).all()  # facing the camera
    # normals of the surface through neighbouring back-projected points, where all 3x3 pixels lie on one primitive
    tangent_u = points[1:-1, 2:] - points[1:-1, :-2]
    tangent_v = points[2:, 1:-1] - points[:-2, 1:-1]
    from_depth = np.cross(tangent_v, tangent_u)
    from_depth /= np.linalg.norm(from_depth, axis=2, keepdims=True)
    labels = view["labels"]
    same = np.ones_like(labels[1:-1, 1:-1], dtype=bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            same &= (
                labels[1 + dr : labels.shape[0] - 1 + dr, 1 + dc : labels.shape[1] - 1 + dc]
                == labels[1:-1, 1:-1]
            )
    agreement = (from_depth * normals[1:-1, 1:-1]).sum(-1)[same]
    angles = np.degrees(np.arccos(np.clip(np.abs(agreement), -1, 1)))
    assert (agreement > 0).mean() > 0.99  # the cross product's orientation is ours: towards the camera
    assert np.median(angles) < 0.5 and (angles < 5).mean() > 0.97
    # the floor's normal is the room's up axis, whatever the camera
    up = camera.camera_to_world[:3, :3] @ normals[labels == 1].T
    np.testing.assert_allclose(up.T, np.broadcast_to(room.room_to_world[:3, 2], up.T.shape), atol=1e-6)


def _normal_field(height: int, width: int, offsets: list[float]) -> torch.Tensor:
    """`[3, H, W]` unit normals varying smoothly over the image (sampled at pixel centres)."""
    a, b, c = offsets
    y, x = torch.meshgrid(
        (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij"
    )
    return F.normalize(torch.stack([0.8 * x + a, 0.6 * y + b, -1.0 + 0.3 * c * x]), dim=0)


def _smooth_normal_set(count: int, seed: int, grid=(8, 10), upsample: int = 4, noise: float = 0.0):
    """Features = a smooth normal field at the patch centres (+ 3 empty channels); targets = the field at 4x."""
    generator = torch.Generator().manual_seed(seed)
    raw, targets = [], []
    for _ in range(count):
        offsets = (torch.rand(3, generator=generator) - 0.5).tolist()
        features = torch.cat([_normal_field(*grid, offsets), torch.zeros(3, *grid)])
        raw.append({"original": features + noise * torch.randn(6, *grid, generator=generator)})
        targets.append(_normal_field(grid[0] * upsample, grid[1] * upsample, offsets))
    return CachedFeatureDataset(raw, targets)


def _random_feature_set(count: int, seed: int, grid=(8, 10), upsample: int = 4):
    """Features = noise; targets = independent normals, uniform over the hemisphere facing the camera."""
    generator = torch.Generator().manual_seed(seed)
    raw, targets = [], []
    for _ in range(count):
        size = (grid[0] * upsample, grid[1] * upsample)
        cos_theta, phi = (
            torch.rand(size, generator=generator),
            2 * math.pi * torch.rand(size, generator=generator),
        )
        sin_theta = (1 - cos_theta**2).sqrt()
        targets.append(torch.stack([sin_theta * phi.cos(), sin_theta * phi.sin(), -cos_theta]))
        raw.append({"original": torch.randn(6, *grid, generator=generator)})
    return CachedFeatureDataset(raw, targets)


def _train_and_evaluate(train_set, test_set, steps: int):
    accelerator = Accelerator(cpu=True)
    args = ProbeArguments(
        probe="normals",
        output_dir="unused",
        max_steps=steps,
        train_batch_size=4,
        learning_rate=2e-2,
        report_to="none",
    )
    heads = NormalsHeads({"original": (6, 0)})
    loader = torch.utils.data.DataLoader(train_set, batch_size=4, shuffle=True, collate_fn=collate_cached)
    # One thread: on these tiny tensors a second one only waits, and on a busy machine it costs ten times more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        heads, history = train_probe(heads, loader, args, accelerator, loader_is_sharded=True)
        test = torch.utils.data.DataLoader(test_set, batch_size=4, collate_fn=collate_cached)
        return evaluate_normals(heads, test, accelerator)["original"], history["original"]
    finally:
        torch.set_num_threads(threads)


def test_features_that_encode_the_normals_give_near_zero_error():
    scores, losses = _train_and_evaluate(
        _smooth_normal_set(16, seed=0), _smooth_normal_set(8, seed=1), steps=300
    )
    assert losses[-1] < 0.2 * losses[0]
    assert scores["num_pixels"] == 8 * 32 * 40
    assert scores["mean"] < 2.0 and scores["median"] < 1.5, scores
    assert scores["within_11.25"] > 0.99, scores


def test_random_features_give_the_chance_level():
    """Uninformative features: the best the head can do is the hemisphere's pole, whose angle to a uniform
    hemisphere normal has mean 1 rad (57.3°), median 60° and P(<t) = 1 - cos t (1.9%, 7.6%, 13.4%)."""
    scores, _ = _train_and_evaluate(
        _random_feature_set(16, seed=0), _random_feature_set(8, seed=1), steps=150
    )
    assert scores["mean"] == pytest.approx(math.degrees(1.0), abs=2.5), scores
    assert scores["median"] == pytest.approx(60.0, abs=3.0), scores
    for threshold in (11.25, 22.5, 30):
        assert scores[f"within_{threshold:g}"] == pytest.approx(
            1 - math.cos(math.radians(threshold)), abs=0.025
        ), scores


def test_crop_and_flip_keep_the_normals_consistent():
    image = torch.rand(3, 6, 8)
    normals = normals_to_tensor(
        np.dstack([np.full((6, 8), 0.6), np.linspace(-0.5, 0.5, 48).reshape(6, 8), np.full((6, 8), -0.6)])
    )
    flipped_image, flipped = NormalsCropFlip(None, flip_probability=1.0)(image, normals)
    torch.testing.assert_close(flipped_image, image.flip(-1))
    torch.testing.assert_close(flipped[0], -normals[0].flip(-1))  # mirrored surfaces face the other way in x
    torch.testing.assert_close(flipped[1:], normals[1:].flip(-1))
    cropped_image, cropped = NormalsCropFlip((4, 10), flip_probability=0.0)(image, normals)
    assert cropped_image.shape == (3, 4, 10) and cropped.shape == (3, 4, 10)
    assert float(cropped[:, :, 8:].abs().sum()) == 0.0  # padding has no ground truth


def test_nyu_style_normals_column_with_another_axis_convention():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(2, 5, 6, 3))
    truth[..., 2] = -np.abs(truth[..., 2])
    truth /= np.linalg.norm(truth, axis=-1, keepdims=True)
    data = Dataset.from_dict(
        {
            "rgb": list(rng.integers(0, 255, size=(2, 5, 6, 3), dtype=np.uint8)),
            "surface_normal": list((truth * [1, -1, -1]).astype(np.float32)),
        }
    )
    columns = ColumnMapping(image="rgb", normals="surface_normal")
    sample = ProbeDataset(data, "normals", columns, normals_axes="x,-y,-z")[1]
    torch.testing.assert_close(
        sample["target"], torch.from_numpy(truth[1]).float().permute(2, 0, 1), atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match="no column"):
        ProbeDataset(data, "normals")


@pytest.fixture(scope="module")
def probe_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("normals_probe")
    data = generate_dataset(
        root / "data",
        1,
        1,
        SyntheticSceneConfig(num_views=4, width=64, height=48, num_points=100, test_every=0),
    )
    torch.manual_seed(0)
    backbone = tiny_dinov2_config(32, patch_size=8, image_size=32)
    FiT3DModel(FiT3DConfig(backbone_config=backbone, backbone=None)).save_pretrained(root / "fit3d")
    return {"data": data, "model": root / "fit3d", "cache": root / "cache"}


def test_cli_normals_probe_three_way_table(probe_setup, tmp_path, capsys):
    from fit3d_hf.cli import main

    scene_spec = f"{probe_setup['data'] / 'scenes'}"  # a folder of scenes: the scenes builder, split by --holdout_every
    output = tmp_path / "normals"
    code = main([
        "evaluate", "--model", str(probe_setup["model"]), "--probe", "normals", "--dataset", scene_spec, "--holdout_every", "2",
        "--cache_dir", str(probe_setup["cache"]), "--max_steps", "3", "--crop_size", "32,40", "--output_dir", str(output),
        "--report_to", "none",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["probe"] == "normals" and list(summary["rows"]) == ["original", "fine-tuned", "FiT3D"]
    results = json.loads((output / "results.json").read_text())
    assert results["settings"]["train_split"] == "train" and results["settings"]["split"] == "val"
    evaluated = sum(
        len(read_scene(p).frames) // 2 for p in sorted((probe_setup["data"] / "scenes").iterdir())
    )
    for row in results["rows"]:
        assert (
            row["num_pixels"] == evaluated * 64 * 48
        )  # every pixel has an analytic normal (no anonymised views here)
        assert (
            0 <= row["median"] <= 180
            and 0 <= row["within_11.25"] <= row["within_22.5"] <= row["within_30"] <= 1
        )
        assert len(results["loss_curves"][row["variant"]]["loss"]) == 3
    table = [line for line in (output / "results.md").read_text().splitlines() if line.startswith("|")]
    assert table[0] == "| features | channels | mean ↓ | median ↓ | 11.25° ↑ | 22.5° ↑ | 30° ↑ |"
    assert [line.split("|")[2].strip() for line in table[2:]] == ["32", "32", "64"]
    assert (output / "normals_metrics.png").read_bytes()[:4] == b"\x89PNG"
    heads = load_file(output / "probe_heads.safetensors")
    assert heads["heads.fit3d.conv.weight"].shape == (3, 64, 1, 1)
    # the synthetic ground truth the probe read is the generator's analytic normals
    frame = read_scene(probe_setup["data"] / "scenes" / "synth00000").frames[1]
    truth = render_view(
        make_scene_spec(SyntheticSceneConfig(num_views=4, width=64, height=48, test_every=0)), frame.camera
    )["normals"]
    assert (
        np.degrees(np.arccos(np.clip((load_normals(frame.normal_path) * truth).sum(-1), -1, 1))).max() < 0.5
    )
