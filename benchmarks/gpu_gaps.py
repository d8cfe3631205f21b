"""Where the GPU waits: the idle gaps between GPU activities in a torch.profiler Chrome trace, and which of them
the host caused (the next kernel's launch call returned only after the GPU had run dry), attributed to the
innermost operator that was running on the host at that launch.

Used by profile_lift.py (Stage I's iteration is ~0.4 ms slower than its kernels add up to, session 9, H100);
Nsight Systems does not run on the lent machines (device/KINDS.md), torch.profiler's trace does. Written by hand:
torch.profiler reports per-kernel sums but not the idle time between kernels or its cause.
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from pathlib import Path

__all__ = ["gpu_idle_gaps", "gpu_idle_gaps_of_file", "gpu_time_per_call", "trace_events"]

_GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
_RUNTIME_CATEGORIES = {"cuda_runtime", "cuda_driver"}


def gpu_idle_gaps(events: list[dict], min_gap_us: float = 1.0, top: int = 10) -> dict:
    """Idle time of the GPU between its activities in `events` (Chrome trace events, times in microseconds).

    Returns a dict: `busy_us` (union of the activities), `idle_us` (gaps of at least `min_gap_us` between the
    first and last activity), `host_bound_us` (the part of it where the next activity's launch call ended after
    the GPU went idle) and `by_operator`: the `top` host operators (innermost `cpu_op` around those launches, or
    "(no operator)") with their host-bound idle time, largest first.
    """
    complete = [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]
    gpu = sorted((e for e in complete if e.get("cat") in _GPU_CATEGORIES), key=lambda e: float(e["ts"]))
    launches = {
        e["args"]["correlation"]: e
        for e in complete
        if e.get("cat") in _RUNTIME_CATEGORIES and "correlation" in e.get("args", {})
    }
    # by start, and of two that start together the longer (outer) first
    operators = sorted(
        (e for e in complete if e.get("cat") == "cpu_op"), key=lambda e: (float(e["ts"]), -float(e["dur"]))
    )
    starts = [float(e["ts"]) for e in operators]
    result = {"busy_us": 0.0, "idle_us": 0.0, "host_bound_us": 0.0, "by_operator": []}
    if not gpu:
        return result
    by_operator: dict[str, float] = defaultdict(float)
    busy_until = float(gpu[0]["ts"])
    for event in gpu:
        start, end = float(event["ts"]), float(event["ts"]) + float(event["dur"])
        gap = start - busy_until
        if gap >= min_gap_us:
            result["idle_us"] += gap
            launch = launches.get(event.get("args", {}).get("correlation"))
            if launch is not None and float(launch["ts"]) + float(launch["dur"]) > busy_until:
                # the GPU ran dry before the host had launched this activity: host-bound, for the part of the
                # gap after the GPU went idle and until the launch returned
                waited = min(gap, float(launch["ts"]) + float(launch["dur"]) - busy_until)
                result["host_bound_us"] += waited
                by_operator[_innermost_operator(operators, starts, float(launch["ts"]))] += waited
        result["busy_us"] += max(0.0, end - max(start, busy_until))
        busy_until = max(busy_until, end)
    ranked = sorted(by_operator.items(), key=lambda item: -item[1])[:top]
    result["by_operator"] = [(name, round(us, 1)) for name, us in ranked]
    return result


def gpu_time_per_call(events: list[dict], annotation: str, **kwargs) -> list[dict]:
    """Where each call's time goes, for calls marked by host regions named `annotation`
    (`torch.profiler.record_function`), each followed by a synchronisation so that calls do not overlap.

    For each region, in order: `latency_us`, from the region's start to its first GPU activity (the host work before
    the first launch reaches the GPU, which a CUDA-event timing of the call counts); `span_us`, from its start to the
    end of its last activity (what such a timing measures); and `gpu_idle_gaps` (with `kwargs`) of its activities:
    those that start after the region's start and before the next region's.
    """
    complete = [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]
    starts = sorted(
        float(e["ts"]) for e in complete if e.get("cat") == "user_annotation" and e.get("name") == annotation
    )
    host = [e for e in complete if e.get("cat") not in _GPU_CATEGORIES]
    gpu = [e for e in complete if e.get("cat") in _GPU_CATEGORIES]
    calls = []
    for start, next_start in zip(starts, starts[1:] + [float("inf")], strict=True):
        own = [e for e in gpu if start <= float(e["ts"]) < next_start]
        if not own:
            calls.append({"latency_us": None, "span_us": None, **gpu_idle_gaps([], **kwargs)})
            continue
        first = min(float(e["ts"]) for e in own)
        last = max(float(e["ts"]) + float(e["dur"]) for e in own)
        calls.append(
            {"latency_us": first - start, "span_us": last - start, **gpu_idle_gaps(host + own, **kwargs)}
        )
    return calls


def trace_events(path: str | Path) -> list[dict]:
    """The events of a trace written by `torch.profiler.profile.export_chrome_trace`."""
    trace = json.loads(Path(path).read_text())
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def gpu_idle_gaps_of_file(path: str | Path, **kwargs) -> dict:
    """`gpu_idle_gaps` of a trace written by `torch.profiler.profile.export_chrome_trace`."""
    return gpu_idle_gaps(trace_events(path), **kwargs)


def _innermost_operator(operators: list[dict], starts: list[float], ts: float) -> str:
    """Name of the innermost `cpu_op` running at time `ts`: operators of one thread nest, so it is the latest to
    start among those that contain `ts` (`operators` sorted by start, `starts` their start times)."""
    for i in range(bisect.bisect_right(starts, ts) - 1, -1, -1):
        if starts[i] + float(operators[i]["dur"]) >= ts:
            return operators[i]["name"]
    return "(no operator)"
