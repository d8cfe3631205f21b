import math

import numpy as np
import pytest
import torch

from fit3d_hf.gaussians import DensificationConfig, Densifier, FeatureGaussians, sh_dc_to_rgb
from fit3d_hf.geometry import quat_to_rotmat


def _grid_points(spacing=0.5, n=4):
    axis = np.arange(n) * spacing
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


def test_from_points_follows_3dgs_initialisation():
    points = _grid_points(spacing=0.5)
    colors = np.tile(np.array([[255, 128, 0]], dtype=np.uint8), (len(points), 1))
    gaussians = FeatureGaussians.from_points(points, colors, feature_dim=8)
    assert len(gaussians) == 64 and gaussians.feature_dim == 8
    # On a grid every point has at least 3 neighbours at exactly the spacing: scale = sqrt(0.25) = 0.5.
    torch.testing.assert_close(gaussians.scales, torch.full((64, 3), 0.5))
    torch.testing.assert_close(gaussians.opacities, torch.full((64,), 0.1))
    torch.testing.assert_close(gaussians.normalized_quats, torch.tensor([[1.0, 0, 0, 0]]).expand(64, 4))
    torch.testing.assert_close(
        sh_dc_to_rgb(gaussians.sh_dc[:, 0]), torch.tensor([[1.0, 128 / 255, 0.0]]).expand(64, 3)
    )
    assert gaussians.sh.shape == (64, 16, 3) and torch.all(gaussians.sh_rest == 0)
    assert torch.all(gaussians.features == 0)  # FiT3D's code initialises features with zeros
    assert gaussians.active_sh().shape == (64, 1, 3)
    for _ in range(5):
        gaussians.raise_sh_degree()
    assert gaussians.active_sh_degree == 3


def test_from_points_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        FeatureGaussians.from_points(np.zeros((0, 3)), np.zeros((0, 3)), 4)
    with pytest.raises(ValueError, match="shape"):
        FeatureGaussians(
            torch.zeros(2, 3),
            torch.zeros(3, 4),
            torch.zeros(2, 3),
            torch.zeros(2),
            torch.zeros(2, 16, 3),
            torch.zeros(2, 4),
        )


def test_quat_to_rotmat_matches_scipy():
    from scipy.spatial.transform import Rotation

    quats = torch.randn(10, 4, dtype=torch.float64)
    expected = Rotation.from_quat(quats[:, [1, 2, 3, 0]].numpy()).as_matrix()
    torch.testing.assert_close(quat_to_rotmat(quats), torch.from_numpy(expected))


def _model_and_optimizer(n=6):
    gaussians = FeatureGaussians.from_points(
        _grid_points(0.5, 2)[:n], np.full((n, 3), 100, np.uint8), feature_dim=4
    )
    optimizer = torch.optim.Adam(
        [{"params": [getattr(gaussians, name)], "lr": 0.01} for name in gaussians.PARAMETER_NAMES]
    )
    loss = sum((getattr(gaussians, name) + 1).square().sum() for name in gaussians.PARAMETER_NAMES)
    loss.backward()
    optimizer.step()
    return gaussians, optimizer


def test_densify_clones_small_splits_large_and_keeps_adam_state_aligned():
    gaussians, optimizer = _model_and_optimizer()
    with torch.no_grad():
        gaussians.log_scales[:3] = math.log(0.001)  # small: cloned
        gaussians.log_scales[3:] = math.log(1.0)  # large: split
    config = DensificationConfig(grad_threshold=1e-3, percent_dense=0.01)
    densifier = Densifier(config, scene_extent=1.0, num_gaussians=len(gaussians))
    grads = torch.zeros(6, 2)
    grads[[0, 3]] = 1.0  # only Gaussians 0 (small) and 3 (large) pass the threshold
    densifier.update_stats(grads, torch.full((6,), 5), width=100, height=80)
    before_means = gaussians.means.detach().clone()
    changes = densifier.densify_and_prune(gaussians, optimizer, prune_large=False)
    assert changes == {"cloned": 1, "split": 1, "pruned": 0, "total": 6 - 1 + 1 + 2}
    assert len(gaussians) == 8
    # The clone is an exact copy of Gaussian 0; the split children are 1/(0.8*2) of Gaussian 3's scale.
    torch.testing.assert_close(gaussians.means[5], before_means[0])  # after the 5 kept originals
    torch.testing.assert_close(gaussians.scales[-2:], torch.full((2, 3), 1.0 / 1.6))
    assert not torch.any(torch.all(gaussians.means == before_means[3], dim=1))  # the split original is gone
    for name in gaussians.PARAMETER_NAMES:
        param = getattr(gaussians, name)
        state = optimizer.state[param]
        assert state["exp_avg"].shape == param.shape and state["exp_avg_sq"].shape == param.shape
        assert any(param is p for group in optimizer.param_groups for p in group["params"])
    # New Gaussians start with zero moments, kept ones keep theirs.
    assert torch.all(optimizer.state[gaussians.means]["exp_avg"][-3:] == 0)
    assert torch.all(optimizer.state[gaussians.means]["exp_avg"][:5] != 0)


