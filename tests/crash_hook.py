"""Runs a fit3d command or training script with a pause point, so that a test can SIGKILL it exactly there.

    python tests/crash_hook.py MARKER WHERE N -- (-m MODULE | SCRIPT) ARGS...

WHERE is either `replace:REGEX` (the N-th `os.replace` onto a path matching REGEX: the commit of an atomic
write, after the temporary file or folder was written; the hook first cuts the largest temporary file to half
its size, as a crash in the middle of writing it would leave it) or `call:MODULE:ATTRIBUTE` (the N-th call
of that function or method, e.g. a step's gradient clipping, between its backward and its optimizer step).
At the pause the hook writes MARKER (its pid and what it paused in) and sleeps until it is killed.

`trace:MODULE:ATTRIBUTE` (N unused) pauses nowhere: it appends one JSON line per call of that method to
`MARKER.<pid>`: the length of the object it is called on (when it has one) and the other arguments, e.g.
which frames a dataset served to which process.

Nothing in the library knows about this: the hook patches the running process from outside, so the code
under test is the code users run.
"""

import importlib
import json
import os
import re
import runpy
import sys
import time
from pathlib import Path


def _pause(marker: str, what: str) -> None:
    Path(marker).write_text(json.dumps({"pid": os.getpid(), "paused_in": what}))
    while True:  # until SIGKILL
        time.sleep(1)


def _cut_in_half(path: Path) -> str:
    """Truncates the temporary file (or the largest file of a temporary folder) to half its size."""
    files = (
        [path]
        if path.is_file()
        else sorted(path.rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else -1)
    )
    victim = files[-1] if files else None
    if victim is None or not victim.is_file():
        return "nothing"
    size = victim.stat().st_size
    with open(victim, "r+b") as handle:
        handle.truncate(size // 2)
    return f"{victim} cut from {size} to {size // 2} bytes"


def _hook_replace(marker: str, pattern: str, occurrence: int) -> None:
    real_replace, seen = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        if re.search(pattern, os.fspath(dst)):
            seen[0] += 1
            if seen[0] == occurrence:
                _pause(
                    marker, f"os.replace({os.fspath(src)!r} -> {os.fspath(dst)!r}); {_cut_in_half(Path(src))}"
                )
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


def _hook_call(marker: str, module_name: str, attribute: str, occurrence: int) -> None:
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real, seen = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        seen[0] += 1
        if seen[0] == occurrence:
            _pause(marker, f"call {seen[0]} of {module_name}.{attribute}")
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


def _hook_trace(marker: str, module_name: str, attribute: str) -> None:
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)

    def wrapper(self, *args, **kwargs):
        record = {
            "len": len(self) if hasattr(self, "__len__") else None,
            "args": [a if isinstance(a, (int, float, str)) else repr(a) for a in args],
        }
        with open(f"{marker}.{os.getpid()}", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        return real(self, *args, **kwargs)

    setattr(owner, name, wrapper)


def main() -> None:
    marker, where, occurrence, separator, *command = sys.argv[1:]
    assert separator == "--", "usage: crash_hook.py MARKER WHERE N -- (-m MODULE | SCRIPT) ARGS..."
    kind, _, spec = where.partition(":")
    if kind == "replace":
        _hook_replace(marker, spec, int(occurrence))
    elif kind == "call":
        module_name, _, attribute = spec.partition(":")
        _hook_call(marker, module_name, attribute, int(occurrence))
    elif kind == "trace":
        module_name, _, attribute = spec.partition(":")
        _hook_trace(marker, module_name, attribute)
    elif kind != "none":
        raise SystemExit(f"unknown pause point {where!r}")
    if command[0] == "-m":
        sys.argv = [command[1], *command[2:]]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")


if __name__ == "__main__":
    main()
