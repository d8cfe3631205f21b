import math

import torch

from fit3d_hf.evaluation import feature_consistency, patch_correspondences


def _look_at(center, target):
    forward = torch.tensor(target, dtype=torch.float64) - torch.tensor(center, dtype=torch.float64)
    forward /= forward.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64))
    right /= right.norm()
    down = torch.linalg.cross(forward, right)
    rotation = torch.stack([right, down, forward])  # rows: camera axes in world coordinates
    w2c = torch.eye(4, dtype=torch.float64)
    w2c[:3, :3] = rotation
    w2c[:3, 3] = -rotation @ torch.tensor(center, dtype=torch.float64)
    return w2c


def _plane_depth(K, w2c, height, width, plane_z=5.0):
    """Depth of the plane z = plane_z seen by a camera."""
    c2w = torch.linalg.inv(w2c)
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    rays = torch.stack([xs, ys, torch.ones_like(xs)], -1).double() @ torch.linalg.inv(K).T
    directions = rays @ c2w[:3, :3].T
    t = (plane_z - c2w[2, 3]) / directions[..., 2]
    return (t * rays[..., 2]).float(), c2w


def _features_of_world(K, w2c, depth, grid):
    """Features that are a fixed function of the world point under each patch centre."""
    h, w = grid
    height, width = depth.shape
    ys = ((torch.arange(h) + 0.5) * height / h).long()
    xs = ((torch.arange(w) + 0.5) * width / w).long()
    c2w = torch.linalg.inv(w2c)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    pixels = torch.stack([xx + 0.5, yy + 0.5, torch.ones_like(xx)], -1).double()
    points = (pixels @ torch.linalg.inv(K).T) * depth[yy, xx, None].double()
    world = points @ c2w[:3, :3].T + c2w[:3, 3]
    freqs = torch.arange(1, 9, dtype=torch.float64)
    return (
        torch.cat([torch.sin(world[..., :1] * freqs), torch.cos(world[..., 1:2] * freqs)], -1)
        .permute(2, 0, 1)
        .float()
    )


def test_view_paired_with_itself_maps_patch_centres_onto_themselves():
    K = torch.tensor([[50.0, 0, 40], [0, 50.0, 30], [0, 0, 1]], dtype=torch.float64)
    w2c = _look_at([0.0, 0.0, 0.0], [0.0, 0.0, 5.0])
    depth, _ = _plane_depth(K, w2c, 60, 80)
    matches = patch_correspondences(depth, K, w2c, K, w2c, (6, 8), depth_b=depth)
    assert len(matches) == 48
    torch.testing.assert_close(matches.target_pixels, matches.source_pixels, atol=1e-3, rtol=0)
    features = torch.randn(16, 6, 8)
    similarity = feature_consistency(features, features, matches, (60, 80))
    torch.testing.assert_close(similarity, torch.ones(48), atol=1e-5, rtol=0)


def test_consistent_features_score_higher_than_view_dependent_ones():
    K = torch.tensor([[60.0, 0, 40], [0, 60.0, 30], [0, 0, 1]], dtype=torch.float64)
    w2c_a = _look_at([0.0, 0.0, 0.0], [0.0, 0.0, 5.0])
    w2c_b = _look_at([0.6, 0.2, 0.3], [0.2, 0.1, 5.0])
    depth_a, _ = _plane_depth(K, w2c_a, 60, 80)
    depth_b, _ = _plane_depth(K, w2c_b, 60, 80)
    grid = (30, 40)
    features_a = _features_of_world(K, w2c_a, depth_a, grid)
    features_b = _features_of_world(K, w2c_b, depth_b, grid)
    matches = patch_correspondences(depth_a, K, w2c_a, K, w2c_b, grid, depth_b=depth_b)
    assert 0 < len(matches) < grid[0] * grid[1]  # part of A's view leaves B's image
    consistent = feature_consistency(features_a, features_b, matches, (60, 80)).mean()
    # Features tied to image position instead of the world disagree at the correspondences.
    view_dependent = feature_consistency(features_a, features_a, matches, (60, 80)).mean()
    assert consistent > 0.95
    assert view_dependent < consistent - 0.1


def test_occluded_points_are_dropped():
    K = torch.tensor([[50.0, 0, 40], [0, 50.0, 30], [0, 0, 1]], dtype=torch.float64)
    w2c = _look_at([0.0, 0.0, 0.0], [0.0, 0.0, 5.0])
    depth, _ = _plane_depth(K, w2c, 60, 80)
    occluder = depth.clone()
    occluder[:, :40] = 1.0  # something much closer covers the left half of B
    matches = patch_correspondences(depth, K, w2c, K, w2c, (6, 8), depth_b=occluder)
    assert len(matches) == 24 and torch.all(matches.target_pixels[:, 0] >= 40)
    assert not math.isnan(float(matches.target_pixels.sum()))
