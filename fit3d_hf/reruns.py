"""What a rerun does with an earlier result in its output folder: reuse it, resume it, or refuse.

A result records the settings that determine it (`settings.json` beside it). A rerun whose settings are
equal reuses a finished result (a one-line notice, no work) and resumes an unfinished one; a rerun whose
settings differ is refused with the differing settings named, unless `--overwrite` is given. Without this,
a rerun after changing, say, the backbone would silently hand the old result on to the next stage.

The recorded settings are the options dataclass's fields minus an explicit list of fields that do not change
the result (output paths, logging, checkpoint frequency, ...). A field added to the dataclass later is
therefore a result setting unless someone decides otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from .errors import UsageError
from .utils import atomic_write_text

__all__ = [
    "SETTINGS_FILENAME",
    "check_previous_result",
    "read_settings",
    "result_settings",
    "settings_differences",
    "write_settings",
]

logger = logging.getLogger(__name__)

SETTINGS_FILENAME = "settings.json"


def result_settings(
    options: Any,
    exclude: Iterable[str],
    canonical: Mapping[str, Callable[[Any], Any]] | None = None,
) -> dict[str, Any]:
    """The settings of an options dataclass that determine its result, as JSON values.

    Args:
        options: A dataclass instance (e.g. `LiftingArguments`).
        exclude: Names of the fields that do not change the result.
        canonical: Per-field functions mapping a value to a canonical form, so that two spellings of the
            same setting compare equal (e.g. a backbone short name and its Hub id).

    Returns:
        `{field name: value}`, round-tripped through JSON (tuples become lists), in field order.
    """
    exclude, canonical = set(exclude), dict(canonical or {})
    settings = {}
    for field in dataclasses.fields(options):
        if field.name in exclude:
            continue
        value = getattr(options, field.name)
        settings[field.name] = canonical[field.name](value) if field.name in canonical else value
    return json.loads(json.dumps(settings, default=str))


def settings_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`"name: recorded value -> current value"` for every setting that differs (in `current`'s order)."""
    missing = object()
    differences = []
    for name in [*current, *(name for name in recorded if name not in current)]:
        old, new = recorded.get(name, missing), current.get(name, missing)
        if old != new:
            old_text = "(not recorded)" if old is missing else repr(old)
            new_text = "(not set)" if new is missing else repr(new)
            differences.append(f"{name}: {old_text} -> {new_text}")
    return differences


def write_settings(folder: str | Path, settings: Mapping[str, Any]) -> Path:
    """Writes `settings` to `<folder>/settings.json` (atomically)."""
    return atomic_write_text(Path(folder) / SETTINGS_FILENAME, json.dumps(dict(settings), indent=2) + "\n")


def read_settings(folder: str | Path) -> dict[str, Any] | None:
    """The settings recorded in `folder`, or None when there are none (or they cannot be read)."""
    path = Path(folder) / SETTINGS_FILENAME
    try:
        settings = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return settings if isinstance(settings, dict) else None


def check_previous_result(
    folder: str | Path,
    settings: Mapping[str, Any],
    *,
    finished: bool,
    unfinished: bool,
    overwrite: bool,
    what: str = "result",
) -> Literal["new", "finished", "resume", "overwrite"]:
    """Decides what a run does with the result already in `folder`.

    Args:
        folder: The result's folder.
        settings: The settings of this run (`result_settings`).
        finished: Whether `folder` holds a finished result.
        unfinished: Whether it holds an unfinished one that could be resumed.
        overwrite: Whether `--overwrite` was given.
        what: How messages name the result (e.g. "lifted scene").

    Returns:
        `"new"` (nothing to reuse), `"finished"` (reuse it: equal settings), `"resume"` (continue it: equal
        settings) or `"overwrite"` (there is one, and `--overwrite` says to replace it).

    Raises:
        UsageError: The earlier result was made with other settings, or with settings that were not
            recorded, and `--overwrite` was not given.
    """
    if not finished and not unfinished:
        return "new"
    if overwrite:
        return "overwrite"
    state = "a finished" if finished else "an unfinished"
    recorded = read_settings(folder)
    if recorded is None:
        raise UsageError(
            f"{folder} holds {state} {what} whose settings were not recorded (an older fit3d-hf made it), so "
            "it cannot be told whether it matches this run; pass --overwrite to redo it"
        )
    differences = settings_differences(recorded, settings)
    if differences:
        raise UsageError(
            f"{folder} holds {state} {what} made with other settings ({'; '.join(differences)}); pass "
            "--overwrite to replace it, or choose another output folder"
        )
    return "finished" if finished else "resume"
