"""The CUDA rasterizer equals the PyTorch reference: forward values and every gradient, op by op, end to end.

The reference runs in float64 on the same GPU; the CUDA backend in float32. The scenes and comparisons are
shared with the CPU backend's tests (tests/render_helpers.py, whose docstring explains the two criteria of
`assert_matches`).
"""

from __future__ import annotations

import pytest
import torch
from render_helpers import (
    FWD,
    GRAD,
    NAMES,
    assert_bf16_features_match_float,
    assert_fixed_geometry_skips_its_gradients,
    assert_project_gradient_through_the_clamp,
    assert_project_op_matches_reference,
    assert_render_without_graph_matches,
    assert_sh_parts_render_like_joined,
    assert_spherical_harmonics_op_matches_reference,
    compare_render,
)
from render_helpers import assert_matches as _assert_matches
from render_helpers import cameras as _cameras
from render_helpers import loss_weights as _loss_weights
from render_helpers import scene as _scene

from fit3d_hf.render import _binning, _reference, _wrapper, render
from fit3d_hf.render._backend import load_extension

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", autouse=True)
def _extension():
    if not torch.cuda.is_available() or load_extension() is None:
        from fit3d_hf.render._backend import extension_error

        pytest.skip(f"CUDA rasterizer unavailable: {extension_error()}")


def _compare_render(params, K, w2c, width, height, seed, **kwargs):
    return compare_render(params, K, w2c, width, height, seed, backend="cuda", **kwargs)


# ---- end to end ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_features", [0, 3, 16, 64, 128, 384])
@pytest.mark.parametrize("batch", [1, 4])
def test_render_matches_reference(n_features, batch):
    width, height = 75, 53  # not multiples of the tile size
    params = _scene(600, n_features, seed=n_features + batch, device="cuda")
    K, w2c = _cameras(batch, width, height, "cuda")
    _compare_render(params, K, w2c, width, height, seed=n_features)


@pytest.mark.parametrize("route", [False, True])
def test_render_with_background_and_routing(route):
    width, height = 64, 48
    params = _scene(800, 20, seed=7, device="cuda")
    K, w2c = _cameras(2, width, height, "cuda")
    background = torch.tensor([0.3, 0.6, 0.9], device="cuda")
    _compare_render(
        params, K, w2c, width, height, seed=7, background=background, feature_grad_to_geometry=route
    )


