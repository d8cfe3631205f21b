"""Stage I on the CPU reference renderer and a small synthetic scene."""

import json
from dataclasses import replace

import pytest
import torch
from backbone_helpers import tiny_dinov2_config
from transformers import Dinov2Model

from fit3d_hf.backbones import DenseFeatureExtractor
from fit3d_hf.gaussians import BundleMismatchError, load_bundle
from fit3d_hf.lifting import LiftingArguments, lift_scene, resolve_scene_list
from fit3d_hf.scene import read_scene
from fit3d_hf.scene.synthetic import SyntheticSceneConfig, generate_dataset


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    config = SyntheticSceneConfig(seed=3, num_views=24, width=64, height=48, num_points=4000)
    generate_dataset(root, num_scenes=1, num_val_scenes=0, config=config)
    return root


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    torch.manual_seed(0)
    # Patch size 4: a 12 x 16 feature grid on the 48 x 64 images, fine enough to be lifted in a short run.
    config = tiny_dinov2_config(32, patch_size=4, image_size=64)
    folder = tmp_path_factory.mktemp("backbone")
    Dinov2Model(config).save_pretrained(folder)
    return str(folder)


def _args(out, backbone, **overrides):
    # Short-run settings: 1,000 iterations instead of 30,000, so larger learning rates (FiT3D's feature and
    # decoder lr of 6.25e-5 needs the full run) decaying over the run, a compressed densification schedule and a
    # Gaussian cap.
    base = LiftingArguments(
        backbone=backbone, out=str(out), feature_dim=16, iterations=1000, holdout_every=4, feature_lr=0.01,
        decoder_lr=0.01, sh_dc_lr=0.01, position_lr_init=1.6e-3, position_lr_final=1.6e-5, position_lr_max_steps=0,
        scaling_lr=0.01,
        densify_from=50, densify_until=800, densify_interval=100, opacity_reset_interval=10_000,
        sh_increase_interval=250, max_gaussians=6000, checkpoint_interval=250, previews=False, device="cpu",
    )  # fmt: skip
    return replace(base, **overrides)


def test_short_run_fits_rgb_and_features(scene_root, backbone_dir, tmp_path):
    scene_dir = resolve_scene_list(str(scene_root))[0]
    metrics = lift_scene(scene_dir, _args(tmp_path, backbone_dir, previews=True), progress=False)
    assert metrics["views_heldout"] == 6 and metrics["views_train"] == 18
    assert metrics["psnr_heldout"] >= 22.0, metrics
    # The bundle as saved (fp16 geometry, compressed SH) renders the held-out views as well as the trained Gaussians.
    assert abs(metrics["psnr_heldout"] - metrics["psnr_heldout_uncompressed"]) <= 0.5, metrics
    assert metrics["feature_l1_train"] <= 0.5 * metrics["feature_l1_train_start"], metrics
    # where the time went: every phase, in order, adding up to (nearly) the whole
    phases = metrics["seconds_by_phase"]
    assert list(phases) == [
        "scene_data", "initial_evaluation", "training", "evaluation", "colour_kmeans", "colour_refinement",
        "bundle_writing", "saved_bundle_evaluation", "previews",
    ]  # fmt: skip
    assert min(phases.values()) > 0 and phases["training"] == round(metrics["seconds_training"], 3)
    assert 0.95 * metrics["seconds_total"] < sum(phases.values()) <= metrics["seconds_total"] + 0.01
    densification = metrics["densification"]
    # Densification ran and its bookkeeping adds up (a split replaces one Gaussian by two). Nothing need be
    # pruned here: before the first opacity reset, FiT3D prunes only transparent Gaussians.
    assert densification["cloned"] + densification["split"] > 0, densification
    grown = densification["cloned"] + densification["split"] - densification["pruned"]
    assert metrics["num_gaussians"] == metrics["num_gaussians_initial"] + grown, (
        metrics["num_gaussians"],
        densification,
    )
    folder = tmp_path / metrics["scene_id"]
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["num_gaussians"] == metrics["num_gaussians"]
    assert (folder / "preview_rgb.png").is_file() and (folder / "preview_features.png").is_file()
    assert not (folder / "checkpoint.pt").exists()
    bundle = load_bundle(
        folder, expected_backbone=backbone_dir, expected_backbone_dim=32, expected_feature_dim=16
    )
    assert len(bundle) == metrics["num_gaussians"]
    with pytest.raises(BundleMismatchError, match="backbone"):
        load_bundle(folder, expected_backbone="facebook/dinov2-small")
    # A finished scene is skipped: the same call returns the saved metrics without training.
    assert (
        lift_scene(scene_dir, _args(tmp_path, backbone_dir), progress=False)["seconds_training"]
        == saved["seconds_training"]
    )


