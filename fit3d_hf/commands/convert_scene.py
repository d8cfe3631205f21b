"""`fit3d convert-scene`: write scenes in another layout (ScanNet++, nerfstudio or COLMAP text).

No stage needs it: every stage reads every layout. It is for other tools (nerfstudio, 3DGS, FiT3D's original
code) and for sharing a capture in one layout. See `fit3d_hf.scene.convert` for what each layout holds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

__all__ = ["ConvertArguments", "DESCRIPTION", "main"]

DESCRIPTION = "Write scenes (any layout fit3d-hf reads) as ScanNet++, nerfstudio or COLMAP text, files copied"


@dataclass
class ConvertArguments:
    scenes: str = field(
        metadata={
            "help": "The scenes, as `fit3d lift` takes them: a scene in any layout, a folder of scenes, a text file listing scenes, or a comma-separated list."
        }
    )
    to: str = field(metadata={"help": "Output layout.", "choices": ["scannetpp", "nerfstudio", "colmap"]})
    output_dir: str = field(
        metadata={
            "help": "Folder to write: scenes/<scene_id>/ + metadata/ (scannetpp) or <scene_id>/ (nerfstudio, colmap)."
        }
    )
    holdout_every: int = field(
        default=0,
        metadata={
            "help": "scannetpp: the val samples are every K-th view of each scene, as `fit3d lift --holdout_every K` held them out (0: the scenes' own test frames)."
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace output_dir if it exists and is not empty."}
    )


def main(argv: list[str]) -> int:
    from fit3d_hf.cli import parse_args
    from fit3d_hf.errors import Fit3DError
    from fit3d_hf.scene.convert import convert_scenes

    (args,) = parse_args("fit3d convert-scene", DESCRIPTION, [ConvertArguments], argv)
    try:
        written = convert_scenes(
            args.scenes, args.to, args.output_dir, holdout_every=args.holdout_every, overwrite=args.overwrite
        )
    except (Fit3DError, FileNotFoundError, ValueError) as error:
        sys.stderr.write(f"fit3d convert-scene: error: {error}\n")
        return getattr(error, "exit_code", 1)
    for path in written:
        sys.stdout.write(f"{path}\n")
    return 0
