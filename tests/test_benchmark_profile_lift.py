"""benchmarks/profile_lift.py runs only on a GPU; its densification timing runs here on the CPU, on a small random
scene, so that the device call does not find it broken: events change the Gaussians as they report."""

import torch
from benchmark_helpers import load_benchmark

from fit3d_hf.lifting import LiftingArguments
from fit3d_hf.lifting.lifter import Lifter


def _cpu_lifter(profile_lift, points: int, **overrides) -> Lifter:
    """A Lifter on the script's random scene (4 views, 64 x 48), on the CPU."""
    device = torch.device("cpu")
    data = profile_lift.random_scene(points, 4, 64, 48, 32, device)
    args = LiftingArguments(
        backbone="random", out="/tmp/unused", feature_dim=8, iterations=30_000, checkpoint_interval=0,
        device="cpu", **overrides,
    )  # fmt: skip
    return Lifter(args, data, list(range(4)), device)


def test_densification_events_are_timed_and_change_the_gaussians(capsys):
    profile_lift = load_benchmark("profile_lift")
    lifter = _cpu_lifter(
        profile_lift,
        3000,
        densify_until=30_000,
        densify_from=10**9,
        densify_grad_threshold=0.0,
        max_gaussians=3060,
    )
    before = len(lifter.gaussians)
    timed = profile_lift.time_densification_events(lifter, events=2, steps_between=2)
    line = capsys.readouterr().out.strip()
    assert line.startswith("densification event: ") and " ms (min " in line
    changes = eval(line.split("changes: ", 1)[1])  # the printed list of dicts
    # threshold 0: every Gaussian seen is a candidate, and the cap lets 60 of them through
    assert len(changes) == 2 and changes[0]["cloned"] + changes[0]["split"] == 60
    # each event's total is the count it left, and the last one is the lifter's
    assert changes[0]["total"] == before + changes[0]["cloned"] + changes[0]["split"] - changes[0]["pruned"]
    assert changes[-1]["total"] == len(lifter.gaussians)
    # the JSON line's fields: the printed figures
    assert timed["densification_changes"] == changes
    assert f"{timed['densification_event_ms']:.1f} ms (min {timed['densification_event_min_ms']:.1f})" in line


def test_steps_are_timed_in_windows():
    profile_lift = load_benchmark("profile_lift")
    lifter = _cpu_lifter(profile_lift, 500)
    windows = profile_lift.time_steps(lifter, steps=6, windows=3)
    assert len(windows) == 3 and all(0 < w < 10_000 for w in windows)
    assert lifter.iteration == 6  # every step of the three windows of two ran


def test_colour_compression_is_timed(capsys):
    profile_lift = load_benchmark("profile_lift")
    lifter = _cpu_lifter(profile_lift, 500)
    timed = profile_lift.time_colour_refinement(lifter, steps=2)
    line = capsys.readouterr().out.strip()
    # the printed figures are the returned ones, and both phases took time
    assert line == (
        f"colour compression: k-means {timed['colour_kmeans_s']:.2f} s, "
        f"refinement {timed['colour_refinement_ms_per_step']:.2f} ms / step"
    )
    assert timed["colour_refinement_ms_per_step"] > 0


def test_a_background_checkpoint_is_timed_against_the_steps_it_overlaps(capsys):
    profile_lift = load_benchmark("profile_lift")
    lifter = _cpu_lifter(profile_lift, 500)
    timed = profile_lift.time_checkpoint_write(lifter, ms_per_iteration=1.0)
    line = capsys.readouterr().out.strip()
    steps = lifter.iteration
    assert steps >= 1  # the training went on while the checkpoint was written
    assert line.startswith("checkpoint in the background: ") and f"over {steps} steps" in line
    assert 0 <= timed["checkpoint_submit_ms"] and timed["checkpoint_write_s"] > 0
    during = timed["ms_per_iteration_during_checkpoint"]
    # (the write's seconds are rounded to 1 ms, the steps' ms to 0.01: a short write of few steps differs by that)
    assert abs(during * steps / 1000 - timed["checkpoint_write_s"]) <= 0.0005 + 0.000005 * steps
    assert abs(timed["checkpoint_cost_s"] - steps * (during - 1.0) / 1000) < 1e-3 * steps


def test_a_part_of_the_checkpoint_is_timed_in_place_of_the_write(tmp_path, capsys):
    """With `save`, the writer thread hands the host copy of the state to it instead of writing a file."""
    profile_lift = load_benchmark("profile_lift")
    lifter = _cpu_lifter(profile_lift, 500)
    received, before = [], lifter.gaussians.means.detach().clone()
    timed = profile_lift.time_checkpoint_write(
        lifter, 1.0, "checkpoint part test", save=lambda state, path: received.append((state, path))
    )
    assert capsys.readouterr().out.startswith("checkpoint part test in the background: ")
    ((state, path),) = received
    assert not path.exists()  # nothing written
    # the state at submit, copied, while the steps went on
    assert state["iteration"] == 0 and lifter.iteration >= 1
    assert torch.equal(state["gaussians"]["means"], before)
    assert timed["checkpoint_write_s"] > 0
    # the parts the lift stage times run on such a state: the checksums of every tensor
    sums = profile_lift.CHECKPOINT_PARTS["host_copy_and_checksums"](state, path)
    assert "gaussians/means" in sums and profile_lift.CHECKPOINT_PARTS["host_copy"](state, path) is None


def test_evaluation_is_timed_per_view(capsys):
    profile_lift = load_benchmark("profile_lift")
    lifter = _cpu_lifter(profile_lift, 500)
    calls = []
    evaluate = lifter.evaluate
    lifter.evaluate = lambda views: calls.append(list(views)) or evaluate(views)
    timed = profile_lift.time_evaluation(lifter, rounds=2)
    assert capsys.readouterr().out.strip() == f"evaluation: {timed['evaluation_ms_per_view']:.2f} ms / view"
    assert timed["evaluation_ms_per_view"] > 0
    assert calls == [[0, 1], [0, 1, 2, 3] * 2]  # a warm-up, then every training view twice in one call
