"""What a Stage I checkpoint costs the training: a state of Stage I's shape (the lifter's per-Gaussian parameter
groups with Adam's two moments, at --gaussians) written synchronously, as before session 15, and by
fit3d_hf.lifting.checkpoint_writer.CheckpointWriter in the background, while optimizer steps stand in for the
training (the time `submit` holds the loop, how long the write takes, and the steps' time with a write in flight
against without one).

python benchmarks/checkpoint_write.py [--gaussians 1000000] [--device cuda] [--work_dir /tmp]

Prints one JSON line.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adam_bandwidth import GROUP_WIDTHS, stage_one_parameters  # noqa: E402
from timing import synchronize  # noqa: E402

from fit3d_hf.checkpoints import save_torch_checkpoint  # noqa: E402
from fit3d_hf.lifting.checkpoint_writer import CheckpointWriter  # noqa: E402
from fit3d_hf.optim import make_adam  # noqa: E402


def _steps_per_second(step, device, while_alive=None, seconds: float = 1.0) -> tuple[float, int]:
    """Optimizer steps per second, each one synchronised; for as long as `while_alive()` holds, if given."""
    steps, start = 0, time.perf_counter()
    while (while_alive() if while_alive else time.perf_counter() - start < seconds) or steps == 0:
        step()
        synchronize(device)
        steps += 1
    return steps / (time.perf_counter() - start), steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gaussians", type=int, default=1_000_000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--work_dir", default=None, help="where the checkpoints are written (default: a temp folder)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    params = stage_one_parameters(args.gaussians, device)
    optimizer = make_adam(
        [{"params": [p], "lr": 1e-3} for p in params], eps=1e-15, device=device
    )  # the lifter's groups
    optimizer.step()  # Adam's moments exist from here on
    state = {
        "iteration": 1000,
        "gaussians": {name: p.detach() for name, p in zip(GROUP_WIDTHS, params, strict=True)},
        "optimizer": optimizer.state_dict(),
    }
    state_bytes = sum(p.numel() * 4 * 3 for p in params)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fit3d-checkpoint-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "checkpoint.pt"
    try:
        synchronize(device)
        start = time.perf_counter()
        save_torch_checkpoint(state, path)
        synchronous_s = time.perf_counter() - start

        alone_per_s, _ = _steps_per_second(optimizer.step, device)
        writer = CheckpointWriter(background=True)
        synchronize(device)
        start = time.perf_counter()
        writer.submit(state, path)
        synchronize(device)  # the snapshot's copies on the device included
        submit_s = time.perf_counter() - start
        during_per_s, steps_during = _steps_per_second(
            optimizer.step, device, while_alive=lambda: writer.writing
        )
        writer.wait()
        background_s = time.perf_counter() - start
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(  # noqa: T201
        json.dumps(
            {
                "benchmark": "checkpoint_write",
                "device": name,
                "gaussians": args.gaussians,
                "state_gb": round(state_bytes / 1e9, 3),
                "synchronous_save_s": round(synchronous_s, 3),
                "background_submit_ms": round(1e3 * submit_s, 2),
                "background_write_s": round(background_s, 3),
                "adam_step_ms_alone": round(1e3 / alone_per_s, 3),
                "adam_step_ms_during_write": round(1e3 / during_per_s, 3),
                "adam_steps_during_write": steps_during,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
