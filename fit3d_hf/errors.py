"""The project's known errors: one family, so that every command reports them the same way.

The contract (shared by the library, the `fit3d` subcommands, the training scripts and the Space):

* A known error is an instance of `Fit3DError`. Its message is one sentence or two that name the file (or
  argument) at fault and the problem, and where it helps, what to do. It never needs its traceback.
* Every class also derives from the built-in error a caller would catch without knowing fit3d-hf
  (`ValueError`, `FileNotFoundError`, `OSError`), so `except ValueError` around a reader keeps working.
* Commands print a known error as one line, `fit3d <command>: error: <message>`, and exit with
  `error.exit_code`: 2 for usage errors (bad arguments), 1 for the others. `--debug` or `FIT3D_DEBUG=1`
  shows the traceback (see `fit3d_hf.cli`).
* Anything else (a bug, a CUDA fault) keeps its traceback.

Raise the most specific class; use `file_problem` to build the usual "<path>: <problem>" message.
"""

from __future__ import annotations

import os

__all__ = [
    "BundleMismatchError",
    "CorruptFileError",
    "Fit3DError",
    "HubUnavailableError",
    "InputError",
    "MissingInputError",
    "UsageError",
    "file_problem",
]


class Fit3DError(Exception):
    """Base class of the project's known errors (see the module docstring for the contract)."""

    exit_code = 1


class UsageError(Fit3DError, ValueError):
    """Bad command-line arguments or options (a value out of range, flags that contradict each other)."""

    exit_code = 2


class InputError(Fit3DError, ValueError):
    """Input data that cannot be used: a malformed scene file, a wrong shape, NaN poses, an unknown backbone."""


class CorruptFileError(InputError):
    """A file whose bytes are damaged: truncated, undecodable, or failing its checksum."""


class MissingInputError(Fit3DError, FileNotFoundError):
    """A file or folder the run needs does not exist."""


class BundleMismatchError(InputError):
    """A Gaussian bundle was made for another backbone or feature dimension than the one asked for."""


class HubUnavailableError(Fit3DError, OSError):
    """A Hugging Face Hub id was asked for but the Hub cannot be reached (offline, or no network)."""


def file_problem(path: str | os.PathLike, problem: str) -> str:
    """The usual message of a file error: `"<path>: <problem>"`."""
    return f"{os.fspath(path)}: {problem}"
