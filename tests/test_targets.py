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
        ((20, 30), (40, 50)),  # upsampling: the second tap clamps onto the first at the last rows
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


def test_patch_grid_decode_5x5_kernel_reaches_the_padding():
    generator = torch.Generator().manual_seed(1)
    feature_map = torch.randn(1, 3, 11, 13, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 3, 5, 5, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        decode_at_patch_grid(feature_map, weight, (4, 6)),
        decode_then_resample(feature_map, weight, (4, 6)),
        rtol=1e-10,
        atol=1e-10,
    )


def test_patch_grid_decode_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="same F"):
        decode_at_patch_grid(torch.zeros(1, 4, 8, 8), torch.zeros(6, 5, 3, 3), (2, 2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_patch_grid_decode_on_cuda_equals_full_decode():
    # Stage II's shapes (a batch of 876 x 584 renders of 64 channels, DINOv2's 41 x 62 grid, 384 channels)
    generator = torch.Generator().manual_seed(2)
    feature_map = torch.randn(2, 64, 584, 876, generator=generator).cuda()
    weight = torch.randn(384, 64, 3, 3, generator=generator).cuda() / 24
    on_cuda = decode_at_patch_grid(feature_map, weight, (41, 62))
    assert on_cuda.shape == (2, 384, 41, 62)
    # the oracle in float32 without TF32 convolutions: both resample at float32 source coordinates, which
    # differ from float64's by up to ~6e-5 pixels at x = 876 (PyTorch's own float32 interpolate is ~2e-4 off
    # its float64 result here, measured on an H100 and on the CPU)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected = decode_then_resample(feature_map, weight, (41, 62))
    torch.testing.assert_close(on_cuda, expected, rtol=1e-4, atol=1e-4)
    in_float64 = decode_then_resample(feature_map.double(), weight.double(), (41, 62))
    torch.testing.assert_close(on_cuda.double(), in_float64, rtol=1e-3, atol=1e-3)
