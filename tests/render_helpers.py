"""Scenes, cameras and comparisons shared by the tests that hold a compiled backend (CUDA: test_render_cuda.py,
CPU: test_render_cpu.py) against the PyTorch reference.

The reference runs in float64, the compiled backend in float32. `assert_matches` checks two criteria: the
relative L2 error of the whole tensor must be small, and at most a tiny fraction of elements may leave an
element-wise band. The fraction exists because a float32 alpha that lands within rounding of the 1/255 skip
threshold (or the 0.99 clamp) legitimately flips a (pixel, Gaussian) pair; a real bug moves many elements or
the norm.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from fit3d_hf.render import _reference, _wrapper, render
from fit3d_hf.render._constants import FRUSTUM_MARGIN

__all__ = [
    "cuda_test",
    "FWD",
    "GRAD",
    "NAMES",
    "assert_bf16_features_match_float",
    "assert_matches",
    "assert_project_gradient_through_the_clamp",
    "assert_project_op_matches_reference",
    "assert_render_without_graph_matches",
    "assert_sh_parts_render_like_joined",
    "assert_spherical_harmonics_op_matches_reference",
    "cameras",
    "compare_render",
    "loss_weights",
    "scene",
]

# Tolerances: float32 compiled backend vs float64 reference, calibrated on an H100 (torch 2.11 + CUDA 13.0),
# where the forward's rel L2 was <= 6.5e-5 (one pixel whose alpha flipped at the 1/255 threshold, |err| 3e-3,
# dominates). The CPU backend (2-core AMD EPYC, torch 2.13 CPU) meets the same ones.
FWD = dict(rtol=1e-4, atol=1e-5, max_bad=1e-3, max_rel_l2=3e-4)
GRAD = dict(rtol=2e-3, atol=1e-4, max_bad=2e-3, max_rel_l2=1e-3)
NAMES = ("means", "quats", "scales", "opacities", "colors", "features")


def assert_matches(name, actual, expected, rtol, atol, max_bad, max_rel_l2):
    """`atol` is relative to the largest |expected|; see the module docstring for the two criteria."""
    assert actual is not None, f"{name}: no gradient"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(actual).all(), f"{name}: {int((~torch.isfinite(actual)).sum())} non-finite values"
    if expected.numel() == 0:
        return
    err = (actual - expected).abs()
    scale = expected.abs().max().clamp_min(1e-30)
    bad = err > atol * scale + rtol * expected.abs()
    bad_fraction = bad.double().mean().item()
    rel_l2 = (err.norm() / expected.norm().clamp_min(1e-30)).item()
    worst = int(err.argmax())
    detail = (
        f"{name}: rel L2 {rel_l2:.2e} (max {max_rel_l2:.0e}), {int(bad.sum())}/{bad.numel()} outside "
        f"rtol={rtol}, atol={atol}*{scale.item():.3g} (max fraction {max_bad}); worst |err| "
        f"{err.flatten()[worst].item():.3e} at {worst}: {actual.flatten()[worst].item():.6g} vs "
        f"{expected.flatten()[worst].item():.6g}"
    )
    assert rel_l2 <= max_rel_l2 and bad_fraction <= max_bad, detail


def cameras(batch, width, height, device):
    """`(K [B, 3, 3], world_to_camera [B, 4, 4])`: cameras turning about y, off-centre principal points."""
    poses, Ks = [], []
    for b in range(batch):
        angle = 0.12 * b
        pose = torch.eye(4)
        pose[:3, :3] = torch.tensor(
            [[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]]
        )
        pose[:3, 3] = torch.tensor([0.05 * b, -0.03 * b, 0.1 * b])
        poses.append(pose)
        f = 0.9 * width * (1 + 0.05 * b)
        Ks.append(torch.tensor([[f, 0, width / 2 + b], [0, f * 1.02, height / 2 - b], [0, 0, 1]]))
    return torch.stack(Ks).to(device), torch.stack(poses).to(device)


def scene(n, n_features, seed, device, degenerate=False, sh_coeffs=None):
    """Random Gaussians in front of the cameras; `degenerate` adds tiny, huge, near-plane, off-screen and
    behind-the-camera ones, opacities at 1 (alpha clamp) and below 1/255."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([3.0, 2.0, 4.0]) + torch.tensor(
        [0.0, 0.0, 3.0]
    )
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.rand(n, 3, generator=g) * (math.log(0.15) - math.log(0.005)) + math.log(0.005))
    opacities = torch.sigmoid(2.0 * torch.randn(n, generator=g))
    colors = (
        torch.rand(n, 3, generator=g)
        if sh_coeffs is None
        else 0.4 * torch.randn(n, sh_coeffs, 3, generator=g)
    )
    features = 0.5 * torch.randn(n, n_features, generator=g)
    if degenerate:
        k = max(n // 20, 1)
        scales[0:k] = 1e-6  # tiny: only the 0.3 px low-pass remains
        scales[k : 2 * k] = 2.5  # huge: covers the whole image
        means[2 * k : 3 * k, 2] = torch.linspace(0.0102, 0.05, k)  # just beyond the near plane
        means[3 * k : 4 * k, 0] = torch.linspace(-30.0, 30.0, k)  # far off-screen (frustum clamp)
        means[4 * k : 5 * k, 2] = -2.0  # behind the camera
        opacities[5 * k : 6 * k] = 1.0  # alpha clamped at 0.99
        opacities[6 * k : 7 * k] = 0.002  # below 1/255: culled
    return [t.to(device) for t in (means, quats, scales, opacities, colors, features)]


def _clamped_scene(K, width, height, n=400, seed=5):
    """`(means, quats, scales, opacities, clamped_x, clamped_y)`: large Gaussians centred beyond the projection's
    Jacobian clamp of camera 0 at the origin (x/z past the image edge + FRUSTUM_MARGIN tan(fov/2); half of them
    past it along y too), which still reach the image."""
    fx, fy, cx, cy = (float(v) for v in (K[0, 0, 0], K[0, 1, 1], K[0, 0, 2], K[0, 1, 2]))
    margin_x, margin_y = FRUSTUM_MARGIN * 0.5 * width / fx, FRUSTUM_MARGIN * 0.5 * height / fy
    limits = torch.tensor([[-(cx / fx + margin_x), (width - cx) / fx + margin_x],
                           [-(cy / fy + margin_y), (height - cy) / fy + margin_y]])  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    z = 2.0 + 2.0 * torch.rand(n, generator=g)
    side = torch.randint(0, 2, (n, 2), generator=g)
    uv = limits.gather(1, side.T).T * (1.1 + 0.4 * torch.rand(n, 2, generator=g))  # 10-50% past the bound
    inside = torch.rand(n, generator=g) < 0.5
    uv[inside, 1] = limits[1, 1] * (2 * torch.rand(int(inside.sum()), generator=g) - 1) * 0.9
    means = torch.stack([uv[:, 0] * z, uv[:, 1] * z, z], dim=1)
    scales = z[:, None] * (0.3 + 0.3 * torch.rand(n, 3, generator=g))
    quats = torch.randn(n, 4, generator=g)
    opacities = 0.5 + 0.5 * torch.rand(n, generator=g)
    clamped = (uv < limits[:, 0]) | (uv > limits[:, 1])
    device = K.device
    return (
        means.to(device),
        quats.to(device),
        scales.to(device),
        opacities.to(device),
        clamped[:, 0],
        clamped[:, 1],
    )


def _assert_project_matches_reference(
    means, quats, scales, opacities, K, w2c, width, height, weighted=(0, 1, 2)
):
    """The compiled projection (the tensors' device) against the float64 reference: its outputs, and its gradients
    to means, quats and scales, on the (camera, Gaussian) pairs both keep. The loss weighs the outputs in
    `weighted` (0: means2d, 1: conics, 2: depths) by random numbers: the conics alone reach the geometry only
    through the Jacobian, a share the 2D means' gradient would hide."""
    inputs = [t.clone().requires_grad_(i < 3) for i, t in enumerate((means, quats, scales, opacities))]
    got = _wrapper.project(*inputs, w2c, K, width, height)
    inputs64 = [t.detach().double().requires_grad_(i < 3) for i, t in enumerate(inputs)]
    want = _reference._project(*inputs64, w2c.double(), K.double(), width, height)
    assert (got[3] == want[3]).double().mean() >= 0.999
    visible = (got[3] > 0) & (want[3] > 0)
    for name, a, b in zip(("means2d", "conics", "depths"), got[:3], want[:3], strict=True):
        assert_matches(name, a[visible], b[visible], **FWD)
    g = torch.Generator().manual_seed(0)
    v = [
        torch.randn(t.shape, generator=g).to(t.device) * visible.reshape(*visible.shape, *([1] * (t.dim() - 2)))
        * (i in weighted)
        for i, t in enumerate(got[:3])
    ]  # fmt: skip
    grads = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got[:3], v, strict=True)), inputs[:3])
    grads64 = torch.autograd.grad(
        sum((a * w.double()).sum() for a, w in zip(want[:3], v, strict=True)), inputs64[:3]
    )
    for name, a, b in zip(("means", "quats", "scales"), grads, grads64, strict=True):
        assert_matches(f"grad {name}", a, b, **GRAD)


