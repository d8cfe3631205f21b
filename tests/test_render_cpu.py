"""The compiled CPU rasterizer equals the PyTorch reference: forward values and every gradient, op by op and
end to end, with the CUDA tests' scenes and tolerances (tests/render_helpers.py); its binning reaches every
(tile, Gaussian) pair that can matter, in depth order; it is deterministic whatever the thread count; and
render() selects it for float32 CPU tensors (else the reference, with a warning that names the cause)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from render_helpers import (
    FWD,
    GRAD,
    NAMES,
    assert_bf16_features_match_float,
    assert_fixed_geometry_skips_its_gradients,
    assert_matches,
    assert_project_gradient_through_the_clamp,
    assert_project_op_matches_reference,
    assert_render_without_graph_matches,
    assert_sh_parts_render_like_joined,
    assert_spherical_harmonics_op_matches_reference,
    cameras,
    compare_render,
    loss_weights,
    scene,
)

from fit3d_hf.render import _backend, _reference, _wrapper, backend, render
from fit3d_hf.render import rasterize as rasterize_module
from fit3d_hf.render._constants import ALPHA_THRESHOLD, TILE_SIZE
from fit3d_hf.render.spec import rasterize_per_pixel


@pytest.fixture(scope="module", autouse=True)
def _cpu_extension():
    """Skips only where no C++ compiler exists; where one does, the extension must be there (CI builds it)."""
    build = _backend._load_build_module()
    if build is not None and build.cpu_toolchain_problem() is not None:
        pytest.skip(f"no CPU rasterizer can be built here: {build.cpu_toolchain_problem()}")
    assert _backend.load_cpu_extension() is not None, _backend.cpu_extension_error()


def _weighted_sum(out, weights):
    images = (out.rgb, out.depth, out.features, out.alpha)
    return sum((image * w).sum() for image, w in zip(images, weights, strict=True))


def _compare(params, K, w2c, width, height, seed, **kwargs):
    return compare_render(params, K, w2c, width, height, seed, backend="cpu", **kwargs)


# ---- end to end ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_features,batch", [(0, 1), (3, 4), (64, 1), (384, 1)])
def test_render_matches_reference(n_features, batch):
    width, height = 75, 53  # not multiples of the tile size
    params = scene(600, n_features, seed=n_features + batch, device="cpu")
    K, w2c = cameras(batch, width, height, "cpu")
    _compare(params, K, w2c, width, height, seed=n_features)


@pytest.mark.parametrize("route", [False, True])
def test_render_with_background_and_routing(route):
    width, height = 64, 48
    params = scene(800, 20, seed=7, device="cpu")
    K, w2c = cameras(2, width, height, "cpu")
    background = torch.tensor([0.3, 0.6, 0.9])
    _compare(params, K, w2c, width, height, seed=7, background=background, feature_grad_to_geometry=route)


@pytest.mark.parametrize("n_features,alpha_clamp_grad", [(3, True), (80, True), (3, False), (80, False)])
def test_degenerate_gaussians(n_features, alpha_clamp_grad):
    """Tiny, huge (whole image), near-plane, far off-screen and behind-the-camera Gaussians, opacity 1 (alpha
    clamped at 0.99: both gradient rules through the clamp) and below 1/255."""
    width, height = 70, 50
    params = scene(1000, n_features, seed=11, device="cpu", degenerate=True)
    K, w2c = cameras(2, width, height, "cpu")
    out, grads = _compare(
        params,
        K,
        w2c,
        width,
        height,
        seed=11,
        feature_grad_to_geometry=True,
        alpha_clamp_grad=alpha_clamp_grad,
    )
    assert (out.radii[:, 200:250] == 0).all()  # the ones behind the camera (k = 50: slots 200..249)
    assert (out.radii[:, 50:100] > 0).all()  # the huge ones are drawn
    for name, g in zip(NAMES, grads, strict=True):
        assert torch.isfinite(g).all(), name


def test_alpha_clamp_rules_differ_where_the_clamp_holds():
    """With opacity-1 Gaussians, 3DGS's rule (the gradient passes the 0.99 clamp) and gsplat's (it stops)
    give different opacity gradients, each matching the reference's (checked above); elsewhere they agree."""
    width, height = 40, 30
    params = scene(200, 3, seed=12, device="cpu")
    params[3][:100] = 1.0  # alpha clamped at the centre of these
    K, w2c = cameras(1, width, height, "cpu")
    weights = loss_weights(1, 3, width, height, "cpu", seed=12)

    def opacity_grad(clamp_grad):
        leaves = [p.clone().requires_grad_(True) for p in params]
        out = render(*leaves, K, w2c, width, height, alpha_clamp_grad=clamp_grad)
        _weighted_sum(out, weights).backward()
        return leaves[3].grad

    through, stopped = opacity_grad(True), opacity_grad(False)
    assert not torch.allclose(through[:100], stopped[:100])
    torch.testing.assert_close(through[100:], stopped[100:], rtol=1e-5, atol=1e-6)


