"""benchmarks/pair_capacity.py: the replay of a capacity rule over a scene's per-view pair counts (overflowing
renders and padding), with values worked out by hand, and its count of pairs per view on a small scene."""

import json

import pytest
from benchmark_helpers import load_benchmark


def _replay(*args, **kwargs):
    return load_benchmark("pair_capacity").replay(*args, **kwargs)


def test_constant_counts_never_overflow_and_carry_the_margin():
    # the first render is exact; each later one has 1.06 x 100,000 + 1024 = 107,024 slots: 7.024% padding
    result = _replay([100_000], 1.06, 0.98, iterations=10, densify_until=-1)
    assert result == {
        "overflow_rate": 0.0,
        "mean_padding": pytest.approx(0.063, abs=5e-4),
    }  # 9 x 0.07024 / 10


def test_a_new_gaussian_count_starts_over_with_an_exact_binning():
    # 300 renders, new counts at 0, 100 and 200: 297 padded renders of 7.024%
    result = _replay([100_000], 1.06, 0.98, iterations=300, densify_until=15_000)
    assert result["mean_padding"] == pytest.approx(297 * 0.07024 / 300, abs=5e-4)


def test_a_capacity_that_never_shrinks_overflows_at_most_once():
    # two views of 100k and 300k pairs: once the larger one was seen, its capacity stays
    kept = _replay([100_000, 300_000], 1.06, 1.0, iterations=1000, densify_until=-1)
    assert kept["overflow_rate"] <= 1 / 1000
    # forgetting at once (decay 0), every 300k render right after a 100k one overflows: within an epoch half the
    # time, across two epochs a quarter of the time, so 3 in 8 renders
    forgetful = _replay([100_000, 300_000], 1.06, 0.0, iterations=1000, densify_until=-1)
    assert forgetful["overflow_rate"] == pytest.approx(0.375, abs=0.05)


def test_counts_a_scene_and_prints_one_line_per_rule(tmp_path, capsys):
    from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset

    config = SyntheticSceneConfig(seed=3, num_views=6, width=64, height=48, num_points=500)
    generate_dataset(tmp_path, num_scenes=1, num_val_scenes=0, config=config)
    scene = next(p for p in (tmp_path / "scenes").iterdir() if p.is_dir())
    benchmark = load_benchmark("pair_capacity")
    benchmark.main(["--scene", str(scene), "--iterations", "50"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(benchmark.RULES) and sum(line["current"] for line in lines) == 1
    low, mean, high = lines[0]["pairs_min_mean_max"]
    assert lines[0]["views"] == 6 and 0 < low <= mean <= high