def test_prune_and_opacity_reset_and_schedule():
    gaussians, optimizer = _model_and_optimizer()
    with torch.no_grad():
        gaussians.opacity_logits[0] = -10.0  # transparent: pruned
        gaussians.log_scales[1] = math.log(5.0)  # larger than 0.1 x extent (1.0): pruned once prune_large
    config = DensificationConfig(
        densify_from=0, densify_interval=10, opacity_reset_interval=20, grad_threshold=1e9
    )
    densifier = Densifier(config, scene_extent=10.0, num_gaussians=len(gaussians))
    assert densifier.step(5, gaussians, optimizer) == {}
    changes = densifier.step(10, gaussians, optimizer)
    assert changes["pruned"] == 1 and len(gaussians) == 5
    changes = densifier.step(20, gaussians, optimizer)  # not after the first reset yet: large kept
    assert changes["opacity_reset"] == 1 and len(gaussians) == 5
    assert torch.all(gaussians.opacities <= 0.01 + 1e-6)
    assert torch.all(optimizer.state[gaussians.opacity_logits]["exp_avg"] == 0)
    with torch.no_grad():
        gaussians.opacity_logits.fill_(0.0)
    changes = densifier.step(30, gaussians, optimizer)  # after the reset: the large one goes
    assert changes["pruned"] == 1 and len(gaussians) == 4
    assert densifier.step(config.densify_until, gaussians, optimizer) == {}


def test_cap_limits_growth_to_highest_gradients():
    gaussians, optimizer = _model_and_optimizer()
    with torch.no_grad():
        gaussians.log_scales.fill_(math.log(0.001))
    densifier = Densifier(DensificationConfig(grad_threshold=1e-6, max_gaussians=8), 1.0, len(gaussians))
    densifier.update_stats(
        torch.arange(1, 7, dtype=torch.float32)[:, None].repeat(1, 2), torch.ones(6), 10, 10
    )
    changes = densifier.densify_and_prune(gaussians, optimizer, prune_large=False)
    assert changes["cloned"] == 2 and len(gaussians) == 8
    # The two clones copy the two highest-gradient Gaussians (indices 4 and 5).
    torch.testing.assert_close(gaussians.means[6:], gaussians.means[4:6])


def test_screen_size_prune_is_off_by_default_as_in_3dgs():
    """3DGS's 20 px test never fires (its radii are reset right before it): only the world-scale test prunes
    by size, unless prune_screen_size asks for the screen test."""
    results = {}
    for prune_screen_size in (False, True):
        gaussians, optimizer = _model_and_optimizer()
        config = DensificationConfig(grad_threshold=1e9, min_opacity=0.0, prune_screen_size=prune_screen_size)
        densifier = Densifier(config, scene_extent=10.0, num_gaussians=len(gaussians))
        radii = torch.tensor([100.0, 5, 5, 5, 5, 5])  # Gaussian 0 covered 100 px in some view
        densifier.update_stats(torch.zeros(6, 2), radii, width=100, height=80)
        kept_means = gaussians.means.detach()[1:].clone()
        results[prune_screen_size] = densifier.densify_and_prune(gaussians, optimizer, prune_large=True)
        if prune_screen_size:
            torch.testing.assert_close(gaussians.means.detach(), kept_means)
    assert results[False]["pruned"] == 0 and results[False]["total"] == 6
    assert results[True]["pruned"] == 1 and results[True]["total"] == 5


