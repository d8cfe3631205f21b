"""`fit3d preprocess-scannetpp`: raw ScanNet++ DSLR scenes -> FiT3D's preprocessed scene layout."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

__all__ = ["DESCRIPTION", "PreprocessScanNetppArguments", "main"]

DESCRIPTION = "Downscale and undistort raw ScanNet++ DSLR scenes into the FiT3D scene layout (resumable)"


@dataclass
class PreprocessScanNetppArguments:
    raw: str = field(
        metadata={"help": "Raw ScanNet++ root holding data/<scene>/dslr/ and splits/nvs_sem_{train,val}.txt."}
    )
    out: str = field(metadata={"help": "Output root; gets scenes/<scene>/ and metadata/."})
    scenes: list[str] | None = field(
        default=None,
        metadata={"help": "Only these scene ids (default: every scene in the split files)."},
    )
    downscale: float = field(
        default=2.0, metadata={"help": "Image downscale factor before undistortion (FiT3D: 2)."}
    )
    jpeg_quality: int = field(default=95, metadata={"help": "JPEG quality of the written images."})
    overwrite: bool = field(default=False, metadata={"help": "Redo scenes that are already finished."})


def main(argv: list[str]) -> int:
    from fit3d_hf.cli import parse_args
    from fit3d_hf.scene.preprocess_scannetpp import preprocess_scannetpp

    (args,) = parse_args("fit3d preprocess-scannetpp", DESCRIPTION, [PreprocessScanNetppArguments], argv)
    folders = preprocess_scannetpp(
        args.raw,
        args.out,
        args.scenes,
        downscale=args.downscale,
        jpeg_quality=args.jpeg_quality,
        overwrite=args.overwrite,
    )
    sys.stdout.write(json.dumps({"out": args.out, "scenes": [folder.name for folder in folders]}) + "\n")
    return 0