@pytest.mark.parametrize("n_features,alpha_clamp_grad", [(3, True), (80, True), (3, False), (80, False)])
def test_degenerate_gaussians(n_features, alpha_clamp_grad):
    """Includes Gaussians of opacity 1 (alpha clamped at 0.99): both gradient rules through the clamp."""
    width, height = 70, 50
    params = _scene(1000, n_features, seed=11, device="cuda", degenerate=True)
    K, w2c = _cameras(2, width, height, "cuda")
    out, grads = _compare_render(
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
    for name, g in zip(NAMES, grads, strict=True):
        assert torch.isfinite(g).all(), name


def test_sh_colours_match_reference():
    width, height = 64, 40
    params = _scene(500, 8, seed=5, device="cuda", sh_coeffs=16)
    K, w2c = _cameras(3, width, height, "cuda")
    _compare_render(params, K, w2c, width, height, seed=5)
    _compare_render(params, K, w2c, width, height, seed=6, sh_degree=1)


def test_larger_scene_matches_reference():
    width, height = 240, 176
    params = _scene(20_000, 32, seed=9, device="cuda")
    K, w2c = _cameras(1, width, height, "cuda")
    _compare_render(params, K, w2c, width, height, seed=9)


def test_forward_is_deterministic_and_features_may_be_none():
    params = _scene(2000, 0, seed=3, device="cuda")
    K, w2c = _cameras(2, 80, 60, "cuda")
    a = render(*params[:5], None, K, w2c, 80, 60)
    b = render(*params[:5], None, K, w2c, 80, 60)
    assert a.backend == "cuda" and a.features.shape == (2, 0, 60, 80)
    for name in ("rgb", "depth", "alpha", "radii", "means2d"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_empty_scene():
    K, w2c = _cameras(2, 33, 17, "cuda")
    empty = torch.zeros(0, 3, device="cuda")
    bg = torch.tensor([0.1, 0.2, 0.3], device="cuda")
    out = render(
        empty,
        torch.zeros(0, 4, device="cuda"),
        empty,
        torch.zeros(0, device="cuda"),
        empty,
        torch.zeros(0, 4, device="cuda"),
        K,
        w2c,
        33,
        17,
        background=bg,
    )
    assert out.backend == "cuda"
    torch.testing.assert_close(out.rgb, bg[None, :, None, None].expand(2, 3, 17, 33))
    assert torch.count_nonzero(out.alpha) == 0 and torch.count_nonzero(out.features) == 0


# ---- op by op: every *_fwd in ext.cpp against its reference twin ------------------------------------------


def test_project_op_matches_reference():
    assert_project_op_matches_reference("cuda")


def test_project_gradient_where_the_jacobian_clamp_holds():
    assert_project_gradient_through_the_clamp("cuda")


@pytest.mark.parametrize("coeffs", [16, 9])
def test_spherical_harmonics_op_matches_reference(coeffs):
    assert_spherical_harmonics_op_matches_reference("cuda", coeffs)


def test_bf16_channels_last_features_match_float32():
    assert_bf16_features_match_float("cuda")


def test_render_without_gradients_skips_autograd():
    assert_render_without_graph_matches("cuda")


def test_fixed_geometry_skips_its_gradients():
    assert_fixed_geometry_skips_its_gradients("cuda")


def test_sh_parameter_pair_renders_like_the_joined_coefficients():
    """3DGS's two SH parameters, read in place, give the images of their concatenation exactly and its
    gradients up to the order of float32 sums."""
    assert_sh_parts_render_like_joined("cuda")


@pytest.mark.parametrize("n_features,route", [(5, False), (5, True), (150, False), (150, True)])
def test_rasterize_op_matches_reference(n_features, route):
    """Same projected inputs into both rasterizers: isolates compositing, binning and its backward."""
    width, height = 83, 61
    means, quats, scales, opacities, colors, features = _scene(1500, n_features, seed=23, device="cuda")
    K, w2c = _cameras(2, width, height, "cuda")
    with torch.no_grad():
        means2d, conics, depths, radii = _reference._project(
            means, quats, scales, opacities, w2c, K, width, height
        )
    per_camera_colors = torch.rand(2, 1500, 3, device="cuda")
    background = torch.tensor([0.5, 0.25, 0.75], device="cuda")
    inputs = [means2d, conics, depths, per_camera_colors, opacities, features, background]
    weights = _loss_weights(2, n_features, width, height, "cuda", seed=n_features)

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
        _assert_matches(name, a, b, **FWD)
    names = ("means2d", "conics", "depths", "colors", "opacities", "features", "background")
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        _assert_matches(f"grad {name}", a, b, **GRAD)


def test_unused_images_cost_no_gradient():
    """A loss on rgb only leaves features without gradient (None), and geometry still gets one."""
    params = _scene(1000, 16, seed=4, device="cuda")
    K, w2c = _cameras(1, 64, 48, "cuda")
    leaves = [p.clone().requires_grad_(True) for p in params]
    out = render(*leaves, K, w2c, 64, 48)
    out.rgb.sum().backward()
    assert leaves[5].grad is None
    assert leaves[0].grad.abs().sum() > 0 and out.means2d.grad.abs().sum() > 0


# ---- bad input ----------------------------------------------------------------------------------------


def test_bad_input_on_cuda():
    params = _scene(100, 4, seed=1, device="cuda")
    K, w2c = _cameras(1, 32, 32, "cuda")
    with pytest.raises(ValueError, match=r"quats must have shape \(100, 4\).*got \(99, 4\)"):
        render(params[0], params[1][:99], *params[2:], K, w2c, 32, 32)
    with pytest.raises(ValueError, match=r"features must have shape \(100, F\), got \(100, 4, 1\)"):
        render(*params[:5], params[5][..., None], K, w2c, 32, 32)
    with pytest.raises(ValueError, match=r"K is on cpu, but the Gaussians are on cuda"):
        render(*params, K.cpu(), w2c, 32, 32)
    with pytest.raises(TypeError, match=r"the CUDA backend renders float32"):
        render(*[p.double() for p in params], K.double(), w2c.double(), 32, 32, backend="cuda")
    with pytest.raises(TypeError, match=r"scales must have dtype torch.float32, got torch.float16"):
        render(params[0], params[1], params[2].half(), *params[3:], K, w2c, 32, 32)
    with pytest.raises(ValueError, match=r"world_to_camera must have shape \(1, 4, 4\)"):
        render(*params, K, w2c[:, :3], 32, 32)
    with pytest.raises(ValueError, match=r"quats is on cuda:0, but the Gaussians are on cpu"):
        _wrapper.project(params[0].cpu(), *params[1:4], w2c, K, 32, 32)


# ---- guardrails and boundaries -------------------------------------------------------------------------


def _extension_checks_shapes_and_devices():
    ext = load_extension()
    params = _scene(50, 4, seed=2, device="cuda")
    means, quats, scales, opacities, colors, features = params
    K, w2c = _cameras(2, 40, 30, "cuda")
    with pytest.raises(ValueError, match=r"quats must have shape \[50, 4\]"):
        ext.project_fwd(means, quats[:49].contiguous(), scales, opacities, w2c, K, 40, 30, 0.01, 1e10)
    with pytest.raises(ValueError, match=r"K must have shape \[2, 3, 3\]"):
        ext.project_fwd(means, quats, scales, opacities, w2c, K[:1].contiguous(), 40, 30, 0.01, 1e10)
    with pytest.raises(ValueError, match=r"near_plane < far_plane"):
        ext.project_fwd(means, quats, scales, opacities, w2c, K, 40, 30, 0.0, 1e10)
    with pytest.raises(ValueError, match=r"at most 64 coefficients per channel, got 65"):
        sh = torch.zeros(50, 65, 3, device="cuda")
        ext.spherical_harmonics_bwd(sh, None, means, w2c, 3, torch.zeros(2, 50, 3, device="cuda"))
    m2d, con, dep, radii = ext.project_fwd(means, quats, scales, opacities, w2c, K, 40, 30, 0.01, 1e10)
    with pytest.raises(ValueError, match=r"radii must have shape \[2, 50\]"):
        ext.isect_tiles(m2d, con, opacities, dep, radii[:1].contiguous(), 40, 30, 0)
    with pytest.raises(ValueError, match=r"opacities must have dtype Float"):
        ext.isect_tiles(m2d, con, opacities.double(), dep, radii, 40, 30, 0)
    ranges, ids, _ = ext.isect_tiles(m2d, con, opacities, dep, radii, 40, 30, 0)
    with pytest.raises(ValueError, match=r"tile_ranges must have shape \[12, 2\]"):
        ext.rasterize_fwd(
            m2d, con, opacities, colors, dep, features, None, ranges[:5].contiguous(), ids, 40, 30, False
        )
    with pytest.raises(ValueError, match=r"background must have shape \[3\]"):
        ext.rasterize_fwd(
            m2d,
            con,
            opacities,
            colors,
            dep,
            features,
            torch.zeros(4, device="cuda"),
            ranges,
            ids,
            40,
            30,
            False,
        )
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match=r"features is on cuda:1 but the other arguments are on cuda:0"):
            ext.rasterize_fwd(
                m2d, con, opacities, colors, dep, features.to("cuda:1"), None, ranges, ids, 40, 30, False
            )
    images = ext.rasterize_fwd(m2d, con, opacities, colors, dep, features, None, ranges, ids, 40, 30, False)
    final_t, last_ids = images[4], images[5]
    v_features = torch.ones(2, 4, 30, 40, device="cuda")
    with pytest.raises(ValueError, match=r"v_features must have shape \[2, 4, 30, 40\]"):
        ext.rasterize_bwd(
            m2d, con, opacities, colors, dep, features, None, ranges, ids, final_t, last_ids, 40, 30,
            None, None, v_features.transpose(2, 3).contiguous(), None, False, True, True,
        )  # fmt: skip


def _feature_loss_refuses_a_transposed_mask():
    from fit3d_hf.losses import upsampled_feature_l1

    decoded = torch.randn(2, 8, 20, 30, device="cuda")
    target = torch.randn(2, 8, 4, 6, device="cuda")
    mask = torch.rand(2, 1, 30, 20, device="cuda") > 0.5  # the right element count, the wrong shape
    # the wrapper refuses it by name before the launch; the C++ check stays as the backstop
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 1, 20, 30\) .*got \(2, 1, 30, 20\)"):
        upsampled_feature_l1(decoded, target, mask)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 1, 20, 30\) .*got \(2, 1, 30, 20\)"):
        _wrapper.feature_l1(decoded, target, mask)
    channels_last = [t.contiguous(memory_format=torch.channels_last) for t in (decoded, target)]
    with pytest.raises(ValueError, match=r"mask must be a contiguous bool tensor of shape \[2, 1, 20, 30\]"):
        load_extension().feature_l1_fwd(*channels_last, mask)


