"""PhotoMetricDistortion (mmseg semantics on [0, 1] float images): hand-computed brightness/contrast results,
the HSV conversion against Python's colorsys, identity settings, clipping, untouched labels, seeding, and the
probe option that switches it on for segmentation only."""

import colorsys

import pytest
import torch

from fit3d_hf.cli import parse_args
from fit3d_hf.evaluation.arguments import ProbeArguments
from fit3d_hf.evaluation.photometric import ColorAug, PhotoMetricDistortion, hsv_to_rgb, rgb_to_hsv
from fit3d_hf.evaluation.protocol import build_train_transform
from fit3d_hf.evaluation.transforms import ComposeTransforms, RandomRotate, RandomScaleCropFlip


def _pixels(values: list[list[float]]) -> torch.Tensor:
    """[[r, g, b], ...] -> [3, 1, N]."""
    return torch.tensor(values, dtype=torch.float32).T[:, None, :]


def _image_with_extremes(generator: torch.Generator) -> torch.Tensor:
    """A random [3, 8, 8] image holding black, white, grey and saturated pixels too."""
    image = torch.rand(3, 8, 8, generator=generator)
    image[:, 0, 0], image[:, 0, 1], image[:, 0, 2] = 0.0, 1.0, 0.5
    image[:, 0, 3] = torch.tensor([1.0, 0.0, 0.0])
    image[:, 0, 4] = torch.tensor([0.0, 1.0, 1.0])
    return image


def test_brightness_then_contrast_by_hand():
    channel = torch.tensor([[0.0, 0.2], [0.5, 0.95]])
    image = torch.stack([channel, channel.flip(0), channel.T])
    brighter = PhotoMetricDistortion.apply(image, brightness=0.1, contrast=1.5)
    expected = torch.tensor([[0.15, 0.45], [0.9, 1.0]])  # (x + 0.1 clipped to 1) * 1.5, clipped to 1
    torch.testing.assert_close(brighter, torch.stack([expected, expected.flip(0), expected.T]))
    darker = PhotoMetricDistortion.apply(image, brightness=-0.1, contrast=0.5)
    expected = torch.tensor([[0.0, 0.05], [0.2, 0.425]])  # (x - 0.1 clipped to 0) * 0.5
    torch.testing.assert_close(darker, torch.stack([expected, expected.flip(0), expected.T]))


def test_contrast_before_or_after_saturation_by_hand():
    # (0.6, 0.3, 0.3) is hue 0, saturation 0.5, value 0.6.
    pixel = _pixels([[0.6, 0.3, 0.3]])
    first = PhotoMetricDistortion.apply(pixel, contrast=2.0, saturation=2.0, contrast_first=True)
    # x2 -> (1, 0.6, 0.6): S 0.4, V 1 -> S 0.8 -> (1, 0.2, 0.2)
    torch.testing.assert_close(first, _pixels([[1.0, 0.2, 0.2]]))
    last = PhotoMetricDistortion.apply(pixel, contrast=2.0, saturation=2.0, contrast_first=False)
    # S 0.5 -> 1 (clipped) -> (0.6, 0, 0) -> x2 -> (1, 0, 0)
    torch.testing.assert_close(last, _pixels([[1.0, 0.0, 0.0]]))


def test_forced_steps_with_fixed_factors_give_the_hand_computed_result():
    image = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0]).repeat(3, 2, 1)
    image[1] *= 0.5
    distortion = PhotoMetricDistortion(
        brightness_delta=0, contrast_range=(1.5, 1.5), saturation_range=(1, 1), hue_delta=0, probability=1.0
    )
    out, _ = distortion(image, torch.zeros(2, 5, dtype=torch.long))
    # Brightness +0, saturation x1 and hue +0 change nothing; contrast x1.5 then clips.
    torch.testing.assert_close(out, (image * 1.5).clamp(0, 1), atol=1e-5, rtol=0)
    assert out[0, 0].tolist() == pytest.approx([0.0, 0.3, 0.75, 1.0, 1.0], abs=1e-5)
    assert out[1, 0].tolist() == pytest.approx([0.0, 0.15, 0.375, 0.525, 0.75], abs=1e-5)


def test_hsv_matches_colorsys_and_round_trips():
    image = _image_with_extremes(torch.Generator().manual_seed(1))
    hsv = rgb_to_hsv(image)
    for row, col in [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (3, 5), (7, 7), (5, 2)]:
        expected = colorsys.rgb_to_hsv(*image[:, row, col].tolist())
        assert hsv[:, row, col].tolist() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(hsv_to_rgb(hsv), image, atol=1e-5, rtol=0)
    # Saturation 1 and hue 0 leave the image unchanged.
    identity = PhotoMetricDistortion.apply(image, saturation=1.0, hue=0.0)
    torch.testing.assert_close(identity, image, atol=1e-5, rtol=0)


def test_hue_and_saturation_known_answers():
    colours = _pixels([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.8, 0.4, 0.2]])
    # 30 OpenCV hue units = 60 degrees: red -> yellow, green -> cyan.
    shifted = PhotoMetricDistortion.apply(colours[:, :, :2], hue=30.0)
    torch.testing.assert_close(shifted, _pixels([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]), atol=1e-6, rtol=0)
    # -60 units = -120 degrees: red -> blue; 180 units = a full turn.
    torch.testing.assert_close(
        PhotoMetricDistortion.apply(colours[:, :, :1], hue=-60.0),
        _pixels([[0.0, 0.0, 1.0]]),
        atol=1e-6,
        rtol=0,
    )
    torch.testing.assert_close(PhotoMetricDistortion.apply(colours, hue=180.0), colours, atol=1e-6, rtol=0)
    # Saturation x0 = grey at the value (the largest channel); x0.5 halves the distance to it.
    torch.testing.assert_close(
        PhotoMetricDistortion.apply(colours, saturation=0.0), _pixels([[1.0] * 3, [1.0] * 3, [0.8] * 3])
    )
    torch.testing.assert_close(
        PhotoMetricDistortion.apply(colours[:, :, 2:], saturation=0.5), _pixels([[0.8, 0.6, 0.5]])
    )


