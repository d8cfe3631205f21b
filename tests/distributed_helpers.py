"""Runs several real processes of a distributed CPU (gloo) job with a hard timeout.

torch 2.13's gloo process group can deadlock at teardown (benchmarks/RESULTS.md: a worker thread needs the
GIL to free the last all-gather while the main thread, holding it, joins the worker). A hang there must fail
the test with a message that names it, not stall CI: `run_processes` kills every process at the timeout and
says whether the job had finished its work (the teardown hang) or not.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# ACCELERATE_USE_CPU + --multi_gpu is what starts several gloo processes on a machine without GPUs.
GLOO_ENV = {
    **os.environ,
    "ACCELERATE_USE_CPU": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TQDM_DISABLE": "1",
}

GLOO_TEARDOWN_HANG = (
    "{what} finished its work ({evidence}) but its processes did not exit within {timeout} s: this is the known "
    "deadlock of torch 2.13's gloo process group at teardown (benchmarks/RESULTS.md), not a fit3d-hf failure of the "
    "job itself; the processes were killed"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(*options: str) -> list[str]:
    return [
        ACCELERATE,
        "launch",
        "--multi_gpu",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *options,
    ]


def run_processes(
    commands: list[list[str]],
    logs: list[Path],
    *,
    timeout: float,
    finished: Callable[[], str | None],
    what: str,
    env: dict | None = None,
) -> None:
    """Starts every command (each in its own process group), waits for all with one deadline, and fails the
    test on a non-zero exit or at the deadline. `finished()` returns a description of the job's outputs when
    they are complete (then a hang is the gloo teardown deadlock), else None."""
    processes = []
    handles = [open(log, "w") for log in logs]  # noqa: SIM115
    try:
        for command, handle in zip(commands, handles, strict=True):
            processes.append(
                subprocess.Popen(
                    command,
                    cwd=REPO,
                    env=env or GLOO_ENV,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in processes):
            failed = [i for i, p in enumerate(processes) if p.poll() not in (None, 0)]
            if failed:
                break
            time.sleep(0.2)
        hung = [p for p in processes if p.poll() is None]
        for process in hung:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and the workers it started
            process.wait()
    finally:
        for handle in handles:
            handle.close()
    failed = [(i, p.returncode) for i, p in enumerate(processes) if p not in hung and p.returncode != 0]
    if failed:
        index, code = failed[0]
        pytest.fail(f"{what}: command {index} exited with {code}:\n{logs[index].read_text()[-4000:]}")
    if hung:
        evidence = finished()
        if evidence is not None:
            pytest.fail(GLOO_TEARDOWN_HANG.format(what=what, evidence=evidence, timeout=timeout))
        tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
        pytest.fail(f"{what} did not finish within {timeout} s (killed):\n{tails}")
