"""The `fit3d` command: one subcommand per module in `fit3d_hf/commands/`.

Each command module defines `DESCRIPTION` (one line, shown by `fit3d --help`) and `main(argv)`.
Options are dataclasses parsed with `transformers.HfArgumentParser` (see `parse_args`), so every
option is a flag and a single `.json`/`.yaml` argument can hold them all.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["COMMANDS", "main", "parse_args"]

# subcommand name -> module in fit3d_hf.commands. Modules import heavy dependencies inside main().
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "export-dataset": "export_dataset",
    "push": "push",
    "convert-original": "convert_original",
    "preprocess-scannetpp": "preprocess_scannetpp",
    "lift": "lift",
    "finetune": "finetune",
    "evaluate": "evaluate",
    "verify": "verify",
}


def parse_args(prog: str, description: str, dataclass_types: Sequence[type], argv: Sequence[str]) -> tuple[Any, ...]:
    """Parses `argv` into instances of `dataclass_types` with HfArgumentParser.

    A single argument ending in `.json`, `.yaml` or `.yml` is read as a config file holding the options.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(dataclass_types), prog=prog, description=description)
    argv = list(argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = Path(argv[0])
        if not path.is_file():
            parser.error(f"config file {path} does not exist")
        if path.suffix == ".json":
            return parser.parse_json_file(str(path))
        return parser.parse_yaml_file(str(path))
    return parser.parse_args_into_dataclasses(args=argv)


def _usage() -> str:
    lines = ["usage: fit3d <command> [options]   (fit3d <command> --help for its options)", "", "commands:"]
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"fit3d_hf.commands.{module_name}")
        lines.append(f"  {name:<22} {module.DESCRIPTION}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage() + "\n")
        return 0
    if argv[0] == "--version":
        from fit3d_hf import __version__

        sys.stdout.write(f"fit3d-hf {__version__}\n")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"fit3d: unknown command {name!r}\n\n{_usage()}\n")
        return 2
    module = importlib.import_module(f"fit3d_hf.commands.{COMMANDS[name]}")
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
