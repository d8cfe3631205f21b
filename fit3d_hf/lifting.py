"""Stage I: lift a backbone's 2D features of one scene into 3D feature Gaussians.

The method of FiT3D (ECCV 2024, §3.1), with its hyper-parameters as defaults: 3DGS fitted to the scene's
images, each Gaussian also carrying an F-dim feature (F = 64) that is alpha-blended into a feature map and
decoded by a per-scene 3x3 convolution (F -> D, no bias) at full resolution. Loss:
`0.8 * L1(rgb) + 0.2 * (1 - SSIM(rgb)) + 1.0 * L1(decoded features, upsampled backbone features)`; the
rasterizer routes the feature loss to the features only, never to geometry. Anonymised pixels (mask 0)
are excluded by replacing the targets there with the detached prediction, as the original does.

Unlike the original, the backbone's target features are computed once per image and kept (fp16, at patch
resolution) instead of being recomputed every iteration, and a run checkpoints itself so that a killed run
resumes where it stopped and ends with the same Gaussians. The bundle stores the SH colours compressed (see
`fit3d_hf.gaussians.sh_codec`); their DC terms and codebook are refined by rendering before they are saved.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoints import load_torch_checkpoint, save_torch_checkpoint
from .errors import UsageError
from .gaussians import DensificationConfig, Densifier, FeatureGaussians, load_bundle, save_bundle
from .gaussians.bundle import BUNDLE_FILENAME, SH_STORAGES
from .gaussians.sh_codec import CompressedSH, assemble_sh, encode_sh
from .losses import psnr, ssim, upsampled_feature_l1
from .scene.specs import heldout_view_indices, resolve_scene_list  # noqa: F401  (resolve_scene_list: re-exported)
from .utils import atomic_write_text, deterministic_algorithms

__all__ = ["LiftingArguments", "SceneData", "lift_many", "lift_scene", "load_scene_data", "resolve_scene_list", "scene_extent"]

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.json"
CHECKPOINT_FILENAME = "checkpoint.pt"
INITIAL_METRICS_FILENAME = "initial_metrics.json"
PREVIEW_FILENAMES = ("preview_rgb.png", "preview_features.png")
# Fields of LiftingArguments that do not change a scene's result, so a rerun that differs only in them reuses
# (or resumes) it. Every other field, including any added later, is recorded in the scene's settings.json
# and must match; add a field here only when its value cannot change the bundle or the metrics.
NON_RESULT_FIELDS = frozenset(
    {
        "out",  # where the result goes, not what it is
        "device",  # where it is computed (CPU and CUDA agree up to rounding; resuming on another device is fine)
        "checkpoint_interval",  # a resumed run ends with the same Gaussians as an uninterrupted one
        "previews",  # extra PNGs only
        "keep_checkpoint",  # what is kept afterwards
        "overwrite",  # what to do with an earlier result
    }
)
NORMALIZATIONS = ("imagenet", "processor")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"--{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_device_name(name: str) -> None:
    """Refuses a `--device` value torch cannot parse ('auto' is ours: CUDA when available)."""
    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from error


@dataclass
class LiftingArguments:
    """Options of Stage I (defaults: FiT3D's, i.e. 3DGS's plus the feature terms)."""

    backbone: str = field(metadata={"help": "Backbone whose features are lifted: Hub id, local folder or short name."})
    out: str = field(metadata={"help": "Output folder; the scene's results go to <out>/<scene_id>/."})
    feature_dim: int = field(default=64, metadata={"help": "Length F of each Gaussian's feature."})
    iterations: int = field(default=30_000, metadata={"help": "Optimisation steps (one view each)."})
    image_scale: float = field(default=1.0, metadata={"help": "Resize factor applied to the images (and intrinsics)."})
    max_gaussians: int | None = field(default=None, metadata={"help": "Cap on the number of Gaussians."})
    holdout_every: int = field(default=0, metadata={"help": "Keep every K-th view out of training and report on it (0: none)."})
    random_init_points: int = field(default=100_000, metadata={"help": "Random initial Gaussians when the scene has no sparse points."})
    seed: int = field(default=0, metadata={"help": "Seed of every random choice (view order, splits, random init)."})
    sh_degree: int = field(default=3, metadata={"help": "Highest SH degree of the colours."})
    sh_increase_interval: int = field(default=1000, metadata={"help": "Raise the active SH degree every N iterations."})
    lambda_dssim: float = field(default=0.2, metadata={"help": "Weight of (1 - SSIM) in the RGB loss."})
    rgb_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the whole RGB loss (0: features only, geometry frozen)."})
    feature_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the feature L1 loss."})
    position_lr_init: float = field(default=1.6e-4, metadata={"help": "Initial lr of the means (x scene extent)."})
    position_lr_final: float = field(default=1.6e-6, metadata={"help": "Final lr of the means (x scene extent)."})
    position_lr_max_steps: int = field(
        default=30_000,
        metadata={
            "help": "Length of the means' lr decay, in iterations (FiT3D/3DGS: 30,000 whatever --iterations; after it "
            "the lr stays at the final value). 0: decay over --iterations, so that a short run ends at the final lr."
        },
    )
    sh_dc_lr: float = field(default=0.0025, metadata={"help": "lr of the SH DC coefficients."})
    sh_rest_lr: float = field(default=0.0025 / 20, metadata={"help": "lr of the higher SH coefficients."})
    feature_lr: float = field(default=0.0025 / 40, metadata={"help": "lr of the Gaussians' features."})
    decoder_lr: float = field(default=0.0025 / 40, metadata={"help": "lr of the per-scene decoder."})
    opacity_lr: float = field(default=0.05, metadata={"help": "lr of the opacity logits."})
    scaling_lr: float = field(default=0.005, metadata={"help": "lr of the log scales."})
    rotation_lr: float = field(default=0.001, metadata={"help": "lr of the quaternions."})
    densify_from: int = field(default=500, metadata={"help": "First iteration of densification."})
    densify_until: int = field(default=15_000, metadata={"help": "Last iteration of densification."})
    densify_interval: int = field(default=100, metadata={"help": "Densify every N iterations."})
    opacity_reset_interval: int = field(default=3000, metadata={"help": "Reset opacities every N iterations."})
    densify_grad_threshold: float = field(default=2e-4, metadata={"help": "Screen-space gradient threshold (NDC)."})
    prune_screen_size: bool = field(
        default=False,
        metadata={
            "help": "Also prune Gaussians whose screen radius exceeded 20 px since the last densification (after the "
            "first opacity reset). 3DGS/FiT3D's code has this test but it never fires there (the radii are reset just "
            "before it); enabling it prunes more aggressively than 3DGS does."
        },
    )
    near_plane: float = field(
        default=0.2,
        metadata={"help": "Gaussians closer to the camera than this (camera z, scene units) are not rendered (FiT3D's rasterizer: 0.2)."},
    )
    normalization: str = field(default="imagenet", metadata={"help": "Backbone input normalisation: 'imagenet' (FiT3D) or 'processor'.", "choices": list(NORMALIZATIONS)})
    pos_embed_interpolation: str | None = field(
        default=None,
        metadata={
            "help": "Position-embedding resampling of the backbone: 'timm' (bicubic with antialiasing, as the original "
            "FiT3D's timm backbones) or 'native' (transformers'). Default: 'timm' for the short names (dinov2_small, "
            "...), else what the backbone's config records, else 'native'. Stage II must use the same (it checks).",
            "choices": ["timm", "native"],
        },
    )
    checkpoint_interval: int = field(default=1000, metadata={"help": "Save a resumable checkpoint every N iterations (0: never)."})
    device: str = field(default="auto", metadata={"help": "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."})
    mixed_precision: str = field(
        default="no",
        metadata={"help": "'bf16': decode the features and compute their loss in bfloat16 (faster on GPUs; FiT3D: fp32).", "choices": ["no", "bf16"]},
    )
    bundle_sh: str = field(
        default="compressed",
        metadata={
            "help": "How the bundle stores the SH colours: 'compressed' (8-bit DC + a k-means codebook of the higher "
            "orders; the whole file is about 164 B per Gaussian at F = 64) or 'fp16' (exact to half precision, about "
            "252 B; RGB renders keep view-dependent detail). Stage II reads neither.",
            "choices": list(SH_STORAGES),
        },
    )
    bundle_sh_refine_steps: int | None = field(
        default=None,
        metadata={
            "help": "With --bundle_sh compressed: iterations refining the compressed colours (DC + codebook) by "
            "rendering the training views after training (default: min(1000, iterations / 10); 0: none)."
        },
    )
    previews: bool = field(default=True, metadata={"help": "Write preview PNGs (RGB render, PCA of features)."})
    keep_checkpoint: bool = field(default=False, metadata={"help": "Keep the last checkpoint after the scene is finished."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Redo a scene whose earlier result (finished or not) was made with other settings (see settings.json)."},
    )

    def __post_init__(self) -> None:
        # Range checks; `fit3d_hf.cli.parse_args` reports them as argparse does (usage line, exit 2).
        for name in ("feature_dim", "iterations", "random_init_points", "sh_increase_interval", "densify_interval"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("checkpoint_interval", "opacity_reset_interval", "densify_from", "densify_until"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if self.max_gaussians is not None and self.max_gaussians <= 0:
            raise UsageError(f"--max_gaussians must be positive, got {self.max_gaussians}")
        if not 0 < self.image_scale <= 1:
            raise UsageError(f"--image_scale must be in (0, 1], got {self.image_scale}")
        if self.holdout_every < 0 or self.holdout_every == 1:
            raise UsageError(f"--holdout_every must be 0 or at least 2, got {self.holdout_every}")
        if not 0 <= self.sh_degree <= 3:
            raise UsageError(f"--sh_degree must be 0 to 3, got {self.sh_degree}")
        if not 0 <= self.lambda_dssim <= 1:
            raise UsageError(f"--lambda_dssim must be in [0, 1], got {self.lambda_dssim}")
        if self.bundle_sh_refine_steps is not None and self.bundle_sh_refine_steps < 0:
            raise UsageError(f"--bundle_sh_refine_steps must be 0 or more, got {self.bundle_sh_refine_steps}")
        _check_choice("bundle_sh", self.bundle_sh, SH_STORAGES)
        _check_choice("mixed_precision", self.mixed_precision, ("no", "bf16"))
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_device_name(self.device)
        if self.position_lr_max_steps < 0:
            raise UsageError(f"--position_lr_max_steps must be positive (or 0: --iterations), got {self.position_lr_max_steps}")
        if self.near_plane <= 0:
            raise UsageError(f"--near_plane must be positive, got {self.near_plane}")

    def densification(self) -> DensificationConfig:
        return DensificationConfig(
            densify_from=self.densify_from,
            densify_until=self.densify_until,
            densify_interval=self.densify_interval,
            opacity_reset_interval=self.opacity_reset_interval,
            grad_threshold=self.densify_grad_threshold,
            prune_screen_size=self.prune_screen_size,
            max_gaussians=self.max_gaussians,
        )


@dataclass
class SceneData:
    """A scene's views on the device: images uint8 `[V, 3, H, W]`, masks bool `[V, 1, H, W]`, intrinsics
    `[V, 3, 3]`, poses `[V, 4, 4]`, and the backbone's target features fp16 `[V, D, h, w]`."""

    scene_id: str
    image_ids: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    K: torch.Tensor
    world_to_camera: torch.Tensor
    targets: torch.Tensor
    points: np.ndarray
    point_colors: np.ndarray
    camera_centers: np.ndarray

    @property
    def height(self) -> int:
        return self.images.shape[2]

    @property
    def width(self) -> int:
        return self.images.shape[3]

    def image(self, index: int) -> torch.Tensor:
        """`[1, 3, H, W]` float image in [0, 1]."""
        return self.images[index : index + 1].float() / 255.0


