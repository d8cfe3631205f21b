"""The comparison report: one row per feature variant (original, fine-tuned, FiT3D), as Markdown, JSON and plots.

`build_results` turns the probe's metrics into a JSON-ready dictionary, `results_markdown` renders its table
(scores in percent where the paper reports percent), and `write_report` writes `results.md`, `results.json`
and PNG plots (per-class IoU bars, depth or normals metrics, recall against viewpoint change, training losses) to the
output folder, each through a temporary file and a rename. Plots need matplotlib (the `space`/`test`
extras); without it they are skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

from ..utils import atomic_path, atomic_write_text

__all__ = [
    "VARIANT_LABELS",
    "build_results",
    "metric_columns",
    "results_markdown",
    "write_report",
]

logger = logging.getLogger(__name__)

# Row names of the comparison table, in table order.
VARIANT_LABELS: dict[str, str] = {
    "original": "original",
    "finetuned": "fine-tuned",
    "fit3d": "FiT3D",
    "baseline": "baseline",
}
_LOSS_CURVE_POINTS = 500  # training-loss curves are thinned to this many points in results.json


def _percent(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _decimals(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _degrees(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}°"


def _integer(value) -> str:
    return "–" if value is None else str(int(value))


def metric_columns(results: dict) -> list[tuple[str, str, Callable]]:
    """`(metric key, column header, formatter)` of the main table of a probe's results."""
    probe = results["probe"]
    if probe == "segmentation":
        return [("mIoU", "mIoU ↑", _percent), ("mAcc", "mAcc ↑", _percent), ("aAcc", "aAcc ↑", _percent)]
    if probe == "depth":
        return [
            ("rmse", "RMSE ↓", _decimals), ("abs_rel", "AbsRel ↓", _decimals), ("delta1", "δ<1.25 ↑", _percent),
            ("delta2", "δ<1.25² ↑", _percent), ("delta3", "δ<1.25³ ↑", _percent), ("log10", "log10 ↓", _decimals),
        ]  # fmt: skip
    if probe == "normals":
        return [
            ("mean", "mean ↓", _degrees), ("median", "median ↓", _degrees), ("within_11.25", "11.25° ↑", _percent),
            ("within_22.5", "22.5° ↑", _percent), ("within_30", "30° ↑", _percent),
        ]  # fmt: skip
    if probe == "correspondence":
        columns = [(f"recall@{t:g}px", f"recall@{t:g}px ↑", _percent) for t in results["thresholds"]]
        return columns + [("pairs", "pairs", _integer), ("correspondences", "correspondences", _integer)]
    raise ValueError(f"unknown probe {probe!r}")