def test_killed_run_resumes_to_the_same_gaussians(scene_root, backbone_dir, tmp_path):
    scene = read_scene(resolve_scene_list(str(scene_root))[0])
    extractor = DenseFeatureExtractor.from_pretrained(backbone_dir)
    args = dict(
        iterations=160, checkpoint_interval=40, densify_from=20, densify_interval=20, densify_until=140
    )
    uninterrupted = tmp_path / "a"
    lift_scene(scene, _args(uninterrupted, backbone_dir, **args), extractor, progress=False)
    interrupted = tmp_path / "b"
    assert (
        lift_scene(
            scene,
            _args(interrupted, backbone_dir, **args),
            extractor,
            max_iterations_this_run=80,
            progress=False,
        )
        is None
    )
    assert (interrupted / scene.scene_id / "checkpoint.pt").is_file()
    lift_scene(scene, _args(interrupted, backbone_dir, **args), extractor, progress=False)
    first = load_bundle(uninterrupted / scene.scene_id, include_sh=True)
    second = load_bundle(interrupted / scene.scene_id, include_sh=True)
    assert len(first) == len(second)
    for name in ("means", "quats", "log_scales", "opacities", "features", "decoder_weight", "sh"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_feature_loss_alone_leaves_geometry_unchanged(scene_root, backbone_dir, tmp_path):
    scene = read_scene(resolve_scene_list(str(scene_root))[0])
    args = _args(
        tmp_path, backbone_dir, iterations=30, rgb_loss_weight=0.0, densify_from=10_000, holdout_every=0
    )
    metrics = lift_scene(scene, args, progress=False)
    bundle = load_bundle(tmp_path / scene.scene_id)
    from fit3d_hf.gaussians import FeatureGaussians

    initial = FeatureGaussians.from_points(scene.points, scene.point_colors, 16)
    assert len(bundle) == len(initial)
    torch.testing.assert_close(bundle.means, initial.means.detach(), rtol=0, atol=0)
    torch.testing.assert_close(bundle.scales, initial.scales.detach(), rtol=2e-3, atol=0)  # fp16 storage
    torch.testing.assert_close(bundle.opacities.float(), initial.opacities.detach(), rtol=1e-3, atol=0)
    assert metrics["feature_l1_train"] < metrics["feature_l1_train_start"]  # the features did learn


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="holdout_every"):
        LiftingArguments(backbone="b", out="o", holdout_every=1)
    with pytest.raises(ValueError, match="image_scale"):
        LiftingArguments(backbone="b", out="o", image_scale=2.0)
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        resolve_scene_list("/nonexistent/scenes")


def test_refining_the_compressed_colours_recovers_held_out_psnr(scene_root, backbone_dir, tmp_path):
    """The bundle's codebook alone loses view-dependent colour; refining DC + codebook by rendering wins it back."""
    scene_dir = resolve_scene_list(str(scene_root))[0]
    # a higher SH lr and earlier degree raises, so that the higher orders carry colour in a short run
    settings = dict(
        iterations=500, sh_rest_lr=0.01, sh_increase_interval=100, densify_until=400, checkpoint_interval=0
    )
    plain = lift_scene(
        scene_dir,
        _args(tmp_path / "plain", backbone_dir, bundle_sh_refine_steps=0, **settings),
        progress=False,
    )
    refined = lift_scene(scene_dir, _args(tmp_path / "refined", backbone_dir, **settings), progress=False)
    assert plain["psnr_heldout_uncompressed"] == refined["psnr_heldout_uncompressed"]  # same training
    assert plain["psnr_heldout"] < plain["psnr_heldout_uncompressed"] - 0.3, (
        plain
    )  # the codebook costs colour
    assert refined["psnr_heldout"] > plain["psnr_heldout"] + 0.3, (plain, refined)


