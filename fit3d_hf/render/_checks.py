"""Argument checks with messages that name the argument and give the expected and the actual value."""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping

import torch
from torch import Tensor

__all__ = ["check_tensor"]


def check_tensor(
    value: object,
    name: str,
    shape: tuple[int | str, ...],
    dims: MutableMapping[str, int],
    dtypes: Iterable[torch.dtype],
    device: torch.device | None = None,
) -> Tensor:
    """Checks a tensor argument and binds its named dimensions.

    Args:
        value: the argument.
        name: its name, used in messages.
        shape: expected shape; ints must match, strings are named sizes (e.g. "N") bound on first use and
            compared afterwards, so the same name means the same size across arguments.
        dims: the named sizes bound so far (updated in place).
        dtypes: accepted dtypes.
        device: required device, if any.

    Returns:
        `value`.

    Raises:
        TypeError: not a tensor, or a dtype outside `dtypes`.
        ValueError: a wrong number of dimensions, a size that differs from `shape` or from an earlier
            argument, or another device.
    """
    dtypes = tuple(dtypes)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {value.dtype}")
    # the message is built only on failure (render() checks ten tensors per call), from the sizes bound before
    known = dict(dims)

    def pretty() -> str:
        expected = tuple(known.get(d, d) if isinstance(d, str) else d for d in shape)
        return "(" + ", ".join(str(d) for d in expected) + ("," if len(expected) == 1 else "") + ")"

    if value.dim() != len(shape):
        raise ValueError(f"{name} must have shape {pretty()}, got {tuple(value.shape)}")
    for axis, (want, got) in enumerate(zip(shape, value.shape, strict=True)):
        if isinstance(want, str):
            bound = dims.setdefault(want, got)
            if bound != got:
                raise ValueError(
                    f"{name} must have shape {pretty()} ({want} = {bound} from an earlier argument), "
                    f"got {tuple(value.shape)}"
                )
        elif want != got:
            raise ValueError(f"{name} must have shape {pretty()}, got {tuple(value.shape)} (axis {axis})")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device}, but the Gaussians are on {device}")
    return value
