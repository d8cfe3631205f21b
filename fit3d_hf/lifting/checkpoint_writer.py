"""Stage I checkpoints written while training goes on (`CheckpointWriter`).

A checkpoint of a 1M-Gaussian scene holds about 1.5 GB (the Gaussians and Adam's two moments). Written inside
the training loop it took 3.0 s on an H100 host and 5-9 s on a 2-core machine (checksums, `torch.save`): at
the earlier default of one every 1000 of 30,000 iterations, about 1.5 minutes of a scene that trains in four
(`benchmarks/checkpoint_write.py`). On a GPU the writer instead takes a snapshot of the state on the device (a
copy of every tensor: milliseconds, and later steps cannot change it) and hands it to a thread, which copies it
to the host on a stream of its own, so that the training's stream never waits for the transfer, and writes it
with `save_torch_checkpoint` (hashing and writing release the GIL, so the training loop keeps launching; the
snapshot held the loop 5.8 ms). The host copy goes through two small page-locked staging buffers: copied
straight into pageable memory, the 1.5 GB held the training thread's kernel launches for the whole transfer
(its steps took 113 instead of 8 ms for 1.2 s: 1.15 s of the checkpoint's 1.2 s cost to the training, H100,
session 17), while a copy into page-locked memory is a DMA that blocks no other thread (copying all of it into
page-locked memory instead would pin 1.5 GB of the host for good). A checkpoint now costs the training 0.10-0.14
s, its steps at 8.0 instead of 7.6 ms during the 3 s write. What reaches the disk is the same file a
synchronous save writes then.

On the CPU it writes synchronously: training and writing would share the same cores, and a checkpoint is then
on disk as soon as `submit` returns (the crash-resume tests rely on it).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from ..checkpoints import map_tensors, save_torch_checkpoint

__all__ = ["CheckpointWriter"]

logger = logging.getLogger(__name__)


class CheckpointWriter:
    """Writes `save_torch_checkpoint` files one at a time, on a background thread when `background`.

    `submit` waits for the previous write, then snapshots the state and (in the background) writes it; `wait`
    waits for the write in flight and raises its error, if any. As a context manager it waits on exit; when the
    block is already leaving with an exception, a failed write is logged instead of hiding that exception.
    The snapshot costs one copy of the state's memory on its device for as long as the write takes; where the
    device lacks the room, that checkpoint is written synchronously (with a warning).
    """

    def __init__(self, background: bool):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._staging: list[torch.Tensor] | None = None  # page-locked, made at the first write from a GPU

    def submit(self, state: dict, path: str | os.PathLike) -> None:
        self.wait()
        if not self.background:
            save_torch_checkpoint(state, path)
            return
        try:
            snapshot = _snapshot(state)
        except torch.cuda.OutOfMemoryError:
            # the copy needs the state's size once more on its device: without the room, write as the CPU does
            logger.warning(
                "no device memory for a copy of the checkpoint (%s): writing it in the training loop instead",
                path,
            )
            save_torch_checkpoint(state, path)
            return
        ready = {}  # per GPU: the copies are queued on its current stream; the writer's stream waits for them
        for tensor in _tensors(snapshot):
            if tensor.is_cuda and tensor.device not in ready:
                ready[tensor.device] = torch.cuda.current_stream(tensor.device).record_event()
        if ready and self._staging is None:
            # made here, once: allocating page-locked memory may hold up other threads' CUDA calls
            self._staging = [
                torch.empty(_STAGING_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)
            ]
        self._thread = threading.Thread(
            target=self._write, args=(snapshot, ready, Path(path)), name="fit3d-checkpoint-writer"
        )
        self._thread.start()

    @property
    def writing(self) -> bool:
        """Whether a background write is still in flight."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.wait()
            return
        try:
            self.wait()
        except Exception:
            logger.exception("a checkpoint write failed too")

    def _write(self, snapshot: dict, ready: dict, path: Path) -> None:
        try:
            save_torch_checkpoint(map_tensors(snapshot, lambda tensor: self._to_host(tensor, ready)), path)
        except BaseException as error:  # re-raised by the training thread's next submit / wait
            self._error = error

    def _to_host(self, tensor: torch.Tensor, ready: dict) -> torch.Tensor:
        if not tensor.is_cuda:
            return tensor
        stream = self._streams.get(tensor.device)
        if stream is None:
            stream = self._streams[tensor.device] = torch.cuda.Stream(tensor.device)
        with torch.cuda.stream(stream):
            stream.wait_event(ready[tensor.device])
            return _copy_through_staging(tensor, self._staging, stream)


# bytes per page-locked staging buffer (two per writer): large enough that a chunk's copy dwarfs its launch
_STAGING_BYTES = 64 << 20


def _copy_through_staging(tensor: torch.Tensor, staging: list[torch.Tensor], stream) -> torch.Tensor:
    """A host copy of the CUDA `tensor` (pageable memory), made on `stream` in chunks through the page-locked
    `staging` buffers in turn: the device copies one chunk while this thread moves the previous one out."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype)
    source = tensor.contiguous().view(-1).view(torch.uint8)
    target = out.view(-1).view(torch.uint8)
    chunk = staging[0].numel()
    pending = None  # (buffer, its copy's event, where it goes in target)
    for k, begin in enumerate(range(0, source.numel(), chunk)):
        end = min(begin + chunk, source.numel())
        buffer = staging[k % len(staging)]
        buffer[: end - begin].copy_(source[begin:end], non_blocking=True)
        copied = stream.record_event()
        if pending is not None:
            _drain(*pending, target)
        pending = (buffer, copied, begin, end)
    if pending is not None:
        _drain(*pending, target)
    return out


def _drain(buffer: torch.Tensor, copied, begin: int, end: int, target: torch.Tensor) -> None:
    copied.synchronize()  # this thread waits for the chunk's copy; the training's stream does not
    target[begin:end].copy_(buffer[: end - begin])


def _snapshot(state: dict) -> dict:
    """`state` with a copy of each of its tensors, on the tensor's device."""
    return map_tensors(state, lambda tensor: tensor.detach().clone())


def _tensors(value) -> list[torch.Tensor]:
    found = []
    map_tensors(value, found.append)
    return found
