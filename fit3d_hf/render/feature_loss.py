"""`feature_l1()`: Stage I's feature loss, one API over the fused compiled op and its PyTorch twin.

The loss compares a decoded feature render with the backbone's patch features upsampled bilinearly to its
size (`_reference._feature_l1` states it). Float32, float16 and bfloat16 inputs on a device with a compiled
extension get the fused op (`_wrapper.feature_l1`: one pass over the decoded map, and one for its gradient);
float64, a target that requires grad, or a device without an extension get the composed PyTorch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fit3d_hf.render import _reference, _wrapper
from fit3d_hf.render._backend import load_cpu_extension, load_extension
from fit3d_hf.render._checks import check_feature_l1_inputs

__all__ = ["feature_l1"]

# the composed ops also take float64 (gradcheck, the reference renders)
_DTYPES = (*_wrapper.FEATURE_L1_DTYPES, torch.float64)


def _use_kernel(decoded: Tensor, target: Tensor) -> bool:
    if target.requires_grad:
        return False
    kernel_dtypes = _wrapper.FEATURE_L1_DTYPES
    if decoded.dtype not in kernel_dtypes or target.dtype not in kernel_dtypes:  # float64: the composed ops
        return False
    if decoded.is_cuda:
        extension = load_extension()
        return extension is not None and hasattr(extension, "feature_l1_fwd")
    return decoded.device.type == "cpu" and load_cpu_extension() is not None


def feature_l1(decoded: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over channels and pixels of |decoded - up(target)|, up() being bilinear upsampling
    (align_corners=False) to the decoded map's size; pixels where `mask` is False count 0 (the mean still
    divides by all pixels).

    Args:
        decoded: `[B, D, H, W]` decoded feature render (float32, float16, bfloat16 or float64).
        target: `[B, D, h, w]` backbone features, on the device of `decoded`.
        mask: `[B, 1, H, W]` bool, or None.

    Returns:
        The loss, a float32 scalar.

    Raises:
        TypeError: an argument is not a tensor, or has another dtype.
        ValueError: a shape that does not match (a mask must be `[B, 1, H, W]`, not merely hold as many
            elements), or tensors on different devices.
    """
    check_feature_l1_inputs(decoded, target, mask, _DTYPES)
    if _use_kernel(decoded, target):
        return _wrapper._apply_feature_l1(decoded, target, mask)
    return _reference._feature_l1(decoded, target, mask)
