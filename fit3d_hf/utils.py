"""Small helpers shared by the training loops."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["deterministic_algorithms"]


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """Deterministic kernels inside the block (restored afterwards). Used on the CPU, where some of
    PyTorch's multi-threaded reductions (index_add and scatter in the reference renderer's backward)
    sum in a varying order: two runs with the same seed, or a resumed run, would differ in the last bits."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled or previous)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
