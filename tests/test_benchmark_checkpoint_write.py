"""benchmarks/checkpoint_write.py on the CPU: its line describes a real write of a Stage I-shaped state."""

import json

from benchmark_helpers import load_benchmark


def test_the_line_times_both_ways_of_writing(tmp_path, capsys):
    load_benchmark("checkpoint_write").main(
        ["--gaussians", "5000", "--device", "cpu", "--work_dir", str(tmp_path)]
    )
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert line["benchmark"] == "checkpoint_write" and line["device"] == "cpu" and line["gaussians"] == 5000
    # 123 floats per Gaussian (the lifter's groups at feature_dim 64), each with Adam's two moments
    assert line["state_gb"] == round(5000 * 123 * 4 * 3 / 1e9, 3)
    assert line["synchronous_save_s"] > 0 and line["background_write_s"] >= line["background_submit_ms"] / 1e3
    assert line["adam_steps_during_write"] >= 1 and line["adam_step_ms_alone"] > 0
    assert list(tmp_path.iterdir()) == []  # the checkpoint it wrote is removed
