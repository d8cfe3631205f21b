"""Stage I over many scenes, sharded over processes: `accelerate launch training/lift_features.py
--scenes LIST --backbone ID --out DIR [Stage I options]`.

Each process lifts every N-th scene on its own GPU; finished scenes are skipped and an interrupted
scene resumes from its last checkpoint, so the same command can simply be launched again. Each scene records
the settings that determine it (<out>/<scene_id>/settings.json): a relaunch with other settings is refused,
naming them, unless --overwrite. Sizing advice: `fit3d lift --help`.
"""

import sys
from dataclasses import dataclass, field, replace

from accelerate import Accelerator

from fit3d_hf.cli import parse_args, run_command
from fit3d_hf.lifting import LiftingArguments, lift_many, resolve_scene_list


@dataclass
class ScenesArguments:
    scenes: str = field(
        metadata={"help": "Text file of scene folders (one per line), a dataset root with scenes/, or a folder of scenes."}
    )


def main(argv: list[str]) -> None:
    scenes_args, lift_args = parse_args("lift_features.py", __doc__, [ScenesArguments, LiftingArguments], argv)
    accelerator = Accelerator()
    lift_args = replace(lift_args, device=str(accelerator.device))
    scene_paths = resolve_scene_list(scenes_args.scenes)
    accelerator.print(f"{len(scene_paths)} scenes over {accelerator.num_processes} processes")
    lift_many(scene_paths, lift_args, process_index=accelerator.process_index, num_processes=accelerator.num_processes,
              progress=accelerator.is_local_main_process)  # fmt: skip
    accelerator.wait_for_everyone()
    accelerator.print("done")


if __name__ == "__main__":
    sys.exit(run_command("lift_features.py", main, sys.argv[1:]))
