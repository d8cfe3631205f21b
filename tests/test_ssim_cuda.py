"""Stage I's fused SSIM (rasterizer_cuda/ssim.cu) equals the composed torch ops of `fit3d_hf.losses._ssim_torch`
in value and in the gradient w.r.t. the prediction, on images smaller than the window, of one pixel, and of
sizes that are no multiple of the kernel's 32 x 32 tiles; elsewhere `ssim` keeps the torch ops."""

from __future__ import annotations

import pytest
import torch
from render_helpers import cuda_test

from fit3d_hf.losses import _FusedSSIM, _ssim_torch, ssim


def _images(shape, seed=0, device="cuda"):
    """A prediction in [0, 1] and a target near it (SSIM well inside (0, 1)), float32."""
    g = torch.Generator().manual_seed(seed)
    prediction = torch.rand(shape, generator=g)
    target = (prediction + 0.2 * torch.randn(shape, generator=g)).clamp(0, 1)
    return prediction.to(device), target.to(device)


def _grad(fn, prediction, target, weight=1.0):
    prediction = prediction.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(weight * fn(prediction, target), prediction)
    return grad


SHAPES = [(1, 3, 37, 53), (2, 3, 584, 876), (2, 2, 33, 65), (1, 1, 5, 7), (1, 3, 1, 1), (1, 2, 1, 40)]


@cuda_test
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_forward_matches_torch(shape):
    prediction, target = _images(shape)
    value = ssim(prediction.requires_grad_(True), target)
    assert type(value.grad_fn).__name__ == "_FusedSSIMBackward"  # the fused path, not the fallback
    value, prediction = value.detach(), prediction.detach()
    assert value.shape == () and value.dtype == torch.float32 and value.device == prediction.device
    exact = _ssim_torch(prediction.double(), target.double())
    assert abs(float(value) - float(exact)) < 1e-6
    assert abs(float(value) - float(_ssim_torch(prediction, target))) < 1e-6
    if shape[-1] > 1:
        assert float(value) < 0.95  # the images differ: not trivially 1


@cuda_test
@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (1, 1, 5, 7), (2, 3, 64, 96)])
def test_identical_images_give_one(shape):
    prediction, _ = _images(shape)
    assert float(ssim(prediction, prediction.clone())) == pytest.approx(1.0, abs=1e-6)


@cuda_test
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_gradient_matches_autograd(shape):
    prediction, target = _images(shape, seed=1)
    fused = _grad(lambda p, t: _FusedSSIM.apply(p, t), prediction, target)
    float32 = _grad(_ssim_torch, prediction, target)
    exact = _grad(_ssim_torch, prediction.double(), target.double()).float()
    scale = exact.abs().max()
    assert scale > 0
    # both float32 gradients are within float32 rounding of the float64 one; the fused one at least as close
    assert (fused - exact).abs().max() <= 1e-5 * scale
    assert (fused - float32).abs().max() <= 2e-5 * scale
    assert (fused - exact).abs().max() <= 2 * (float32 - exact).abs().max() + 1e-6 * scale


@cuda_test
def test_incoming_gradient_scales_the_result():
    """Stage I's loss takes 0.2 * (1 - SSIM): the backward reads the incoming gradient (-0.2) on the device."""
    prediction, target = _images((1, 3, 70, 90), seed=2)
    unit = _grad(ssim, prediction, target)
    p = prediction.clone().requires_grad_(True)
    (0.8 * (p - target).abs().mean() + 0.2 * (1.0 - ssim(p, target))).backward()
    l1_grad = 0.8 * torch.sign(prediction - target) / prediction.numel()
    torch.testing.assert_close(p.grad, l1_grad - 0.2 * unit, rtol=1e-5, atol=1e-12)
    exact = _grad(_ssim_torch, prediction.double(), target.double(), weight=-0.2).float()
    torch.testing.assert_close(
        _grad(ssim, prediction, target, weight=-0.2), exact, rtol=0, atol=1e-5 * exact.abs().max().item()
    )


@cuda_test
def test_fused_ssim_is_deterministic_and_takes_non_contiguous_input():
    prediction, target = _images((2, 3, 50, 70), seed=3)
    first, again = ssim(prediction, target), ssim(prediction, target)
    assert torch.equal(first, again)
    assert torch.equal(_grad(ssim, prediction, target), _grad(ssim, prediction, target))
    # a transposed view: copied to contiguous memory, the gradient returns through the copy
    base = prediction.transpose(2, 3).contiguous().requires_grad_(True)
    view = base.transpose(2, 3)
    assert not view.is_contiguous()
    value = ssim(view, target)
    value.backward()
    assert torch.equal(value, first)
    assert torch.equal(base.grad.transpose(2, 3), _grad(ssim, prediction, target))


@cuda_test
def test_torch_ops_serve_what_the_kernel_does_not_cover():
    prediction, target = _images((1, 3, 30, 40), seed=4)
    # a target that takes a gradient: the torch ops, which give it one
    t = target.clone().requires_grad_(True)
    value = ssim(prediction, t)
    assert type(value.grad_fn).__name__ != "_FusedSSIMBackward"
    value.backward()
    assert t.grad is not None and t.grad.abs().max() > 0
    # float64, another window: the torch ops, exactly
    p64, t64 = prediction.double(), target.double()
    assert torch.equal(ssim(p64, t64), _ssim_torch(p64, t64))
    assert torch.equal(
        ssim(prediction, target, window_size=7), _ssim_torch(prediction, target, window_size=7)
    )


@cuda_test
def test_extension_refuses_bad_arguments():
    from fit3d_hf.render._backend import load_extension

    extension = load_extension()
    prediction, target = _images((1, 3, 20, 30))
    with pytest.raises(ValueError, match="target must have shape"):
        extension.ssim_fwd(prediction, target[:, :2].contiguous())
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        extension.ssim_fwd(prediction.cpu(), target.cpu())
    with pytest.raises(ValueError, match="must have dtype"):
        extension.ssim_fwd(prediction.double(), target.double())
    with pytest.raises(ValueError, match="must be contiguous"):
        extension.ssim_fwd(prediction.transpose(2, 3), target.transpose(2, 3))
    _, derivatives = extension.ssim_fwd(prediction, target)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        extension.ssim_bwd(prediction, target, derivatives, torch.ones(2, device="cuda"))


def test_ssim_on_cpu_keeps_the_torch_ops():
    prediction, target = _images((1, 3, 37, 53), device="cpu")
    p = prediction.clone().requires_grad_(True)
    value = ssim(p, target)
    assert type(value.grad_fn).__name__ != "_FusedSSIMBackward"
    assert torch.equal(value, _ssim_torch(prediction, target))
    value.backward()
    assert torch.equal(p.grad, _grad(_ssim_torch, prediction, target))