def assert_project_op_matches_reference(device: str):
    """The compiled projection on `device` against the reference on a scene with degenerate Gaussians, with the
    loss on all its outputs and on the conics alone."""
    means, quats, scales, opacities, _, _ = scene(3000, 0, seed=21, device=device, degenerate=True)
    K, w2c = cameras(3, 90, 70, device)
    _assert_project_matches_reference(means, quats, scales, opacities, K, w2c, 90, 70)
    _assert_project_matches_reference(means, quats, scales, opacities, K, w2c, 90, 70, weighted=(1,))


def assert_project_gradient_through_the_clamp(device: str):
    """Gaussians centred beyond the Jacobian's clamp that still reach the image: the clamped coordinate's gradient
    goes to z, a path no Gaussian of the other scenes takes (those beyond the clamp are culled)."""
    K, w2c = cameras(1, 90, 70, device)
    means, quats, scales, opacities, clamped_x, clamped_y = _clamped_scene(K, 90, 70)
    visible = _wrapper.project(means, quats, scales, opacities, w2c, K, 90, 70)[3][0].cpu() > 0
    assert int((visible & clamped_x).sum()) > 100 and int((visible & clamped_y).sum()) > 50
    _assert_project_matches_reference(means, quats, scales, opacities, K, w2c, 90, 70, weighted=(1,))


