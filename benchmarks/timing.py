"""Timing shared by the benchmarks that time whole steps (inference.py, adam_bandwidth.py, finetune.py,
profile_lift.py): wall clock, and the GPU time of a profiled run."""

import time

import torch


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU), so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, device: torch.device, warmup: int, iterations: int) -> float:
    """Median seconds per call of `function`, timed with device synchronisation around each call."""
    for _ in range(warmup):
        function()
    timings = []
    for _ in range(iterations):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        timings.append(time.perf_counter() - start)
    return sorted(timings)[len(timings) // 2]


def device_kernels(prof, steps: int) -> tuple[list, float]:
    """The GPU kernels and copies a `torch.profiler` run recorded (no CPU-side operator rows, which double-count
    them), slowest first, and their total in ms per step of the `steps` profiled."""
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return kernels, sum(e.self_device_time_total for e in kernels) / steps / 1000


def top_kernels_ms(kernels: list, steps: int, count: int) -> dict[str, float]:
    """The first `count` of `device_kernels`' rows as {name (80 characters): ms per step}, for a JSON line."""
    return {e.key[:80]: round(e.self_device_time_total / steps / 1000, 3) for e in kernels[:count]}
