"""`fit3d lift`: Stage I for the scenes of a scene spec, one after the other (use training/lift_features.py with
accelerate to share many scenes over GPUs)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

DESCRIPTION = "Stage I: lift a backbone's features of scenes into 3D feature Gaussians"


@dataclass
class SceneArguments:
    scene: str = field(metadata={"help": "The scenes: a scene (ScanNet++ layout, nerfstudio/instant-ngp transforms.json or COLMAP text), a folder of scenes, a text file listing scenes, or a comma-separated list of these."})


def main(argv: list[str]) -> int:
    from fit3d_hf.cli import parse_args
    from fit3d_hf.lifting import LiftingArguments, lift_many, resolve_scene_list

    scene_args, lift_args = parse_args("fit3d lift", DESCRIPTION, [SceneArguments, LiftingArguments], argv)
    for metrics in lift_many(resolve_scene_list(scene_args.scene), lift_args):  # one JSON line per scene
        summary = {key: metrics[key] for key in ("scene_id", "num_gaussians", "psnr_train", "psnr_heldout", "feature_l1_train", "seconds_training")}
        sys.stdout.write(json.dumps(summary) + "\n")
    return 0
