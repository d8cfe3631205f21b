"""Known answers for the probe metrics (mIoU/mAcc/aAcc, depth errors), the probe heads and the depth losses."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from fit3d_hf.evaluation.heads import (
    LinearDepthHead,
    LinearSegmentationHead,
    depth_bins,
    gradient_loss,
    sig_loss,
)
from fit3d_hf.evaluation.metrics import (
    DEPTH_METRICS,
    depth_errors,
    depth_scores,
    segmentation_areas,
    segmentation_scores,
)
from fit3d_hf.evaluation.training import learning_rate_factor


def test_segmentation_scores_match_hand_computed_values_with_ignore_index():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    predictions = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    areas = segmentation_areas(predictions, labels, num_classes=3, ignore_index=255)
    # Rows: intersection, predicted, labelled. Class 0: labelled twice, predicted twice, one right; class 1:
    # labelled 3 times, predicted 4 times, 3 right; class 2: labelled twice, predicted once (right). The
    # ignored pixel (predicted 2) counts nowhere.
    assert areas.tolist() == [[[1, 3, 1], [2, 4, 1], [2, 3, 2]]]
    scores = segmentation_scores(areas, ["a", "b", "c"])
    ious = [1 / (2 + 2 - 1), 3 / (4 + 3 - 3), 1 / (1 + 2 - 1)]
    accuracies = [1 / 2, 3 / 3, 1 / 2]
    assert scores["mIoU"] == pytest.approx(sum(ious) / 3)
    assert scores["mAcc"] == pytest.approx(sum(accuracies) / 3)
    assert scores["aAcc"] == pytest.approx(5 / 7)
    assert scores["per_class"]["a"] == pytest.approx({"IoU": 1 / 3, "Acc": 1 / 2})


def test_segmentation_scores_equal_a_confusion_matrix_oracle_and_skip_absent_classes():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (3, 20, 30), generator=generator)
    labels[labels == 4] = 255  # class 4 never labelled ...
    predictions = torch.randint(0, 6, (3, 20, 30), generator=generator)  # ... and class 5 never either
    per_image = segmentation_areas(predictions, labels, num_classes=6)
    scores = segmentation_scores(per_image)  # [N, 3, C] is summed
    valid = (labels != 255).flatten().numpy()
    matrix = confusion_matrix(
        labels.flatten().numpy()[valid], predictions.flatten().numpy()[valid], labels=range(6)
    )
    intersection = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersection / union
        accuracy = intersection / matrix.sum(1)
    assert scores["mIoU"] == pytest.approx(np.nanmean(iou))
    assert scores["mAcc"] == pytest.approx(np.nanmean(accuracy))
    assert scores["aAcc"] == pytest.approx(intersection.sum() / matrix.sum())
    # Predicted but never labelled: IoU 0 (counted), accuracy undefined.
    assert scores["per_class"]["4"]["IoU"] == 0.0 and scores["per_class"]["4"]["Acc"] is None
    perfect = segmentation_scores(segmentation_areas(labels.clamp_max(3), labels.clamp_max(3), num_classes=6))
    assert perfect["mIoU"] == 1.0 and perfect["per_class"]["5"] == {"IoU": None, "Acc": None}


def test_depth_errors_match_hand_computed_values_per_image():
    prediction = torch.tensor([[[1.0, 2.0, 4.0, 7.0]], [[3.0, 3.0, 3.0, 3.0]], [[1.0, 1.0, 1.0, 1.0]]])
    target = torch.tensor([[[1.0, 1.0, 2.0, 0.0]], [[3.0, 12.0, 3.0, 6.0]], [[0.0, 0.0, 0.0, 0.0]]])
    rows = depth_errors(prediction, target, min_depth=1e-3, max_depth=10.0)
    assert rows.shape == (3, len(DEPTH_METRICS))
    first = dict(zip(DEPTH_METRICS, rows[0].tolist(), strict=True))
    # Valid pixels (1, 1), (2, 1), (4, 2); the 0 target is unknown.
    assert first["rmse"] == pytest.approx(math.sqrt((0 + 1 + 4) / 3))
    assert first["abs_rel"] == pytest.approx((0 + 1 + 1) / 3)
    assert first["sq_rel"] == pytest.approx((0 + 1 + 2) / 3)
    assert first["log10"] == pytest.approx(2 * math.log10(2) / 3)
    assert first["rmse_log"] == pytest.approx(math.sqrt(2 * math.log(2) ** 2 / 3))
    assert first["silog"] == pytest.approx(
        100 * math.sqrt(2 * math.log(2) ** 2 / 3 - (2 * math.log(2) / 3) ** 2)
    )
    assert (first["delta1"], first["delta2"], first["delta3"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    # Image 2: the 12 m pixel is beyond max_depth; the 6 m one has ratio 2 > 1.25^3, so it fails every δ.
    second = dict(zip(DEPTH_METRICS, rows[1].tolist(), strict=True))
    assert second["rmse"] == pytest.approx(math.sqrt(9 / 3))
    assert (second["delta1"], second["delta3"]) == pytest.approx((2 / 3, 2 / 3))
    assert torch.isnan(rows[2]).all()  # no ground truth at all
    scores = depth_scores(rows)
    assert scores["num_images"] == 2
    assert scores["rmse"] == pytest.approx((first["rmse"] + second["rmse"]) / 2)
    assert scores["abs_rel"] == pytest.approx((2 / 3 + (0 + 0 + 0.5) / 3) / 2)


def test_depth_errors_clamp_predictions_into_the_range():
    rows = depth_errors(
        torch.tensor([[50.0, -1.0]]), torch.tensor([[5.0, 2.0]]), min_depth=1e-3, max_depth=10.0
    )
    rmse = dict(zip(DEPTH_METRICS, rows[0].tolist(), strict=True))["rmse"]
    assert rmse == pytest.approx(math.sqrt(((10 - 5) ** 2 + (1e-3 - 2) ** 2) / 2))


def test_depth_head_bins_and_output_range():
    bins = depth_bins(1e-3, 10.0, 256)
    assert bins[0].item() == pytest.approx(1e-3) and bins[-1].item() == pytest.approx(10.0)
    torch.testing.assert_close(bins[1:] - bins[:-1], torch.full((255,), (10.0 - 1e-3) / 255))
    log_bins = depth_bins(0.1, 10.0, 3, "SID")
    torch.testing.assert_close(log_bins, torch.tensor([0.1, 1.0, 10.0]))

    head = LinearDepthHead(
        feature_channels=6, cls_channels=4, min_depth=1e-3, max_depth=10.0, n_bins=256, upsample=4
    )
    assert head.in_channels == 10 and head.conv_depth.in_channels == 10
    features, cls_token = 5 * torch.randn(2, 6, 3, 5), 5 * torch.randn(2, 4)
    depth = head(features, cls_token)
    assert depth.shape == (2, 1, 12, 20)
    assert depth.min() >= 1e-3 and depth.max() <= 10.0
    probabilities = head.bin_probabilities(features, cls_token)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, 12, 20))
    assert head(features, cls_token, output_size=(30, 50)).shape == (2, 1, 30, 50)
    # Zero weights: every bin gets the same 0.1 (the linear normalisation's epsilon), so depth = mean of bins.
    torch.nn.init.zeros_(head.conv_depth.weight)
    torch.nn.init.zeros_(head.conv_depth.bias)
    torch.testing.assert_close(head(features, cls_token), torch.full((2, 1, 12, 20), (1e-3 + 10.0) / 2))
    # All mass on one bin (large score there) -> that bin's depth, up to the epsilon left on the others.
    head.conv_depth.bias.data[100] = 1e6
    assert head(features, cls_token)[0, 0, 0, 0].item() == pytest.approx(bins[100].item(), rel=1e-3)
    with pytest.raises(ValueError, match="CLS token"):
        head(features, None)


def test_segmentation_head_upsamples_logits_to_the_label_size():
    head = LinearSegmentationHead(in_channels=8, num_classes=5).eval()
    logits = head(torch.randn(2, 8, 4, 6), output_size=(28, 42))
    assert logits.shape == (2, 5, 28, 42)
    with pytest.raises(ValueError, match=r"\[B, 8, h, w\]"):
        head(torch.randn(2, 7, 4, 6))


def test_sig_loss_and_gradient_loss_known_answers():
    target = 1.0 + 4.0 * torch.rand(2, 1, 16, 16)
    target[0, 0, :2] = 0.0  # unknown pixels are ignored
    # A global scale error: the log difference is constant, so Var = 0 and only the mean term remains.
    scaled = 2.0 * target
    eps = 1e-3
    valid = target > 0
    g = torch.log(scaled[valid] + eps) - torch.log(target[valid] + eps)
    expected = torch.sqrt(g.var() + 0.15 * g.mean() ** 2)
    torch.testing.assert_close(sig_loss(scaled, target), expected)
    assert sig_loss(scaled, target).item() == pytest.approx(math.sqrt(0.15) * math.log(2), rel=1e-3)
    assert sig_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    assert sig_loss(scaled, target, warm_up=True).item() == pytest.approx(
        math.sqrt(0.15) * g.mean().item(), rel=1e-6
    )
    # Gradients of log depth are invariant to a global scale, up to eps.
    assert gradient_loss(scaled, target).item() == pytest.approx(0.0, abs=2e-3)
    noisy = target * torch.exp(0.3 * torch.randn_like(target))
    assert gradient_loss(noisy, target).item() > 0.5
    assert sig_loss(noisy, target).item() > 0.2


def test_learning_rate_schedules_follow_mmcv():
    # poly (power 1) over the whole run, multiplied by a linear warm-up from warmup_ratio to 1.
    assert learning_rate_factor(0, 1000, 100, 1e-6, "poly") == pytest.approx(1e-6)
    assert learning_rate_factor(50, 1000, 100, 1e-6, "poly") == pytest.approx((1 - 0.5 * (1 - 1e-6)) * 0.95)
    assert learning_rate_factor(100, 1000, 100, 1e-6, "poly") == pytest.approx(0.9)
    assert learning_rate_factor(1000, 1000, 100, 1e-6, "poly") == pytest.approx(0.0)
    assert learning_rate_factor(500, 1000, 0, 1e-3, "cosine") == pytest.approx(0.5)
    assert learning_rate_factor(0, 1000, 0, 1e-3, "cosine") == pytest.approx(1.0)
