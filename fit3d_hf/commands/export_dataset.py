"""`fit3d export-dataset`: frames (or points) of any scenes as self-contained Parquet shards (images embedded)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

__all__ = ["DESCRIPTION", "ExportArguments", "main"]

DESCRIPTION = "Export scenes (frames or points; ScanNet++ roots or any scene spec) as Parquet shards with the images embedded"


@dataclass
class ExportArguments:
    data_dir: str = field(
        metadata={
            "help": "The scenes: a ScanNet++ root split by metadata/<split>_samples.txt, or scenes as `fit3d lift` takes "
            "them (a scene in any layout, a folder of scenes, a text file listing scenes, or a comma-separated list)."
        }
    )
    output_dir: str = field(
        metadata={"help": "Folder to write (data/<split>-XXXXX-of-NNNNN.parquet + README.md)."}
    )
    config: str = field(
        default="frames",
        metadata={
            "help": "Which dataset config: one row per frame, or one row per scene's sparse points.",
            "choices": ["frames", "points"],
        },
    )
    max_shard_size: str = field(
        default="500MB", metadata={"help": "Largest Parquet shard, e.g. 500MB or 2GB."}
    )
    writer_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per Parquet row group (default: datasets' choice for image data)."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace output_dir if it exists and is not empty."}
    )
    holdout_every: int = field(
        default=0,
        metadata={
            "help": "Scene specs: the val split is every K-th view of each scene, as `fit3d lift --holdout_every K` "
            "held them out (0: the scenes' own test frames)."
        },
    )


def main(argv: list[str]) -> int:
    from dataset_builders.scannetpp import export_parquet
    from fit3d_hf.cli import parse_args

    (args,) = parse_args("fit3d export-dataset", DESCRIPTION, [ExportArguments], argv)
    # Errors reach `fit3d_hf.cli.run_command`, which reports a reader's error behind datasets' wrapper.
    shards = export_parquet(
        args.data_dir,
        args.output_dir,
        args.config,
        max_shard_size=args.max_shard_size,
        writer_batch_size=args.writer_batch_size,
        overwrite=args.overwrite,
        holdout_every=args.holdout_every,
    )
    for split, paths in shards.items():
        sys.stdout.write(f"{split}: {len(paths)} shard(s) in {args.output_dir}/data\n")
    return 0
