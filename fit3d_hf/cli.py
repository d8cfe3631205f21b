"""The `fit3d` command: one subcommand per module in `fit3d_hf/commands/`.

Each command module defines `DESCRIPTION` (one line, shown by `fit3d --help`) and `main(argv)`.
Options are dataclasses parsed with `transformers.HfArgumentParser` (see `parse_args`), so every
option is a flag and a single `.json`/`.yaml` argument can hold them all.

Every command, and every script in `training/`, runs through `run_command`: the project's known errors
(`fit3d_hf.errors`) are printed as one line, `<prog>: error: <message>`, with exit code 2 for usage errors
and 1 for the others; `--debug` or `FIT3D_DEBUG=1` adds the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["COMMANDS", "DEBUG_ENV", "known_error", "main", "parse_args", "run_command"]

DEBUG_ENV = "FIT3D_DEBUG"
DEBUG_FLAG = "--debug"

# subcommand name -> module in fit3d_hf.commands. Modules import heavy dependencies inside main().
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "export-dataset": "export_dataset",
    "push": "push",
    "convert-original": "convert_original",
    "preprocess-scannetpp": "preprocess_scannetpp",
    "convert-scene": "convert_scene",
    "lift": "lift",
    "finetune": "finetune",
    "evaluate": "evaluate",
    "verify": "verify",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus the defaults that mislead: none on required flags (they have
    no default) and none on `--no_x` switches (their "default: False" reads as "x is off")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or isinstance(action, argparse._StoreFalseAction):
            return action.help or ""
        return super()._get_help_string(action)


def _build_parser(prog: str, description: str, dataclass_types: Sequence[type]):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        list(dataclass_types), prog=prog, description=description, formatter_class=_HelpFormatter
    )
    for action in parser._actions:
        # HfArgumentParser gives `--no_x` the help of `--x`; say what the switch does instead.
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
            action.help = f"Turn --{action.dest} off (it is on by default)."
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"Show the traceback of known errors too (or set {DEBUG_ENV}=1).",
    )
    return parser


def parse_args(
    prog: str, description: str, dataclass_types: Sequence[type], argv: Sequence[str]
) -> tuple[Any, ...]:
    """Parses `argv` into instances of `dataclass_types` with HfArgumentParser.

    A single argument ending in `.json`, `.yaml` or `.yml` is read as a config file holding the options.
    Bad values, including those the dataclasses' own checks (`__post_init__`) refuse, end the program as
    argparse does: the usage line, `<prog>: error: <message>`, exit code 2. `--debug` is accepted anywhere
    (`run_command` acts on it).
    """
    parser = _build_parser(prog, description, dataclass_types)
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
            path = Path(argv[0])
            if not path.is_file():
                parser.error(f"config file {path} does not exist")
            try:
                if path.suffix == ".json":
                    return parser.parse_json_file(str(path))
                return parser.parse_yaml_file(str(path))
            except TypeError as error:  # a required option missing from the file
                parser.error(f"config file {path}: {error}")
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:  # the options' own checks, unused keys, a config file that does not parse
        parser.error(str(error))


def known_error(error: BaseException) -> BaseException | None:
    """The known error behind `error`, if any: a `Fit3DError`, a plain `FileNotFoundError` (always a missing
    input), or one of these as the cause of a wrapper (datasets wraps its builders' errors)."""
    from fit3d_hf.errors import Fit3DError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (Fit3DError, FileNotFoundError)):
            return error
        error = error.__cause__
    return None


class _StatusHandler(logging.Handler):
    """Shows the library's status lines (INFO) and warnings on stderr, one line each, without breaking the
    progress bars (written through tqdm)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            prefix = "warning: " if record.levelno >= logging.WARNING else ""
            tqdm.write(prefix + record.getMessage(), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def show_status_lines() -> None:
    """Shows the INFO messages of `fit3d_hf` (phases, skipped scenes, ...) on stderr; called once per run."""
    package_logger = logging.getLogger("fit3d_hf")
    if not any(isinstance(handler, _StatusHandler) for handler in package_logger.handlers):
        package_logger.addHandler(_StatusHandler())
    if package_logger.level == logging.NOTSET or package_logger.level > logging.INFO:
        package_logger.setLevel(logging.INFO)


def _debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_command(prog: str, command: Callable[[list[str]], int | None], argv: Sequence[str]) -> int:
    """Runs `command(argv)` and turns the project's known errors into one line on stderr.

    Args:
        prog: The name errors are reported under, e.g. `"fit3d lift"` or `"finetune.py"`.
        command: The command's main function; it gets `argv` (with `--debug` still in it, which
            `parse_args` drops) and returns an exit code (None for 0).
        argv: The command's arguments.

    Returns:
        The exit code: the command's, else `error.exit_code` (2 for usage errors, 1 for the others) for a
        known error, 130 for Ctrl-C. Unknown errors propagate with their traceback.
    """
    argv = list(argv)
    debug = _debug_requested(argv)
    show_status_lines()
    try:
        return int(command(argv) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception as error:
        known = known_error(error)
        if known is None:
            raise
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"{prog}: error: {known}\n")
        return int(getattr(known, "exit_code", 1))


def _usage() -> str:
    lines = [
        "usage: fit3d <command> [options] [--debug]   (fit3d <command> --help for its options)",
        "",
        f"Known errors print one line; --debug (or {DEBUG_ENV}=1) also shows their traceback.",
        "",
        "commands:",
    ]
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"fit3d_hf.commands.{module_name}")
        lines.append(f"  {name:<22} {module.DESCRIPTION}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == DEBUG_FLAG:  # `fit3d --debug <command> ...`
        argv = [*argv[1:], DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage() + "\n")
        return 0
    if argv[0] == "--version":
        from fit3d_hf import __version__

        sys.stdout.write(f"fit3d-hf {__version__}\n")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        sys.stderr.write(f"{_usage()}\n\nfit3d: error: unknown command {name!r}{hint}\n")
        return 2
    module = importlib.import_module(f"fit3d_hf.commands.{COMMANDS[name]}")
    return run_command(f"fit3d {name}", module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
