"""`fit3d lift`: Stage I for one scene (use training/lift_features.py with accelerate for many)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

__all__ = ["DESCRIPTION", "SceneArguments", "main"]

DESCRIPTION = "Stage I: lift a backbone's features of one scene into 3D feature Gaussians"


@dataclass
class SceneArguments:
    scene: str = field(metadata={"help": "Scene folder: ScanNet++ layout, nerfstudio/instant-ngp transforms.json or COLMAP text."})


def main(argv: list[str]) -> int:
    from fit3d_hf.cli import parse_args
    from fit3d_hf.lifting import LiftingArguments, lift_scene

    scene_args, lift_args = parse_args("fit3d lift", DESCRIPTION, [SceneArguments, LiftingArguments], argv)
    metrics = lift_scene(scene_args.scene, lift_args)
    summary = {key: metrics[key] for key in ("scene_id", "num_gaussians", "psnr_train", "psnr_heldout", "feature_l1_train", "seconds_training")}
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0
