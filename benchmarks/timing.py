"""Wall-clock timing shared by the benchmarks that time whole steps (inference.py, adam_bandwidth.py)."""

import time

import torch


def median_seconds(function, device: torch.device, warmup: int, iterations: int) -> float:
    """Median seconds per call of `function`, timed with device synchronisation around each call."""
    for _ in range(warmup):
        function()
    timings = []
    for _ in range(iterations):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - start)
    return sorted(timings)[len(timings) // 2]
