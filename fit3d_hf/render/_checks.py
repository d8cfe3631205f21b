"""Argument checks of the render ops, with messages that name the argument and give the expected and the
actual value: tensors (`check_tensor`), image sizes and clipping planes, the device of a compiled op's
tensors, and the inputs of the fused feature loss."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping

import torch
from torch import Tensor

__all__ = [
    "check_compiled_device",
    "check_feature_l1_inputs",
    "check_image_and_planes",
    "check_image_size",
    "check_sh_coefficients",
    "check_tensor",
    "sh_parts",
]


def check_tensor(
    value: object,
    name: str,
    shape: tuple[int | str, ...],
    dims: MutableMapping[str, int],
    dtypes: Iterable[torch.dtype],
    device: torch.device | None = None,
    device_of: str = "the Gaussians",
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
        device_of: what `device` is the device of, in the message (the Gaussians for the render ops).

    Returns:
        `value`.

    Raises:
        TypeError: not a tensor, or a dtype outside `dtypes`.
        ValueError: a wrong number of dimensions, a size that differs from `shape` or from an earlier
            argument, or another device.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not isinstance(dtypes, tuple):
        dtypes = tuple(dtypes)
    if value.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {value.dtype}")
    # render() checks ten tensors per call: the fast path binds sizes and compares, and the message (which shows
    # the sizes bound before this call) is built only on failure
    sizes = value.shape
    if len(sizes) != len(shape):
        raise ValueError(f"{name} must have shape {_expected(shape, dims)}, got {tuple(sizes)}")
    bound_here = []
    for axis, (want, got) in enumerate(zip(shape, sizes, strict=True)):
        if isinstance(want, str):
            bound = dims.get(want)
            if bound is None:
                dims[want] = got
                bound_here.append(want)
            elif bound != got:
                before = {k: v for k, v in dims.items() if k not in bound_here}
                raise ValueError(
                    f"{name} must have shape {_expected(shape, before)} ({want} = {bound} from an earlier argument), "
                    f"got {tuple(sizes)}"
                )
        elif want != got:
            before = {k: v for k, v in dims.items() if k not in bound_here}
            raise ValueError(
                f"{name} must have shape {_expected(shape, before)}, got {tuple(sizes)} (axis {axis})"
            )
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device}, but {device_of} are on {device}")
    return value


def _expected(shape: tuple[int | str, ...], known: Mapping[str, int]) -> str:
    """The expected shape for a message: named sizes replaced by their values where known."""
    expected = tuple(known.get(d, d) if isinstance(d, str) else d for d in shape)
    return "(" + ", ".join(str(d) for d in expected) + ("," if len(expected) == 1 else "") + ")"


def sh_parts(sh: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """(DC terms, rest) of SH coefficients given as a pair, or (the `[N, K, 3]` tensor, None)."""
    if isinstance(sh, tuple | list):
        return sh[0], sh[1]
    return sh, None


def check_sh_coefficients(
    sh: object,
    dims: MutableMapping[str, int],
    dtypes: Iterable[torch.dtype],
    device: torch.device | None = None,
    name: str = "colors",
) -> None:
    """Checks SH coefficients, one `[N, K, 3]` tensor or the pair (DC terms `[N, 1, 3]`, the rest
    `[N, K - 1, 3]`) in which 3DGS keeps them; binds N and K (the number of coefficients per channel)."""
    if not isinstance(sh, tuple | list):
        check_tensor(sh, f"{name} (SH)", ("N", "K", 3), dims, dtypes, device)
        return
    if len(sh) != 2:
        raise ValueError(
            f"{name} as SH parts must be a pair (DC terms [N, 1, 3], the rest [N, K - 1, 3]), got {len(sh)} tensors"
        )
    dc, rest = sh
    check_tensor(dc, f"{name}[0] (SH DC terms)", ("N", 1, 3), dims, dtypes, device)
    check_tensor(rest, f"{name}[1] (SH higher orders)", ("N", "K - 1", 3), dims, dtypes, device)
    k = 1 + dims.pop("K - 1")
    if dims.setdefault("K", k) != k:
        raise ValueError(
            f"{name} has {k} SH coefficients per channel, but {dims['K']} from an earlier argument"
        )


def check_image_size(width: object, height: object) -> None:
    """Refuses an image size that is not a positive int."""
    for name, size in (("width", width), ("height", height)):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"{name} must be a positive int, got {size!r}")


def check_image_and_planes(width: object, height: object, near_plane: float, far_plane: float) -> None:
    """Refuses an image size that is not a positive int, or clipping planes outside 0 < near < far."""
    check_image_size(width, height)
    if not 0 < near_plane < far_plane:  # also refuses NaN
        raise ValueError(
            f"need 0 < near_plane < far_plane, got near_plane={near_plane}, far_plane={far_plane}"
        )


def check_compiled_device(name: str, t: Tensor) -> None:
    """The compiled ops take CUDA or CPU tensors; other devices need render(..., backend="reference")."""
    if t.device.type not in ("cuda", "cpu"):
        raise ValueError(f"the compiled backends need CUDA or CPU tensors, but {name} is on {t.device}")


def check_feature_l1_inputs(
    decoded: object, target: object, mask: object, dtypes: Iterable[torch.dtype]
) -> dict[str, int]:
    """Checks the inputs of the feature loss: decoded `[B, D, H, W]`, target `[B, D, h, w]` (each of a dtype
    in `dtypes`) and mask `[B, 1, H, W]` bool or None, all on the device of `decoded`.

    Returns:
        The named sizes (B, D, H, W, h, w).
    """
    dtypes = tuple(dtypes)
    dims: dict[str, int] = {}
    check_tensor(decoded, "decoded", ("B", "D", "H", "W"), dims, dtypes)
    device = decoded.device
    check_tensor(target, "target", ("B", "D", "h", "w"), dims, dtypes, device, "the decoded features")
    if mask is not None:
        check_tensor(mask, "mask", ("B", 1, "H", "W"), dims, (torch.bool,), device, "the decoded features")
    return dims
