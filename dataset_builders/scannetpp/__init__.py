"""The `scannetpp` datasets builder (preprocessed ScanNet++ scenes: frames + poses, and sparse points)."""

from __future__ import annotations

from pathlib import Path

from dataset_builders.scannetpp.scannetpp import (
    FRAME_FEATURES,
    POINT_FEATURES,
    ScanNetPP,
    ScanNetPPConfig,
    data_fingerprint,
    export_parquet,
    group_samples,
)

__all__ = [
    "FRAME_FEATURES",
    "POINT_FEATURES",
    "ScanNetPP",
    "ScanNetPPConfig",
    "data_fingerprint",
    "export_parquet",
    "group_samples",
    "load_scannetpp",
]


def load_scannetpp(
    data_dir: Path | str,
    config_name: str = "frames",
    split: str | None = None,
    cache_dir: Path | str | None = None,
    streaming: bool = False,
):
    """Builds (or reuses from the cache) the ScanNet++ dataset and returns it.

    Args:
        data_dir: dataset root holding `scenes/` and `metadata/`.
        config_name: "frames" or "points".
        split: "train", "val", or None for a `DatasetDict` of every split.
        cache_dir: the datasets cache (default: HF_DATASETS_CACHE).
        streaming: return an `IterableDataset` read straight from the scene files (nothing is prepared).

    Returns:
        A `Dataset` / `DatasetDict` (or `IterableDataset` / `IterableDatasetDict` when streaming).
    """
    builder = ScanNetPP(
        cache_dir=None if cache_dir is None else str(cache_dir),
        config_name=config_name,
        data_dir=str(data_dir),
    )
    if streaming:
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare()
    return builder.as_dataset(split=split)
