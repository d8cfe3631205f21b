"""FiT3D's probe protocol details: centre padding, depth augmentations and crops, OneCycle momentum, the
cross-entropy mean of mmseg 0.27, and the data-set presets."""

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import Dinov2Config, Dinov2Model

from fit3d_hf.backbones import DenseFeatureExtractor
from fit3d_hf.evaluation.arguments import ProbeArguments
from fit3d_hf.evaluation.data import ProbeDataArguments
from fit3d_hf.evaluation.features import FrozenFeatures
from fit3d_hf.evaluation.heads import build_probe_heads
from fit3d_hf.evaluation.photometric import ColorAug
from fit3d_hf.evaluation.protocol import (
    apply_eval_crop,
    apply_preset,
    build_train_transform,
    center_pad,
    onecycle_momentum,
)
from fit3d_hf.evaluation.samples import CachedFeatureDataset, collate_cached
from fit3d_hf.evaluation.training import _probe_losses, train_probe
from fit3d_hf.evaluation.transforms import ComposeTransforms, FixedCrop, RandomRotate, RandomScaleCropFlip
from fit3d_hf.modeling_fit3d import backbone_dense_features


def test_center_padding_matches_the_originals_zero_padding_of_normalised_images():
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     patch_size=14, image_size=28)).eval()  # fmt: skip
    extractor = DenseFeatureExtractor(model)
    images = torch.rand(1, 3, 40, 61)  # -> 42 x 70: pads (1, 1) rows and (4, 5) columns
    padded = center_pad(images, 14, extractor.image_mean.flatten())
    assert padded.shape == (1, 3, 42, 70)
    assert torch.equal(padded[..., 1:41, 4:65], images)
    features = FrozenFeatures(baseline=extractor, patch_fit="pad")(images)["baseline"]
    # The original: normalise, then F.pad with zeros (CenterPadding as a forward pre-hook of the backbone).
    normalised = (images - extractor.image_mean) / extractor.image_std
    expected, _ = backbone_dense_features(model, F.pad(normalised, (4, 5, 1, 1)))
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    assert features.shape[-2:] == (3, 5)
    resized = FrozenFeatures(baseline=extractor, patch_fit="resize")(images)["baseline"]
    assert resized.shape[-2:] == (2, 4)  # 40 x 61 resized down to 28 x 56
    assert center_pad(padded, 14, extractor.image_mean.flatten()) is padded  # already a multiple


def test_random_rotate_turns_image_and_target_together():
    image = torch.rand(3, 5, 5)
    target = torch.arange(25, dtype=torch.float32).view(5, 5)
    rotated, moved = RandomRotate.rotate(image, target, 90.0)
    turned = [k for k in (1, -1) if torch.allclose(rotated, torch.rot90(image, k, dims=(1, 2)), atol=1e-5)]
    assert len(turned) == 1 and torch.equal(moved, torch.rot90(target, turned[0], dims=(0, 1)))
    # a small angle on a non-square image: corners leave the frame and become 0; depth values are not blended
    depth = torch.full((40, 60), 3.0)
    depth[:, 30:] = 7.0
    _, moved = RandomRotate.rotate(torch.rand(3, 40, 60), depth, 2.5)
    assert moved[0, 0] == 0 and set(moved.unique().tolist()) <= {0.0, 3.0, 7.0}
    torch.manual_seed(0)
    never = RandomRotate(probability=0.0, degrees=2.5)(image, target)
    assert never[0] is image


def test_color_aug_applies_gamma_on_the_0_255_scale_like_the_toolbox():
    image = torch.full((3, 2, 2), 0.5)
    out = ColorAug.apply(image, gamma=1.1, brightness=1.0, colors=torch.ones(3))
    assert out[0, 0, 0].item() == pytest.approx(127.5**1.1 / 255, rel=1e-5)  # 0.812, not 0.5 ** 1.1 = 0.467
    out = ColorAug.apply(image, gamma=1.0, brightness=1.2, colors=torch.tensor([1.0, 0.9, 1.1]))
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([0.6, 0.54, 0.66]))
    assert ColorAug.apply(torch.ones(3, 1, 1), 1.1, 1.25, torch.ones(3)).max() == 1.0  # clipped


def test_fixed_and_evaluation_crops():
    image, target = torch.rand(3, 480, 640), torch.rand(480, 640)
    cropped, cropped_target = FixedCrop("nyu")(image, target)
    assert cropped.shape == (3, 427, 565) and torch.equal(cropped_target, target[45:472, 43:608])
    kitti_image, kitti_target = torch.rand(3, 375, 1242), torch.rand(375, 1242)
    cropped, cropped_target = FixedCrop("kb")(kitti_image, kitti_target)
    assert cropped.shape == (3, 352, 1216) and torch.equal(cropped_target, kitti_target[23:375, 13:1229])

    ones = torch.ones(480, 640)
    eigen = apply_eval_crop(ones, "eigen")
    assert eigen.sum() == 426 * 560 and eigen[45, 41] == 1 and eigen[44, 41] == 0 and eigen[470, 600] == 1
    garg = apply_eval_crop(torch.ones(352, 1216), "garg")
    assert garg.sum() == (349 - 143) * (1172 - 43) and garg[143, 43] == 1 and garg[142, 43] == 0
    assert apply_eval_crop(ones, "none") is ones