def test_evaluation_is_psnr_and_feature_l1_over_valid_pixels(scene_root, backbone_dir, tmp_path):
    """`Lifter.evaluate`: the mean over views of the PSNR and of |decoded - up(target)| (channel mean) over each
    view's valid pixels, as composed ops compute them in float64 (it uses the training loss's fused kernel)."""
    import math

    import torch.nn.functional as F

    from fit3d_hf.lifting import load_scene_data
    from fit3d_hf.lifting.lifter import Lifter

    scene = read_scene(resolve_scene_list(str(scene_root))[0])
    data = load_scene_data(
        scene, DenseFeatureExtractor.from_pretrained(backbone_dir), 1.0, torch.device("cpu"), progress=False
    )
    data.masks[1, :, :20] = False  # a view with a third of its pixels invalid
    lifter = Lifter(
        _args(tmp_path, backbone_dir), data, list(range(len(data.image_ids))), torch.device("cpu")
    )
    with torch.no_grad():
        lifter.gaussians.features.normal_()
    views = [0, 1, 2]
    metrics = lifter.evaluate(views)
    psnrs, l1s = [], []
    with torch.no_grad():
        for view in views:
            out = lifter.render(view, with_grad=False)
            valid = data.masks[view : view + 1].double()
            error = (out.rgb.clamp(0, 1).double() - data.image(view).double()) ** 2
            psnrs.append(10 * math.log10(1 / float((error * valid).sum() / (3 * valid.sum()))))
            decoded = lifter.decoder(out.features).double()
            target = F.interpolate(
                data.targets[view : view + 1].double(), size=decoded.shape[2:], mode="bilinear"
            )
            channel_mean = (decoded - target).abs().mean(dim=1, keepdim=True)
            l1s.append(float((channel_mean * valid).sum() / valid.sum()))
    assert metrics["psnr"] == pytest.approx(sum(psnrs) / 3, abs=1e-4)
    assert metrics["feature_l1"] == pytest.approx(sum(l1s) / 3, rel=1e-5)
    assert l1s[1] != pytest.approx(l1s[0], rel=1e-2)  # the views differ: a mean over views is being checked


def test_colour_refinement_steps_only_the_used_codebook_rows(scene_root, backbone_dir, tmp_path):
    """One refinement step is one Adam step on the codebook rows that the view's Gaussians use: such rows move by
    the lr, no other row moves, and row 0 (the zero vector of never-trained higher orders, here over half the
    Gaussians) stays exactly zero; the codes do not change."""
    from fit3d_hf.gaussians.sh_codec import encode_sh
    from fit3d_hf.lifting import load_scene_data
    from fit3d_hf.lifting.lifter import Lifter

    scene = read_scene(resolve_scene_list(str(scene_root))[0])
    extractor = DenseFeatureExtractor.from_pretrained(backbone_dir)
    data = load_scene_data(scene, extractor, 1.0, torch.device("cpu"), progress=False)
    args = _args(tmp_path, backbone_dir, sh_rest_lr=0.01)
    lifter = Lifter(args, data, list(range(len(data.image_ids))), torch.device("cpu"))
    g = lifter.gaussians
    g.active_sh_degree = g.max_sh_degree
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        g.sh_rest.copy_(0.2 * torch.randn(g.sh_rest.shape, generator=generator))
        g.sh_rest[::2] = 0  # never trained: code 0
    before = encode_sh(g.sh.detach(), seed=args.seed)
    compressed = lifter.compress_colours()
    assert torch.equal(compressed.rest_codebook, before.rest_codebook)  # the k-means of encode_sh, same seed
    after = lifter.refine_compressed_colours(compressed, steps=1)
    assert torch.equal(after.rest_codes, before.rest_codes)
    codes = before.rest_codes.long()
    assert (codes[::2] == 0).all() and (codes[1::2] != 0).float().mean() > 0.5
    moved = (after.rest_codebook.float() - before.rest_codebook.float()).abs()
    assert torch.equal(after.rest_codebook[0], torch.zeros_like(after.rest_codebook[0]))
    used = torch.zeros(len(moved), dtype=torch.bool)
    used[codes] = True
    # Adam's first step moves each element with a gradient by lr (fp16 storage: within its rounding); rows whose
    # Gaussians the view does not see have none
    stepped = moved.amax(dim=1) > 0
    assert stepped.sum() >= 10 and not stepped[~used].any()
    assert ((moved[stepped] - 0.01).abs() < 2e-4).float().mean() > 0.95, moved[stepped]