def assert_spherical_harmonics_op_matches_reference(device: str, coeffs: int):
    """The compiled SH colours on `device` against the float64 reference at every degree `coeffs` allows, values
    and gradients to the coefficients and means. 2000 Gaussians leave the CUDA backward's last block of 128 partly
    empty; 9 coefficients give it another staging stride than 16."""
    means, _, _, _, sh, _ = scene(2000, 0, seed=22, device=device, sh_coeffs=coeffs)
    _, w2c = cameras(4, 64, 48, device)
    for degree in range(math.isqrt(coeffs)):
        sh32, means32 = sh.clone().requires_grad_(True), means.clone().requires_grad_(True)
        sh64, means64 = sh.double().requires_grad_(True), means.double().requires_grad_(True)
        got = _wrapper.spherical_harmonics(sh32, means32, w2c, degree)
        want = _reference._spherical_harmonics(sh64, means64, w2c.double(), degree)
        assert_matches(f"colors (degree {degree})", got, want, **FWD)
        v = torch.randn(got.shape, device=device)
        grads = torch.autograd.grad(
            (got * v).sum(), (sh32, means32), allow_unused=True, materialize_grads=True
        )
        grads64 = torch.autograd.grad(
            (want * v.double()).sum(), (sh64, means64), allow_unused=True, materialize_grads=True
        )
        for name, a, b in zip(("sh", "means"), grads, grads64, strict=True):
            if b.abs().max() > 0:
                assert_matches(f"grad {name} (degree {degree})", a, b, **GRAD)
            else:
                assert torch.count_nonzero(a) == 0


