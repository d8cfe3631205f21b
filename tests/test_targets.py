import pytest
import torch

from fit3d_hf.targets import decode_at_patch_grid, decode_then_resample


@pytest.mark.parametrize(
    "image_size, grid",
    [
        ((584, 876), (41, 62)),
        ((120, 160), (8, 11)),
        ((61, 45), (4, 3)),
        ((30, 40), (30, 40)),
        ((17, 23), (2, 1)),
    ],
)
def test_patch_grid_decode_equals_full_decode_then_resample(image_size, grid):
    generator = torch.Generator().manual_seed(0)
    feature_map = torch.randn(2, 8, *image_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(24, 8, 3, 3, generator=generator, dtype=torch.float64)
    fast = decode_at_patch_grid(feature_map, weight, grid)
    slow = decode_then_resample(feature_map, weight, grid)
    assert fast.shape == (2, 24, *grid)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)


def test_patch_grid_decode_float32_and_1x1_kernel():
    feature_map = torch.randn(1, 4, 50, 70)
    weight = torch.randn(6, 4, 1, 1)
    torch.testing.assert_close(
        decode_at_patch_grid(feature_map, weight, (7, 9)),
        decode_then_resample(feature_map, weight, (7, 9)),
        rtol=1e-4,
        atol=1e-4,
    )


def test_patch_grid_decode_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="same F"):
        decode_at_patch_grid(torch.zeros(1, 4, 8, 8), torch.zeros(6, 5, 3, 3), (2, 2))