def test_lifter_steps_as_3dgs_with_fixed_lr_schedule_and_near_plane(
    scene_root, backbone_dir, tmp_path, monkeypatch
):
    """3DGS's loop: densify, then step, so Gaussians skip Adam on densification iterations (the decoder does
    not); no step on the last iteration; the position lr decays over 30,000 steps whatever the run length;
    Gaussians nearer than 0.2 are culled."""
    import math

    import fit3d_hf.render
    from fit3d_hf.gaussians import FeatureGaussians
    from fit3d_hf.lifting import load_scene_data, scene_extent
    from fit3d_hf.lifting.lifter import Lifter, exponential_lr

    near_planes = []
    real_render = fit3d_hf.render.render

    def recording_render(*args, **kwargs):
        near_planes.append(kwargs.get("near_plane"))
        return real_render(*args, **kwargs)

    monkeypatch.setattr(fit3d_hf.render, "render", recording_render)
    scene = read_scene(resolve_scene_list(str(scene_root))[0])
    data = load_scene_data(
        scene, DenseFeatureExtractor.from_pretrained(backbone_dir), 1.0, torch.device("cpu"), progress=False
    )
    args = LiftingArguments(
        backbone=backbone_dir, out=str(tmp_path), feature_dim=8, iterations=4, densify_from=0, densify_interval=2,
        densify_grad_threshold=1e9, device="cpu",
    )  # fmt: skip
    assert args.position_lr_max_steps == 30_000 and args.near_plane == 0.2 and not args.prune_screen_size
    lifter = Lifter(args, data, list(range(len(data.image_ids))), torch.device("cpu"))
    with torch.no_grad():  # non-zero features, so that the decoder gets a gradient from the first step
        lifter.gaussians.features.normal_()

    def snapshot():
        state = {
            name: getattr(lifter.gaussians, name).detach().clone()
            for name in FeatureGaussians.PARAMETER_NAMES
        }
        return state, lifter.decoder.weight.detach().clone()

    moved = []
    for _ in range(4):
        gaussians, decoder = snapshot()
        lifter.step()
        after, decoder_after = snapshot()
        moved.append(
            (not torch.equal(after["means"], gaussians["means"]), not torch.equal(decoder_after, decoder))
        )
        if lifter.iteration in (2, 4):  # densification iterations: every Gaussian tensor was replaced
            for name in FeatureGaussians.PARAMETER_NAMES:
                assert torch.equal(after[name], gaussians[name]), (lifter.iteration, name)
    # (means moved, decoder moved) per iteration; iteration 4 is the last: no step at all
    assert moved == [(True, True), (False, True), (True, True), (False, False)]
    means_lr = next(g["lr"] for g in lifter.optimizer.param_groups if g["name"] == "means")
    expected = scene_extent(data.camera_centers) * exponential_lr(4, 1.6e-4, 1.6e-6, 30_000)
    assert math.isclose(means_lr, expected, rel_tol=1e-12) and means_lr > 0.99 * 1.6e-4 * scene_extent(
        data.camera_centers
    )
    assert near_planes and set(near_planes) == {0.2}


def test_bf16_steps_render_features_as_the_decoder_reads_them(
    scene_root, backbone_dir, tmp_path, monkeypatch
):
    """With mixed_precision bf16 the rasterizer returns bfloat16 channels-last features (and takes their gradient
    so): the same steps as rendering float32 and converting, which the lifter did before."""
    import dataclasses

    import fit3d_hf.render
    from fit3d_hf.lifting import load_scene_data
    from fit3d_hf.lifting.lifter import Lifter

    scene = read_scene(resolve_scene_list(str(scene_root))[0])
    data = load_scene_data(
        scene, DenseFeatureExtractor.from_pretrained(backbone_dir), 1.0, torch.device("cpu"), progress=False
    )
    args = LiftingArguments(
        backbone=backbone_dir, out=str(tmp_path), feature_dim=8, iterations=10, densify_until=0,
        mixed_precision="bf16", device="cpu",
    )  # fmt: skip
    real_render = fit3d_hf.render.render
    feature_dtypes = []

    def converting_render(*args, feature_dtype=None, **kwargs):
        out = real_render(*args, **kwargs)
        if feature_dtype is None:
            return out
        feature_dtypes.append(feature_dtype)
        features = out.features.to(feature_dtype, memory_format=torch.channels_last)
        return dataclasses.replace(out, features=features)

    lifters = []
    for render in (real_render, converting_render):
        monkeypatch.setattr(fit3d_hf.render, "render", render)
        torch.manual_seed(0)  # the decoder's initial weights
        lifter = Lifter(args, data, list(range(len(data.image_ids))), torch.device("cpu"))
        with torch.no_grad():
            lifter.gaussians.features.normal_(generator=torch.Generator().manual_seed(0))
        initial = lifter.gaussians.features.detach().clone()
        for _ in range(3):
            lifter.step()
        lifters.append(lifter)
    assert feature_dtypes == [torch.bfloat16] * 3
    direct, converted = (lifter.gaussians for lifter in lifters)
    assert (direct.features - initial).abs().amax() > 1e-4  # the feature loss's gradient reached them
    for name in ("features", "means", "opacity_logits"):
        torch.testing.assert_close(
            getattr(direct, name), getattr(converted, name), rtol=1e-5, atol=1e-7, msg=name
        )


