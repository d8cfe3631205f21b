"""Tile binning by the compiled extensions: the `isect_tiles` op, and the sizing of its pair buffers inside
the rasterize op (`isect_and_rasterize` for CUDA, `isect_and_rasterize_exact` for the CPU).

`isect_tiles` lists, per camera and tile of `TILE_SIZE` x `TILE_SIZE` pixels, the Gaussians that can reach
alpha 1/255 there, front to back. Its pure-PyTorch twin is `_reference._isect_tiles`
(`_reference_binning.py`); `tests/test_render_cpu.py` and `tests/test_render_cuda.py` compare them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fit3d_hf.render._backend import extension_for
from fit3d_hf.render._checks import check_compiled_device, check_image_size, check_tensor

__all__ = ["isect_and_rasterize", "isect_and_rasterize_exact", "isect_tiles"]

_F32 = (torch.float32,)


def isect_tiles(
    means2d: Tensor,  # [B, N, 2]
    conics: Tensor,  # [B, N, 3]
    opacities: Tensor,  # [N]
    depths: Tensor,  # [B, N]
    radii: Tensor,  # [B, N] int32
    width: int,
    height: int,
) -> tuple[Tensor, Tensor]:
    """Bins Gaussians into tiles by the compiled extension (CUDA or CPU), the pair list sized exactly; see
    `_reference._isect_tiles` for the semantics.

    Returns:
        tile_ranges `[B * tiles_y * tiles_x, 2]` int32 and gaussian_ids `[P]` int32.
    """
    dims: dict[str, int] = {}
    device = means2d.device
    check_tensor(means2d, "means2d", ("B", "N", 2), dims, _F32)
    check_tensor(conics, "conics", ("B", "N", 3), dims, _F32, device)
    check_tensor(opacities, "opacities", ("N",), dims, _F32, device)
    check_tensor(depths, "depths", ("B", "N"), dims, _F32, device)
    check_tensor(radii, "radii", ("B", "N"), dims, (torch.int32,), device)
    check_compiled_device("means2d", means2d)
    check_image_size(width, height)
    args = [t.contiguous() for t in (means2d, conics, opacities, depths, radii)]
    tile_ranges, gaussian_ids, _ = extension_for(device).isect_tiles(*args, width, height, 0)
    return tile_ranges, gaussian_ids


# Slots of the (tile, Gaussian) pair buffers per device. Sizing them exactly needs the pair count on the host,
# a sync that leaves the GPU idle while the host launches the rest of the forward (about 0.2 ms of a 1 ms
# render); instead they get a capacity from the counts of recent calls, the count is checked once the launches
# are queued, and the rare call that overflows is redone with an exact size.
# Capacities are kept per (device, cameras, Gaussians, width, height), so renders of other sizes in between
# (evaluation, other scenes) neither overflow nor pad each other's buffers.
_PAIR_CAPACITY: dict[tuple, int] = {}
# The capacity shrinks by at most 0.1% a call after a large render: it holds about the largest count of the last
# few hundred calls. An overflow costs a wasted forward (1.1 ms at 1M Gaussians, H100) and an exact binning,
# a padding slot only its share of the pair sort. On the 300 views of benchmarks/lift.py's 1M-Gaussian scene,
# drawn in Stage I's order with densification's new counts (benchmarks/pair_capacity.py), 2% a call overflowed
# 10.6% of the renders (padding 27%), 0.1% overflows 0.7% of them (padding 36%).
_CAPACITY_MARGIN = 1.06  # slots per pair of the last call
_CAPACITY_DECAY = 0.999
_CAPACITY_ENTRIES = 64


def isect_and_rasterize_exact(ext, means2d, conics, depths, colors, opacities, features, background, radii, width,
                               height, features_bf16=False):  # fmt: skip
    """The CPU path: its binning always sizes the pair list exactly (there is no device to keep busy)."""
    tile_ranges, gaussian_ids, _ = ext.isect_tiles(
        means2d, conics, opacities, depths, radii, width, height, 0
    )
    images = ext.rasterize_fwd(
        means2d, conics, opacities, colors, depths, features, background, tile_ranges, gaussian_ids, width, height,
        features_bf16,
    )  # fmt: skip
    return tile_ranges, gaussian_ids, images


def isect_and_rasterize(ext, means2d, conics, depths, colors, opacities, features, background, radii, width, height,
                        features_bf16=False):  # fmt: skip
    """The CUDA path: bins with the capacity of the recent calls of this size (see `_PAIR_CAPACITY`), queues
    the rasterizer, then checks the pair count; returns (tile_ranges, gaussian_ids, images of rasterize_fwd)."""
    key = (means2d.device.index or 0, *means2d.shape[:2], width, height)
    capacity = _PAIR_CAPACITY.get(key, 0)
    if key not in _PAIR_CAPACITY and len(_PAIR_CAPACITY) >= _CAPACITY_ENTRIES:
        del _PAIR_CAPACITY[next(iter(_PAIR_CAPACITY))]  # the oldest size
    while True:
        tile_ranges, gaussian_ids, total = ext.isect_tiles(
            means2d, conics, opacities, depths, radii, width, height, capacity
        )
        images = ext.rasterize_fwd(
            means2d, conics, opacities, colors, depths, features, background, tile_ranges, gaussian_ids, width, height,
            features_bf16,
        )  # fmt: skip
        # waits for the count only, not for the rest of the binning (emitting and sorting the pairs, ~0.3 ms at
        # 1M Gaussians, H100): this thread gets back to launching that much sooner, ahead of the GPU
        ext.wait_pair_count(means2d.device.index or 0)
        pairs = int(total)
        _PAIR_CAPACITY[key] = max(int(_CAPACITY_MARGIN * pairs) + 1024, int(_CAPACITY_DECAY * capacity))
        if capacity <= 0 or pairs <= capacity:
            return tile_ranges, gaussian_ids, images
        capacity = 0  # overflowed: size the buffers exactly this time
