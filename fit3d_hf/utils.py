"""Small helpers shared across the library: atomic file and folder writes, deterministic CPU kernels, and
reading ahead on threads."""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = [
    "atomic_folder",
    "atomic_path",
    "atomic_path_leftovers",
    "atomic_write_text",
    "current_umask",
    "deterministic_algorithms",
    "make_staging_dir",
    "map_ahead",
    "replace_folder",
]


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux's /proc), else by setting
    and restoring it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_staging_dir(beside: str | os.PathLike) -> Path:
    """A new hidden folder beside `beside`, to build an output in and rename into place. Unlike
    `tempfile.mkdtemp` (always 0700) it gets the permissions the umask gives any new folder, so that the
    renamed output can be read by the others that share it."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{beside.name}.", dir=beside.parent))
    folder.chmod(0o777 & ~current_umask())
    return folder


def _temporary_affixes(path: Path) -> tuple[str, str]:
    """The prefix and suffix of `atomic_path`'s temporary files for `path` (the random part goes between)."""
    return f".{path.name}.", path.suffix or ".tmp"


def atomic_path_leftovers(path: str | os.PathLike) -> list[Path]:
    """The temporary files of `atomic_path(path)` that a killed process left beside `path` (a finished or failed
    write removes its own)."""
    path = Path(path)
    prefix, suffix = _temporary_affixes(path)
    return [p for p in path.parent.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}") if p.is_file()]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary file beside `path` (same suffix, so writers that look at it pick the right format).
    When the block ends normally the temporary file replaces `path`; on an error it is deleted, so a failed
    write never leaves a half-written `path`. The parent folder is created if needed. The result gets the
    permissions the umask gives any new file (`mkstemp` alone would leave it 0600, unreadable to others)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary_affixes(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        temporary.chmod(0o666 & ~current_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` (UTF-8) to `path` atomically (see `atomic_path`); returns the path."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Puts the finished folder `staging` at `target` by renaming it (both on one file system).

    An existing `target` is first renamed aside (a hidden name beside it) and deleted only once the new folder
    is in place, so a crash never leaves a half-deleted `target`: at worst the old folder, or the new one and a
    hidden leftover.
    """
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return target
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a new, empty staging folder beside `target` (`make_staging_dir`) to build a whole output in.
    When the block ends normally the staging folder replaces `target` (`replace_folder`); on an error it is
    deleted and `target` is left as it was."""
    target = Path(target)
    staging = make_staging_dir(target)
    try:
        yield staging
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful swap


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """Deterministic kernels inside the block (restored afterwards). Used on the CPU, where some of
    PyTorch's multi-threaded reductions (index_add and scatter in the reference renderer's backward)
    sum in a varying order: two runs with the same seed, or a resumed run, would differ in the last bits."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled or previous)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def map_ahead(fn: Callable, items: Iterable, workers: int, ahead: int | None = None) -> Iterator:
    """`fn(item)` for each item, in order, computed by `workers` threads up to `ahead` items (default
    2 x workers) before the caller takes them: file decoding (Pillow and torch release the GIL) overlaps the
    caller's work, with a bounded number of results in memory. Written here because `Executor.map` submits
    every item at once (its `buffersize` arrived in Python 3.14) and a DataLoader's worker processes would
    pickle every decoded image back. An exception in `fn` is raised here, at its item."""
    if workers <= 1:
        yield from map(fn, items)
        return
    ahead = ahead or 2 * workers
    with ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error or an abandoned generator: drop what has not started
            for future in pending:
                future.cancel()
