"""benchmarks/gpu_gaps.py: the GPU's idle time between activities of a profiler trace, and the part the host
caused, attributed to the innermost host operator around the late launch."""

import pytest
import torch
from benchmark_helpers import load_benchmark
from torch.profiler import ProfilerActivity, profile


def _gpu_gaps():
    return load_benchmark("gpu_gaps")


def _event(cat, name, ts, dur, correlation=None):
    event = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {}}
    if correlation is not None:
        event["args"]["correlation"] = correlation
    return event


def test_gaps_split_into_host_bound_and_other():
    events = [
        # host: an operator launches kernel 1 early, a long one launches kernel 2 after kernel 1 has ended
        _event("cpu_op", "aten::outer", 0, 200),
        _event("cpu_op", "aten::early", 0, 5),
        _event("cuda_runtime", "cudaLaunchKernel", 1, 2, correlation=1),
        _event("cpu_op", "aten::slow_host", 10, 60),
        _event("cuda_runtime", "cudaLaunchKernel", 65, 3, correlation=2),
        # kernel 3 was launched long before: its gap (a wait on something else) is idle but not host-bound
        _event("cuda_runtime", "cudaLaunchKernel", 66, 2, correlation=3),
        # GPU: kernel 1 [5, 30), idle until 70 (the launch of kernel 2 returned at 68: 38 us host-bound),
        # kernel 2 [70, 80), a memset overlapping it, idle [90, 100), kernel 3 [100, 110)
        _event("kernel", "k1", 5, 25, correlation=1),
        _event("kernel", "k2", 70, 10, correlation=2),
        _event("gpu_memset", "Memset", 75, 15),
        _event("kernel", "k3", 100, 10, correlation=3),
    ]
    gaps = _gpu_gaps().gpu_idle_gaps(events)
    assert gaps["busy_us"] == pytest.approx(25 + 20 + 10)
    assert gaps["idle_us"] == pytest.approx(40 + 10)
    assert gaps["host_bound_us"] == pytest.approx(38)
    assert gaps["by_operator"] == [("aten::slow_host", 38.0)]
    # of two operators that start together, the shorter (inner) one is named
    late_launch = [
        _event("cpu_op", "aten::inner", 0, 50),
        _event("cpu_op", "aten::outer", 0, 100),
        _event("cuda_runtime", "cudaLaunchKernel", 40, 2, correlation=1),
        _event("kernel", "k0", 0, 10, correlation=0),
        _event("kernel", "k1", 45, 10, correlation=1),
    ]
    assert _gpu_gaps().gpu_idle_gaps(late_launch)["by_operator"] == [("aten::inner", 32.0)]


def test_small_gaps_are_ignored_and_an_empty_trace_is_all_zero():
    module = _gpu_gaps()
    events = [_event("kernel", "a", 0, 10, 1), _event("kernel", "b", 10.5, 10, 2)]
    assert module.gpu_idle_gaps(events)["idle_us"] == 0.0
    assert module.gpu_idle_gaps(events, min_gap_us=0.1)["idle_us"] == pytest.approx(0.5)
    assert module.gpu_idle_gaps([]) == {
        "busy_us": 0.0,
        "idle_us": 0.0,
        "host_bound_us": 0.0,
        "by_operator": [],
    }


def test_reads_a_trace_torch_exports(tmp_path):
    """A real export (CPU activity only here: no GPU rows, so nothing idles) goes through the file reader."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        x = torch.randn(64, 64)
        (x @ x).sum()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    gaps = _gpu_gaps().gpu_idle_gaps_of_file(tmp_path / "trace.json")
    assert gaps == {"busy_us": 0.0, "idle_us": 0.0, "host_bound_us": 0.0, "by_operator": []}


def test_time_per_call_splits_latency_from_gaps():
    events = [
        # call 1 starts at 0: its first kernel starts at 30 (latency 30), idles [40, 50) waiting for a launch
        _event("user_annotation", "forward", 0, 60),
        _event("cpu_op", "aten::validate", 0, 25),
        _event("cuda_runtime", "cudaLaunchKernel", 26, 2, correlation=1),
        _event("cpu_op", "aten::slow_host", 30, 25),
        _event("cuda_runtime", "cudaLaunchKernel", 45, 4, correlation=2),
        _event("kernel", "k1", 30, 10, correlation=1),
        _event("kernel", "k2", 50, 20, correlation=2),
        # call 2 starts at 100: first kernel at 110, no gaps
        _event("user_annotation", "forward", 100, 20),
        _event("cuda_runtime", "cudaLaunchKernel", 105, 2, correlation=3),
        _event("kernel", "k3", 110, 15, correlation=3),
        # another region's name is not a call
        _event("user_annotation", "other", 200, 5),
    ]
    calls = _gpu_gaps().gpu_time_per_call(events, "forward")
    assert [c["latency_us"] for c in calls] == [30.0, 10.0]
    assert [c["span_us"] for c in calls] == [70.0, 25.0]
    assert calls[0]["idle_us"] == pytest.approx(10)
    assert calls[0]["host_bound_us"] == pytest.approx(9)  # the launch returned at 49, the GPU idled from 40
    assert calls[0]["by_operator"] == [("aten::slow_host", 9.0)]
    assert calls[1]["busy_us"] == pytest.approx(15) and calls[1]["idle_us"] == 0.0
    # a region without GPU work
    assert _gpu_gaps().gpu_time_per_call([_event("user_annotation", "forward", 0, 5)], "forward") == [
        {
            "latency_us": None,
            "span_us": None,
            "busy_us": 0.0,
            "idle_us": 0.0,
            "host_bound_us": 0.0,
            "by_operator": [],
        }
    ]
