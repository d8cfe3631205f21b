"""`fit3d lift`: Stage I for the scenes of a scene spec, one after the other (use training/lift_features.py with
accelerate to share many scenes over GPUs)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

__all__ = ["DESCRIPTION", "SceneArguments", "main"]

DESCRIPTION = "Stage I: lift a backbone's features of scenes into 3D feature Gaussians"
_HELP = (
    DESCRIPTION
    + ". Writes <out>/<scene_id>/: gaussians.safetensors, metrics.json, settings.json (the settings that determine "
    "the result) and previews. A rerun with the same settings skips a finished scene and resumes an unfinished "
    "one; with other settings it is refused unless --overwrite. Cost: each iteration renders and back-propagates "
    "one view at full resolution, so a run costs about iterations x (pixels + Gaussians). On a 2-core CPU (the "
    "pure-PyTorch renderer) one iteration took about 0.8 CPU-seconds at 64x48 px with 3k Gaussians and 2.1 at "
    "160x120 px with 20k Gaussians and a 384-wide backbone: the default 30000 iterations of a full ScanNet++ scene "
    "are a GPU job (minutes on an H100). For a quick look on a CPU: --iterations 2000 --image_scale 0.25, and "
    "--random_init_points 20000 for scenes without sparse points. Many scenes on several GPUs: accelerate launch "
    "training/lift_features.py with the same options."
)


@dataclass
class SceneArguments:
    scene: str = field(
        metadata={
            "help": "The scenes: a scene (ScanNet++ layout, nerfstudio/instant-ngp transforms.json or COLMAP text), a folder of scenes, a text file listing scenes, or a comma-separated list of these."
        }
    )


def main(argv: list[str]) -> int:
    from fit3d_hf.cli import parse_args
    from fit3d_hf.lifting import LiftingArguments, lift_many, resolve_scene_list

    scene_args, lift_args = parse_args("fit3d lift", _HELP, [SceneArguments, LiftingArguments], argv)
    for metrics in lift_many(resolve_scene_list(scene_args.scene), lift_args):  # one JSON line per scene
        summary = {
            key: metrics[key]
            for key in (
                "scene_id",
                "num_gaussians",
                "psnr_train",
                "psnr_heldout",
                "feature_l1_train",
                "seconds_training",
            )
        }
        sys.stdout.write(json.dumps(summary) + "\n")
    return 0
