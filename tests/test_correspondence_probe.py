"""The correspondence probe on synthetic scenes: mutual-nearest-neighbour matching, recall against the ground truth
from depth and poses, and its fall with the viewpoint change for features that are not 3D-consistent."""

import math

import pytest
import torch

from fit3d_hf.evaluation.correspondence import (
    correspondence_recall,
    mutual_nearest_neighbours,
    patch_centres,
    patch_correspondences,
    viewpoint_angle,
)
from fit3d_hf.evaluation.correspondence_probe import (
    CorrespondenceProbeOptions,
    angle_bin,
    angle_bin_labels,
    correspondence_probe,
)
from fit3d_hf.evaluation.data import load_probe_dataset
from fit3d_hf.evaluation.samples import ProbeDataset
from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset

PATCH = 8  # patch side of the test features: a 10 x 14 grid on 112 x 84 images


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """A synthetic validation scene of 24 views around a room, as a correspondence `ProbeDataset`."""
    root = tmp_path_factory.mktemp("corr")
    config = SyntheticSceneConfig(num_views=24, width=112, height=84, num_points=100, anonymised_every=0)
    generate_dataset(root / "data", num_scenes=1, num_val_scenes=1, config=config)
    splits = load_probe_dataset(f"scannetpp:{root / 'data'}", cache_dir=str(root / "cache"))
    return ProbeDataset(splits["val"], "correspondence")


def _world_points(sample: dict, grid: tuple[int, int]) -> torch.Tensor:
    """`[h * w, 3]` world points under the patch centres of a view (from its depth and pose)."""
    height, width = sample["image"].shape[-2:]
    centres = patch_centres(grid, (height, width)).double()
    depth = sample["depth"][centres[:, 1].long(), centres[:, 0].long()].double()
    rays = (
        torch.cat([centres, torch.ones(len(centres), 1, dtype=torch.float64)], 1)
        @ torch.linalg.inv(sample["K"]).T
    )
    camera_to_world = torch.linalg.inv(sample["world_to_camera"])
    return (rays * depth[:, None]) @ camera_to_world[:3, :3].T + camera_to_world[:3, 3]


def _feature_table(dataset: ProbeDataset) -> dict[bytes, dict[str, torch.Tensor]]:
    """Per view (keyed by its image bytes), three kinds of dense features on the 8-pixel patch grid:
    "world": random Fourier features of the world point under each patch (3D-consistent by construction);
    "mixed": the same plus a term that depends on the patch's image position (view-dependent);
    "random": independent noise per view."""
    generator = torch.Generator().manual_seed(0)
    world_frequencies = 2.0 * torch.randn(3, 32, generator=generator, dtype=torch.float64)
    pixel_frequencies = 0.05 * torch.randn(2, 16, generator=generator, dtype=torch.float64)
    table = {}
    for index in range(len(dataset)):
        sample = dataset[index]
        height, width = sample["image"].shape[-2:]
        grid = (height // PATCH, width // PATCH)
        world = _world_points(sample, grid) @ world_frequencies
        pixels = patch_centres(grid, (height, width)).double() @ pixel_frequencies
        world_features = torch.cat([world.sin(), world.cos()], 1)
        pixel_features = torch.cat([pixels.sin(), pixels.cos()], 1)
        table[sample["image"].numpy().tobytes()] = {
            "world": world_features.T.reshape(-1, *grid).float(),
            "mixed": torch.cat([world_features, 1.5 * pixel_features], 1).T.reshape(-1, *grid).float(),
            "random": torch.randn(64, *grid, generator=generator),
        }
    return table


def test_mutual_nearest_neighbours_and_viewpoint_angle():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.0]]).T  # [D, N]
    b = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.1, 0.0]]).T
    index_a, index_b = mutual_nearest_neighbours(a, b)
    # a0 <-> b1 (cosine), a1 <-> b0; a2's nearest is b1, whose nearest is a0: not mutual.
    assert sorted(zip(index_a.tolist(), index_b.tolist(), strict=True)) == [(0, 1), (1, 0)]

    turn = torch.eye(4, dtype=torch.float64)
    angle = math.radians(40)
    turn[:3, :3] = torch.tensor(
        [[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]]
    )
    assert viewpoint_angle(torch.eye(4), turn) == pytest.approx(40.0)
    assert angle_bin_labels([0, 15, 30, 60, 180]) == ["0-15°", "15-30°", "30-60°", ">60°"]
    assert [angle_bin(a, [0, 15, 30, 60, 180]) for a in (0.0, 14.9, 15.0, 59.0, 180.0)] == [0, 0, 1, 2, 3]


def test_recall_is_one_for_a_view_paired_with_itself(views):
    sample = views[5]
    height, width = sample["image"].shape[-2:]
    grid = (height // PATCH, width // PATCH)
    features = torch.randn(16, *grid)
    matches = patch_correspondences(
        sample["depth"], sample["K"], sample["world_to_camera"], sample["K"], sample["world_to_camera"], grid,
        depth_b=sample["depth"],
    )  # fmt: skip
    assert len(matches) == grid[0] * grid[1]  # every patch sees itself
    counts = correspondence_recall(features, features, matches, (height, width), (5.0, 10.0, 20.0))
    assert counts["hits"] == [len(matches)] * 3 and counts["mutual"] == len(matches)
    assert counts["errors"].max().item() < 1e-3
    # A shuffled copy of the features maps every patch elsewhere.
    shuffled = features.flatten(1)[:, torch.randperm(grid[0] * grid[1])].reshape(features.shape)
    assert correspondence_recall(features, shuffled, matches, (height, width), (5.0,))["hits"][0] < 0.1 * len(
        matches
    )


def test_recall_of_3d_consistent_features_is_high_and_view_dependent_features_fall_with_viewpoint_change(
    views,
):
    table = _feature_table(views)

    def extract(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: value[None] for name, value in table[images[0].numpy().tobytes()].items()}

    options = CorrespondenceProbeOptions(pairs_per_scene=40, seed=0)
    summary = correspondence_probe(extract, ["world", "mixed", "random"], PATCH, views, options)
    assert summary["bin_labels"] == ["0-15°", "15-30°", "30-60°", ">60°"]
    for name in ("world", "mixed", "random"):
        assert summary["curves"][name]["pairs"] == [10, 10, 10, 10]  # every bin filled
    world, mixed, random = (summary["rows"][name] for name in ("world", "mixed", "random"))
    assert world["pairs"] == 40 and world["correspondences"] > 1000
    # 3D-consistent features find their correspondences; independent noise does not (chance level).
    assert world["recall@10px"] > 0.75 and world["recall@5px"] > 0.7
    assert random["recall@10px"] < 0.05
    assert world["recall@10px"] > mixed["recall@10px"] > random["recall@10px"]
    # Features tied to image position agree for small viewpoint changes and fail for large ones.
    curve = summary["curves"]["mixed"]["recall@10px"]
    assert all(earlier > later for earlier, later in zip(curve, curve[1:], strict=False))
    assert curve[0] > 0.8 and curve[-1] < 0.5
    assert summary["curves"]["world"]["recall@10px"][-1] > curve[-1] + 0.2