def test_onecycle_momentum_follows_mmcv():
    total = 100
    assert onecycle_momentum(0, total) == pytest.approx(0.95)
    assert onecycle_momentum(29, total) == pytest.approx(0.85)  # end of the first phase: 0.3 x 100 - 1
    assert onecycle_momentum(99, total) == pytest.approx(0.95)
    middle = 29 + (99 - 29) / 2
    assert onecycle_momentum(middle, total) == pytest.approx(0.90)
    assert onecycle_momentum(14.5, total) == pytest.approx(0.90)
    # the probe trainer sets beta1 from it before every iteration
    generator = torch.Generator().manual_seed(0)
    data = CachedFeatureDataset(
        [{"original": torch.randn(4, 4, 4, generator=generator), "original_cls": torch.randn(4, generator=generator)} for _ in range(4)],
        [torch.rand(16, 16, generator=generator) * 5 + 0.5 for _ in range(4)],
    )  # fmt: skip
    args = ProbeArguments(
        probe="depth", output_dir="unused", max_steps=7, train_batch_size=2, report_to="none"
    )
    assert args.resolved().momentum_schedule == "onecycle"  # the depth reference
    heads = build_probe_heads("depth", {"original": (4, 4)}, max_depth=10.0)
    seen = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        seen.append(self.param_groups[0]["betas"][0])
        return original_step(self, *a, **k)

    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate_cached)
    torch.optim.AdamW.step = recording_step
    try:
        train_probe(heads, loader, args, Accelerator(cpu=True), loader_is_sharded=True)
    finally:
        torch.optim.AdamW.step = original_step
    assert seen == pytest.approx([onecycle_momentum(step, 7) for step in range(7)])


def test_cross_entropy_is_averaged_over_all_pixels_like_mmseg_027():
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4))
    target[:, :2] = 255  # half the pixels unlabelled
    args = ProbeArguments(probe="segmentation", output_dir="unused").resolved()
    assert args.ce_average == "all"
    all_pixels = _probe_losses("segmentation", {"v": logits}, target, 0, args, 0)["v"]
    valid_only = F.cross_entropy(logits, target, ignore_index=255)
    torch.testing.assert_close(all_pixels, 0.5 * valid_only)
    args = ProbeArguments(probe="segmentation", output_dir="unused", ce_average="valid").resolved()
    torch.testing.assert_close(
        _probe_losses("segmentation", {"v": logits}, target, 0, args, 0)["v"], valid_only
    )


def test_presets_fill_what_is_not_given():
    depth = ProbeArguments(probe="depth", output_dir="o")
    data, args = apply_preset(ProbeDataArguments(dataset="d", preset="nyuv2"), depth)
    assert (data.depth_scale, args.max_depth, args.fixed_crop, args.eval_crop) == (
        1000.0,
        10.0,
        "nyu",
        "eigen",
    )
    data, args = apply_preset(ProbeDataArguments(dataset="d", preset="kitti"), depth)
    assert (data.depth_scale, args.max_depth, args.crop_size, args.color_aug_brightness) == (
        256.0,
        80.0,
        "352,704",
        "0.9,1.1",
    )
    data, args = apply_preset(
        ProbeDataArguments(dataset="d", preset="scannetpp"),
        ProbeArguments(probe="depth", output_dir="o", max_depth=15.0),
    )
    assert args.max_depth == 15.0 and data.depth_scale == 1000.0  # an explicit flag wins
    segmentation = ProbeArguments(probe="segmentation", output_dir="o")
    data, _ = apply_preset(ProbeDataArguments(dataset="d", preset="ade20k"), segmentation)
    assert data.reduce_zero_label is True and data.num_classes == 150
    data, _ = apply_preset(
        ProbeDataArguments(dataset="d", preset="scannetpp", reduce_zero_label=False), segmentation
    )
    assert data.reduce_zero_label is False and data.num_classes == 100
    data, args = apply_preset(ProbeDataArguments(dataset="d"), depth)  # no preset: generic defaults
    assert (data.depth_scale, data.reduce_zero_label, args.resolved().max_depth) == (1000.0, False, 10.0)
    with pytest.raises(ValueError, match="preset"):
        apply_preset(ProbeDataArguments(dataset="d", preset="cityscapes"), depth)


def test_depth_training_transform_follows_the_reference_pipeline():
    _, args = apply_preset(
        ProbeDataArguments(dataset="d", preset="nyuv2"), ProbeArguments(probe="depth", output_dir="o")
    )
    transform = build_train_transform(args.resolved())
    assert isinstance(transform, ComposeTransforms)
    kinds = [type(step) for step in transform.transforms]
    assert kinds == [FixedCrop, RandomRotate, RandomScaleCropFlip, ColorAug]
    assert transform.transforms[-1].brightness_range == (0.75, 1.25)
    image, target = transform(torch.rand(3, 480, 640), torch.rand(480, 640) * 5)
    assert image.shape == (3, 416, 544) and target.shape == (416, 544)
    segmentation = build_train_transform(ProbeArguments(probe="segmentation", output_dir="o").resolved())
    assert not any(isinstance(step, (RandomRotate, ColorAug)) for step in segmentation.transforms)
    plain = ProbeArguments(probe="depth", output_dir="o", augment=False, fixed_crop="kb").resolved()
    assert [type(step) for step in build_train_transform(plain).transforms] == [FixedCrop]
    assert math.isclose(args.resolved().rotate_degrees, 2.5)
