"""The options of Stage I (`LiftingArguments`, FiT3D's defaults), the device they name, and the settings that
determine a scene's result (recorded in its settings.json, so that a rerun with other settings is refused)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UsageError
from ..gaussians import DensificationConfig
from ..gaussians.bundle import SH_STORAGES

__all__ = ["LiftingArguments", "NON_RESULT_FIELDS", "check_device_name", "lifting_settings", "resolve_device"]

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

    backbone: str = field(
        metadata={"help": "Backbone whose features are lifted: Hub id, local folder or short name."}
    )
    out: str = field(metadata={"help": "Output folder; the scene's results go to <out>/<scene_id>/."})
    feature_dim: int = field(default=64, metadata={"help": "Length F of each Gaussian's feature."})
    iterations: int = field(default=30_000, metadata={"help": "Optimisation steps (one view each)."})
    image_scale: float = field(
        default=1.0, metadata={"help": "Resize factor applied to the images (and intrinsics)."}
    )
    max_gaussians: int | None = field(default=None, metadata={"help": "Cap on the number of Gaussians."})
    holdout_every: int = field(
        default=0, metadata={"help": "Keep every K-th view out of training and report on it (0: none)."}
    )
    random_init_points: int = field(
        default=100_000, metadata={"help": "Random initial Gaussians when the scene has no sparse points."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of every random choice (view order, splits, random init)."}
    )
    sh_degree: int = field(default=3, metadata={"help": "Highest SH degree of the colours."})
    sh_increase_interval: int = field(
        default=1000, metadata={"help": "Raise the active SH degree every N iterations."}
    )
    lambda_dssim: float = field(default=0.2, metadata={"help": "Weight of (1 - SSIM) in the RGB loss."})
    rgb_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the whole RGB loss (0: features only, geometry frozen)."}
    )
    feature_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the feature L1 loss."})
    position_lr_init: float = field(
        default=1.6e-4, metadata={"help": "Initial lr of the means (x scene extent)."}
    )
    position_lr_final: float = field(
        default=1.6e-6, metadata={"help": "Final lr of the means (x scene extent)."}
    )
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
    opacity_reset_interval: int = field(
        default=3000, metadata={"help": "Reset opacities every N iterations."}
    )
    densify_grad_threshold: float = field(
        default=2e-4, metadata={"help": "Screen-space gradient threshold (NDC)."}
    )
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
        metadata={
            "help": "Gaussians closer to the camera than this (camera z, scene units) are not rendered (FiT3D's rasterizer: 0.2)."
        },
    )
    normalization: str = field(
        default="imagenet",
        metadata={
            "help": "Backbone input normalisation: 'imagenet' (FiT3D) or 'processor'.",
            "choices": list(NORMALIZATIONS),
        },
    )
    pos_embed_interpolation: str | None = field(
        default=None,
        metadata={
            "help": "Position-embedding resampling of the backbone: 'timm' (bicubic with antialiasing, as the original "
            "FiT3D's timm backbones) or 'native' (transformers'). Default: 'timm' for the short names (dinov2_small, "
            "...), else what the backbone's config records, else 'native'. Stage II must use the same (it checks).",
            "choices": ["timm", "native"],
        },
    )
    checkpoint_interval: int = field(
        default=5000,
        metadata={
            "help": "Save a resumable checkpoint every N iterations (0: never). On a GPU it is written on a "
            "background thread from a copy on the device (about 1.5 GB at 1M Gaussians, held while it is written; "
            "written in the loop it took 3 s on an H100 host, about 40 s of training at that size)."
        },
    )
    device: str = field(
        default="auto", metadata={"help": "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."}
    )
    mixed_precision: str = field(
        default="no",
        metadata={
            "help": "'bf16': compute the backbone's target features under bfloat16 autocast, and decode the "
            "features and compute their loss in bfloat16 (faster on GPUs; FiT3D: fp32).",
            "choices": ["no", "bf16"],
        },
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
    previews: bool = field(
        default=True, metadata={"help": "Write preview PNGs (RGB render, PCA of features)."}
    )
    keep_checkpoint: bool = field(
        default=False, metadata={"help": "Keep the last checkpoint after the scene is finished."}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Redo a scene whose earlier result (finished or not) was made with other settings (see settings.json)."
        },
    )

    def __post_init__(self) -> None:
        # Range checks; `fit3d_hf.cli.parse_args` reports them as argparse does (usage line, exit 2).
        for name in (
            "feature_dim",
            "iterations",
            "random_init_points",
            "sh_increase_interval",
            "densify_interval",
        ):
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
            raise UsageError(
                f"--position_lr_max_steps must be positive (or 0: --iterations), got {self.position_lr_max_steps}"
            )
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


def resolve_device(name: str) -> torch.device:
    """The device of `--device`, refused (before anything is written) when this machine lacks it."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name}: this machine has no CUDA device (torch sees none); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def lifting_settings(args: LiftingArguments) -> dict:
    """The settings that determine a scene's Stage I result: every field of `args` except `NON_RESULT_FIELDS`,
    with the backbone in one spelling (short names as Hub ids, local folders as absolute paths)."""
    from ..backbones import resolve_backbone_name
    from ..reruns import result_settings

    def backbone_id(name: str) -> str:
        name = resolve_backbone_name(name)
        return str(Path(name).resolve()) if Path(name).exists() else name

    return result_settings(args, NON_RESULT_FIELDS, canonical={"backbone": backbone_id})
