"""The Stage I benchmark's scene preparation (benchmarks/lift.py): point replication (--points_per_sample), a
ScanNet++-sized Gaussian count from the sparse points the synthetic generator can afford, and a scene generated
elsewhere copied in (--base_scene)."""

import numpy as np
import pytest
from benchmark_helpers import load_benchmark

from fit3d_hf.scene.colmap_text import read_colmap_points


def test_points_are_replicated_with_their_colours_and_jittered(tmp_path):
    path = tmp_path / "points3D.txt"
    xyz = np.array([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]])
    rgb = np.array([[10, 20, 30], [200, 100, 0]])
    path.write_text(
        "# a COLMAP header line\n"
        + "".join(f"{i + 1} {p[0]} {p[1]} {p[2]} {c[0]} {c[1]} {c[2]} 0.1 1 0 2 5\n" for i, (p, c) in enumerate(zip(xyz, rgb, strict=True)))
    )  # fmt: skip
    load_benchmark("lift").replicate_points(path, copies=400, jitter=0.01)
    new_xyz, new_rgb = read_colmap_points(path)
    assert new_xyz.shape == (800, 3)
    for index in range(2):
        copies = slice(400 * index, 400 * (index + 1))
        assert (new_rgb[copies] == rgb[index]).all()
        offsets = new_xyz[copies] - xyz[index]
        assert np.abs(offsets.mean(axis=0)).max() < 0.003  # centred on the point (std of the mean 0.0005)
        assert 0.009 < offsets.std() < 0.011


def test_a_scene_generated_elsewhere_is_copied_and_replicated_as_if_generated_here(
    tmp_path, monkeypatch, capsys
):
    lift = load_benchmark("lift")
    size = ["--views", "9", "--width", "64", "--height", "48", "--num_points", "300", "--workers", "1"]

    def run(*options):
        monkeypatch.setattr("sys.argv", ["lift.py", *size, "--generate_only", *options])
        lift.main()
        return tmp_path / options[options.index("--work_dir") + 1] / "data" / "scenes" / "bench00000"

    base = run("--work_dir", str(tmp_path / "base"))
    generated = run("--work_dir", str(tmp_path / "generated"), "--points_per_sample", "3")

    def no_generation(*args, **kwargs):
        raise AssertionError("--base_scene given: nothing is generated")

    monkeypatch.setattr(lift, "generate_scene", no_generation)
    copied = run(
        "--work_dir", str(tmp_path / "copied"), "--points_per_sample", "3", "--base_scene", str(base)
    )
    capsys.readouterr()
    assert len(read_colmap_points(base / "points3D.txt")[0]) == 300
    copied_xyz, copied_rgb = read_colmap_points(copied / "points3D.txt")
    generated_xyz, generated_rgb = read_colmap_points(generated / "points3D.txt")
    assert copied_xyz.shape == (900, 3)
    np.testing.assert_array_equal(copied_xyz, generated_xyz)  # same replication seed, same jitter
    np.testing.assert_array_equal(copied_rgb, generated_rgb)
    images = sorted(p.name for p in (generated / "images").iterdir())
    assert len(images) == 9 and images == sorted(p.name for p in (copied / "images").iterdir())
    assert all(
        (generated / "images" / n).read_bytes() == (copied / "images" / n).read_bytes() for n in images
    )


def test_a_base_scene_of_another_view_count_is_refused(tmp_path, monkeypatch, capsys):
    lift = load_benchmark("lift")
    (tmp_path / "scene" / "images").mkdir(parents=True)
    (tmp_path / "scene" / "images" / "DSC00000.JPG").write_bytes(b"")
    monkeypatch.setattr("sys.argv", ["lift.py", "--views", "9", "--base_scene", str(tmp_path / "scene")])
    with pytest.raises(SystemExit):
        lift.main()
    assert "1 images in images/, --views is 9" in capsys.readouterr().err