def _tile_keys_and_launch_grid_limits_are_clear_errors():
    ext = load_extension()
    one = torch.ones(1, 1, device="cuda")
    means2d, conics = torch.zeros(1, 1, 2, device="cuda"), torch.ones(1, 1, 3, device="cuda")
    radii = torch.ones(1, 1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"overflow the 32-bit tile keys"):
        ext.isect_tiles(means2d, conics, one[0], one, radii, 1_100_000, 1_100_000, 0)
    B = 70_000
    with pytest.raises(ValueError, match=r"70000 cameras in one call exceed the CUDA launch grid"):
        ext.isect_tiles(
            means2d.expand(B, 1, 2).contiguous(), conics.expand(B, 1, 3).contiguous(), one[0],
            one.expand(B, 1).contiguous(), radii.expand(B, 1).contiguous(), 16, 16, 0,
        )  # fmt: skip


def _run_isolated(function) -> None:
    """Runs a module-level function of this file in a fresh interpreter, so that a crash on the C++ error path
    (an error raised by an extension linked with a second copy of libstdc++ once killed the interpreter on the lent
    machines, see rasterizer_cuda/build.py) fails this test rather than the whole run."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import {Path(__file__).stem} as m; m.{function.__name__}()"
    result = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (
        f"{function.__name__} failed (exit {result.returncode}):\n"
        + "\n".join(line for line in result.stderr.splitlines() if not line.startswith("Extension modules"))[
            -3000:
        ]
    )


def test_extension_checks_shapes_and_devices():
    """The C++ backstop: every op refuses a wrong shape, dtype or device by name (ValueError), even called directly."""
    _run_isolated(_extension_checks_shapes_and_devices)


def test_feature_loss_refuses_a_transposed_mask():
    _run_isolated(_feature_loss_refuses_a_transposed_mask)


def test_tile_keys_and_launch_grid_limits_are_clear_errors():
    _run_isolated(_tile_keys_and_launch_grid_limits_are_clear_errors)


def test_project_validates_the_planes():
    params = _scene(10, 0, seed=3, device="cuda")
    K, w2c = _cameras(1, 32, 32, "cuda")
    for near, far in ((0.0, 10.0), (-1.0, 10.0), (2.0, 1.0), (float("nan"), 10.0)):
        with pytest.raises(ValueError, match=r"need 0 < near_plane < far_plane"):
            _wrapper.project(*params[:4], w2c, K, 32, 32, near_plane=near, far_plane=far)


def test_forced_pair_buffer_overflow_is_redone_exactly():
    """A capacity far below the pair count: the call must notice the overflow and redo the binning exactly."""
    width, height = 96, 64
    params = _scene(2000, 16, seed=21, device="cuda")
    K, w2c = _cameras(2, width, height, "cuda")
    _binning._PAIR_CAPACITY.clear()
    exact = render(*params, K, w2c, width, height, backend="cuda")
    key = (torch.device("cuda").index or 0, 2, 2000, width, height)
    pairs = _binning._PAIR_CAPACITY[key]
    assert pairs > 2000
    _binning._PAIR_CAPACITY[key] = 100  # overflow on the next call
    redone = render(*params, K, w2c, width, height, backend="cuda")
    for name in ("rgb", "depth", "features", "alpha"):
        assert torch.equal(getattr(redone, name), getattr(exact, name)), name
    assert _binning._PAIR_CAPACITY[key] >= 0.99 * pairs  # the exact count was learnt again


# Feature counts F whose 4 + F channels sit at each edge of the forward's compiled capacities (4 ... 72) and
# of the passes of both directions (forward passes of <= 72 channels; backward passes of colour, depth and <= 64
# features, then <= 64 features, in 8-channel tensor-core blocks).
PASS_EDGES = [1, 4, 5, 7, 8, 9, 12, 13, 16, 17, 20, 21, 28, 29, 44, 45, 60, 61, 64, 65, 68, 69, 128, 129, 132, 133,
              140, 141]  # fmt: skip


@pytest.mark.parametrize("n_features", PASS_EDGES)
def test_channel_capacities_at_every_pass_boundary(n_features):
    width, height = 40, 34
    params = _scene(300, n_features, seed=100 + n_features, device="cuda")
    K, w2c = _cameras(2, width, height, "cuda")
    _compare_render(
        params, K, w2c, width, height, seed=n_features, feature_grad_to_geometry=n_features % 2 == 1
    )


@pytest.mark.parametrize("decoded_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [24, 13])  # 13: not a multiple of 8, the one-channel path
def test_feature_loss_dtypes_and_scalar_path(decoded_dtype, target_dtype, channels):
    import torch.nn.functional as F

    from fit3d_hf.losses import upsampled_feature_l1

    g = torch.Generator().manual_seed(channels)
    decoded = torch.randn(2, channels, 23, 37, generator=g).to("cuda", decoded_dtype).requires_grad_(True)
    target = torch.randn(2, channels, 5, 7, generator=g).to("cuda", target_dtype)
    mask = (torch.rand(2, 1, 23, 37, generator=g) > 0.3).cuda()
    loss = upsampled_feature_l1(decoded, target, mask)
    up = F.interpolate(target.float(), size=(23, 37), mode="bilinear", align_corners=False)
    diff = decoded.detach().float() - up
    expected = (diff.abs() * mask).sum() / decoded.numel()
    assert float(loss) == pytest.approx(float(expected), rel=2e-3 if decoded_dtype != torch.float32 else 1e-5)
    loss.backward()
    decided = diff.abs() > 1e-2
    expected_grad = (torch.sign(diff) * mask / decoded.numel()).to(decoded_dtype).float()
    assert torch.equal(decoded.grad.float()[decided], expected_grad[decided])


# ---- the twins of the binning and the feature loss, and the per-pixel spec --------------------------------


def test_binning_matches_its_twin():
    """isect_tiles against `_reference._isect_tiles` on the same float32 inputs. Unlike the CPU build, nvcc
    contracts multiply-adds, so a Gaussian at a tile's edge may land on the other side of it by a rounding: at
    most 1e-3 of the pairs may differ, and a tile whose Gaussians agree lists them in the same order.
    (Tolerance reasoned, not yet calibrated on a GPU.)"""
    width, height = 129, 97
    means, quats, scales, opacities, _, _ = _scene(3000, 0, seed=32, device="cuda", degenerate=True)
    K, w2c = _cameras(3, width, height, "cuda")
    means2d, conics, depths, radii = _wrapper.project(means, quats, scales, opacities, w2c, K, width, height)
    got = _wrapper.isect_tiles(means2d, conics, opacities, depths, radii, width, height)
    want = _reference._isect_tiles(means2d, conics, opacities, depths, radii, width, height)

    def tile_lists(ranges, ids):
        return [tuple(ids[start:end].tolist()) for start, end in ranges.tolist()]

    got_lists, want_lists = tile_lists(*got), tile_lists(*want)
    differing = sum(len(set(a) ^ set(b)) for a, b in zip(got_lists, want_lists, strict=True))
    assert len(want[1]) > 3000 and differing <= 1e-3 * len(want[1])
    for a, b in zip(got_lists, want_lists, strict=True):
        assert set(a) != set(b) or a == b


@pytest.mark.parametrize("gaussians", [3000, 4, 0])  # 4: most tiles empty; 0 visible: no pair at all
def test_tile_ranges_with_spare_slots_equal_the_exact_ones(gaussians):
    """The binning with more slots than pairs (the unused ones keyed "no tile", sorted last) gives every tile the
    exact binning's range, an empty tile [0, 0) in both (the CPU binning's and the reference's convention)."""
    width, height = 129, 97
    means, quats, scales, opacities, _, _ = _scene(max(gaussians, 4), 0, seed=33, device="cuda")
    K, w2c = _cameras(2, width, height, "cuda")
    means2d, conics, depths, radii = _wrapper.project(means, quats, scales, opacities, w2c, K, width, height)
    if gaussians == 0:
        radii = torch.zeros_like(radii)  # all culled
    ext = load_extension()
    exact_ranges, exact_ids, total = ext.isect_tiles(
        means2d, conics, opacities, depths, radii, width, height, 0
    )
    pairs = int(total)  # the pinned count slot is reused by the next call
    assert (pairs > 0) == (gaussians > 0) and exact_ranges.shape == (2 * 9 * 7, 2)
    ranges, ids, total = ext.isect_tiles(
        means2d, conics, opacities, depths, radii, width, height, pairs + 777
    )
    torch.cuda.synchronize()
    assert int(total) == pairs and ids.numel() == pairs + 777
    assert torch.equal(ranges, exact_ranges)
    assert torch.equal(ids[:pairs], exact_ids)
    empty = exact_ranges[:, 0] == exact_ranges[:, 1]
    assert bool((exact_ranges[empty] == 0).all())
    if gaussians != 3000:
        assert bool(empty.any())
    else:  # the ranges tile the pair list in order
        nonempty = exact_ranges[~empty]
        assert int(nonempty[0, 0]) == 0 and int(nonempty[-1, 1]) == pairs
        assert torch.equal(nonempty[1:, 0], nonempty[:-1, 1])


