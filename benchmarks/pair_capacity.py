"""How often the CUDA binning's pair buffers overflow, and how much they are padded, under a capacity rule
(`fit3d_hf/render/_binning.py`: the next call's capacity is max(margin x the last count + 1024, decay x the
last capacity); an overflow redoes the binning exactly and wastes a rasterizer forward, padding slots are sorted
with the pairs). Counts the (tile, Gaussian) pairs of every view of a scene for its starting Gaussians (the
initialisation Stage I uses), then replays 30k iterations of Stage I's view order (each view once per epoch, in
random order) under several rules. Densification changes the Gaussian count every 100 iterations until 15k, and
capacities are kept per count: there the next call starts over with an exact binning. Prints one JSON line per
rule.

    python benchmarks/pair_capacity.py --scene .liftscene/bench00000 --points_per_sample 5   # ~1M Gaussians

Runs on the CPU extension (the counts are the same as on CUDA; ~0.12 s per view at 1M Gaussians on 2 cores).
"""

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fit3d_hf.gaussians.model import FeatureGaussians
from fit3d_hf.render import _binning
from fit3d_hf.render._backend import extension_for
from fit3d_hf.render._wrapper import project
from fit3d_hf.scene import read_scene

RULES = [(1.06, 0.98), (1.06, 0.99), (1.06, 0.995), (1.06, 0.999), (1.1, 0.99), (1.2, 0.98)]


def pairs_per_view(scene) -> list[int]:
    gaussians = FeatureGaussians.from_points(np.asarray(scene.points), np.asarray(scene.point_colors), 8)
    ext = extension_for(torch.device("cpu"))
    counts = []
    for frame in tqdm(scene.frames, desc="pairs per view"):
        camera = frame.camera
        K = torch.from_numpy(camera.K).float()[None]
        world_to_camera = torch.from_numpy(camera.world_to_camera).float()[None]
        with torch.no_grad():
            means2d, conics, depths, radii = project(
                gaussians.means, gaussians.normalized_quats, gaussians.scales, gaussians.opacities,
                world_to_camera, K, camera.width, camera.height,
            )  # fmt: skip
            _, _, total = ext.isect_tiles(
                means2d,
                conics,
                gaussians.opacities.contiguous(),
                depths,
                radii,
                camera.width,
                camera.height,
                0,
            )
        counts.append(int(total))
    return counts


def replay(
    counts: list[int], margin: float, decay: float, iterations: int, densify_until: int = 15000, seed: int = 0
) -> dict:
    """Overflowing calls and mean padding (unused slots per pair) over `iterations` renders in epoch order."""
    rng, order = random.Random(seed), []
    capacity, overflows, padding = 0, 0, 0.0
    for iteration in range(iterations):
        if iteration % 100 == 0 and iteration <= densify_until:
            capacity = 0  # a new Gaussian count: a new capacity entry
        if not order:
            order = list(range(len(counts)))
            rng.shuffle(order)
        pairs = counts[order.pop()]
        if capacity > 0:
            overflows += pairs > capacity
            padding += max(capacity - pairs, 0) / pairs
        capacity = max(int(margin * pairs) + 1024, int(decay * capacity))
    return {"overflow_rate": round(overflows / iterations, 4), "mean_padding": round(padding / iterations, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scene", type=Path, required=True, help="a scene folder (COLMAP text or transforms.json)"
    )
    parser.add_argument("--points_per_sample", type=int, default=1, help="jittered copies of each point")
    parser.add_argument("--iterations", type=int, default=30000)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        scene_dir = args.scene
        if args.points_per_sample > 1:
            from lift import replicate_points  # benchmarks/lift.py: the same copies its 1M-Gaussian scene has

            scene_dir = Path(tmp) / args.scene.name
            shutil.copytree(args.scene, scene_dir, symlinks=True)
            replicate_points(scene_dir / "points3D.txt", args.points_per_sample, 0.005)
        scene = read_scene(scene_dir)
        start = time.perf_counter()
        counts = pairs_per_view(scene)
    base = {
        "benchmark": "pair_capacity",
        "device": "cpu (counts)",
        "gaussians": len(scene.points),
        "views": len(counts),
        "pairs_min_mean_max": [min(counts), round(float(np.mean(counts))), max(counts)],
        "counting_s": round(time.perf_counter() - start, 1),
    }
    for margin, decay in RULES:
        current = (margin, decay) == (_binning._CAPACITY_MARGIN, _binning._CAPACITY_DECAY)
        line = {**base, "margin": margin, "decay": decay, "current": current}
        print(json.dumps({**line, **replay(counts, margin, decay, args.iterations)}))  # noqa: T201


if __name__ == "__main__":
    main()