def loss_weights(batch, n_features, width, height, device, seed):
    """Random weights of the four images (rgb, depth, features, alpha) in the test loss."""
    g = torch.Generator().manual_seed(seed + 100)
    shapes = (
        (batch, 3, height, width),
        (batch, 1, height, width),
        (batch, n_features, height, width),
        (batch, 1, height, width),
    )
    return [torch.randn(s, generator=g).to(device) for s in shapes]


def render_and_grads(params, K, w2c, width, height, weights, backend, **kwargs):
    """Renders with `backend`, backpropagates the weighted sum of the four images; (out, images, grads)."""
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    out = render(*leaves, K, w2c, width, height, backend=backend, **kwargs)
    images = (out.rgb, out.depth, out.features, out.alpha)
    loss = sum((image * w).sum() for image, w in zip(images, weights, strict=True))
    loss.backward()
    return out, images, [p.grad for p in leaves]


def compare_render(params, K, w2c, width, height, seed, backend, **kwargs):
    """Renders `params` with `backend` (float32) and with the reference (float64) and asserts that images,
    radii and every gradient (means2d's too) agree within FWD / GRAD. Returns (out, grads) of `backend`."""
    batch, n_features = K.shape[0], params[5].shape[1]
    weights = loss_weights(batch, n_features, width, height, K.device, seed)
    out, images, grads = render_and_grads(params, K, w2c, width, height, weights, backend, **kwargs)
    params64 = [p.double() for p in params]
    ref_kwargs = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    ref, ref_images, ref_grads = render_and_grads(
        params64,
        K.double(),
        w2c.double(),
        width,
        height,
        [w.double() for w in weights],
        "reference",
        **ref_kwargs,
    )
    assert out.backend == backend and ref.backend == "reference"
    radii_equal = (out.radii == ref.radii).double().mean().item()
    assert radii_equal >= 0.999 and (out.radii - ref.radii).abs().max() <= 1, (
        f"radii agree on {radii_equal:.4%}"
    )
    for name, a, b in zip(("rgb", "depth", "features", "alpha"), images, ref_images, strict=True):
        assert_matches(name, a, b, **FWD)
    for name, a, b in zip(NAMES, grads, ref_grads, strict=True):
        assert_matches(f"grad {name}", a, b, **GRAD)
    assert_matches("grad means2d", out.means2d.grad, ref.means2d.grad, **GRAD)
    return out, grads


def feature_grads_planar_and_channels_last(device: str, n_features: int = 24):
    """The Gaussians' gradients from the same feature-image gradient given planar and channels-last (the layout
    Stage I's decoder passes back): `(planar grads, channels-last grads)`, one tensor per parameter."""
    params = scene(300, n_features, seed=31, device=device)
    K, w2c = cameras(2, 40, 32, device)
    grads = []
    g = torch.Generator().manual_seed(5)
    v_features = torch.randn(2, n_features, 32, 40, generator=g).to(device)
    for layout in (torch.contiguous_format, torch.channels_last):
        leaves = [p.clone().requires_grad_(True) for p in params]
        out = render(*leaves, K, w2c, 40, 32, feature_grad_to_geometry=True)
        grad_image = v_features.contiguous(memory_format=layout)
        assert grad_image.is_contiguous(memory_format=layout)
        grads.append(torch.autograd.grad(out.features, leaves, grad_outputs=grad_image))
    return grads