def scene_extent(camera_centers: np.ndarray) -> float:
    """3DGS's `cameras_extent`: 1.1 x the largest distance of a camera centre from their mean."""
    centers = np.asarray(camera_centers, dtype=np.float64)
    radius = np.linalg.norm(centers - centers.mean(axis=0), axis=1).max() if len(centers) else 0.0
    return 1.1 * max(float(radius), 1e-6)


def _resolve_device(name: str) -> torch.device:
    """The device of `--device`, refused (before anything is written) when this machine lacks it."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: this machine has no CUDA device (torch sees none); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@torch.no_grad()
def load_scene_data(scene, extractor, image_scale: float, device: torch.device, progress: bool = True) -> SceneData:
    """Loads a scene's images and masks at `image_scale`, and computes the backbone features once.

    Args:
        scene: a `fit3d_hf.scene.Scene`.
        extractor: a `fit3d_hf.backbones.DenseFeatureExtractor` (images in [0, 1] -> `[B, D, h, w]`).
    """
    from .scene import load_image, load_mask

    images, masks, Ks, poses, targets = [], [], [], [], []
    for frame in tqdm(scene.frames, desc=f"{scene.scene_id}: target features", disable=not progress):
        image = torch.from_numpy(load_image(frame.image_path)).permute(2, 0, 1)[None]
        camera = frame.camera
        if image_scale != 1.0:
            camera = camera.scaled(image_scale)
            image = F.interpolate(image, size=(camera.height, camera.width), mode="bilinear", antialias=True)
        if frame.mask_path is not None:
            mask = torch.from_numpy(load_mask(frame.mask_path))[None, None].float()
            if image_scale != 1.0:
                mask = F.interpolate(mask, size=(camera.height, camera.width), mode="bilinear")
            mask = mask > 0.5
        else:
            mask = torch.ones(1, 1, camera.height, camera.width, dtype=torch.bool)
        image = image.clamp(0, 1)
        targets.append(extractor(image.to(device)).to(torch.float16))
        images.append((image * 255).round().to(torch.uint8))
        masks.append(mask)
        Ks.append(torch.from_numpy(camera.K).float())
        poses.append(torch.from_numpy(camera.world_to_camera).float())
    return SceneData(
        scene_id=scene.scene_id,
        image_ids=[frame.image_id for frame in scene.frames],
        images=torch.cat(images).to(device),
        masks=torch.cat(masks).to(device),
        K=torch.stack(Ks).to(device),
        world_to_camera=torch.stack(poses).to(device),
        targets=torch.cat(targets).to(device),
        points=np.asarray(scene.points),
        point_colors=np.asarray(scene.point_colors),
        camera_centers=np.stack([frame.camera.center for frame in scene.frames]),
    )


def _exponential_lr(step: int, lr_init: float, lr_final: float, max_steps: int) -> float:
    """Log-linear interpolation from lr_init to lr_final over max_steps (3DGS's position schedule)."""
    t = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return math.exp(math.log(lr_init) * (1 - t) + math.log(lr_final) * t)


class _ToChannelsLast(torch.autograd.Function):
    """`x.to(dtype, channels_last)` as one copy, and its gradient back to x's dtype and layout as one copy
    (a layout change then autocast's cast take two copies each way, over a 64-channel full-size map)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.input_dtype = x.dtype
        return x.to(dtype=dtype, memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(dtype=ctx.input_dtype, memory_format=torch.contiguous_format), None


class _Lifter:
    """The state of one scene's optimisation: Gaussians, decoder, optimizer, densifier, view order."""

    def __init__(self, args: LiftingArguments, data: SceneData, train_views: list[int], device: torch.device):
        self.args, self.data, self.train_views, self.device = args, data, train_views, device
        self.extent = scene_extent(data.camera_centers)
        generator = torch.Generator().manual_seed(args.seed)
        if len(data.points) > 0:
            gaussians = FeatureGaussians.from_points(
                data.points, data.point_colors, args.feature_dim, max_sh_degree=args.sh_degree
            )
        else:
            center = data.camera_centers.mean(axis=0)
            gaussians = FeatureGaussians.random_in_box(
                args.random_init_points, center - self.extent, center + self.extent, args.feature_dim,
                generator=generator, max_sh_degree=args.sh_degree,
            )  # fmt: skip
        self.gaussians = gaussians.to(device)
        backbone_dim = data.targets.shape[1]
        # FiT3D's decoder: one 3x3 convolution F -> D, no bias, no activation, no upsampling.
        self.decoder = torch.nn.Conv2d(args.feature_dim, backbone_dim, 3, padding=1, bias=False).to(device)
        if device.type == "cuda":
            self.decoder.to(memory_format=torch.channels_last)
        self.optimizer = self._make_optimizer()
        self.densifier = Densifier(args.densification(), self.extent, len(self.gaussians), seed=args.seed)
        self.view_generator = torch.Generator().manual_seed(args.seed + 1)
        self.view_stack: list[int] = []
        self.iteration = 0
        self.densification_totals = {"cloned": 0, "split": 0, "pruned": 0, "opacity_reset": 0}

    def _make_optimizer(self) -> torch.optim.Adam:
        args, g = self.args, self.gaussians
        groups = [
            {"params": [g.means], "lr": args.position_lr_init * self.extent, "name": "means"},
            {"params": [g.sh_dc], "lr": args.sh_dc_lr, "name": "sh_dc"},
            {"params": [g.sh_rest], "lr": args.sh_rest_lr, "name": "sh_rest"},
            {"params": [g.features], "lr": args.feature_lr, "name": "features"},
            {"params": [g.opacity_logits], "lr": args.opacity_lr, "name": "opacity_logits"},
            {"params": [g.log_scales], "lr": args.scaling_lr, "name": "log_scales"},
            {"params": [g.quats], "lr": args.rotation_lr, "name": "quats"},
            {"params": list(self.decoder.parameters()), "lr": args.decoder_lr, "name": "decoder"},
        ]
        return torch.optim.Adam(groups, lr=0.0, eps=1e-15, fused=self.device.type == "cuda")

    def next_view(self) -> int:
        # 3DGS's order: a shuffled stack of the training views, refilled when empty.
        if not self.view_stack:
            order = torch.randperm(len(self.train_views), generator=self.view_generator).tolist()
            self.view_stack = [self.train_views[i] for i in order]
        return self.view_stack.pop()

    def render(self, view: int, with_grad: bool):
        from .render import render

        g = self.gaussians
        with torch.set_grad_enabled(with_grad):
            return render(
                g.means, g.quats, g.scales, g.opacities, g.active_sh(), g.features,
                self.data.K[view : view + 1], self.data.world_to_camera[view : view + 1],
                self.data.width, self.data.height, sh_degree=g.active_sh_degree, near_plane=self.args.near_plane,
            )  # fmt: skip

    def target_features(self, view: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`[1, D, H, W]` backbone features of a view, bilinearly upsampled to the image (as FiT3D)."""
        low = self.data.targets[view : view + 1].to(dtype)
        return F.interpolate(low, size=(self.data.height, self.data.width), mode="bilinear", align_corners=False)

    def step(self) -> dict[str, torch.Tensor]:
        args, data = self.args, self.data
        self.iteration += 1
        it = self.iteration
        for group in self.optimizer.param_groups:
            if group["name"] == "means":
                decay_steps = args.position_lr_max_steps or args.iterations
                group["lr"] = self.extent * _exponential_lr(it, args.position_lr_init, args.position_lr_final, decay_steps)
        if it % args.sh_increase_interval == 0:
            self.gaussians.raise_sh_degree()

        view = self.next_view()
        out = self.render(view, with_grad=True)
        mask = data.masks[view : view + 1]
        loss_rgb, l1_rgb = self.rgb_loss(out.rgb, view)
        bf16 = args.mixed_precision == "bf16"
        features = out.features
        if self.device.type == "cuda":  # cuDNN convolves channels-last maps without transposing them
            features = _ToChannelsLast.apply(features, torch.bfloat16 if bf16 else features.dtype)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            decoded = self.decoder(features)
        l1_features = upsampled_feature_l1(decoded, data.targets[view : view + 1], mask)
        loss = args.rgb_loss_weight * loss_rgb + args.feature_loss_weight * l1_features
        loss.backward()

        # 3DGS's order: densify first, then step. Parameters that densification (or an opacity reset) just
        # replaced have no gradient, so Adam skips them this once; the decoder always steps. The last
        # iteration takes no step (3DGS steps only while iteration < iterations).
        with torch.no_grad():
            if it < args.densify_until:
                self.densifier.update_stats(out.means2d.grad[0], out.radii[0], data.width, data.height)
            for key, value in self.densifier.step(it, self.gaussians, self.optimizer).items():
                if key in self.densification_totals:
                    self.densification_totals[key] += value
            if it < args.iterations:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        # Detached tensors, not floats: reading a value would wait for the GPU at every step.
        return {"loss": loss.detach(), "l1_rgb": l1_rgb.detach(), "l1_features": l1_features.detach()}

    def rgb_loss(self, rgb: torch.Tensor, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """3DGS's `(1 - lambda) * L1 + lambda * (1 - SSIM)` of a rendered view, and its L1 part."""
        # Anonymised pixels: the targets become the (detached) prediction, so they add no loss.
        target = torch.where(self.data.masks[view : view + 1], self.data.image(view), rgb.detach())
        l1 = (rgb - target).abs().mean()
        return (1 - self.args.lambda_dssim) * l1 + self.args.lambda_dssim * (1.0 - ssim(rgb, target)), l1

    def fit_compressed_colours(self, steps: int, progress: bool = False) -> CompressedSH:
        """The SH colours compressed for the bundle, with the DC terms and the codebook then refined by
        rendering the training views for `steps` iterations (RGB loss; geometry, features and each Gaussian's
        code fixed), as compact 3DGS methods do after vector quantisation: the k-means codebook alone keeps
        only the dominant higher-order patterns, and the DC terms can take up the average of what it misses
        over the directions each Gaussian is seen from.
        """
        from .render import render

        args, data, g = self.args, self.data, self.gaussians
        logger.info("%s: compressing the SH colours of %d Gaussians (k-means)", data.scene_id, len(g))
        compressed = encode_sh(g.sh, seed=args.seed)
        codes = compressed.rest_codes.to(torch.int32).long().to(self.device)
        codebook = torch.nn.Parameter(compressed.rest_codebook.float().to(self.device))
        dc = torch.nn.Parameter(g.sh_dc.detach().clone())
        if steps > 0 and codebook.shape[1] > 0:
            optimizer = torch.optim.Adam(
                [{"params": [dc], "lr": args.sh_dc_lr}, {"params": [codebook], "lr": args.sh_rest_lr}], eps=1e-15
            )
            geometry = [t.detach() for t in (g.means, g.quats, g.scales, g.opacities)]
            for _ in tqdm(range(steps), desc=f"{data.scene_id}: refining the compressed colours", disable=not progress):
                view = self.next_view()
                colours = torch.cat([dc, codebook[codes].view(len(codes), -1, 3)], dim=1)
                out = render(
                    *geometry, colours, None, data.K[view : view + 1], data.world_to_camera[view : view + 1],
                    data.width, data.height, sh_degree=g.active_sh_degree, render_depth=False, near_plane=args.near_plane,
                )  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                self.rgb_loss(out.rgb, view)[0].backward()
                codebook.grad[0] = 0  # row 0 stays the exact zero vector of untrained higher orders
                optimizer.step()
        return assemble_sh(dc.detach()[:, 0], codebook.detach(), codes)

    @torch.no_grad()
    def evaluate(self, views: list[int], desc: str | None = None) -> dict[str, float]:
        """Mean PSNR (valid pixels) and feature L1 over `views` (with a progress bar labelled `desc`, if given)."""
        if not views:
            return {}
        psnrs, l1s = [], []
        for view in tqdm(views, desc=desc, disable=desc is None, leave=False):
            out = self.render(view, with_grad=False)
            mask = self.data.masks[view : view + 1]
            psnrs.append(psnr(out.rgb.clamp(0, 1), self.data.image(view), mask))
            decoded = self.decoder(out.features)
            error = (decoded - self.target_features(view)).abs().mean(dim=1, keepdim=True)
            l1s.append(float((error * mask).sum() / mask.sum().clamp_min(1)))
        return {"psnr": float(np.mean(psnrs)), "feature_l1": float(np.mean(l1s))}

    # --- checkpoints (torch.save of tensors and plain values only; loaded with weights_only=True) ---
    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "active_sh_degree": self.gaussians.active_sh_degree,
            "gaussians": {k: v.detach().cpu() for k, v in self.gaussians.state_dict().items()},
            "decoder": {k: v.detach().cpu() for k, v in self.decoder.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "densifier": self.densifier.state_dict(),
            "view_generator": self.view_generator.get_state(),
            "view_stack": list(self.view_stack),
            "densification_totals": dict(self.densification_totals),
        }

    def load_state_dict(self, state: dict) -> None:
        tensors = state["gaussians"]
        self.gaussians = FeatureGaussians(
            tensors["means"], tensors["quats"], tensors["log_scales"], tensors["opacity_logits"],
            torch.cat([tensors["sh_dc"], tensors["sh_rest"]], dim=1), tensors["features"],
            max_sh_degree=self.args.sh_degree,
        ).to(self.device)  # fmt: skip
        self.gaussians.active_sh_degree = state["active_sh_degree"]
        self.decoder.load_state_dict(state["decoder"])
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.densifier.load_state_dict(state["densifier"])
        self.view_generator.set_state(state["view_generator"])
        self.view_stack = list(state["view_stack"])
        self.iteration = int(state["iteration"])
        self.densification_totals = dict(state["densification_totals"])


def _write_previews(lifter: _Lifter, view: int, folder: Path) -> None:
    from .visualization import pca_rgb, save_image

    data = lifter.data
    out = lifter.render(view, with_grad=False)
    rendered = (out.rgb[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    ground_truth = data.images[view].permute(1, 2, 0).cpu().numpy()
    save_image(folder / "preview_rgb.png", np.concatenate([ground_truth, rendered], axis=1))
    target = data.targets[view].float()
    decoded = lifter.decoder(out.features)
    decoded_low = F.interpolate(decoded, size=target.shape[1:], mode="bilinear", align_corners=False)[0]
    target_colors, rendered_colors = pca_rgb(target, decoded_low, fit_on=0)
    size = (data.width, data.height)
    from PIL import Image

    pictures = [np.asarray(Image.fromarray(c).resize(size, Image.NEAREST)) for c in (target_colors, rendered_colors)]
    save_image(folder / "preview_features.png", np.concatenate(pictures, axis=1))


def lifting_settings(args: LiftingArguments) -> dict:
    """The settings that determine a scene's Stage I result: every field of `args` except `NON_RESULT_FIELDS`,
    with the backbone in one spelling (short names as Hub ids, local folders as absolute paths)."""
    from .backbones import resolve_backbone_name
    from .reruns import result_settings

    def backbone_id(name: str) -> str:
        name = resolve_backbone_name(name)
        return str(Path(name).resolve()) if Path(name).exists() else name

    return result_settings(args, NON_RESULT_FIELDS, canonical={"backbone": backbone_id})


def _remove_outputs(folder: Path) -> None:
    """Deletes the files a lift writes into `folder` (only those: `--out` may share a folder with anything)."""
    from .reruns import SETTINGS_FILENAME

    names = (METRICS_FILENAME, CHECKPOINT_FILENAME, INITIAL_METRICS_FILENAME, BUNDLE_FILENAME, SETTINGS_FILENAME)
    for name in (*names, *PREVIEW_FILENAMES):
        (folder / name).unlink(missing_ok=True)


def lift_scene(
    scene,
    args: LiftingArguments,
    extractor=None,
    *,
    max_iterations_this_run: int | None = None,
    progress: bool = True,
) -> dict | None:
    """Runs Stage I on one scene and writes `<out>/<scene_id>/` (bundle, metrics.json, settings.json, previews).

    An earlier result in that folder is reused when it was made with the same settings (`lifting_settings`):
    a finished scene is skipped and its metrics returned, an unfinished one resumes from its last
    checkpoint. With other settings the call is refused (`UsageError` naming them) unless `args.overwrite`.
    `max_iterations_this_run` stops early after a checkpoint (used to test resuming); the function then
    returns None. Nothing is written before the scene, the device and the backbone have loaded.

    Args:
        scene: a scene folder (any layout `fit3d_hf.scene.read_scene` reads) or a loaded `Scene`.
        args: the options.
        extractor: a `DenseFeatureExtractor`, or a function returning one (called only when the scene needs
            lifting); built from `args.backbone` when None.
    """
    from .reruns import check_previous_result, write_settings
    from .scene import read_scene

    device = _resolve_device(args.device)
    if isinstance(scene, (str, os.PathLike)):
        scene = read_scene(scene)
    folder = Path(args.out) / scene.scene_id
    metrics_path = folder / METRICS_FILENAME
    settings = lifting_settings(args)
    previous = check_previous_result(
        folder, settings, finished=metrics_path.is_file(), unfinished=(folder / CHECKPOINT_FILENAME).is_file(),
        overwrite=args.overwrite, what="lifted scene",
    )  # fmt: skip
    if previous == "finished":
        logger.info("%s: already lifted with these settings (%s): skipping it; --overwrite redoes it", scene.scene_id, folder)
        return json.loads(metrics_path.read_text())
    torch.manual_seed(args.seed)
    if extractor is None:
        extractor = _load_extractor(args)
    elif not isinstance(extractor, torch.nn.Module):  # a loader (lift_many shares one backbone over scenes)
        extractor = extractor()
    if previous == "overwrite":
        logger.info("%s: replacing the earlier result in %s (--overwrite)", scene.scene_id, folder)
        _remove_outputs(folder)
    created = _missing_ancestors(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_settings(folder, settings)
    try:
        with deterministic_algorithms(device.type == "cpu"):
            return _lift(scene, args, extractor, folder, device, max_iterations_this_run, progress)
    except BaseException:
        if not (folder / CHECKPOINT_FILENAME).is_file():  # nothing to resume: leave no litter behind
            _remove_outputs(folder)
            for path in created:  # innermost first; only folders this call created, and only when empty
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
        raise


def _load_extractor(args: LiftingArguments):
    from .backbones import DenseFeatureExtractor

    return DenseFeatureExtractor.from_pretrained(
        args.backbone, normalization=args.normalization, pos_embed_interpolation=args.pos_embed_interpolation
    )


def _missing_ancestors(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, innermost first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _lift(scene, args, extractor, folder, device, max_iterations_this_run, progress) -> dict | None:
    metrics_path = folder / METRICS_FILENAME
    extractor = extractor.to(device).eval()
    for param in extractor.parameters():
        param.requires_grad_(False)

    start = time.perf_counter()
    data = load_scene_data(scene, extractor, args.image_scale, device, progress=progress)
    views = list(range(len(data.image_ids)))
    holdout = heldout_view_indices(len(views), args.holdout_every)  # the `scenes` builder's val split too
    train = [v for v in views if v not in holdout]
    lifter = _Lifter(args, data, train, device)
    checkpoint_path = folder / CHECKPOINT_FILENAME
    if checkpoint_path.is_file():
        lifter.load_state_dict(load_torch_checkpoint(checkpoint_path))
        logger.info("%s: resumed from %s at iteration %d", scene.scene_id, checkpoint_path, lifter.iteration)
        initial = json.loads((folder / INITIAL_METRICS_FILENAME).read_text())
    else:
        initial = lifter.evaluate(train, desc=f"{scene.scene_id}: initial evaluation" if progress else None)
        atomic_write_text(folder / INITIAL_METRICS_FILENAME, json.dumps(initial))

    bar = tqdm(total=args.iterations, initial=lifter.iteration, desc=f"{scene.scene_id}: lifting", disable=not progress)
    steps_this_run = 0
    train_start = time.perf_counter()
    while lifter.iteration < args.iterations:
        losses = lifter.step()
        steps_this_run += 1
        bar.update(1)
        if lifter.iteration % 10 == 0:
            bar.set_postfix(loss=f"{float(losses['loss']):.4f}", gaussians=len(lifter.gaussians))
        interval = args.checkpoint_interval
        if interval and lifter.iteration % interval == 0 and lifter.iteration < args.iterations:
            save_torch_checkpoint(lifter.state_dict(), checkpoint_path)  # atomic, with tensor checksums
            if max_iterations_this_run is not None and steps_this_run >= max_iterations_this_run:
                bar.close()
                return None
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - train_start

    label = (lambda what: f"{scene.scene_id}: {what}") if progress else (lambda what: None)
    final_train = lifter.evaluate(train, desc=label("evaluating the training views"))
    final_holdout = lifter.evaluate(holdout, desc=label("evaluating the held-out views"))
    compressed = None
    if args.bundle_sh == "compressed":
        steps = args.bundle_sh_refine_steps
        compressed = lifter.fit_compressed_colours(min(1000, args.iterations // 10) if steps is None else steps, progress)
    logger.info("%s: writing the bundle (%d Gaussians)", scene.scene_id, len(lifter.gaussians))
    bundle_path = save_bundle(
        folder / BUNDLE_FILENAME, lifter.gaussians, lifter.decoder.weight.detach(),
        scene_id=scene.scene_id, backbone=args.backbone,
        extra_metadata={"image_size": [data.width, data.height], "iterations": args.iterations}, seed=args.seed,
        sh_storage=args.bundle_sh, compressed_sh=compressed, provenance=extractor.provenance(),
    )  # fmt: skip
    # Held-out PSNR of the bundle as saved (fp16 geometry, compressed SH): one more pass over the held-out views.
    saved_holdout = {}
    if holdout:
        trained = lifter.gaussians
        saved = load_bundle(bundle_path, include_sh=True).to_gaussians(trained.active_sh_degree)
        lifter.gaussians = saved.to(device)
        saved_holdout = lifter.evaluate(holdout, desc=label("evaluating the saved bundle"))
        lifter.gaussians = trained
    if args.previews:
        _write_previews(lifter, holdout[0] if holdout else train[0], folder)
    metrics = {
        "scene_id": scene.scene_id,
        "backbone": args.backbone,
        "feature_dim": args.feature_dim,
        "backbone_dim": int(data.targets.shape[1]),
        "iterations": args.iterations,
        "num_gaussians": len(lifter.gaussians),
        "num_gaussians_initial": len(data.points) if len(data.points) else args.random_init_points,
        "densification": lifter.densification_totals,
        "views_train": len(train),
        "views_heldout": len(holdout),
        "image_size": [data.width, data.height],
        "psnr_train": final_train["psnr"],
        "psnr_heldout": saved_holdout.get("psnr"),
        "psnr_heldout_uncompressed": final_holdout.get("psnr"),
        "feature_l1_train_start": initial["feature_l1"],
        "feature_l1_train": final_train["feature_l1"],
        "feature_l1_heldout": final_holdout.get("feature_l1"),
        "bundle_bytes": bundle_path.stat().st_size,
        "seconds_training": train_seconds,
        "seconds_total": time.perf_counter() - start,
        "device": str(device),
        "arguments": asdict(args),
    }
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2))  # written last: marks the scene done
    if not args.keep_checkpoint:  # resume state, no longer needed once metrics.json marks the scene done
        checkpoint_path.unlink(missing_ok=True)
        (folder / INITIAL_METRICS_FILENAME).unlink(missing_ok=True)
    return metrics


def lift_many(
    scene_paths: list[Path],
    args: LiftingArguments,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    claims=None,
) -> list[dict]:
    """Lifts this process's share of the scenes (every `num_processes`-th, from `process_index`), one
    after the other; finished scenes are skipped and unfinished ones resume (see `lift_scene`).

    With `claims` (a `fit3d_hf.scene_claims.SceneClaims`), the processes claim scenes one at a time instead
    (balanced, and a dead process's scenes are taken over once its lease expires); the index and count
    are then unused."""

    @functools.cache
    def extractor():  # loaded once, for the first scene that needs it (a finished scene needs none)
        return _load_extractor(args)

    if claims is not None:
        return [lift_scene(path, args, extractor, progress=progress) for path in claims.scenes(list(scene_paths))]
    share = list(scene_paths)[process_index::num_processes]
    results = []
    for path in tqdm(share, desc=f"scenes (process {process_index})", disable=not progress or len(share) < 2):
        results.append(lift_scene(path, args, extractor, progress=progress))
    return results
