"""benchmarks/target_features.py on the CPU: the scene-data phase split into the image readers, the backbone by
batch size (precisions other than fp32 are measured on CUDA only) and the phase as the lift runs it."""

import json

from benchmark_helpers import load_benchmark

from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_scene


def _records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_random_images_backbone_lines_compare_each_batch_with_batch_one(capsys):
    size = ["--width", "56", "--height", "42", "--device", "cpu"]
    load_benchmark("target_features").main(["--views", "3", "--batches", "1,2", *size])
    records = _records(capsys)
    assert [(r["part"], r["precision"], r["batch"]) for r in records] == [
        ("backbone", "fp32", 1),
        ("backbone", "fp32", 2),
    ]
    assert all(r["device"] == "cpu" and r["image_size"] == [56, 42] for r in records)
    assert all(r["views_per_s"] > 0 for r in records)
    assert records[0]["max_abs_diff"] == 0.0 and records[0]["mean_rel_diff"] == 0.0  # the reference itself
    # batching changes the features by rounding only (they are stored in fp16: ~1e-3 relative)
    assert records[1]["max_abs_diff"] < 1e-2 and records[1]["mean_rel_diff"] < 1e-3


def test_a_scene_adds_its_readers_and_the_whole_phase(tmp_path, capsys):
    config = SyntheticSceneConfig(seed=2, num_views=4, width=56, height=42, num_points=200)
    scene = generate_scene(tmp_path, "bench00000", config, workers=1)
    load_benchmark("target_features").main(
        ["--scene", str(scene), "--views", "2", "--batches", "2", "--device", "cpu"]
    )
    records = _records(capsys)
    parts = [r["part"] for r in records]
    assert parts[0] == "readers" and parts[-1] == "scene_data"
    assert parts.count("backbone") == 1 and records[parts.index("backbone")]["batch"] == 2
    threads = [r["threads"] for r in records if r["part"] == "readers"]
    assert threads == sorted(set(threads)) and threads[0] >= 1
    assert all(r["views_per_s"] > 0 for r in records)
