"""`fit3d verify PATH...`: check Gaussian bundles and checkpoints of both stages against their checksums.

Each PATH is a bundle (`gaussians.safetensors` or its scene folder), a Stage I `checkpoint.pt`, a Stage II
`checkpoint-<step>/` folder, or any folder, searched for all of these (e.g. a whole Stage I output folder).
Prints one line per item and a summary; exits with 1 when any item is damaged. Items written before
checksums existed are read through and reported as "unverified".
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

__all__ = ["DESCRIPTION", "VerifyArguments", "main"]

DESCRIPTION = "Check Gaussian bundles and training checkpoints against their checksums (in bulk)"


@dataclass
class VerifyArguments:
    paths: list[str] = field(
        metadata={
            "help": "Bundles, checkpoints, or folders searched for them (positional: fit3d verify PATH...).",
            "nargs": "+",
        }
    )
    json: bool = field(default=False, metadata={"help": "Print one JSON record per item instead of text."})


def main(argv: list[str]) -> int:
    from tqdm.auto import tqdm

    from fit3d_hf.checkpoints import verify_path
    from fit3d_hf.cli import parse_args

    argv = list(argv)
    leading = 0
    while leading < len(argv) and not argv[leading].startswith("-"):
        leading += 1
    if leading:  # positional paths, as the usage line says
        argv = ["--paths", *argv[:leading], *argv[leading:]]
    (args,) = parse_args("fit3d verify", __doc__, [VerifyArguments], argv)
    records = []
    for path in tqdm(args.paths, desc="verifying", disable=len(args.paths) < 2):
        records.extend(verify_path(path))
    for record in records:
        if args.json:
            line = json.dumps(record)
        elif not record["ok"]:
            line = f"DAMAGED     {record['problem']}"
        else:
            line = (
                f"{'ok' if record['checksummed'] else 'unverified':<11} {record['path']} ({record['kind']})"
            )
        sys.stdout.write(line + "\n")
    damaged = sum(not r["ok"] for r in records)
    unverified = sum(r["ok"] and not r["checksummed"] for r in records)
    summary = f"{len(records)} item(s): {len(records) - damaged - unverified} ok, {unverified} unverified (no checksums), {damaged} damaged"
    (sys.stderr if args.json else sys.stdout).write(summary + "\n")
    return 1 if damaged else 0
