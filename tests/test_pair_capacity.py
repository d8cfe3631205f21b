"""The host side of the CUDA binning's pair buffers (fit3d_hf/render/_binning.py): the first render of a size
sizes them exactly, later ones reuse a capacity without waiting for the count, an overflow is redone exactly,
and capacities are kept per size. A stand-in extension records the calls, so this runs without a GPU."""

from __future__ import annotations

import pytest
import torch

from fit3d_hf.render import _binning


class _Extension:
    """isect_tiles reports `pairs[0]` pairs (then the next value), rasterize_fwd returns a marker."""

    def __init__(self, pairs):
        self.pairs, self.capacities, self.rasterized, self.calls = list(pairs), [], 0, []
        self.total = torch.zeros(1, dtype=torch.long)  # the pinned slot, written when its count "arrives"

    def isect_tiles(self, means2d, conics, opacities, depths, radii, width, height, capacity):
        self.capacities.append(capacity)
        self.calls.append("isect_tiles")
        self.total[0] = -1  # not on the host yet
        self.arriving = self.pairs.pop(0)
        return "ranges", "ids", self.total

    def rasterize_fwd(self, *args):
        self.rasterized += 1
        self.calls.append("rasterize_fwd")
        return f"images {self.rasterized}"

    def wait_pair_count(self, device):
        self.calls.append(f"wait_pair_count {device}")
        self.total[0] = self.arriving


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch):
    monkeypatch.setattr(_binning, "_PAIR_CAPACITY", {})


def _render(ext, n=1000, width=64, height=48):
    means2d = torch.zeros(1, n, 2)
    return _binning.isect_and_rasterize(ext, means2d, None, None, None, None, None, None, None, width, height)


# Capacities as the wrapper's design states them, worked out by hand (not with its formula): 6 % headroom over
# the last count plus 1024 slots, shrinking by at most 0.1 % per render.
CAPACITY_AFTER_10K = 11_624  # 1.06 x 10,000 + 1024
CAPACITY_AFTER_10K_THEN_9K = 11_612  # max(1.06 x 9,000 + 1024 = 10,564, 0.999 x 11,624 = 11,612.4)
CAPACITY_AFTER_50K = 54_024  # 1.06 x 50,000 + 1024


def test_first_render_is_exact_then_capacity_is_reused():
    ext = _Extension([10_000, 10_000, 9_000])
    assert _render(ext) == ("ranges", "ids", "images 1")
    assert _render(ext)[2] == "images 2"
    _render(ext)
    assert ext.capacities == [0, CAPACITY_AFTER_10K, CAPACITY_AFTER_10K]  # no host sync after the first
    # the rasterizer is queued before the host waits, and then for the count alone
    assert ext.calls == ["isect_tiles", "rasterize_fwd", "wait_pair_count 0"] * 3
    # a smaller count lets the capacity shrink only slowly (renders of one scene vary from view to view)
    assert _binning._PAIR_CAPACITY[(0, 1, 1000, 64, 48)] == CAPACITY_AFTER_10K_THEN_9K


def test_an_overflow_is_redone_with_exact_buffers():
    ext = _Extension([10_000, 50_000, 50_000, 50_000])
    _render(ext)
    images = _render(ext)  # 50k pairs do not fit the capacity of 10k: the same render again, sized exactly
    assert ext.capacities == [0, CAPACITY_AFTER_10K, 0] and images[2] == "images 3"
    _render(ext)
    assert ext.capacities[-1] == CAPACITY_AFTER_50K


def test_capacities_are_kept_per_size():
    ext = _Extension([10_000, 200, 10_000])
    _render(ext, n=1000)
    _render(ext, n=10)  # another size: exact, and it leaves the first size's capacity alone
    _render(ext, n=1000)
    assert ext.capacities == [0, 0, CAPACITY_AFTER_10K]


def test_the_number_of_sizes_kept_is_bounded():
    ext = _Extension([100] * (_binning._CAPACITY_ENTRIES + 1))
    for n in range(1, _binning._CAPACITY_ENTRIES + 2):
        _render(ext, n=n)
    assert len(_binning._PAIR_CAPACITY) == _binning._CAPACITY_ENTRIES
    assert (0, 1, 1, 64, 48) not in _binning._PAIR_CAPACITY  # the oldest size went first
