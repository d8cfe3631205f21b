"""Whether Stage I scenes gain from sharing a GPU: the iterations per second of one GPU running `--processes`
Stage I lifters at once (each profile_lift.py's random scene and settings), against one alone. Our kernels run
at about a quarter of the SMs' warp slots, latency-bound, so two scenes' kernels side by side (CUDA MPS, which
the caller starts with `nvidia-cuda-mps-control -d`) might fill what one leaves idle; without MPS the processes'
contexts take turns.

    python benchmarks/gpu_sharing.py --processes 2 [--gaussians 1000000] [--steps 400]

Each process builds its lifter, warms up, waits until all are ready, then times `--steps` iterations. Prints one
JSON line: each process's ms per iteration and the GPU's iterations per second in all.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_lift import warm_lifter  # noqa: E402
from timing import synchronize  # noqa: E402


def run_one(args: argparse.Namespace) -> None:
    """One process: its lifter, warm-up, the start barrier (a file per ready process), then the timed steps."""
    device = torch.device(args.device)
    lifter = warm_lifter(
        args.gaussians, args.width, args.height, device,
        densify_until=0, mixed_precision="bf16" if device.type == "cuda" else "no",
    )  # fmt: skip
    synchronize(device)
    barrier = Path(args.barrier)
    (barrier / f"ready{args.index}").touch()
    while len(list(barrier.glob("ready*"))) < args.processes:
        time.sleep(0.01)
    start = time.perf_counter()
    for _ in range(args.steps):
        lifter.step()
    synchronize(device)
    seconds = time.perf_counter() - start
    print(json.dumps({"index": args.index, "seconds": seconds, "steps": args.steps}), flush=True)  # noqa: T201


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--gaussians", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--width", type=int, default=876)
    parser.add_argument("--height", type=int, default=584)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: to check the script")
    parser.add_argument("--label", default="", help="a note for the JSON line (e.g. whether MPS was on)")
    parser.add_argument("--index", type=int, default=None, help=argparse.SUPPRESS)  # a child's number
    parser.add_argument("--barrier", default=None, help=argparse.SUPPRESS)  # the children's shared folder
    args = parser.parse_args(argv)
    if args.index is not None:
        run_one(args)
        return None
    with tempfile.TemporaryDirectory() as barrier:
        own = list(argv if argv is not None else sys.argv[1:])
        children = [
            subprocess.Popen(
                [sys.executable, __file__, *own, "--index", str(i), "--barrier", barrier],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(args.processes)
        ]
        results = []
        for child in children:
            out, _ = child.communicate()
            if child.returncode != 0:
                raise RuntimeError(f"a lifter process failed (exit {child.returncode})")
            results.append(json.loads(out.strip().splitlines()[-1]))
    slowest = max(r["seconds"] for r in results)
    record = {
        "benchmark": "gpu_sharing",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "label": args.label,
        "processes": args.processes,
        "gaussians": args.gaussians,
        "steps": args.steps,
        "ms_per_iteration": [round(1000 * r["seconds"] / r["steps"], 2) for r in results],
        "gpu_iterations_per_s": round(args.processes * args.steps / slowest, 1),
    }
    print(json.dumps(record), flush=True)  # noqa: T201
    return record


if __name__ == "__main__":
    main()
