"""benchmarks/gpu_sharing.py is meant for a GPU; here its processes run on the CPU on a tiny scene, so that the
device call does not find the barrier or the record broken."""

from benchmark_helpers import load_benchmark


def test_processes_are_timed_together_and_summed(capsys):
    gpu_sharing = load_benchmark("gpu_sharing")
    argv = ["--processes", "2", "--gaussians", "300", "--steps", "3", "--width", "64", "--height", "48"]
    record = gpu_sharing.main([*argv, "--device", "cpu", "--label", "check"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"benchmark": "gpu_sharing"')
    assert record["processes"] == 2 and record["steps"] == 3 and record["label"] == "check"
    assert record["device"] == "cpu" and len(record["ms_per_iteration"]) == 2
    assert all(ms > 0 for ms in record["ms_per_iteration"])
    # the GPU's rate: both processes' steps over the slower one's time
    expected = 2 * 3 / (max(record["ms_per_iteration"]) * 3 / 1000)
    assert abs(record["gpu_iterations_per_s"] - expected) <= 0.02 * expected + 0.1
