"""The pure-PyTorch renderer: known answers, the per-pixel spec (fit3d_hf/render/spec.py), gradchecks."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from fit3d_hf.render import _constants, _reference, _reference_compositing, render
from fit3d_hf.render._constants import MAX_ALPHA
from fit3d_hf.render.rasterize import _validate, _well_formed
from fit3d_hf.render.spec import rasterize_per_pixel

ROOT = Path(__file__).resolve().parents[1]


def _camera(f=20.0, cx=4.5, cy=4.5, dtype=torch.float64, pose=None):
    K = torch.tensor([[[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]]], dtype=dtype)
    w2c = torch.eye(4, dtype=dtype)[None] if pose is None else pose[None].to(dtype)
    return K, w2c


def _rotation_y(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3] = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=torch.float64)
    return pose


def _scene(n=4, n_features=3, dtype=torch.float64, seed=0, spread=0.25, sh_coeffs=None):
    """Gaussians in front of a camera at the origin looking down +z, all inside the image."""
    g = torch.Generator().manual_seed(seed)
    means = torch.cat(
        [(torch.rand(n, 2, generator=g) - 0.5) * spread, 1.5 + torch.rand(n, 1, generator=g)], 1
    )
    quats = torch.randn(n, 4, generator=g)
    scales = 0.03 + 0.06 * torch.rand(n, 3, generator=g)
    opacities = 0.3 + 0.5 * torch.rand(n, generator=g)
    if sh_coeffs is None:
        colors = torch.rand(n, 3, generator=g)
    else:
        colors = 0.3 * torch.randn(n, sh_coeffs, 3, generator=g)
    features = torch.randn(n, n_features, generator=g)
    return [t.to(dtype) for t in (means, quats, scales, opacities, colors, features)]


# ---- known answers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("opacity,expected_alpha", [(0.6, 0.6), (1.0, MAX_ALPHA)])
def test_single_gaussian_head_on(opacity, expected_alpha):
    f, z, s = 20.0, 2.0, 0.1
    K, w2c = _camera(f=f)
    means = torch.tensor([[0.0, 0.0, z]], dtype=torch.float64)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    scales = torch.full((1, 3), s, dtype=torch.float64)
    colors = torch.tensor([[0.2, 0.5, 0.9]], dtype=torch.float64)
    features = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    out = render(
        means, quats, scales, torch.tensor([opacity], dtype=torch.float64), colors, features, K, w2c, 9, 9
    )

    var = (f * s / z) ** 2 + 0.3  # EWA: J Sigma J^T = (f s / z)^2 I, plus the low-pass
    torch.testing.assert_close(out.means2d[0, 0], torch.tensor([4.5, 4.5], dtype=torch.float64))
    _, conics, _, _ = _reference._project(
        means, quats, scales, torch.tensor([opacity]).double(), w2c, K, 9, 9
    )
    torch.testing.assert_close(conics[0, 0], torch.tensor([1 / var, 0.0, 1 / var], dtype=torch.float64))
    assert out.radii[0, 0].item() == math.ceil(3 * math.sqrt(var))
    torch.testing.assert_close(out.rgb[0, :, 4, 4], expected_alpha * colors[0])
    torch.testing.assert_close(out.alpha[0, 0, 4, 4], torch.tensor(expected_alpha, dtype=torch.float64))
    torch.testing.assert_close(out.depth[0, 0, 4, 4], torch.tensor(expected_alpha * z, dtype=torch.float64))
    torch.testing.assert_close(out.features[0, :, 4, 4], expected_alpha * features[0])
    # one pixel right: alpha falls off as exp(-1 / (2 var))
    torch.testing.assert_close(
        out.alpha[0, 0, 4, 5],
        torch.tensor(min(MAX_ALPHA, opacity * math.exp(-0.5 / var)), dtype=torch.float64),
    )


def test_anisotropic_covariance_matches_ewa():
    """Rotated, anisotropic Gaussian off-axis: the conic is the inverse of J R Sigma R^T J^T + 0.3 I."""
    K, w2c = _camera(f=30.0, cx=5.0, cy=4.0, pose=_rotation_y(0.1))
    means = torch.tensor([[0.1, -0.05, 2.0]], dtype=torch.float64)
    quats = torch.tensor([[0.9, 0.2, -0.3, 0.1]], dtype=torch.float64)
    scales = torch.tensor([[0.05, 0.1, 0.02]], dtype=torch.float64)
    means2d, conics, depths, radii = _reference._project(
        means, quats, scales, torch.tensor([0.9]).double(), w2c, K, 10, 8
    )
    q = quats[0] / quats[0].norm()
    w, x, y, z = q.tolist()
    rot = torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ],
        dtype=torch.float64,
    )
    cov = rot @ torch.diag(scales[0] ** 2) @ rot.T
    R, t = w2c[0, :3, :3], w2c[0, :3, 3]
    p = R @ means[0] + t
    jac = torch.tensor(
        [[30.0 / p[2], 0, -30.0 * p[0] / p[2] ** 2], [0, 30.0 / p[2], -30.0 * p[1] / p[2] ** 2]]
    )
    cov2d = jac.double() @ R @ cov @ R.T @ jac.double().T + 0.3 * torch.eye(2, dtype=torch.float64)
    inv = torch.linalg.inv(cov2d)
    torch.testing.assert_close(conics[0, 0], torch.stack([inv[0, 0], inv[0, 1], inv[1, 1]]))
    torch.testing.assert_close(means2d[0, 0], torch.stack([30 * p[0] / p[2] + 5, 30 * p[1] / p[2] + 4]))
    torch.testing.assert_close(depths[0, 0], p[2])


def test_sh_degree_zero_is_constant_colour():
    means, quats, scales, opacities, sh, features = _scene(n=3, sh_coeffs=1)
    K, w2c = _camera()
    rgb = _reference._spherical_harmonics(sh, means, w2c, 0)
    torch.testing.assert_close(rgb[0], torch.clamp_min(_constants.SH_C0 * sh[:, 0] + 0.5, 0.0))
    # degree 1 depends on the view direction: a colour of +z-direction coefficient grows with d_z
    sh4 = torch.zeros(1, 4, 3, dtype=torch.float64)
    sh4[0, 2, 0] = 1.0  # basis 2 = C1 * z
    ahead = _reference._spherical_harmonics(sh4, torch.tensor([[0.0, 0.0, 2.0]]).double(), w2c, 1)
    side = _reference._spherical_harmonics(sh4, torch.tensor([[2.0, 0.0, 0.0]]).double(), w2c, 1)
    torch.testing.assert_close(ahead[0, 0, 0], torch.tensor(0.4886025119029199 + 0.5, dtype=torch.float64))
    torch.testing.assert_close(side[0, 0, 0], torch.tensor(0.5, dtype=torch.float64))


# ---- the spec (the literal 3DGS loop) as oracle --------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_per_pixel_loop(seed):
    means, quats, scales, opacities, colors, features = _scene(n=12, n_features=5, seed=seed, spread=0.6)
    K = torch.tensor(
        [[[20.0, 0, 6.0], [0, 21.0, 5.0], [0, 0, 1]], [[18.0, 0, 6.5], [0, 18.0, 4.0], [0, 0, 1]]]
    ).double()
    w2c = torch.stack([torch.eye(4, dtype=torch.float64), _rotation_y(0.15)])
    bg = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    projected = _reference._project(means, quats, scales, opacities, w2c, K, 13, 11)
    got = _reference._rasterize(*projected[:3], colors, opacities, features, projected[3], 13, 11, bg)
    want = rasterize_per_pixel(*projected[:3], colors, opacities, features, projected[3], 13, 11, bg)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_termination_matches_per_pixel_loop():
    """Many opaque Gaussians on one line of sight: compositing stops before T would drop below 1e-4."""
    n = 8
    means = torch.stack([torch.zeros(n), torch.zeros(n), 1.0 + 0.1 * torch.arange(n)], 1).double()
    quats = torch.tensor([[1.0, 0, 0, 0]]).double().repeat(n, 1)
    scales = torch.full((n, 3), 0.2).double()
    opacities = torch.full((n,), 0.95).double()
    colors = torch.rand(n, 3).double()
    features = torch.randn(n, 2).double()
    K, w2c = _camera(f=10.0)
    projected = _reference._project(means, quats, scales, opacities, w2c, K, 9, 9)
    got = _reference._rasterize(*projected[:3], colors, opacities, features, projected[3], 9, 9)
    want = rasterize_per_pixel(*projected[:3], colors, opacities, features, projected[3], 9, 9, None)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    # 0.05^3 = 1.25e-4 >= 1e-4 but 0.05^4 < 1e-4: exactly three Gaussians at the centre pixel
    torch.testing.assert_close(got[3][0, 0, 4, 4], torch.tensor(1 - 0.05**3, dtype=torch.float64))


def test_row_bands_do_not_change_the_result(monkeypatch):
    """Splitting the image into many bands (a small memory budget) gives the same images and gradients."""
    means, quats, scales, opacities, colors, features = _scene(n=10, n_features=4, spread=0.6, seed=3)
    K, w2c = _camera(f=25.0, cx=6.0, cy=6.0)

    def run():
        params = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, colors, features)]
        out = render(*params, K, w2c, 12, 12)
        loss = (out.rgb * 1.3).sum() + out.depth.sum() + (out.features**2).sum() + out.alpha.sum()
        return [out.rgb, out.features, out.alpha], torch.autograd.grad(loss, params)

    images, grads = run()
    monkeypatch.setattr(_reference_compositing, "_CHUNK_PAIRS", 7)
    images_banded, grads_banded = run()
    for a, b in zip(images + list(grads), images_banded + list(grads_banded), strict=True):
        torch.testing.assert_close(a, b)


# ---- gradients -----------------------------------------------------------------------------------------


def _two_cameras():
    """Two cameras that both see `_scene`: different intrinsics, the second turned and shifted a little."""
    K = torch.tensor(
        [
            [[20.0, 0.0, 4.5], [0.0, 20.0, 4.5], [0.0, 0.0, 1.0]],
            [[18.0, 0.0, 4.2], [0.0, 19.0, 4.7], [0.0, 0.0, 1.0]],
        ],
        dtype=torch.float64,
    )
    second = _rotation_y(0.05)
    second[:3, 3] = torch.tensor([0.02, -0.01, 0.05], dtype=torch.float64)
    return K, torch.stack([torch.eye(4, dtype=torch.float64), second])


def test_gradcheck_render_all_inputs_two_cameras():
    """Every input, the cameras included (the docstring of `render` promises camera gradients from the
    reference backend), over a batch of two cameras."""
    means, quats, scales, opacities, colors, features = _scene(n=3, n_features=2)
    K, w2c = _two_cameras()
    bg = torch.tensor([0.3, 0.1, 0.6], dtype=torch.float64)

    def fn(means, quats, scales, opacities, colors, features, background, K, w2c):
        out = render(
            means, quats, scales, opacities, colors, features, K, w2c, 9, 9, background=background,
            feature_grad_to_geometry=True,
        )  # fmt: skip
        return out.rgb, out.depth, out.features, out.alpha

    inputs = [t.requires_grad_(True) for t in (means, quats, scales, opacities, colors, features, bg, K, w2c)]
    # fast mode (random projections of the Jacobian, torch's own option): the full Jacobian of 2 x 9 x 9 pixels
    # x 7 channels against 101 inputs takes a minute on a 2-core CPU
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)
    # The camera gradients are there (not merely consistent zeros), for each camera's own intrinsics and pose.
    out = fn(*inputs)
    grad_K, grad_w2c = torch.autograd.grad(sum(o.square().sum() for o in out), [K, w2c])
    for camera in range(2):
        assert grad_K[camera, :2].abs().sum() > 0 and grad_w2c[camera, :3].abs().sum() > 0, camera


def test_gradcheck_render_sh_colours():
    means, quats, scales, opacities, sh, features = _scene(n=3, n_features=1, sh_coeffs=9, seed=2)
    K, w2c = _two_cameras()

    def fn(means, sh, w2c):
        out = render(means, quats, scales, opacities, sh, features, K, w2c, 9, 9)
        return out.rgb, out.alpha

    # the pose reaches the colours twice: through the projection and through the SH viewing direction
    assert torch.autograd.gradcheck(
        fn, [means.requires_grad_(True), sh.requires_grad_(True), w2c.requires_grad_(True)], eps=1e-6, atol=1e-5,
        fast_mode=True,
    )  # fmt: skip


def test_gradcheck_spherical_harmonics_degree_3():
    means, _, _, _, sh, _ = _scene(n=4, sh_coeffs=16, seed=4)
    _, w2c = _camera(pose=_rotation_y(0.3))
    fn = lambda sh, means: _reference._spherical_harmonics(sh, means, w2c, 3)  # noqa: E731
    assert torch.autograd.gradcheck(
        fn, [sh.requires_grad_(True), means.requires_grad_(True)], eps=1e-6, atol=1e-6
    )


def test_gradcheck_project_with_frustum_clamp():
    """Part of a Gaussian far off to the side engages the x/z clamp of the Jacobian."""
    means = torch.tensor([[0.0, 0.0, 2.0], [2.5, 0.1, 1.0]], dtype=torch.float64)
    quats = torch.tensor([[1.0, 0.2, 0.1, 0.0], [0.5, 0.5, 0.1, 0.3]], dtype=torch.float64)
    scales = torch.tensor([[0.1, 0.2, 0.05], [1.5, 1.0, 0.5]], dtype=torch.float64)
    opacities = torch.tensor([0.5, 0.9], dtype=torch.float64)
    K, w2c = _camera(f=10.0)

    def fn(means, quats, scales):
        return _reference._project(means, quats, scales, opacities, w2c, K, 9, 9)[:3]

    inputs = [t.requires_grad_(True) for t in (means, quats, scales)]
    assert (_reference._project(means, quats, scales, opacities, w2c, K, 9, 9)[3] > 0).all()
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("clamp_grad", [True, False])
def test_gradient_through_the_alpha_clamp(clamp_grad):
    """A head-on Gaussian of opacity 1: alpha = min(0.99, o G) is clamped at its centre pixel, where G = 1.

    3DGS (graphdeco's backward.cu, which FiT3D forks) differentiates o G there: d alpha / d o = G = 1.
    gsplat passes no gradient through the clamp: 0. One pixel off the centre o G < 0.99 and both agree on
    d alpha / d o = exp(-sigma) with sigma = 1 / (2 var).
    """
    f, z, s = 20.0, 2.0, 0.1
    K, w2c = _camera(f=f)
    means = torch.tensor([[0.0, 0.0, z]], dtype=torch.float64)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    scales = torch.full((1, 3), s, dtype=torch.float64)
    opacity = torch.ones(1, dtype=torch.float64, requires_grad=True)
    colors = torch.zeros(1, 3, dtype=torch.float64)

    def alpha_grad(row, col):
        out = render(means, quats, scales, opacity, colors, None, K, w2c, 9, 9, alpha_clamp_grad=clamp_grad)
        assert out.alpha[0, 0, 4, 4].item() == pytest.approx(MAX_ALPHA)
        (grad,) = torch.autograd.grad(out.alpha[0, 0, row, col], opacity)
        return grad.item()

    var = (f * s / z) ** 2 + 0.3
    assert alpha_grad(4, 4) == pytest.approx(1.0 if clamp_grad else 0.0, abs=1e-12)
    assert alpha_grad(4, 6) == pytest.approx(
        math.exp(-2.0 / var), rel=1e-9
    )  # dx = 2 px: o G = 0.21, unclamped


def _feature_loss_grads(route: bool):
    means, quats, scales, opacities, colors, features = _scene(n=4, n_features=3)
    K, w2c = _camera()
    params = [t.requires_grad_(True) for t in (means, quats, scales, opacities, colors, features)]
    out = render(*params, K, w2c, 9, 9, feature_grad_to_geometry=route)
    loss = (out.features * torch.linspace(-1, 2, 9 * 9 * 3).double().reshape(1, 3, 9, 9)).sum()
    return dict(
        zip(
            ["means", "quats", "scales", "opacities", "colors", "features"],
            torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True),
            strict=True,
        )
    )


def test_feature_loss_reaches_only_features_by_default():
    grads = _feature_loss_grads(route=False)
    for name in ("means", "quats", "scales", "opacities", "colors"):
        assert torch.count_nonzero(grads[name]) == 0, name
    assert grads["features"].abs().sum() > 0


def test_feature_loss_reaches_geometry_when_routed():
    grads = _feature_loss_grads(route=True)
    for name in ("means", "quats", "scales", "opacities", "features"):
        assert grads[name].abs().sum() > 0, name
    assert torch.count_nonzero(grads["colors"]) == 0


def test_rgb_loss_reaches_geometry_and_means2d_grad_is_retained():
    means, quats, scales, opacities, colors, features = _scene(n=4)
    K, w2c = _camera()
    params = [t.requires_grad_(True) for t in (means, quats, scales, opacities, colors, features)]
    out = render(*params, K, w2c, 9, 9)
    weights = torch.rand(out.rgb.shape, dtype=torch.float64)
    (out.rgb * weights).sum().backward()
    for p in params[:5]:
        assert p.grad.abs().sum() > 0
    # means2d.grad is dL/dmeans2d: the gradient of the same loss through the rasterizer alone
    means2d = out.means2d.detach().requires_grad_(True)
    _, conics, depths, radii = _reference._project(*[p.detach() for p in params[:4]], w2c, K, 9, 9)
    rgb = _reference._rasterize(
        means2d, conics, depths, colors.detach(), opacities.detach(), features.detach(), radii, 9, 9
    )[0]
    (expected,) = torch.autograd.grad((rgb * weights).sum(), means2d)
    torch.testing.assert_close(out.means2d.grad, expected)
    assert out.means2d.grad.abs().sum() > 0


# ---- culling, empty scenes, batches ---------------------------------------------------------------------


def test_gaussians_behind_the_camera_or_near_plane_are_culled():
    means, quats, scales, opacities, colors, features = _scene(n=4)
    K, w2c = _camera()
    behind = torch.tensor([[0.0, 0.0, -1.5], [0.05, 0.0, 0.005]], dtype=torch.float64)  # z < 0, z < near
    extra = [torch.cat([t, t[:2]]) for t in (quats, scales, opacities, colors, features)]
    out_all = render(torch.cat([means, behind]), *extra, K, w2c, 9, 9)
    out = render(means, quats, scales, opacities, colors, features, K, w2c, 9, 9)
    assert out_all.radii[0, 4:].tolist() == [0, 0]
    assert (out_all.radii[0, :4] > 0).all()
    for a, b in ((out_all.rgb, out.rgb), (out_all.features, out.features), (out_all.alpha, out.alpha)):
        torch.testing.assert_close(a, b)


def test_empty_scene_gives_background():
    K, w2c = _camera()
    empty = torch.zeros(0, 3, dtype=torch.float64)
    bg = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
    out = render(
        empty,
        torch.zeros(0, 4).double(),
        empty,
        torch.zeros(0).double(),
        empty,
        torch.zeros(0, 5).double(),
        K,
        w2c,
        7,
        5,
        background=bg,
    )
    assert out.rgb.shape == (1, 3, 5, 7) and out.features.shape == (1, 5, 5, 7)
    torch.testing.assert_close(out.rgb, bg[None, :, None, None].expand(1, 3, 5, 7))
    assert torch.count_nonzero(out.features) == 0 and torch.count_nonzero(out.alpha) == 0
    assert torch.count_nonzero(out.depth) == 0 and out.radii.shape == (1, 0)


def test_features_none_and_float32():
    means, quats, scales, opacities, colors, _ = _scene(n=4, dtype=torch.float32)
    K, w2c = _camera(dtype=torch.float32)
    out = render(
        means, quats, scales, opacities, colors, None, K, w2c, 9, 9, render_depth=False, backend="reference"
    )
    assert out.features.shape == (1, 0, 9, 9) and out.depth is None and out.rgb.dtype == torch.float32
    assert out.backend == "reference"
    assert out.alpha.max() > 0.1


def test_batch_equals_one_by_one():
    means, quats, scales, opacities, colors, features = _scene(n=6, n_features=2, spread=0.5)
    K = torch.tensor(
        [[[20.0, 0, 5.0], [0, 20.0, 4.0], [0, 0, 1]], [[15.0, 0, 4.0], [0, 16.0, 5.0], [0, 0, 1]]]
    ).double()
    w2c = torch.stack([_rotation_y(0.05), _rotation_y(-0.1)])
    batched = render(means, quats, scales, opacities, colors, features, K, w2c, 10, 9)
    for b in range(2):
        single = render(
            means, quats, scales, opacities, colors, features, K[b : b + 1], w2c[b : b + 1], 10, 9
        )
        for name in ("rgb", "features", "depth", "alpha", "radii", "means2d"):
            torch.testing.assert_close(getattr(batched, name)[b : b + 1], getattr(single, name))


# ---- bad input ----------------------------------------------------------------------------------------


def _good_args():
    means, quats, scales, opacities, colors, features = _scene(n=4)
    K, w2c = _camera()
    return dict(
        means=means,
        quats=quats,
        scales=scales,
        opacities=opacities,
        colors=colors,
        features=features,
        K=K,
        world_to_camera=w2c,
        width=9,
        height=9,
    )


BAD_INPUTS = [
    (dict(means=torch.zeros(4, 2).double()), ValueError, r"means must have shape \(N, 3\), got \(4, 2\)"),
    (dict(quats=torch.zeros(5, 4).double()), ValueError, r"quats must have shape \(4, 4\).*got \(5, 4\)"),
    (dict(opacities=torch.zeros(4, 1).double()), ValueError, r"opacities must have shape \(4,\)"),
    (
        dict(colors=torch.zeros(4)),
        ValueError,
        r"colors must have shape \(N, 3\), SH coefficients \(N, K, 3\) or the pair",
    ),
    (dict(features=torch.zeros(3, 2).double()), ValueError, r"features must have shape \(4, F\)"),
    (dict(K=torch.eye(3).double()), ValueError, r"K must have shape \(B, 3, 3\), got \(3, 3\)"),
    (
        dict(world_to_camera=torch.eye(4).double()[None].repeat(2, 1, 1)),
        ValueError,
        r"world_to_camera.*B = 1",
    ),
    (
        dict(scales=torch.zeros(4, 3, dtype=torch.int64)),
        TypeError,
        r"scales must have dtype torch.float64",
    ),
    (dict(means=torch.zeros(4, 3, dtype=torch.int32)), TypeError, r"means must have dtype"),
    (dict(opacities=[0.5] * 4), TypeError, r"opacities must be a torch.Tensor, got list"),
    (dict(width=0), ValueError, r"width must be a positive int, got 0"),
    (dict(height=9.5), ValueError, r"height must be a positive int"),
    (dict(near_plane=0.0), ValueError, r"near_plane"),
    (dict(sh_degree=1), ValueError, r"sh_degree=1 needs SH coefficients"),
    (dict(colors=torch.zeros(4, 5, 3).double()), ValueError, r"5 SH coefficients, not a square"),
    (dict(backend="cuda"), ValueError, r"backend='cuda' needs CUDA tensors"),
    (dict(backend="vulkan"), ValueError, r"backend must be one of"),
    (dict(background=torch.zeros(4).double()), ValueError, r"background must have shape \(3,\)"),
]


@pytest.mark.parametrize("change,error,pattern", BAD_INPUTS)
def test_bad_input_is_rejected(change, error, pattern):
    args = _good_args()
    args.update(change)
    positional = [
        args.pop(k)
        for k in (
            "means",
            "quats",
            "scales",
            "opacities",
            "colors",
            "features",
            "K",
            "world_to_camera",
            "width",
            "height",
        )
    ]
    with pytest.raises(error, match=pattern):
        render(*positional, **args)


def test_sh_degree_larger_than_coefficients_is_rejected():
    args = _good_args()
    args["colors"] = torch.zeros(4, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sh_degree=2 needs 9 SH coefficients, colors has 4"):
        render(*args.values(), sh_degree=2)


# ---- constants agree with the CUDA header ---------------------------------------------------------------


def test_constants_match_cuda_header():
    header = (ROOT / "rasterizer_cuda" / "constants.h").read_text()
    values = {}
    for name, expr in re.findall(r"constexpr (?:int|float) (\w+) = ([^;]+);", header):
        expr = re.sub(r"(\d)f\b", r"\1", expr)  # 1.0f -> 1.0
        values[name] = eval(expr, {}, dict(values))  # noqa: S307 (our own header; names defined above)
    for name in _constants.__all__:
        assert name in values, f"{name} missing from constants.h"
        assert values[name] == pytest.approx(getattr(_constants, name), rel=1e-7), name


_ORDER = ("means", "quats", "scales", "opacities", "colors", "features", "K", "world_to_camera", "width", "height",
          "background", "near_plane", "far_plane")  # fmt: skip


def _validation_arguments(**change):
    args = {**_good_args(), "background": None, "near_plane": 0.01, "far_plane": 1e10, **change}
    return [args[name] for name in _ORDER]


@pytest.mark.parametrize("change,error,pattern", BAD_INPUTS)
def test_the_fast_argument_check_passes_nothing_the_detailed_one_refuses(change, error, pattern):
    """render() runs its detailed checks only when a fast test of the common form fails (rasterize._well_formed)."""
    arguments = _validation_arguments(
        **{k: v for k, v in change.items() if k != "backend" and k != "sh_degree"}
    )
    try:
        _validate(*arguments)
    except (TypeError, ValueError):
        assert not _well_formed(*arguments)


def test_the_fast_argument_check_takes_the_common_forms():
    good = _good_args()
    sh = torch.randn(4, 16, 3, dtype=torch.float64)
    variants = [
        {},
        {"colors": sh},
        {"colors": (sh[:, :1], sh[:, 1:])},
        {"features": None},
        {"background": torch.zeros(3, dtype=torch.float64)},
        {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in good.items()},
    ]
    for change in variants:
        arguments = _validation_arguments(**change)
        assert _well_formed(*arguments), change.keys()
        _validate(*arguments)  # accepts too
    assert not _well_formed(
        *_validation_arguments(colors=[sh[:, :1], sh[:, 1:]])
    )  # a list: the detailed path