def _step_changes(gaussians, optimizer, extra):
    """Runs one loss/backward/step over the Gaussians and `extra`; returns which parameters moved."""
    before = {name: getattr(gaussians, name).detach().clone() for name in gaussians.PARAMETER_NAMES}
    before_extra = extra.detach().clone()
    loss = sum((getattr(gaussians, name) + 1).square().sum() for name in gaussians.PARAMETER_NAMES)
    (loss + extra.square().sum()).backward()
    return before, before_extra


def test_replaced_parameters_skip_the_next_optimizer_step_as_in_3dgs():
    """3DGS densifies between backward and step: the replaced parameters have no gradient, so Adam leaves them
    alone for that one step while other groups (the decoder) step. An opacity reset replaces only the opacity."""
    gaussians, optimizer = _model_and_optimizer()
    decoder = torch.nn.Parameter(torch.ones(3))
    optimizer.add_param_group({"params": [decoder], "lr": 0.01})
    densifier = Densifier(DensificationConfig(grad_threshold=1e9, min_opacity=0.0), 1.0, len(gaussians))

    before, before_decoder = _step_changes(gaussians, optimizer, decoder)
    densifier.densify_and_prune(
        gaussians, optimizer, prune_large=False
    )  # nothing changes but every tensor is replaced
    optimizer.step()
    for name in gaussians.PARAMETER_NAMES:
        assert torch.equal(getattr(gaussians, name), before[name]), name
    assert not torch.equal(decoder, before_decoder)

    optimizer.zero_grad(set_to_none=True)
    before, before_decoder = _step_changes(gaussians, optimizer, decoder)
    densifier.reset_opacity(gaussians, optimizer)
    reset_opacity = gaussians.opacity_logits.detach().clone()
    optimizer.step()
    assert torch.equal(gaussians.opacity_logits, reset_opacity)  # skipped the step
    for name in gaussians.PARAMETER_NAMES:
        if name != "opacity_logits":
            assert not torch.equal(getattr(gaussians, name), before[name]), name  # the others stepped
    # The opacity moments restart from zero, the step counts are kept (3DGS's replace_tensor_to_optimizer).
    state = optimizer.state[gaussians.opacity_logits]
    assert torch.all(state["exp_avg"] == 0) and torch.all(state["exp_avg_sq"] == 0)
    assert int(state["step"]) == int(optimizer.state[gaussians.means]["step"]) - 1


def test_densification_statistics_are_ndc_gradient_norms_of_visible_views():
    """3DGS's statistic: the norm of the projected centre's gradient in NDC units (x_pixel = (x_ndc + 1) W / 2,
    so a pixel gradient scales by W / 2 and H / 2), summed over the views that see the Gaussian, with the count
    of those views and the largest screen radius."""
    densifier = Densifier(DensificationConfig(), scene_extent=1.0, num_gaussians=3)
    pixel_grads = torch.tensor([[3.0, 4.0], [3.0, 4.0], [-1.0, 0.5]])
    densifier.update_stats(pixel_grads, torch.tensor([2, 0, 7]), width=100, height=80)
    densifier.update_stats(pixel_grads, torch.tensor([5, 0, 0]), width=100, height=80)
    ndc = math.hypot(3 * 50, 4 * 40)
    torch.testing.assert_close(densifier.grad_accum, torch.tensor([2 * ndc, 0.0, math.hypot(50, 20)]))
    torch.testing.assert_close(densifier.denom, torch.tensor([2.0, 0.0, 1.0]))
    torch.testing.assert_close(densifier.max_radii, torch.tensor([5.0, 0.0, 7.0]))


def test_scale_initialisation_is_the_mean_squared_distance_to_three_nearest_neighbours():
    """3DGS's distCUDA2: the mean of the squared distances to the 3 nearest other points (the k-d tree's
    parallel query against a brute-force float64 computation)."""
    from fit3d_hf.gaussians.model import mean_distance_to_neighbours

    points = np.random.default_rng(3).normal(size=(700, 3))
    squared = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(squared, np.inf)
    expected = np.sort(squared, axis=1)[:, :3].mean(axis=1)
    np.testing.assert_allclose(mean_distance_to_neighbours(points), expected, rtol=1e-12)
    two = mean_distance_to_neighbours(points[:2])  # k capped at the one other point
    assert two.tolist() == pytest.approx([squared[0, 1]] * 2)
