"""benchmarks/lift_node.py, the headline's Stage I measurement: scene copies that the scene lists keep apart, the
launch over processes, the record's arithmetic, and a whole run on the CPU (one process, a tiny scene)."""

import json

import pytest
from backbone_helpers import save_tiny_dinov2
from benchmark_helpers import load_benchmark

from fit3d_hf.scene.specs import resolve_scene_list


def _lift_node():
    return load_benchmark("lift_node")


def test_copies_link_the_scene_and_stay_separate_scenes(tmp_path):
    scene = tmp_path / "bench00000"
    (scene / "images").mkdir(parents=True)
    (scene / "images" / "DSC00000.JPG").write_bytes(b"jpeg")
    (scene / "transforms_train.json").write_text("{}")
    copies = _lift_node().link_copies(scene, tmp_path / "copies", 3)
    assert [c.name for c in copies] == ["bench00000", "bench00001", "bench00002"]
    for copy in copies:
        assert (copy / "images" / "DSC00000.JPG").read_bytes() == b"jpeg"
        assert (copy / "transforms_train.json").is_symlink()
    # a second preparation starts over
    assert len(_lift_node().link_copies(scene, tmp_path / "copies", 2)) == 2
    assert sorted(p.name for p in (tmp_path / "copies").iterdir()) == ["bench00000", "bench00001"]


def test_launch_flags_follow_the_processes_and_the_device(tmp_path):
    module = _lift_node()

    def command(processes, device):
        args = module.argparse.Namespace(
            processes=processes,
            device=device,
            port=29541,
            feature_dim=64,
            iterations=30000,
            mixed_precision="bf16",
        )
        return module.launch_command(args, tmp_path / "scenes", tmp_path / "backbone", tmp_path / "out")

    eight = command(8, "cuda")
    assert (
        eight[eight.index("--num_processes") + 1] == "8" and "--multi_gpu" in eight and "--cpu" not in eight
    )
    assert eight[eight.index("--scenes") + 1] == str(tmp_path / "scenes")
    assert eight[eight.index("--iterations") + 1] == "30000" and eight[-2:] == ["--previews", "False"]
    # the Stage I precision goes to the script, accelerate's own stays off
    assert eight.index("--mixed_precision") < eight.index("--scenes")
    assert eight[eight.index("--mixed_precision", eight.index("--scenes")) + 1] == "bf16"
    one_cpu = command(1, "cpu")
    assert "--cpu" in one_cpu and "--multi_gpu" not in one_cpu
    assert "--multi_gpu" in command(2, "cpu")  # torchrun's gloo processes
    assert "--multi_gpu" not in command(1, "cuda")


def test_summary_rates_and_projection(tmp_path):
    copies = []
    for index, seconds in enumerate([240.0, 246.0, 252.0, 234.0]):
        (tmp_path / "out" / f"bench{index:05d}").mkdir(parents=True)
        (tmp_path / "out" / f"bench{index:05d}" / "metrics.json").write_text(
            json.dumps({"seconds_total": seconds})
        )
        copies.append(tmp_path / "copies" / f"bench{index:05d}")
    record = _lift_node().summarise(tmp_path / "out", copies, processes=2, wall_s=600.0)
    assert record["scenes"] == 4 and record["wall_minutes"] == 10.0
    assert record["scenes_per_hour"] == 24.0 and record["scenes_per_hour_per_process"] == 12.0
    assert record["minutes_per_scene"] == [4.0, 4.1, 4.2, 3.9]
    assert record["projected_node_hours"] == pytest.approx(280 / (12 * 8), abs=0.01)
    # two launches of 2 processes: the same GPUs, so the rate per GPU is the node's over 2, per process over 4
    shared = _lift_node().summarise(tmp_path / "out", copies, processes=2, wall_s=600.0, launches=2)
    assert shared["launches"] == 2 and shared["scenes_per_hour_per_gpu"] == 12.0
    assert shared["scenes_per_hour_per_process"] == 6.0
    assert shared["projected_node_hours"] == record["projected_node_hours"]
    (tmp_path / "out" / "bench00003" / "metrics.json").unlink()
    with pytest.raises(RuntimeError, match="bench00003 did not finish"):
        _lift_node().summarise(tmp_path / "out", copies, processes=2, wall_s=600.0)


@pytest.mark.slow
def test_a_whole_run_on_the_cpu(tmp_path, capfd):
    save_tiny_dinov2(tmp_path / "backbone")
    size = ["--views", "9", "--width", "64", "--height", "48", "--num_points", "300", "--workers", "1"]
    record = _lift_node().main([
        *size, "--processes", "1", "--launches", "2", "--iterations", "3", "--device", "cpu",
        "--mixed_precision", "no", "--backbone", str(tmp_path / "backbone"), "--work_dir", str(tmp_path / "work"),
    ])  # fmt: skip
    # stdout holds the record alone (the launched processes write to stderr)
    assert [json.loads(line) for line in capfd.readouterr().out.strip().splitlines()] == [record]
    # two launches at once (a scene each by default), which the claims kept apart
    assert record["processes"] == 1 and record["launches"] == 2
    assert record["scenes"] == 2 and len(record["minutes_per_scene"]) == 2
    assert record["scenes_per_hour"] > 0 and record["projected_node_hours"] > 0
    lifted = tmp_path / "work" / "node_lifted"
    assert sorted(p.name for p in lifted.iterdir() if not p.name.startswith(".")) == [
        "bench00000",
        "bench00001",
    ]
    for scene in ("bench00000", "bench00001"):
        metrics = json.loads((lifted / scene / "metrics.json").read_text())
        assert (
            metrics["num_gaussians"] == 300
        )  # the scene's 300 sparse points, 3 iterations: no densification
    assert len(resolve_scene_list(str(tmp_path / "work" / "node_scenes"))) == 2