def test_scene_data_reports_how_long_it_waited_for_the_image_readers(scene_root, backbone_dir, caplog):
    import logging
    import re

    from fit3d_hf.lifting import load_scene_data

    scene = read_scene(resolve_scene_list(str(scene_root))[0])
    extractor = DenseFeatureExtractor.from_pretrained(backbone_dir)
    with caplog.at_level(logging.INFO, logger="fit3d_hf.lifting.scene_data"):
        data = load_scene_data(scene, extractor, 1.0, torch.device("cpu"), progress=False)
    assert len(data.image_ids) == 24
    (message,) = [r.getMessage() for r in caplog.records if "image readers" in r.getMessage()]
    match = re.fullmatch(
        r"\S+: 24 views read and encoded in ([\d.]+) s, ([\d.]+) s of it waiting for the image readers",
        message,
    )
    assert match, message
    assert 0 <= float(match.group(2)) <= float(match.group(1))


@pytest.mark.parametrize(("image_scale", "batch"), [(1.0, 1), (1.0, 5), (0.5, 5)])
def test_scene_data_holds_the_decoded_views_and_the_backbone_features_of_each(
    scene_root, backbone_dir, monkeypatch, image_scale, batch
):
    """Full-size views travel as uint8 and become floats on the device, resized ones are resized as floats on the
    host; either way the kept images are the decoded (resized) views rounded to uint8, and the targets are the
    backbone's features of each view on its own, whether the views went through it one by one or in batches (5:
    24 views end with a batch of 4)."""
    import torch.nn.functional as F

    from fit3d_hf.lifting import load_scene_data, scene_data
    from fit3d_hf.scene import load_image

    monkeypatch.setitem(scene_data._TARGET_BATCH, "cpu", batch)
    scene = read_scene(resolve_scene_list(str(scene_root))[0])
    extractor = DenseFeatureExtractor.from_pretrained(backbone_dir)
    data = load_scene_data(scene, extractor, image_scale, torch.device("cpu"), progress=False)
    height, width = round(48 * image_scale), round(64 * image_scale)
    assert data.images.dtype == torch.uint8 and data.images.shape == (24, 3, height, width)
    assert data.targets.dtype == torch.float16
    for view in (0, 13, 23):
        image = torch.from_numpy(load_image(scene.frames[view].image_path)).permute(2, 0, 1)[None]
        if image_scale != 1.0:
            image = F.interpolate(image, size=(height, width), mode="bilinear", antialias=True).clamp(0, 1)
        assert torch.equal(data.images[view : view + 1], (image * 255).round().to(torch.uint8))
        with torch.no_grad():
            expected = extractor(image).to(torch.float16)
        tolerance = {} if batch == 1 else {"atol": 2e-3, "rtol": 2e-3}  # a batch's matmuls round differently
        torch.testing.assert_close(
            data.targets[view : view + 1], expected, **({"atol": 0, "rtol": 0} | tolerance)
        )


def test_bf16_scene_data_runs_the_backbone_in_bfloat16(scene_root, backbone_dir):
    """`--mixed_precision bf16` computes the targets under bfloat16 autocast: close to the fp32 ones (bfloat16
    keeps 8 bits of mantissa) but not them; the images are the same."""
    from fit3d_hf.lifting import load_scene_data

    scene = read_scene(resolve_scene_list(str(scene_root))[0])
    extractor = DenseFeatureExtractor.from_pretrained(backbone_dir)
    exact = load_scene_data(scene, extractor, 1.0, torch.device("cpu"), progress=False)
    fast = load_scene_data(scene, extractor, 1.0, torch.device("cpu"), progress=False, bf16=True)
    assert torch.equal(fast.images, exact.images)
    difference = (fast.targets.float() - exact.targets.float()).abs()
    scale = exact.targets.float().abs().mean()
    assert 1e-4 < float(difference.mean() / scale) < 5e-2


