"""Stage I over many scenes, over processes: `accelerate launch training/lift_features.py
--scenes LIST --backbone ID --out DIR [Stage I options]`.

By default the processes claim scenes one at a time through claim files in `<out>/.claims/` (see
`fit3d_hf/scene_claims.py`): scenes balance over the GPUs, and a dead process's scene is taken over by
another once its lease expires. `--scene_assignment static` gives each process every N-th scene instead.
Finished scenes are skipped and an interrupted scene resumes from its last checkpoint, so the same command
can simply be launched again. The claims also let two launches share a node (each with its own
`--main_process_port`): two scenes per GPU, 7.5% more iterations per second on an H100 under CUDA MPS
(`nvidia-cuda-mps-control -d` first), 10% fewer without it.
Each scene records the settings that determine it (<out>/<scene_id>/settings.json): a relaunch with other
settings is refused, naming them, unless --overwrite. Sizing advice: `fit3d lift --help`.
"""

import sys
from dataclasses import dataclass, field, replace

from accelerate import Accelerator

from fit3d_hf.cli import parse_args, run_command
from fit3d_hf.lifting import LiftingArguments, lift_many, resolve_scene_list
from fit3d_hf.scene_claims import SceneClaims


@dataclass
class ScenesArguments:
    scenes: str = field(
        metadata={
            "help": "The scenes: a scene in any layout, a folder of scenes (or a dataset root with scenes/), a text file listing scenes, or a comma-separated list of these."
        }
    )
    scene_assignment: str = field(
        default="dynamic",
        metadata={"help": "'dynamic': processes claim scenes one at a time (claim files with a lease in <out>/.claims/); "
                  "'static': process i lifts every N-th scene from the i-th."},
    )  # fmt: skip
    claim_lease_seconds: float = field(
        default=600.0,
        metadata={
            "help": "Dynamic assignment: a scene whose owner sent no heartbeat for this long is taken over by another process."
        },
    )

    def __post_init__(self) -> None:
        if self.scene_assignment not in ("dynamic", "static"):
            raise ValueError(
                f"--scene_assignment must be 'dynamic' or 'static', got {self.scene_assignment!r}"
            )
        if self.claim_lease_seconds <= 0:
            raise ValueError(f"--claim_lease_seconds must be positive, got {self.claim_lease_seconds}")


def main(argv: list[str]) -> None:
    scenes_args, lift_args = parse_args(
        "lift_features.py", __doc__, [ScenesArguments, LiftingArguments], argv
    )
    accelerator = Accelerator()
    lift_args = replace(lift_args, device=str(accelerator.device))
    scene_paths = resolve_scene_list(scenes_args.scenes)
    accelerator.print(
        f"{len(scene_paths)} scenes over {accelerator.num_processes} processes ({scenes_args.scene_assignment})"
    )
    claims = None
    if scenes_args.scene_assignment == "dynamic":
        claims = SceneClaims(lift_args.out, lease_seconds=scenes_args.claim_lease_seconds)
    lift_many(scene_paths, lift_args, process_index=accelerator.process_index, num_processes=accelerator.num_processes,
              progress=accelerator.is_local_main_process, claims=claims)  # fmt: skip
    accelerator.wait_for_everyone()
    accelerator.print("done")


if __name__ == "__main__":
    sys.exit(run_command("lift_features.py", main, sys.argv[1:]))
