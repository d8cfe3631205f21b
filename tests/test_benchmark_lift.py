"""The Stage I benchmark's point replication (benchmarks/lift.py --points_per_sample): a ScanNet++-sized Gaussian
count from the sparse points the synthetic generator can afford."""

import numpy as np
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