def assert_sh_parts_render_like_joined(backend: str):
    """Renders the same SH colours given as one `[N, 16, 3]` tensor and as the pair (DC `[N, 1, 3]`, rest
    `[N, 15, 3]`) at each degree with `backend` (on its device): the images must be equal, the gradients of the
    coefficients and the means equal up to the rounding of float32 sums, and coefficients past the degree get none."""
    means, quats, scales, opacities, sh, features = scene(700, 3, seed=41, device=backend, sh_coeffs=16)
    K, w2c = cameras(2, 48, 40, backend)
    weights = torch.randn(2, 3, 40, 48, generator=torch.Generator().manual_seed(3)).to(backend)
    for degree in range(4):
        results = []
        for split in (False, True):
            leaves = [t.clone().requires_grad_(True) for t in (means, sh[:, :1], sh[:, 1:])]
            colors = (leaves[1], leaves[2]) if split else torch.cat(leaves[1:], dim=1)
            out = render(
                leaves[0], quats, scales, opacities, colors, features, K, w2c, 48, 40,
                sh_degree=degree, backend=backend,
            )  # fmt: skip
            (out.rgb * weights).sum().backward()
            results.append(
                (out.rgb.detach(), torch.cat([leaves[1].grad, leaves[2].grad], dim=1), leaves[0].grad)
            )
        joined, parts = results
        assert torch.equal(joined[0], parts[0]), f"rgb differs at degree {degree}"
        # the rasterizer's gradients are summed in no fixed order (atomics): equal up to float32 rounding of sums
        for name, a, b in zip(("grad sh", "grad means"), joined[1:], parts[1:], strict=True):
            scale = a.abs().amax().item()
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale, msg=f"{name} at degree {degree}")
        used = (degree + 1) ** 2
        assert parts[1][:, :used].abs().amax() > 0 and torch.count_nonzero(parts[1][:, used:]) == 0


def assert_bf16_features_match_float(backend: str):
    """`render(..., feature_dtype=torch.bfloat16)` with `backend`: bfloat16 channels-last features equal to the
    float32 render's rounded to bfloat16, and every gradient from a bfloat16 feature-image gradient equal to the
    float32 render's from the same gradient in float32 (up to the order of float32 sums)."""
    params = scene(400, 20, seed=52, device=backend)
    K, w2c = cameras(2, 40, 32, backend)
    g = torch.Generator().manual_seed(9)
    v_features = torch.randn(2, 20, 32, 40, generator=g).to(backend, torch.bfloat16)
    v_features = v_features.contiguous(memory_format=torch.channels_last)
    results = []
    for feature_dtype in (None, torch.bfloat16):
        leaves = [p.clone().requires_grad_(True) for p in params]
        out = render(
            *leaves,
            K,
            w2c,
            40,
            32,
            feature_dtype=feature_dtype,
            feature_grad_to_geometry=True,
            backend=backend,
        )
        grad = v_features if feature_dtype is not None else v_features.float()
        results.append((out.features, torch.autograd.grad(out.features, leaves, grad_outputs=grad)))
    (float_features, float_grads), (bf16_features, bf16_grads) = results
    assert bf16_features.dtype == torch.bfloat16
    assert bf16_features.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(bf16_features, float_features.to(torch.bfloat16))
    for name, a, b in zip(NAMES, float_grads, bf16_grads, strict=True):
        scale = a.abs().amax().item()
        assert (scale > 0) == (name != "colors"), name  # the features reach all but the colours
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * scale, msg=name)


