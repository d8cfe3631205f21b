"""How close Stage I's optimizer step runs to the memory bandwidth: torch's fused Adam over the per-Gaussian
parameters of a Stage I scene (the lifter's groups: means 3, SH DC 3, SH rest 45, features 64, opacity 1, scales 3,
rotations 4 floats per Gaussian), against a plain copy of as many bytes, which is about what the device can
stream. Adam reads parameter, gradient and both moments and writes parameter and moments: 28 bytes per element.
Also times the same step by fit3d_hf.optim.GroupedAdam (all groups in one launch) where the extension has it.

python benchmarks/adam_bandwidth.py [--gaussians 1000000] [--device cuda]

Prints one JSON line. On an H100 in session 7 the fused step took 1.88 ms at 1M Gaussians (Stage I profile), i.e.
~1.8 TB/s; this says what a step at the copy's bandwidth would take.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_seconds  # noqa: E402

from fit3d_hf.optim import GroupedAdam, make_adam  # noqa: E402

# floats per Gaussian of each parameter group of fit3d_hf/lifting/lifter.py (feature_dim 64)
GROUP_WIDTHS = {
    "means": 3,
    "sh_dc": 3,
    "sh_rest": 45,
    "features": 64,
    "opacity_logits": 1,
    "log_scales": 3,
    "quats": 4,
}
ADAM_BYTES_PER_ELEMENT = 28  # read p, g, m, v; write p, m, v (float32)


def stage_one_parameters(gaussians: int, device: torch.device) -> list[torch.Tensor]:
    """Random parameters of Stage I's groups (GROUP_WIDTHS) for `gaussians` Gaussians, each with a random gradient."""
    params = [torch.randn(gaussians, w, device=device, requires_grad=True) for w in GROUP_WIDTHS.values()]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gaussians", type=int, default=1_000_000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    params = stage_one_parameters(args.gaussians, device)

    def groups():  # fresh dicts for each optimizer (torch fills in its defaults in place)
        return [{"params": [p], "lr": 1e-3 * (i + 1)} for i, p in enumerate(params)]

    optimizer = torch.optim.Adam(groups(), eps=1e-15, fused=device.type in ("cuda", "cpu"))
    adam_s = median_seconds(optimizer.step, device, 3, args.repeats)
    # the same step by fit3d_hf.optim.GroupedAdam (one launch), where the extension has it
    grouped = make_adam(groups(), eps=1e-15, device=device)
    grouped_s = (
        median_seconds(grouped.step, device, 3, args.repeats) if isinstance(grouped, GroupedAdam) else None
    )

    elements = sum(p.numel() for p in params)
    # a copy reads and writes 4 bytes per element: copy 3.5 elements per Adam element to stream the same bytes
    source = torch.empty(int(elements * ADAM_BYTES_PER_ELEMENT / 8), device=device)
    target = torch.empty_like(source)
    copy_s = median_seconds(lambda: target.copy_(source), device, 3, args.repeats)

    moved = elements * ADAM_BYTES_PER_ELEMENT
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(  # noqa: T201
        json.dumps(
            {
                "benchmark": "adam_bandwidth",
                "device": name,
                "gaussians": args.gaussians,
                "elements": elements,
                "fused_adam_ms": round(1e3 * adam_s, 3),
                "fused_adam_gb_per_s": round(moved / adam_s / 1e9, 1),
                "grouped_adam_ms": None if grouped_s is None else round(1e3 * grouped_s, 3),
                "grouped_adam_gb_per_s": None if grouped_s is None else round(moved / grouped_s / 1e9, 1),
                "copy_of_the_same_bytes_ms": round(1e3 * copy_s, 3),
                "copy_gb_per_s": round(moved / copy_s / 1e9, 1),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
