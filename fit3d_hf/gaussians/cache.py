"""Stage I's bundles of many scenes by scene id: where each lies, and a device cache that loads them on use.

Stage II renders its targets from them and `fit3d evaluate` renders depth from them, so they live here, below
both.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import torch

from .bundle import GaussianBundle, load_bundle
from .bundle_format import BUNDLE_FILENAME

__all__ = ["GaussianCache", "bundle_path"]


def bundle_path(gaussians_dir: str | Path, scene_id: str) -> Path:
    """Where Stage I writes a scene's bundle: `<gaussians_dir>/<scene_id>/gaussians.safetensors`."""
    return Path(gaussians_dir) / scene_id / BUNDLE_FILENAME


class GaussianCache:
    """Scenes' Stage II tensors on the device, loaded on first use, least recently used evicted first
    once their total size passes the budget."""

    def __init__(
        self, gaussians_dir: str | Path, device: torch.device, budget_bytes: float, verify: bool = True
    ):
        self.gaussians_dir, self.device, self.budget_bytes = Path(gaussians_dir), device, budget_bytes
        self._entries: OrderedDict[str, GaussianBundle] = OrderedDict()
        # Each bundle's checksums are checked the first time it is loaded (not again after an eviction):
        # scene id -> seconds the check took.
        self.verify = verify
        self.verify_seconds: dict[str, float] = {}

    @staticmethod
    def _size(bundle: GaussianBundle) -> int:
        tensors = (
            bundle.means,
            bundle.quats,
            bundle.log_scales,
            bundle.opacities,
            bundle.features,
            bundle.decoder_weight,
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    def get(self, scene_id: str) -> GaussianBundle:
        if scene_id in self._entries:
            self._entries.move_to_end(scene_id)
            return self._entries[scene_id]
        verify = self.verify and scene_id not in self.verify_seconds
        start = time.perf_counter()
        bundle = load_bundle(bundle_path(self.gaussians_dir, scene_id), verify=verify)
        if verify:
            self.verify_seconds[scene_id] = time.perf_counter() - start  # the read and the check
        bundle = bundle.to(self.device)
        bundle.metadata["colors"] = torch.zeros(len(bundle), 3, device=self.device)
        self._entries[scene_id] = bundle
        while (
            len(self._entries) > 1 and sum(self._size(b) for b in self._entries.values()) > self.budget_bytes
        ):
            self._entries.popitem(last=False)
        return bundle

    def __len__(self) -> int:
        return len(self._entries)
