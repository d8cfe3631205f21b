"""Stage II's `checkpoint-<step>` folders in the output folder: finding the complete ones, keeping the newest
(`--checkpoints_total_limit`) and choosing the one `--resume_from_checkpoint` names. Writing one is
`fit3d_hf.checkpoints.save_state_atomically`."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..checkpoints import is_complete_checkpoint
from ..errors import InputError, MissingInputError

__all__ = ["latest_checkpoint", "list_checkpoints", "resolve_resume_checkpoint", "rotate_checkpoints"]


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete `checkpoint-<step>` folders, oldest first (a folder left half-written by a crash of an
    older version, without its model file, is ignored)."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted((p for p in found if is_complete_checkpoint(p)), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def rotate_checkpoints(output_dir: Path, keep: int) -> None:
    """Deletes the oldest checkpoints so that at most `keep` remain."""
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[: max(len(checkpoints) - keep, 0)]:
        shutil.rmtree(old)


def resolve_resume_checkpoint(output_dir: Path, value: str) -> Path | None:
    """`--resume_from_checkpoint`: "latest" (None when the output folder holds no checkpoint yet: a new
    run) or a checkpoint folder, which must exist and be complete."""
    if value == "latest":
        return latest_checkpoint(output_dir)
    path = Path(value)
    if not path.is_dir():
        raise MissingInputError(
            f"--resume_from_checkpoint {value}: no such checkpoint folder; pass an existing checkpoint-<step> folder, "
            f"or 'latest' to resume from the newest one in {output_dir} (or start afresh when there is none)"
        )
    if not path.name.split("-", 1)[-1].isdigit() or not is_complete_checkpoint(path):
        raise InputError(
            f"--resume_from_checkpoint {value}: not a complete checkpoint-<step> folder written by this trainer"
        )
    return path
