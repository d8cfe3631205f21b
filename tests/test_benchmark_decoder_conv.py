"""benchmarks/decoder_conv.py times its step on a GPU; here the step runs on the CPU, so that what the device call
times is the decoder's forward and both gradients, fresh each call (no accumulation into `.grad` timed with it)."""

import torch
from benchmark_helpers import load_benchmark


def test_step_computes_the_convolution_gradients_afresh():
    decoder_conv = load_benchmark("decoder_conv")
    torch.manual_seed(0)
    step, (conv, features, grad_out) = decoder_conv.convolution_step(6, 10, 4, 5, torch.device("cpu"))
    x, g, w = (t.detach().double() for t in (features, grad_out, conv.weight))
    x.requires_grad_(True)
    w.requires_grad_(True)
    torch.nn.functional.conv2d(x, w, padding=1).backward(g)
    for _ in range(2):  # a second call must not add to the first's gradients
        step()
        assert features.grad.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32
        # bfloat16 inputs and products: within a few of its ulps of the float64 gradients
        torch.testing.assert_close(features.grad.double(), x.grad, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(conv.weight.grad.double(), w.grad, rtol=2e-2, atol=5e-2)
