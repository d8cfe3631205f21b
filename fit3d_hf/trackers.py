"""Experiment trackers (`--report_to`): the names accelerate knows and the check that one can log."""

from __future__ import annotations

import importlib.util
import logging

__all__ = ["TRACKERS", "available_tracker"]

logger = logging.getLogger(__name__)

# accelerate's trackers (accelerate.utils.LoggerType), listed here so that --help needs no accelerate import.
TRACKERS = (
    "none",
    "all",
    "tensorboard",
    "wandb",
    "trackio",
    "comet_ml",
    "mlflow",
    "aim",
    "clearml",
    "dvclive",
    "swanlab",
)


def available_tracker(report_to: str | None) -> str | None:
    """The tracker to hand to `Accelerator(log_with=...)`, or None to log nothing.

    accelerate only warns when a tracker's package is missing; this says it clearly (with the package to
    install) and then logs nothing. "none" and "" also mean no tracker.
    """
    if report_to in ("none", "", None):
        return None
    if report_to == "all":  # accelerate's own choice: every tracker whose package is installed
        return report_to
    # Each tracker's package has the tracker's own name (tensorboard, wandb, comet_ml, mlflow, ...).
    package = report_to
    if importlib.util.find_spec(package) is None:
        logger.warning(
            "--report_to %s: the %r package is not installed, so nothing will be logged (pip install %s)",
            report_to,
            package,
            package,
        )
        return None
    return report_to
