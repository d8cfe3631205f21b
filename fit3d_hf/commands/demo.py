"""`fit3d demo`: the whole pipeline on small generated scenes, with a report (see fit3d_hf/demo.py)."""

from __future__ import annotations

import json
import sys

__all__ = ["DESCRIPTION", "main"]

DESCRIPTION = "Run the whole pipeline (data, Stage I, Stage II, evaluation, report) on small synthetic scenes"


def main(argv: list[str]) -> int:
    from fit3d_hf.cli import parse_args
    from fit3d_hf.demo import DemoArguments, run_demo

    (args,) = parse_args("fit3d demo", DESCRIPTION, [DemoArguments], argv)
    summary = run_demo(args)
    before, after = summary["consistency_before"], summary["consistency_after"]
    verdict = "improved" if after > before else "did NOT improve"
    sys.stdout.write(
        f"demo finished in {summary['seconds'] / 60:.1f} min\n"
        f"multi-view consistency on held-out views: {before:.3f} before, {after:.3f} after fine-tuning ({verdict})\n"
        f"report: {summary['report']}\nFiT3DModel: {summary['model']} (the Space loads it)\n"
        + json.dumps(summary)
        + "\n"
    )
    return 0