def test_output_stays_in_unit_range_and_labels_are_untouched():
    generator = torch.Generator().manual_seed(2)
    image = _image_with_extremes(generator)
    labels = torch.randint(0, 5, (8, 8), generator=generator)
    wild = PhotoMetricDistortion(
        brightness_delta=255, contrast_range=(0.0, 3.0), saturation_range=(0.0, 3.0), hue_delta=180,
        probability=1.0, generator=generator,
    )  # fmt: skip
    default = PhotoMetricDistortion(generator=generator)
    for distortion in (wild, default):
        for _ in range(20):
            out, out_labels = distortion(image, labels)
            assert out.shape == image.shape and out.dtype == image.dtype
            assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
            assert out_labels is labels
    assert not torch.equal(wild(image, labels)[0], image)


def test_composed_with_the_crop_only_the_image_changes():
    image = _image_with_extremes(torch.Generator().manual_seed(3))
    labels = torch.arange(64).reshape(8, 8) % 4
    crop = RandomScaleCropFlip((6, 6), (1.0, 1.0), flip_probability=0.5, fill=255)
    torch.manual_seed(5)
    crop_image, crop_labels = crop(image, labels)
    torch.manual_seed(5)  # the crop draws first, so it sees the same random numbers
    forced = PhotoMetricDistortion(contrast_range=(0.5, 0.5), probability=1.0)
    out_image, out_labels = ComposeTransforms([crop, forced])(image, labels)
    assert torch.equal(out_labels, crop_labels)
    assert torch.equal(labels, torch.arange(64).reshape(8, 8) % 4)  # the input is not modified
    assert not torch.allclose(out_image, crop_image)


def test_same_seed_same_output():
    image = _image_with_extremes(torch.Generator().manual_seed(4))
    labels = torch.zeros(8, 8, dtype=torch.long)

    def run(generator=None):
        distortion = PhotoMetricDistortion(generator=generator)
        return torch.stack([distortion(image, labels)[0] for _ in range(8)])

    seeded = run(torch.Generator().manual_seed(7))
    assert torch.equal(seeded, run(torch.Generator().manual_seed(7)))
    assert not torch.equal(seeded, run(torch.Generator().manual_seed(8)))
    torch.manual_seed(7)  # None uses the global generator, which set_seed seeds
    global_rng = run()
    torch.manual_seed(7)
    assert torch.equal(global_rng, run())


def test_draws_follow_the_probabilities_and_ranges():
    distortion = PhotoMetricDistortion(generator=torch.Generator().manual_seed(0))
    draws = [distortion.sample_parameters() for _ in range(4000)]
    for name in ("brightness", "contrast", "saturation", "hue"):
        share = sum(d[name] is not None for d in draws) / len(draws)
        assert share == pytest.approx(0.5, abs=0.04), name
    assert sum(d["contrast_first"] for d in draws) / len(draws) == pytest.approx(0.5, abs=0.04)
    limits = {
        "brightness": (-32 / 255, 32 / 255),
        "contrast": (0.5, 1.5),
        "saturation": (0.5, 1.5),
        "hue": (-18, 18),
    }
    for name, (low, high) in limits.items():
        values = [d[name] for d in draws if d[name] is not None]
        assert (
            low <= min(values) < low + 0.05 * (high - low)
            and high - 0.05 * (high - low) < max(values) <= high
        )
    image = torch.rand(3, 4, 4)
    never = PhotoMetricDistortion(probability=0.0)
    assert torch.equal(never(image, torch.zeros(4, 4))[0], image)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="contrast_range"):
        PhotoMetricDistortion(contrast_range=(1.5, 0.5))
    with pytest.raises(ValueError, match="probability"):
        PhotoMetricDistortion(probability=1.5)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        PhotoMetricDistortion()(torch.rand(4, 4), torch.zeros(4, 4))


def test_probe_option_defaults_on_for_segmentation_only():
    def resolved(*argv):
        (args,) = parse_args("fit3d evaluate", "", [ProbeArguments], ["--output_dir", "out", *argv])
        return args.resolved()

    def steps(transform):
        return [type(t) for t in getattr(transform, "transforms", [transform])]

    segmentation = resolved("--probe", "segmentation")
    assert segmentation.photometric_distortion is True
    assert steps(build_train_transform(segmentation)) == [RandomScaleCropFlip, PhotoMetricDistortion]
    depth = resolved("--probe", "depth")
    assert depth.photometric_distortion is False
    # depth: FiT3D's depth configs also rotate before and colour-augment after the crop
    assert steps(build_train_transform(depth)) == [RandomRotate, RandomScaleCropFlip, ColorAug]
    switched_off = resolved("--probe", "segmentation", "--photometric_distortion", "false")
    assert switched_off.photometric_distortion is False
    assert steps(build_train_transform(switched_off)) == [RandomScaleCropFlip]
    assert build_train_transform(resolved("--probe", "segmentation", "--no_augment")) is None
    assert resolved("--probe", "depth", "--photometric_distortion", "true").photometric_distortion is True
