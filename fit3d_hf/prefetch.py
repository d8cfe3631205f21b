"""Preparing the next batch's inputs while the current training step runs (Stage II).

Stage II's inputs are themselves GPU work: each frame's feature map is rendered from its scene's Gaussians and
decoded on the patch grid, without gradients and independently of the backbone being trained. On a CUDA
device `prefetch_inputs` runs that work for batch k + 1 on a side stream while the default stream trains on
batch k, so the two overlap (the rasterizer's small binning kernels fill the gaps between the backbone's
large ones). Elsewhere it prepares each batch just before it is used. Either way the values are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["prefetch_inputs"]


def prefetch_inputs(
    batches: Iterable, prepare: Callable[[Any], tuple], device: torch.device
) -> Iterator[tuple[Any, tuple]]:
    """Yields `(batch, prepare(batch))` for each batch, preparing the next batch ahead on CUDA devices.

    Args:
        batches: any iterable of batches (a DataLoader).
        prepare: maps a batch to a tuple of tensors; it must not depend on work the consumer queues after
            receiving the previous batch (Stage II's rendering reads only the batch and the Gaussian cache).
        device: where `prepare` puts its outputs.

    To keep the overlap, the consumer should not wait for the device in between (for example, read the loss
    of step k with `.item()` only after step k + 1 has been queued).
    """
    device = torch.device(device)
    if device.type != "cuda":
        for batch in batches:
            yield batch, prepare(batch)
        return
    side = torch.cuda.Stream(device)

    def launch(batch):
        with torch.cuda.stream(side):
            inputs = prepare(batch)
        ready = torch.cuda.Event()
        ready.record(side)
        return batch, inputs, ready

    def hand_over(item):
        batch, inputs, ready = item
        main = torch.cuda.current_stream(device)
        main.wait_event(ready)
        for tensor in inputs:
            if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                tensor.record_stream(main)  # freed blocks are not reused by the side stream too early
        return batch, inputs

    iterator = iter(batches)
    try:
        pending = launch(next(iterator))
    except StopIteration:
        return
    for batch in iterator:
        following = launch(batch)  # queued before the consumer queues its step on `pending`
        yield hand_over(pending)
        pending = following
    yield hand_over(pending)
