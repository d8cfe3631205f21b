"""Stage I's decoder convolution alone: FiT3D's 3x3 convolution from the rendered features (64 channels) to the
backbone's (384), bias-free, on one 876x584 view in bfloat16 and channels-last as fit3d_hf/lifting/lifter.py runs
it, forward and backward (input and weight gradients) from a given output gradient. The Stage I profile (session
24, H100) puts its three cuDNN kernels at 1.19 ms of the 7.45 ms iteration: 226 GFLOP each, so 480-690 TFLOP/s,
compute-bound and near what the H100's bfloat16 tensor cores sustain, the input gradient the slowest. This says
whether cuDNN's autotuner (`torch.backends.cudnn.benchmark`) finds faster kernels than its heuristics pick.

python benchmarks/decoder_conv.py [--height 584 --width 876 --in-channels 64 --out-channels 384]

Prints one JSON line per setting of `cudnn.benchmark`: GPU ms per forward+backward (torch.profiler) and its
TFLOP/s, each kernel's ms, and the floor its bytes set at the copy bandwidth measured in the same run.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import device_kernels, median_seconds, top_kernels_ms  # noqa: E402


def convolution_step(height: int, width: int, in_channels: int, out_channels: int, device: torch.device):
    """A closure running the decoder's forward and backward once (the lifter's layout and precision), and its
    convolution, input and output gradient (the gradients land in `conv.weight.grad` and `features.grad`)."""
    conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False).to(device)
    conv.to(memory_format=torch.channels_last)
    features = torch.randn(1, in_channels, height, width, device=device, dtype=torch.bfloat16)
    features = features.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad_out = torch.randn(1, out_channels, height, width, device=device, dtype=torch.bfloat16)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)

    def step():
        features.grad = None
        conv.weight.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = conv(features)
        out.backward(grad_out)

    return step, (conv, features, grad_out)


def gpu_ms(step, steps: int) -> tuple[float, dict[str, float]]:
    """GPU ms per call of `step` and its kernels' ms, from a torch.profiler run of `steps` calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels, total = device_kernels(prof, steps)
    return total, top_kernels_ms(kernels, steps, 6)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 512 MiB device-to-device copy (256 MiB read, 256 MiB written)."""
    src = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_seconds(lambda: dst.copy_(src), device, 2, 10)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=584)
    parser.add_argument("--width", type=int, default=876)
    parser.add_argument("--in-channels", type=int, default=64)
    parser.add_argument("--out-channels", type=int, default=384)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    pixels = args.height * args.width
    # forward: read input, write output; backward: read the output gradient twice (input and weight gradients),
    # the input once, write the input gradient (bfloat16 throughout; the weight is negligible)
    floor_bytes = 2 * pixels * 3 * (args.in_channels + args.out_channels)
    bandwidth = copy_bandwidth(device)
    flops = 3 * 2 * pixels * args.in_channels * args.out_channels * 9  # forward, input and weight gradients
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        step, _ = convolution_step(args.height, args.width, args.in_channels, args.out_channels, device)
        for _ in range(5):  # the autotuner's trials happen here
            step()
        total, kernels = gpu_ms(step, args.steps)
        print(  # noqa: T201
            json.dumps(
                {
                    "benchmark": "decoder_conv",
                    "device": torch.cuda.get_device_name(device),
                    "shape": [args.in_channels, args.out_channels, args.height, args.width],
                    "cudnn_benchmark": benchmark,
                    "gpu_ms_fwd_bwd": round(total, 3),
                    "bytes_floor_ms": round(1000 * floor_bytes / bandwidth, 3),
                    "tflops": round(flops / (total / 1000) / 1e12, 1),
                    "kernels_ms": kernels,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