def test_sh_colours_match_reference():
    width, height = 64, 40
    params = scene(500, 8, seed=5, device="cpu", sh_coeffs=16)
    K, w2c = cameras(3, width, height, "cpu")
    _compare(params, K, w2c, width, height, seed=5)
    _compare(params, K, w2c, width, height, seed=6, sh_degree=1)


def test_larger_scene_matches_reference():
    width, height = 160, 120
    params = scene(8000, 16, seed=9, device="cpu")
    K, w2c = cameras(1, width, height, "cpu")
    _compare(params, K, w2c, width, height, seed=9)


def test_empty_scene_and_empty_image():
    K, w2c = cameras(2, 33, 17, "cpu")
    bg = torch.tensor([0.1, 0.2, 0.3])
    empty = torch.zeros(0, 3)
    out = render(
        empty,
        torch.zeros(0, 4),
        empty,
        torch.zeros(0),
        empty,
        torch.zeros(0, 4),
        K,
        w2c,
        33,
        17,
        background=bg,
    )
    assert out.backend == "cpu" and out.features.shape == (2, 4, 17, 33)
    torch.testing.assert_close(out.rgb, bg[None, :, None, None].expand(2, 3, 17, 33))
    assert torch.count_nonzero(out.alpha) == 0 and torch.count_nonzero(out.features) == 0
    # Gaussians that all lie behind the camera: nothing is binned, the gradients are zero, not missing
    params = [p.clone().requires_grad_(True) for p in scene(50, 4, seed=2, device="cpu")]
    with torch.no_grad():
        params[0][:, 2] = -3.0
    out = render(*params, K, w2c, 33, 17, background=bg)
    assert (out.radii == 0).all()
    torch.testing.assert_close(out.rgb, bg[None, :, None, None].expand(2, 3, 17, 33))
    (out.rgb.sum() + out.features.sum()).backward()
    for p in params:
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_reruns_are_bit_identical_whatever_the_thread_count():
    """Stage I's checkpoint/resume tests need bit-identical reruns: no float atomics, fixed summation order."""
    params = scene(3000, 16, seed=3, device="cpu", degenerate=True)
    K, w2c = cameras(2, 96, 72, "cpu")
    weights = loss_weights(2, 16, 96, 72, "cpu", seed=3)

    def run():
        leaves = [p.clone().requires_grad_(True) for p in params]
        out = render(*leaves, K, w2c, 96, 72, feature_grad_to_geometry=True)
        _weighted_sum(out, weights).backward()
        return [out.rgb, out.features, out.alpha, out.means2d.grad] + [p.grad for p in leaves]

    threads = torch.get_num_threads()
    first = run()
    torch.set_num_threads(1)
    try:
        single = run()
    finally:
        torch.set_num_threads(threads)
    again = run()
    for a, b, c in zip(first, single, again, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_unused_images_cost_no_gradient():
    """A loss on rgb only leaves features without gradient (None), and geometry still gets one."""
    params = scene(1000, 16, seed=4, device="cpu")
    K, w2c = cameras(1, 64, 48, "cpu")
    leaves = [p.clone().requires_grad_(True) for p in params]
    out = render(*leaves, K, w2c, 64, 48)
    out.rgb.sum().backward()
    assert leaves[5].grad is None
    assert leaves[0].grad.abs().sum() > 0 and out.means2d.grad.abs().sum() > 0


# ---- op by op: every function of the extension against its reference twin -------------------------------


def test_project_op_matches_reference():
    assert_project_op_matches_reference("cpu")


def test_project_gradient_where_the_jacobian_clamp_holds():
    assert_project_gradient_through_the_clamp("cpu")


@pytest.mark.parametrize("coeffs", [16, 9])
def test_spherical_harmonics_op_matches_reference(coeffs):
    assert_spherical_harmonics_op_matches_reference("cpu", coeffs)


def test_bf16_channels_last_features_match_float32():
    assert_bf16_features_match_float("cpu")


def test_render_without_gradients_skips_autograd():
    assert_render_without_graph_matches("cpu")


def test_sh_parameter_pair_renders_like_the_joined_coefficients():
    """3DGS's two SH parameters, read in place, give the images of their concatenation exactly and its
    gradients up to the order of float32 sums."""
    assert_sh_parts_render_like_joined("cpu")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sh_parameter_pair_is_checked(backend):
    means, quats, scales, opacities, sh, features = scene(10, 2, seed=4, device="cpu", sh_coeffs=16)
    K, w2c = cameras(1, 16, 16, "cpu")

    def call(colors, **kwargs):
        return render(
            means, quats, scales, opacities, colors, features, K, w2c, 16, 16, backend=backend, **kwargs
        )

    with pytest.raises(
        ValueError, match=r"colors\[1\] \(SH higher orders\) must have shape \(10, K - 1, 3\)"
    ):
        call((sh[:, :1], sh[:9, 1:]))
    with pytest.raises(ValueError, match=r"colors\[0\] \(SH DC terms\) must have shape \(10, 1, 3\)"):
        call((sh[:, :2], sh[:, 2:]))
    with pytest.raises(ValueError, match=r"must be a pair"):
        call((sh[:, :1], sh[:, 1:4], sh[:, 4:]))
    with pytest.raises(ValueError, match=r"sh_degree=2 needs 9 SH coefficients, colors has 4"):
        call((sh[:, :1], sh[:, 1:4]), sh_degree=2)
    out = call((sh[:, :1], sh[:, 1:4]))  # 4 coefficients: degree 1
    assert torch.allclose(out.rgb, call(sh[:, :4].contiguous()).rgb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_features,route", [(5, False), (5, True), (150, False), (150, True)])
def test_rasterize_op_matches_reference(n_features, route):
    """Same projected inputs into both rasterizers (per-camera colours, a background): isolates binning,
    compositing and its backward."""
    width, height = 83, 61
    means, quats, scales, opacities, colors, features = scene(1500, n_features, seed=23, device="cpu")
    K, w2c = cameras(2, width, height, "cpu")
    with torch.no_grad():
        means2d, conics, depths, radii = _reference._project(
            means, quats, scales, opacities, w2c, K, width, height
        )
    per_camera_colors = torch.rand(2, 1500, 3)
    background = torch.tensor([0.5, 0.25, 0.75])
    inputs = [means2d, conics, depths, per_camera_colors, opacities, features, background]
    weights = loss_weights(2, n_features, width, height, "cpu", seed=n_features)

    def run(fn, tensors, w):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        images = fn(*leaves[:6], radii, width, height, leaves[6], route)
        loss = sum((image * wi).sum() for image, wi in zip(images, w, strict=True))
        return images, torch.autograd.grad(loss, leaves)

    images, grads = run(_wrapper.rasterize, inputs, weights)
    ref_images, ref_grads = run(
        _reference._rasterize, [t.double() for t in inputs], [w.double() for w in weights]
    )
    for name, a, b in zip(("rgb", "depth", "features", "alpha"), images, ref_images, strict=True):
        assert_matches(name, a, b, **FWD)
    names = ("means2d", "conics", "depths", "colors", "opacities", "features", "background")
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert_matches(f"grad {name}", a, b, **GRAD)


def test_binning_lists_every_reachable_pair_front_to_back():
    """isect_tiles, checked against brute force: each tile's list holds every Gaussian with some pixel of the
    tile at alpha >= 1/255 (float64), is sorted by depth (ties by index), and holds no Gaussian more than once."""
    width, height = 70, 50
    means, quats, scales, opacities, _, _ = scene(600, 0, seed=31, device="cpu", degenerate=True)
    K, w2c = cameras(2, width, height, "cpu")
    ext = _backend.load_cpu_extension()
    means2d, conics, depths, radii = ext.project_fwd(
        means, quats, scales, opacities, w2c, K, width, height, 0.01, 1e10
    )
    ranges, ids, total = ext.isect_tiles(means2d, conics, opacities, depths, radii, width, height, 0)
    assert int(total) == len(ids) and int(total) > 0
    tiles_x, tiles_y = math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    for b in range(2):
        visible = torch.nonzero(radii[b] > 0)[:, 0]
        dx = xs[None].double() - means2d[b, visible, 0, None, None].double()
        dy = ys[None].double() - means2d[b, visible, 1, None, None].double()
        a_, b_, c_ = conics[b, visible].double().unbind(-1)
        sigma = 0.5 * (a_[:, None, None] * dx**2 + c_[:, None, None] * dy**2) + b_[:, None, None] * dx * dy
        alpha = opacities[visible, None, None].double() * torch.exp(-sigma)
        reach = alpha >= ALPHA_THRESHOLD * (1 + 1e-5)  # margin: float32 rounding at the threshold
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                start, end = ranges[b * tiles_x * tiles_y + ty * tiles_x + tx].tolist()
                listed = ids[start:end]
                assert len(set(listed.tolist())) == len(listed)
                key = depths[b, listed].double() * 1e7 + listed.double() / 1e4  # depth, then index
                assert (key[1:] > key[:-1]).all() or len(listed) < 2
                block = reach[:, ty * TILE_SIZE : (ty + 1) * TILE_SIZE, tx * TILE_SIZE : (tx + 1) * TILE_SIZE]
                needed = set(visible[block.flatten(1).any(1)].tolist())
                assert needed <= set(listed.tolist()), (b, ty, tx, needed - set(listed.tolist()))


@pytest.mark.parametrize("width,height,n,seed", [(70, 50, 600, 31), (129, 97, 3000, 32), (33, 17, 200, 33)])
def test_binning_matches_its_twin(width, height, n, seed):
    """isect_tiles equals `_reference._isect_tiles` exactly: the same tiles (the CPU build fuses no
    multiply-adds, so the float32 arithmetic of isect_math.h is the twin's), the same order in each tile."""
    means, quats, scales, opacities, _, _ = scene(n, 0, seed=seed, device="cpu", degenerate=True)
    K, w2c = cameras(3, width, height, "cpu")
    projected = _wrapper.project(means, quats, scales, opacities, w2c, K, width, height)
    means2d, conics, depths, radii = projected
    ranges, ids = _wrapper.isect_tiles(means2d, conics, opacities, depths, radii, width, height)
    want_ranges, want_ids = _reference._isect_tiles(means2d, conics, opacities, depths, radii, width, height)
    assert ranges.dtype == want_ranges.dtype == ids.dtype == want_ids.dtype == torch.int32
    assert len(ids) > n and torch.equal(ranges, want_ranges) and torch.equal(ids, want_ids)


def test_rasterize_op_matches_the_per_pixel_spec():
    """The compiled compositing against the literal loop of fit3d_hf/render/spec.py (forward values)."""
    width, height = 29, 23
    means, quats, scales, opacities, colors, features = scene(40, 3, seed=24, device="cpu")
    K, w2c = cameras(2, width, height, "cpu")
    means2d, conics, depths, radii = _wrapper.project(means, quats, scales, opacities, w2c, K, width, height)
    background = torch.tensor([0.5, 0.25, 0.75])
    got = _wrapper.rasterize(
        means2d, conics, depths, colors, opacities, features, radii, width, height, background
    )
    want = rasterize_per_pixel(
        means2d.double(), conics.double(), depths.double(), colors.double(), opacities.double(),
        features.double(), radii, width, height, background.double(),
    )  # fmt: skip
    assert want[3].max() > 0.5  # the scene covers the image
    for name, a, b in zip(("rgb", "depth", "features", "alpha"), got, want, strict=True):
        assert_matches(name, a, b, **FWD)


# ---- the fused feature loss -------------------------------------------------------------------------------


def _composed_feature_l1(decoded, target, mask):
    up = F.interpolate(target.double(), size=decoded.shape[-2:], mode="bilinear", align_corners=False)
    error = (decoded.double() - up).abs()
    if mask is not None:
        error = error * mask
    return error.mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_mask", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_feature_loss_kernel_matches_composed_ops(dtype, use_mask, channels_last):
    from fit3d_hf.losses import upsampled_feature_l1

    g = torch.Generator().manual_seed(0)
    decoded = torch.randn(2, 24, 58, 87, generator=g).to(dtype)
    if channels_last:
        decoded = decoded.contiguous(memory_format=torch.channels_last)
    decoded.requires_grad_(True)
    target = torch.randn(2, 24, 4, 6, generator=g).half()
    mask = torch.rand(2, 1, 58, 87, generator=g) > 0.2 if use_mask else None
    loss = upsampled_feature_l1(decoded, target, mask)
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(
        float(_composed_feature_l1(decoded.detach(), target, mask)), rel=1e-5
    )
    loss.backward(torch.tensor(2.5))
    up = F.interpolate(target.float(), size=(58, 87), mode="bilinear", align_corners=False)
    diff = decoded.detach().float() - up
    expected = 2.5 * torch.sign(diff) / decoded.numel()
    if mask is not None:
        expected = expected * mask
    decided = diff.abs() > 1e-3  # the sign may differ only where decoded and up(target) agree to rounding
    assert decoded.grad.dtype == dtype
    assert torch.equal(decoded.grad.float()[decided], expected.to(dtype).float()[decided])
    assert decided.float().mean() > 0.99


@pytest.mark.parametrize("use_mask", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_feature_l1_op_matches_its_twin(use_mask, channels_last):
    """The fused op (float32) against `_reference._feature_l1` (float64): the loss and its gradient."""
    g = torch.Generator().manual_seed(1)
    decoded = torch.randn(2, 16, 37, 53, generator=g)
    if channels_last:
        decoded = decoded.contiguous(memory_format=torch.channels_last)
    target = torch.randn(2, 16, 3, 4, generator=g)
    mask = torch.rand(2, 1, 37, 53, generator=g) > 0.3 if use_mask else None
    leaf, leaf64 = decoded.clone().requires_grad_(True), decoded.double().requires_grad_(True)
    loss = _wrapper.feature_l1(leaf, target, mask)
    want = _reference._feature_l1(leaf64, target.double(), mask)
    assert loss.dtype == want.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    (grad,) = torch.autograd.grad(loss * 3.0, leaf)
    (grad64,) = torch.autograd.grad(want * 3.0, leaf64)
    up = F.interpolate(target, size=(37, 53), mode="bilinear", align_corners=False)
    decided = (decoded - up).abs() > 1e-3  # the sign may differ only where the two agree to rounding
    assert decided.float().mean() > 0.99
    torch.testing.assert_close(grad[decided], grad64.float()[decided])


def test_feature_loss_kernel_is_used_on_the_cpu_and_deterministic(monkeypatch):
    from fit3d_hf import losses

    decoded, target = torch.randn(1, 16, 30, 40), torch.randn(1, 16, 3, 4)
    calls = []
    real = _wrapper._FeatureL1.apply
    monkeypatch.setattr(_wrapper._FeatureL1, "apply", lambda *a: calls.append(1) or real(*a))
    first = losses.upsampled_feature_l1(decoded, target)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = losses.upsampled_feature_l1(decoded, target)
    finally:
        torch.set_num_threads(threads)
    assert calls == [1, 1] and torch.equal(first, single)


# ---- backend selection -----------------------------------------------------------------------------------


def test_render_selects_the_cpu_backend_for_float32():
    params = scene(50, 2, seed=1, device="cpu")
    K, w2c = cameras(1, 20, 16, "cpu")
    assert backend("cpu") == "cpu"
    assert render(*params, K, w2c, 20, 16).backend == "cpu"
    assert render(*params, K, w2c, 20, 16, backend="reference").backend == "reference"
    doubles = [p.double() for p in params]
    assert render(*doubles, K.double(), w2c.double(), 20, 16).backend == "reference"  # float64: the spec's
    with pytest.raises(TypeError, match=r"the CPU backend renders float32 Gaussians, got torch.float64"):
        render(*doubles, K.double(), w2c.double(), 20, 16, backend="cpu")
    meta = [p.to("meta") for p in params]
    with pytest.raises(ValueError, match=r"backend='cpu' needs CPU tensors, but the Gaussians are on meta"):
        render(*meta, K.to("meta"), w2c.to("meta"), 20, 16, backend="cpu")


def test_without_the_extension_the_reference_serves_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(rasterize_module, "load_cpu_extension", lambda: None)
    monkeypatch.setattr(rasterize_module, "cpu_extension_error", lambda: "no C++ compiler found. To fix: ...")
    rasterize_module._warn_cpu_fallback.cache_clear()
    params = scene(50, 2, seed=1, device="cpu")
    K, w2c = cameras(1, 20, 16, "cpu")
    with caplog.at_level(logging.WARNING, logger=rasterize_module.__name__):
        first = render(*params, K, w2c, 20, 16)
        render(*params, K, w2c, 20, 16)
    rasterize_module._warn_cpu_fallback.cache_clear()
    assert first.backend == "reference" and backend("cpu") == "reference"
    warnings = [r.getMessage() for r in caplog.records if "PyTorch reference" in r.getMessage()]
    assert warnings == [
        "Rendering CPU tensors with the (slow) PyTorch reference: no C++ compiler found. To fix: ..."
    ]
    with pytest.raises(
        RuntimeError, match=r"backend='cpu' was requested but the CPU rasterizer is unavailable"
    ):
        render(*params, K, w2c, 20, 16, backend="cpu")


def test_extension_checks_shapes():
    """The C++ backstop: the ops refuse a wrong shape, dtype or device by name, even called directly."""
    ext = _backend.load_cpu_extension()
    means, quats, scales, opacities, colors, features = scene(50, 4, seed=2, device="cpu")
    K, w2c = cameras(2, 40, 30, "cpu")
    with pytest.raises(ValueError, match=r"quats must have shape \[50, 4\]"):
        ext.project_fwd(means, quats[:49].contiguous(), scales, opacities, w2c, K, 40, 30, 0.01, 1e10)
    with pytest.raises(ValueError, match=r"near_plane < far_plane"):
        ext.project_fwd(means, quats, scales, opacities, w2c, K, 40, 30, 0.0, 1e10)
    m2d, con, dep, radii = ext.project_fwd(means, quats, scales, opacities, w2c, K, 40, 30, 0.01, 1e10)
    with pytest.raises(ValueError, match=r"opacities must have dtype Float"):
        ext.isect_tiles(m2d, con, opacities.double(), dep, radii, 40, 30, 0)
    ranges, ids, _ = ext.isect_tiles(m2d, con, opacities, dep, radii, 40, 30, 0)
    with pytest.raises(ValueError, match=r"tile_ranges must have shape \[12, 2\]"):
        ext.rasterize_fwd(
            m2d, con, opacities, colors, dep, features, None, ranges[:5].contiguous(), ids, 40, 30, False
        )
    with pytest.raises(
        ValueError, match=r"mask must be a contiguous bool CPU tensor of shape \[1, 1, 20, 30\]"
    ):
        ext.feature_l1_fwd(
            torch.randn(1, 8, 20, 30), torch.randn(1, 8, 4, 6), torch.ones(1, 1, 30, 20, dtype=torch.bool)
        )
    with pytest.raises(RuntimeError, match=r"No compiled rasterizer for meta tensors"):
        _backend.extension_for("meta")


def test_build_recipe_makes_the_cpu_extension_without_cuda():
    """setup.py with BUILD_NO_CUDA=1 still builds the CPU extension (optional: a failed compile leaves the
    install without it), from the recipe that the JIT build uses too."""
    from pathlib import Path

    build = _backend._load_build_module()
    ext_modules, cmdclass = build.get_setuptools_extension(cuda=False)
    assert [e.name for e in ext_modules] == ["fit3d_hf._C_cpu"] and "build_ext" in cmdclass
    (extension,) = ext_modules
    assert extension.optional and "-DFIT3D_CPU_ONLY" in extension.extra_compile_args
    params = build.get_cpu_build_parameters()
    assert [str(Path(build.SOURCE_DIR.parent, s)) for s in extension.sources] == params["sources"]
    assert all(Path(s).is_file() for s in params["sources"])


def test_a_failed_optional_build_only_warns(monkeypatch):
    """torch's ninja build raises RuntimeError on a compile error, which setuptools' `optional` does not catch:
    the build command must, for the CPU extension only."""
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension

    def fail(self, ext):
        raise RuntimeError("Error building extension: compiler exploded")

    monkeypatch.setattr(BuildExtension, "build_extension", fail)
    command = _backend._load_build_module().optional_build_ext()(Distribution())
    warnings = []
    monkeypatch.setattr(command, "warn", warnings.append)
    ext_modules, _ = _backend._load_build_module().get_setuptools_extension(cuda=False)
    command.build_extension(ext_modules[0])  # optional: warns
    assert "fit3d_hf._C_cpu failed" in warnings[0] and "compiler exploded" in warnings[0]
    ext_modules[0].optional = False
    with pytest.raises(RuntimeError, match="compiler exploded"):
        command.build_extension(ext_modules[0])


def test_feature_loss_in_float64_takes_the_composed_ops():
    from fit3d_hf.losses import upsampled_feature_l1

    decoded = torch.randn(1, 4, 10, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    loss = upsampled_feature_l1(decoded, target)
    assert float(loss.detach()) == pytest.approx(
        float(_composed_feature_l1(decoded.detach(), target, None)), rel=1e-6
    )
    loss.backward()
    assert decoded.grad.dtype == torch.float64


def test_a_channels_last_feature_gradient_gives_the_planar_gradients():
    from render_helpers import feature_grads_planar_and_channels_last

    planar, channels_last = feature_grads_planar_and_channels_last("cpu")
    assert planar[5].abs().sum() > 0 and planar[0].abs().sum() > 0  # features and (routed) means
    for a, b in zip(planar, channels_last, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpu_features_come_channels_last_with_the_reference_values():
    """The CPU rasterizer writes features pixel-major (channels-last), as its tiles accumulate them."""
    params = scene(300, 12, seed=8, device="cpu")
    K, w2c = cameras(2, 40, 32, "cpu")
    out = render(*params, K, w2c, 40, 32, backend="cpu")
    want = render(*[p.double() for p in params], K.double(), w2c.double(), 40, 32, backend="reference")
    assert out.features.is_contiguous(memory_format=torch.channels_last) and not out.features.is_contiguous()
    assert out.features.shape == (2, 12, 32, 40)
    assert_matches("features", out.features, want.features, **FWD)


def test_fixed_geometry_skips_its_gradients():
    assert_fixed_geometry_skips_its_gradients("cpu")
