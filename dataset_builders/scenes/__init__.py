"""The `scenes` datasets builder: frames and points of any scenes a scene spec names (own captures included)."""

from dataset_builders.scenes.scenes import (
    SPLITS,
    Scenes,
    ScenesConfig,
    is_sample_list_root,
    load_scenes,
    make_frames_builder,
    scenes_fingerprint,
)

__all__ = [
    "SPLITS",
    "Scenes",
    "ScenesConfig",
    "is_sample_list_root",
    "load_scenes",
    "make_frames_builder",
    "scenes_fingerprint",
]