def assert_render_without_graph_matches(backend: str):
    """A render that needs no gradient (inside no_grad, or of inputs that require none) calls the extension
    without autograd's Functions and returns exactly the images of the recorded render."""
    width, height = 64, 48
    params = scene(800, 16, seed=12, device=backend, sh_coeffs=9)
    K, w2c = cameras(2, width, height, backend)
    leaves = [p.clone().requires_grad_(True) for p in params]
    recorded = render(*leaves, K, w2c, width, height, backend=backend)
    assert recorded.rgb.grad_fn is not None and recorded.means2d.grad_fn is not None

    refuse = mock.Mock(side_effect=AssertionError("an autograd Function ran for a render without gradients"))
    with (
        mock.patch.multiple(_wrapper._Project, apply=refuse),
        mock.patch.multiple(_wrapper._SphericalHarmonics, apply=refuse),
        mock.patch.multiple(_wrapper._Rasterize, apply=refuse),
    ):
        with torch.no_grad():
            direct = [render(*leaves, K, w2c, width, height, backend=backend)]
        direct.append(render(*params, K, w2c, width, height, backend=backend))
    for out in direct:
        for name in ("rgb", "depth", "features", "alpha", "radii", "means2d", "depths"):
            actual, expected = getattr(out, name), getattr(recorded, name).detach()
            assert not actual.requires_grad, name
            assert torch.equal(actual, expected), name


def assert_fixed_geometry_skips_its_gradients(backend: str):
    """With the geometry held fixed (means, rotations, scales and opacities requiring no gradient, as in Stage I's
    refinement of the compressed colours), the colours' and features' gradients are those of the render that
    differentiates everything; the rasterizer's op, told that no geometry gradient is needed, leaves the 2D means',
    conics' and opacities' gradients at zero and the channels' as they were."""
    width, height = 56, 40
    params = scene(700, 8, seed=61, device=backend)
    K, w2c = cameras(2, width, height, backend)
    weights = loss_weights(2, 8, width, height, K.device, seed=61)
    _, _, everything = render_and_grads(params, K, w2c, width, height, weights, backend)
    fixed = [p.clone() for p in params[:4]] + [p.clone().requires_grad_(True) for p in params[4:]]
    out = render(*fixed, K, w2c, width, height, backend=backend)
    images = (out.rgb, out.depth, out.features, out.alpha)
    sum((image * w).sum() for image, w in zip(images, weights, strict=True)).backward()
    assert out.means2d.grad_fn is None
    for name, a, b in zip(NAMES[4:], everything[4:], (p.grad for p in fixed[4:]), strict=True):
        assert a.abs().amax() > 0, name
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().amax().item(), msg=name)

    # the op itself: geometry_grad=False zeroes exactly the geometry's gradients
    from fit3d_hf.render._backend import extension_for
    from fit3d_hf.render._binning import isect_tiles
    from fit3d_hf.render._wrapper import project

    ext = extension_for(params[0].device)
    means, quats, scales, opacities, _, features = params
    means2d, conics, depths, radii = project(means, quats, scales, opacities, w2c, K, width, height)
    colors = torch.rand(2, len(means), 3, generator=torch.Generator().manual_seed(0)).to(K.device)
    ranges, ids = isect_tiles(means2d, conics, opacities, depths, radii, width, height)
    fwd = ext.rasterize_fwd(
        means2d, conics, opacities, colors, depths, features, None, ranges, ids, width, height, False
    )
    grads = {}
    for geometry_grad in (True, False):
        grads[geometry_grad] = ext.rasterize_bwd(
            means2d, conics, opacities, colors, depths, features, None, ranges, ids, fwd[4], fwd[5], width, height,
            *(w.contiguous() for w in weights), False, True, geometry_grad,
        )  # fmt: skip
    for i, name in enumerate(("means2d", "conics", "opacities", "colors", "depths", "features")):
        full, skipped = grads[True][i], grads[False][i]
        assert full.abs().amax() > 0, name
        if i < 3:
            assert torch.count_nonzero(skipped) == 0, name
        else:
            torch.testing.assert_close(
                skipped, full, rtol=1e-5, atol=1e-6 * full.abs().amax().item(), msg=name
            )


def cuda_test(test):
    """Marks a test as needing the GPU and the compiled extension: the `cuda` mark (which the CPU-only CI
    deselects) and conftest's `cuda_extension` fixture (which skips where either is missing)."""
    return pytest.mark.cuda(pytest.mark.usefixtures("cuda_extension")(test))