def _clean(value):
    """NaN -> None recursively, tuples -> lists: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _thin(values: list[float], points: int) -> tuple[list[int], list[float]]:
    if len(values) <= points:
        return list(range(1, len(values) + 1)), list(values)
    step = len(values) / points
    indices = sorted({min(len(values) - 1, int(i * step)) for i in range(points)} | {len(values) - 1})
    return [i + 1 for i in indices], [values[i] for i in indices]


def build_results(
    probe: str,
    metrics: dict,
    *,
    channels: dict[str, tuple[int, int]],
    history: dict[str, list[float]] | None = None,
    settings: dict | None = None,
) -> dict:
    """The JSON-ready results of one probe.

    Args:
        probe: "segmentation", "depth", "correspondence" or "normals".
        metrics: segmentation/depth: `{variant: scores}` from `evaluate_probe`; correspondence: the dictionary
            of `correspondence_probe` (`rows`, `curves`, ...).
        channels: variant -> (feature channels, CLS channels) of the probe inputs.
        history: variant -> training loss per iteration (thinned to 500 points here).
        settings: options and provenance, stored as given.

    Returns:
        `{"probe", "rows": [{"variant", "name", "channels", <metrics>}] in table order, "per_class" (segmentation),
        "curves", "thresholds", "bin_labels" (correspondence), "loss_curves", "settings"}` with NaN as None.
    """
    per_variant = metrics["rows"] if probe == "correspondence" else metrics
    order = [v for v in VARIANT_LABELS if v in per_variant] + [
        v for v in per_variant if v not in VARIANT_LABELS
    ]
    results: dict = {"probe": probe, "rows": [], "settings": settings or {}}
    for variant in order:
        scores = dict(per_variant[variant])
        per_class = scores.pop("per_class", None)
        feature_channels, cls_channels = channels.get(variant, (None, 0))
        width = (
            None if feature_channels is None else feature_channels + (cls_channels if probe == "depth" else 0)
        )
        results["rows"].append(
            {"variant": variant, "name": VARIANT_LABELS.get(variant, variant), "channels": width, **scores}
        )
        if per_class is not None:
            results.setdefault("per_class", {})[variant] = per_class
    if probe == "correspondence":
        for key in ("curves", "thresholds", "angle_bins", "bin_labels", "pairs"):
            results[key] = metrics[key]
    if history:
        curves = {}
        for variant, losses in history.items():
            steps, values = _thin(losses, _LOSS_CURVE_POINTS)
            curves[variant] = {"steps": steps, "loss": values}
        results["loss_curves"] = curves
    return _clean(results)


def results_markdown(results: dict) -> str:
    """The comparison as Markdown: a title, provenance, the table with one row per variant, and (for the
    correspondence probe) recall per viewpoint-change bin."""
    probe = results["probe"]
    settings = results.get("settings", {})
    columns = metric_columns(results)
    lines = [f"# FiT3D evaluation: {probe} probe", ""]
    provenance = []
    for key, label in (
        ("model", "model"),
        ("baseline", "baseline"),
        ("dataset", "dataset"),
        ("train_split", "trained on"),
        ("split", "evaluated on"),
    ):
        if settings.get(key):
            provenance.append(f"{label} `{settings[key]}`")
    if provenance:
        lines += [", ".join(provenance), ""]
    header = ["features", "channels"] + [title for _, title, _ in columns]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in results["rows"]:
        cells = [row["name"], _integer(row.get("channels"))] + [fmt(row.get(key)) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    by_variant = {row["variant"]: row for row in results["rows"]}
    if "original" in by_variant and "fit3d" in by_variant:
        key, title, fmt = columns[0]
        a, b = by_variant["original"].get(key), by_variant["fit3d"].get(key)
        if a is not None and b is not None:
            scale = 100 if fmt is _percent else 1
            digits = 2 if scale == 100 or fmt is _degrees else 4
            lines += ["", f"FiT3D − original, {title.split()[0]}: {scale * (b - a):+.{digits}f}"]
    if probe == "correspondence" and results.get("curves"):
        middle = results["thresholds"][len(results["thresholds"]) // 2]
        key = f"recall@{middle:g}px"
        labels = results["bin_labels"]
        lines += ["", f"## {key} by viewpoint change (angle between optical axes)", ""]
        lines.append("| features | " + " | ".join(labels) + " |")
        lines.append("|---|" + "|".join(["---:"] * len(labels)) + "|")
        for row in results["rows"]:
            curve = results["curves"][row["variant"]]
            cells = [
                f"{_percent(value)} ({pairs})"
                for value, pairs in zip(curve[key], curve["pairs"], strict=True)
            ]
            lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
        lines += ["", "(pairs in parentheses)"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Writing


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _save_figure(figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")


def _plot_per_class_iou(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    per_class = results["per_class"]
    variants = [row["variant"] for row in results["rows"] if row["variant"] in per_class]
    names = list(per_class[variants[0]])
    width = 0.8 / len(variants)
    figure = Figure(figsize=(max(6.0, 0.35 * len(names) * len(variants) + 2), 4.0), layout="constrained")
    axes = figure.add_subplot()
    for offset, variant in enumerate(variants):
        values = [100 * (per_class[variant][name]["IoU"] or 0.0) for name in names]
        axes.bar(
            [i + (offset - (len(variants) - 1) / 2) * width for i in range(len(names))],
            values,
            width,
            label=VARIANT_LABELS.get(variant, variant),
        )
    axes.set_xticks(range(len(names)), names, rotation=90 if len(names) > 12 else 0)
    axes.set_ylabel("IoU (%)")
    axes.set_title("Per-class IoU")
    axes.legend()
    _save_figure(figure, path)


def _plot_depth_metrics(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    metrics = [("rmse", "RMSE (m) ↓"), ("abs_rel", "AbsRel ↓"), ("delta1", "δ<1.25 ↑")]
    figure = Figure(figsize=(9.0, 3.2), layout="constrained")
    names = [row["name"] for row in results["rows"]]
    for index, (key, title) in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), index + 1)
        axes.bar(
            names,
            [row.get(key) or 0.0 for row in results["rows"]],
            color=[f"C{i}" for i in range(len(names))],
        )
        axes.set_title(title)
    _save_figure(figure, path)


def _plot_normals_metrics(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    metrics = [
        ("mean", "mean angular error (°) ↓"),
        ("median", "median angular error (°) ↓"),
        ("within_11.25", "within 11.25° (%) ↑"),
    ]
    figure = Figure(figsize=(9.0, 3.2), layout="constrained")
    names = [row["name"] for row in results["rows"]]
    for index, (key, title) in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), index + 1)
        scale = 100 if key.startswith("within") else 1
        axes.bar(
            names,
            [scale * (row.get(key) or 0.0) for row in results["rows"]],
            color=[f"C{i}" for i in range(len(names))],
        )
        axes.set_title(title)
    _save_figure(figure, path)


def _plot_recall_curves(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    thresholds = results["thresholds"]
    labels = results["bin_labels"]
    figure = Figure(figsize=(4.0 * len(thresholds), 3.4), layout="constrained")
    for index, threshold in enumerate(thresholds):
        axes = figure.add_subplot(1, len(thresholds), index + 1)
        key = f"recall@{threshold:g}px"
        for row in results["rows"]:
            values = [math.nan if v is None else 100 * v for v in results["curves"][row["variant"]][key]]
            axes.plot(range(len(labels)), values, marker="o", label=row["name"])
        axes.set_xticks(range(len(labels)), labels)
        axes.set_xlabel("viewpoint change")
        axes.set_ylabel(f"recall within {threshold:g} px (%)")
        axes.set_ylim(0, 100)
        axes.grid(alpha=0.3)
    figure.axes[0].legend()
    figure.suptitle("Mutual-nearest-neighbour recall vs viewpoint change")
    _save_figure(figure, path)


def _plot_losses(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 3.6), layout="constrained")
    axes = figure.add_subplot()
    for variant, curve in results["loss_curves"].items():
        axes.plot(curve["steps"], curve["loss"], label=VARIANT_LABELS.get(variant, variant))
    axes.set_xlabel("iteration")
    axes.set_ylabel("training loss")
    axes.legend()
    _save_figure(figure, path)


def write_report(results: dict, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes `results.md`, `results.json` and the plots of a probe's results.

    Args:
        results: from `build_results`.
        output_dir: created if missing; existing report files are replaced.

    Returns:
        name -> path of every file written ("markdown", "json", and "per_class_iou", "depth_metrics", "normals_metrics",
        "recall_vs_viewpoint", "training_loss" where they apply and matplotlib is installed).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": output_dir / "results.json", "markdown": output_dir / "results.md"}
    _write_text(written["json"], json.dumps(_clean(results), indent=2, allow_nan=False) + "\n")
    _write_text(written["markdown"], results_markdown(results))
    plots: list[tuple[str, Callable]] = []
    if results.get("per_class"):
        plots.append(("per_class_iou", _plot_per_class_iou))
    if results["probe"] == "depth":
        plots.append(("depth_metrics", _plot_depth_metrics))
    if results["probe"] == "normals":
        plots.append(("normals_metrics", _plot_normals_metrics))
    if results.get("curves"):
        plots.append(("recall_vs_viewpoint", _plot_recall_curves))
    if results.get("loss_curves"):
        plots.append(("training_loss", _plot_losses))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("matplotlib is not installed: skipping the plots (pip install matplotlib)")
        return written
    for name, plot in plots:
        path = output_dir / f"{name}.png"
        plot(results, path)
        written[name] = path
    return written
