"""The losses: SSIM's separable window equals the 11x11 one, and Stage I's fused feature loss (CUDA kernel)
equals the composed PyTorch ops in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from render_helpers import cuda_test

from fit3d_hf.losses import _gaussian_window_1d, ssim, upsampled_feature_l1


def _ssim_2d_window(prediction, target, size=11, sigma=1.5):
    """SSIM with the full 2-D window, written out independently of fit3d_hf.losses."""
    channels = prediction.shape[1]
    taps = _gaussian_window_1d(size, sigma, 1, "cpu", torch.float64)[0, 0]
    window = torch.outer(taps, taps).to(prediction.dtype).expand(channels, 1, size, size)

    def blur(x):
        return F.conv2d(x, window, padding=size // 2, groups=channels)

    mu_p, mu_t = blur(prediction), blur(target)
    var_p, var_t = blur(prediction**2) - mu_p**2, blur(target**2) - mu_t**2
    cov = blur(prediction * target) - mu_p * mu_t
    c1, c2 = 0.01**2, 0.03**2
    return (
        ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    ).mean()


def test_ssim_separable_window_equals_2d_window():
    a = torch.rand(2, 3, 37, 53, dtype=torch.float64)
    b = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    assert torch.allclose(ssim(a, b), _ssim_2d_window(a, b), rtol=0, atol=1e-12)
    assert float(ssim(a, a)) == pytest.approx(1.0, abs=1e-12)
    assert float(ssim(a, b)) < 0.9


def test_ssim_gradient_matches_2d_window():
    a = torch.rand(1, 3, 20, 24, dtype=torch.float64, requires_grad=True)
    b = torch.rand(1, 3, 20, 24, dtype=torch.float64)
    (g_sep,) = torch.autograd.grad(ssim(a, b), a)
    (g_2d,) = torch.autograd.grad(_ssim_2d_window(a, b), a)
    assert torch.allclose(g_sep, g_2d, atol=1e-12)


def _composed_feature_l1(decoded, target, mask):
    up = F.interpolate(target.double(), size=decoded.shape[-2:], mode="bilinear", align_corners=False)
    error = (decoded.double() - up).abs()
    if mask is not None:
        error = error * mask
    return error.mean()


def test_upsampled_feature_l1_cpu_is_the_masked_mean():
    decoded = torch.randn(1, 8, 30, 44, requires_grad=True)
    target = torch.randn(1, 8, 3, 4)
    mask = torch.rand(1, 1, 30, 44) > 0.3
    loss = upsampled_feature_l1(decoded, target, mask)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(_composed_feature_l1(decoded, target, mask)), rel=1e-6)
    loss.backward()
    up = F.interpolate(target, size=(30, 44), mode="bilinear", align_corners=False)
    expected = torch.sign(decoded.detach() - up) * mask / decoded.numel()
    assert torch.allclose(decoded.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the fused op (CPU) and the composed ops
def test_upsampled_feature_l1_refuses_inputs_of_the_wrong_shape(dtype):
    """A mask `[B, 1, W, H]` holds as many elements as `[B, 1, H, W]`: refused by name, on every path."""
    decoded = torch.randn(1, 8, 20, 30, dtype=dtype, requires_grad=True)
    target = torch.randn(1, 8, 4, 6, dtype=dtype)
    transposed = torch.ones(1, 1, 30, 20, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=r"mask must have shape \(1, 1, 20, 30\) \(H = 20 .*got \(1, 1, 30, 20\)"
    ):
        upsampled_feature_l1(decoded, target, transposed)
    with pytest.raises(ValueError, match=r"mask must have shape \(1, 1, 20, 30\), got \(20, 30\)"):
        upsampled_feature_l1(decoded, target, transposed[0, 0].T)
    with pytest.raises(TypeError, match=r"mask must have dtype torch.bool, got torch.float32"):
        upsampled_feature_l1(decoded, target, transposed.float().transpose(-1, -2))
    with pytest.raises(ValueError, match=r"target must have shape \(1, 8, h, w\)"):
        upsampled_feature_l1(decoded, target[:, :4], None)
    with pytest.raises(ValueError, match=r"target is on meta, but the decoded features are on cpu"):
        upsampled_feature_l1(decoded, target.to("meta"), None)


@cuda_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_mask", [True, False])
def test_feature_l1_kernel_matches_composed_ops(dtype, use_mask):
    g = torch.Generator().manual_seed(0)
    # odd sizes, a 41 x 62 patch grid -> 584 x 876 as Stage I, and D = 384
    decoded = torch.randn(1, 384, 584, 876, generator=g).to("cuda", dtype).requires_grad_(True)
    target = torch.randn(1, 384, 41, 62, generator=g).half().cuda()
    mask = (torch.rand(1, 1, 584, 876, generator=g) > 0.2).cuda() if use_mask else None
    loss = upsampled_feature_l1(decoded, target, mask)
    expected = _composed_feature_l1(decoded.detach(), target, mask)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    loss.backward(torch.tensor(2.5, device="cuda"))
    up = F.interpolate(target.float(), size=(584, 876), mode="bilinear", align_corners=False)
    diff = decoded.detach().float() - up
    expected_grad = 2.5 * torch.sign(diff) / decoded.numel()
    if mask is not None:
        expected_grad = expected_grad * mask
    # the sign may differ only where decoded and the upsampled target agree to rounding
    decided = diff.abs() > 1e-3
    grad = decoded.grad.float()
    assert torch.equal(grad[decided], expected_grad.to(dtype).float()[decided])
    assert decided.float().mean() > 0.99


@cuda_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_feature_l1_backward_from_signs_equals_the_rereading_backward(cuda_extension, dtype):
    """The forward's 2-bit signs give the backward the re-reading one computes, bit for bit: positive, negative,
    exactly zero (decoded 0 where the target is 0) and masked values; and the autograd Function takes that path."""
    g = torch.Generator().manual_seed(1)
    decoded = torch.randn(2, 16, 30, 44, generator=g)
    decoded[:, :5] = 0.0  # channels whose target is 0: differences exactly 0
    target = torch.randn(2, 16, 3, 5, generator=g)
    target[:, :5] = 0.0
    mask = torch.rand(2, 1, 30, 44, generator=g) > 0.3
    decoded = decoded.to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    target = target.to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    mask = mask.cuda()
    grad_output = torch.tensor([3.0], device="cuda")
    loss, signs = cuda_extension.feature_l1_fwd_signs(decoded, target, mask)
    assert signs is not None and signs.numel() == decoded.numel() // 8
    assert torch.equal(loss, cuda_extension.feature_l1_fwd(decoded, target, mask))
    from_signs = cuda_extension.feature_l1_bwd_from_signs(signs, grad_output, list(decoded.shape), decoded)
    reread = cuda_extension.feature_l1_bwd(decoded, target, mask, grad_output)
    assert from_signs.dtype == dtype and from_signs.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(from_signs, reread)
    assert (reread == 0).any() and (reread > 0).any() and (reread < 0).any()
    # through autograd: the Function keeps the signs, not the decoded map
    leaf = decoded.detach().requires_grad_(True)
    upsampled_feature_l1(leaf, target, mask).backward(grad_output[0])
    assert torch.equal(leaf.grad, reread)


@cuda_test
def test_feature_l1_keeps_no_signs_off_the_8_channel_kernel(cuda_extension):
    decoded = torch.randn(1, 12, 20, 30, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.randn(1, 12, 2, 3, device="cuda").contiguous(memory_format=torch.channels_last)
    loss, signs = cuda_extension.feature_l1_fwd_signs(decoded, target, None)
    assert signs is None and torch.equal(loss, cuda_extension.feature_l1_fwd(decoded, target, None))


@cuda_test
def test_feature_l1_kernel_is_deterministic_and_takes_channels_first_input():
    decoded = torch.randn(2, 64, 50, 70, device="cuda")
    target = torch.randn(2, 64, 5, 7, device="cuda")
    first = upsampled_feature_l1(decoded, target)  # channels-first input: converted
    again = upsampled_feature_l1(decoded.contiguous(memory_format=torch.channels_last), target)
    assert torch.equal(first, again)
    assert float(first) == pytest.approx(float(_composed_feature_l1(decoded, target, None)), rel=1e-5)
