"""benchmarks/timing.py's reading of a profiled run: only device rows count, slowest first, per step."""

from types import SimpleNamespace

from benchmark_helpers import load_benchmark


class _Profile:
    def __init__(self, rows):
        self.rows = rows

    def key_averages(self):
        return self.rows


def test_device_kernels_keeps_device_rows_slowest_first_and_totals_them_per_step():
    timing = load_benchmark("timing")
    rows = [
        SimpleNamespace(key="aten::mul", self_device_time_total=0),  # a host-side operator row
        SimpleNamespace(key="copy", self_device_time_total=1500),
        SimpleNamespace(key="gemm", self_device_time_total=9000),
        SimpleNamespace(key="sort", self_device_time_total=3000),
    ]
    kernels, ms_per_step = timing.device_kernels(_Profile(rows), steps=3)
    assert [e.key for e in kernels] == ["gemm", "sort", "copy"]
    assert ms_per_step == (9000 + 3000 + 1500) / 3 / 1000  # microseconds over 3 steps, in ms
    assert timing.top_kernels_ms(kernels, steps=3, count=2) == {"gemm": 3.0, "sort": 1.0}
