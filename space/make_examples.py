"""Writes the Space's example images: views of procedurally generated rooms (nothing is downloaded).

For each seed, the view that shows the most box and sphere pixels (judged on a quick low-resolution render) is
rendered at full size with anti-aliasing and saved as `examples/room_<seed>.png`.

    python space/make_examples.py [--output_dir space/examples] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fit3d_hf.scene.synthetic import SEMANTIC_CLASSES, SyntheticSceneConfig, make_scene_spec, render_view

__all__ = ["make_example", "main"]

_OBJECT_LABELS = [SEMANTIC_CLASSES.index("box"), SEMANTIC_CLASSES.index("sphere")]


def make_example(seed: int, width: int = 320, height: int = 240, num_views: int = 12) -> np.ndarray:
    """Renders the most object-filled view of the room built from `seed`.

    Args:
        seed: scene seed.
        width: image width in pixels.
        height: image height in pixels.
        num_views: candidate views along the room's camera path.

    Returns:
        uint8 `[height, width, 3]` image.
    """
    room = make_scene_spec(SyntheticSceneConfig(seed=seed, num_views=num_views, width=width, height=height))
    scale = 0.25  # candidates are judged on quarter-size renders: the ray caster costs seconds per full view
    scores = [
        np.isin(render_view(room, camera.scaled(scale))["labels"], _OBJECT_LABELS).mean()
        for camera in room.cameras
    ]
    best = room.cameras[int(np.argmax(scores))]
    rgb = render_view(room, best, supersample=2)["rgb"]
    return (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output_dir", default=str(Path(__file__).resolve().parent / "examples"), help="Where the PNGs go."
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="Scene seeds, one image each."
    )
    parser.add_argument("--width", type=int, default=320, help="Image width in pixels.")
    parser.add_argument("--height", type=int, default=240, help="Image height in pixels.")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        target = output_dir / f"room_{seed}.png"
        # Written next to the target and renamed, so an interrupted run leaves no half-written PNG.
        handle, temporary = tempfile.mkstemp(suffix=".png", dir=output_dir)
        os.close(handle)
        try:
            Image.fromarray(make_example(seed, args.width, args.height)).save(temporary)
            os.chmod(
                temporary, 0o644
            )  # mkstemp creates 0600; the images are meant to be served and committed
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        print(f"wrote {target}")  # noqa: T201 (a script's report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