def test_bf16_evaluation_decodes_as_the_training_does(scene_root, backbone_dir, tmp_path):
    """With mixed_precision bf16 the evaluation decodes bfloat16 channels-last features under bf16 autocast, as the
    steps do: the same PSNR as in float32 (the RGB image is float32 either way) and a feature L1 within bfloat16's
    rounding of it."""
    from fit3d_hf.lifting import load_scene_data
    from fit3d_hf.lifting.lifter import Lifter

    scene = read_scene(resolve_scene_list(str(scene_root))[0])
    data = load_scene_data(
        scene, DenseFeatureExtractor.from_pretrained(backbone_dir), 1.0, torch.device("cpu"), progress=False
    )
    results, decoder_inputs = {}, {}
    for precision in ("no", "bf16"):
        args = LiftingArguments(
            backbone=backbone_dir, out=str(tmp_path), feature_dim=8, iterations=10, mixed_precision=precision,
            device="cpu",
        )  # fmt: skip
        torch.manual_seed(0)  # the decoder's initial weights
        lifter = Lifter(args, data, list(range(len(data.image_ids))), torch.device("cpu"))
        with torch.no_grad():
            lifter.gaussians.features.normal_(generator=torch.Generator().manual_seed(0))

        def record(module, inputs, output, precision=precision):
            decoder_inputs.setdefault(precision, (inputs[0], output))

        lifter.decoder.register_forward_hook(record)
        results[precision] = lifter.evaluate([0, 1])
    features, decoded = decoder_inputs["bf16"]
    assert features.dtype == torch.bfloat16 and features.is_contiguous(memory_format=torch.channels_last)
    assert decoded.dtype == torch.bfloat16
    assert decoder_inputs["no"][1].dtype == torch.float32
    assert results["bf16"]["psnr"] == results["no"]["psnr"]
    assert results["bf16"]["feature_l1"] == pytest.approx(results["no"]["feature_l1"], rel=1e-2)
    assert results["bf16"]["feature_l1"] != results["no"]["feature_l1"]


def test_the_optimizer_is_told_which_sh_orders_can_move(scene_root, backbone_dir, tmp_path):
    """The higher SH orders past the degree in use have zero gradients and keep zero moments, and the optimizer's
    `live_prefix` of the sh_rest group says how many of a Gaussian's 45 coefficients are in use (none at degree
    0, 9 at 1, 24 at 2, all at 3); on the CPU torch's Adam steps them all, which leaves those zeros as they are.
    The prefix is set before each optimizer step from the degree that step rendered with."""
    from fit3d_hf.lifting import load_scene_data
    from fit3d_hf.lifting.lifter import Lifter

    scene = read_scene(resolve_scene_list(str(scene_root))[0])
    data = load_scene_data(
        scene, DenseFeatureExtractor.from_pretrained(backbone_dir), 1.0, torch.device("cpu"), progress=False
    )
    args = LiftingArguments(
        backbone=backbone_dir, out=str(tmp_path), feature_dim=8, iterations=10, sh_increase_interval=2,
        densify_from=0, densify_interval=3, densify_grad_threshold=0.0, device="cpu",
    )  # fmt: skip
    lifter = Lifter(args, data, list(range(len(data.image_ids))), torch.device("cpu"))

    def live_prefix(of):
        return next(g["live_prefix"] for g in of.optimizer.param_groups if g["name"] == "sh_rest")

    seen = []
    for _ in range(8):
        lifter.step()
        g = lifter.gaussians
        live = live_prefix(lifter)  # the degree this step rendered with
        rest = g.sh_rest.detach().flatten(1)
        moments = lifter.optimizer.state[g.sh_rest]
        dead = slice(live if live is not None else rest.shape[1], None)
        assert not rest[:, dead].any() and not moments["exp_avg"].flatten(1)[:, dead].any()
        assert not moments["exp_avg_sq"].flatten(1)[:, dead].any()
        if live:  # the live orders move
            assert rest[:, :live].abs().sum() > 0
        seen.append(live)
    assert seen == [0, 9, 9, 24, 24, None, None, None]  # raised at iterations 2, 4, 6