def test_binning_with_32_bit_tile_keys_equals_the_16_bit_one():
    """Where all tile keys fit 16 bits (fewer than 2^16 tiles over the cameras) the pairs are sorted with 16-bit
    keys, otherwise with 32-bit ones: 16 cameras of 64 x 64 tiles binned at once (32-bit keys) list, tile by tile,
    the same Gaussians in the same order as each camera binned alone (16-bit keys), with and without spare slots."""
    width = height = 1024
    cameras, tiles = 16, (1024 // 16) ** 2
    assert tiles < 2**16 <= cameras * tiles  # one camera: 16-bit keys; all of them: 32-bit keys
    means, quats, scales, opacities, _, _ = _scene(3000, 0, seed=35, device="cuda")
    K, w2c = _cameras(cameras, width, height, "cuda")
    means2d, conics, depths, radii = _wrapper.project(means, quats, scales, opacities, w2c, K, width, height)
    ext = load_extension()

    def tile_lists(b0, b1, spare):
        inputs = (means2d[b0:b1], conics[b0:b1], opacities, depths[b0:b1], radii[b0:b1])
        _, _, total = ext.isect_tiles(*inputs, width, height, 0)
        pairs = int(total)
        ranges, ids, _ = ext.isect_tiles(*inputs, width, height, pairs + spare if spare else 0)
        torch.cuda.synchronize()
        return pairs, [ids[start:end].tolist() for start, end in ranges.tolist()]

    for spare in (0, 555):
        pairs, together = tile_lists(0, cameras, spare)
        alone = [tile_lists(b, b + 1, spare) for b in range(cameras)]
        assert pairs == sum(count for count, _ in alone) > 3000
        assert together == [ids for _, lists in alone for ids in lists]


def test_rasterize_op_matches_the_per_pixel_spec():
    """The CUDA compositing against the literal loop of fit3d_hf/render/spec.py (forward values)."""
    from fit3d_hf.render.spec import rasterize_per_pixel

    width, height = 29, 23
    means, quats, scales, opacities, colors, features = _scene(40, 3, seed=24, device="cuda")
    K, w2c = _cameras(2, width, height, "cuda")
    means2d, conics, depths, radii = _wrapper.project(means, quats, scales, opacities, w2c, K, width, height)
    background = torch.tensor([0.5, 0.25, 0.75], device="cuda")
    got = _wrapper.rasterize(
        means2d, conics, depths, colors, opacities, features, radii, width, height, background
    )
    want = rasterize_per_pixel(
        *[t.double().cpu() for t in (means2d, conics, depths, colors, opacities, features)], radii.cpu(),
        width, height, background.double().cpu(),
    )  # fmt: skip
    for name, a, b in zip(("rgb", "depth", "features", "alpha"), got, want, strict=True):
        _assert_matches(name, a.cpu(), b, **FWD)


@pytest.mark.parametrize("use_mask", [True, False])
def test_feature_l1_op_matches_its_twin(use_mask):
    """The fused CUDA op (float32) against `_reference._feature_l1` (float64): the loss and its gradient."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(2)
    decoded = torch.randn(2, 64, 57, 83, generator=g).cuda()
    target = torch.randn(2, 64, 4, 6, generator=g).cuda()
    mask = (torch.rand(2, 1, 57, 83, generator=g) > 0.3).cuda() if use_mask else None
    leaf, leaf64 = decoded.clone().requires_grad_(True), decoded.double().requires_grad_(True)
    loss = _wrapper.feature_l1(leaf, target, mask)
    want = _reference._feature_l1(leaf64, target.double(), mask)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    (grad,) = torch.autograd.grad(loss * 3.0, leaf)
    (grad64,) = torch.autograd.grad(want * 3.0, leaf64)
    up = F.interpolate(target, size=(57, 83), mode="bilinear", align_corners=False)
    decided = (decoded - up).abs() > 1e-3  # the sign may differ only where the two agree to rounding
    assert decided.float().mean() > 0.99
    torch.testing.assert_close(grad[decided], grad64.float()[decided])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_second_device_renders_the_same():
    width, height = 64, 48
    params = _scene(800, 20, seed=31, device="cuda:0")
    K, w2c = _cameras(2, width, height, "cuda:0")
    first = render(*params, K, w2c, width, height, backend="cuda")
    with torch.cuda.device(0):  # the current device stays cuda:0: the op must follow its tensors
        second = render(*[p.to("cuda:1") for p in params], K.to("cuda:1"), w2c.to("cuda:1"), width, height)
    assert second.backend == "cuda" and second.rgb.device == torch.device("cuda:1")
    for name in ("rgb", "depth", "features", "alpha"):
        assert torch.equal(getattr(second, name).cpu(), getattr(first, name).cpu()), name


def test_a_channels_last_feature_gradient_is_read_in_place():
    """Stage I's decoder passes the feature gradient back channels-last; the backward reads it as such."""
    from render_helpers import feature_grads_planar_and_channels_last

    planar, channels_last = feature_grads_planar_and_channels_last("cuda", n_features=70)  # two passes
    assert planar[5].abs().sum() > 0 and planar[0].abs().sum() > 0
    for a, b in zip(planar, channels_last, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float atomics: summation order only


@pytest.mark.parametrize("n_features", [64, 129])  # one backward pass; three, the last with a partial block
def test_feature_gradients_keep_float32_accuracy(n_features):
    """The feature channels' gradient, sum_p w_p g_p, is a tensor-core product of split TF32 operands; colour's is
    summed in float32 FMAs. Fed the colour image's gradient, every feature triple must get the colours' gradient
    to a relative L2 of 1e-5 (one TF32 product per term would be off by about 3e-4)."""
    width, height = 61, 45
    params = _scene(2000, n_features, seed=11, device="cuda")
    K, w2c = _cameras(2, width, height, "cuda")
    leaves = [p.clone().requires_grad_(True) for p in params]
    out = render(*leaves, K, w2c, width, height, backend="cuda")
    g = torch.Generator().manual_seed(3)
    v_rgb = torch.randn(2, 3, height, width, generator=g).cuda()
    v_features = v_rgb.repeat(1, n_features // 3 + 1, 1, 1)[:, :n_features]
    v_colors, v_feats = torch.autograd.grad(
        (out.rgb, out.features), (leaves[4], leaves[5]), (v_rgb, v_features)
    )
    triples = n_features // 3
    expected = v_colors.repeat(1, triples)
    actual = v_feats[:, : 3 * triples]
    assert v_colors.abs().sum() > 0
    rel_l2 = ((actual - expected).norm() / expected.norm()).item()
    assert rel_l2 < 1e-5, f"rel L2 {rel_l2:.2e}"  # summation order and the dropped lo x lo terms only
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
