"""Ending an Accelerate run (trackers and process group) in an order that cannot hang on gloo."""

from __future__ import annotations

__all__ = ["end_run"]


def end_run(accelerator) -> None:
    """Waits for every process, releases the prepared models and ends the trackers and the process group.

    Why this order: a gloo (CPU) process group's destructor joins its worker threads while holding the GIL,
    and a worker still freeing the last collective's tensors needs the GIL, so destroying the group right
    after a collective can deadlock (torch 2.13: one 2-process Stage II run in two hung in the DDP Reducer's
    destructor, which held the last reference to the group). The barrier waits without the GIL, so the
    workers finish first; releasing the DDP wrappers while the group is still registered keeps their Reducers
    from being what destroys it. Callers drop their own references to the wrapped models first.
    """
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator.end_training()
