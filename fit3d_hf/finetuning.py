"""Stage II: fine-tune a backbone so that its patch features match features rendered from 3D Gaussians.

FiT3D's step (§3.2 of the paper; `engine.train_one_epoch` of the original), with its settings as defaults:
for every frame, render its scene's low-dimensional feature map at its camera (no gradients), decode it
with the scene's decoder and resample it to the backbone's patch grid (done here only where the grid
samples it, see `fit3d_hf.targets`), flip image, target and mask together at random, and regress the
backbone's last-layer normalised patch features with a masked L1; AdamW lr 1e-5, weight decay 1e-4,
gradient clipping 0.1, one epoch.

The loop follows the diffusers/accelerate example scripts (Accelerator, `accumulate`, `save_state`
checkpoints, `--resume_from_checkpoint latest`, trackers), so it runs on one GPU, several GPUs or a CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import InputError, MissingInputError, UsageError
from .frames import depth_to_tensor, image_to_tensor, image_to_uint8
from .gaussians import BundleMismatchError, GaussianBundle, load_bundle
from .gaussians.bundle import BUNDLE_FILENAME, check_provenance
from .losses import masked_l1
from .targets import decode_at_patch_grid
from .utils import deterministic_algorithms

__all__ = [
    "DataArguments",
    "FinetuningArguments",
    "GaussianCache",
    "freeze_unused_parameters",
    "ModelArguments",
    "check_frames_against_gaussians",
    "load_frames",
    "build_train_dataloader",
    "scaled_learning_rate",
    "train",
]

logger = logging.getLogger(__name__)

MIXED_PRECISIONS = ("no", "bf16", "fp16")
# accelerate's trackers (accelerate.utils.LoggerType), listed here so that --help needs no accelerate import.
TRACKERS = ("none", "all", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab")


@dataclass
class ModelArguments:
    backbone: str = field(metadata={"help": "Backbone to fine-tune: Hub id, local folder or short name (dinov2_small, ...)."})
    normalization: str = field(default="imagenet", metadata={"help": "'imagenet' (FiT3D) or 'processor' input normalisation.", "choices": ["imagenet", "processor"]})
    pos_embed_interpolation: str | None = field(
        default=None,
        metadata={
            "help": "Position-embedding resampling to the frames' patch grid: 'timm' (bicubic with antialiasing, as the "
            "original FiT3D's timm backbones) or 'native' (transformers'). Default: 'timm' for the short names "
            "(dinov2_small, ...), else what the backbone's config records, else 'native'. Use the one Stage I used.",
            "choices": ["timm", "native"],
        },
    )
    lora_rank: int = field(default=0, metadata={"help": "Fine-tune rank-R LoRA adapters (peft) instead of all weights (0: full fine-tuning)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: equal to the rank)."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "Comma-separated names of the linear layers that get adapters, or 'all-linear'."}
    )


@dataclass
class DataArguments:
    frames: str = field(metadata={"help": "Frames: the scenes as `fit3d lift` takes them (a scene in any layout, a folder of scenes, a text file listing scenes, or a comma-separated list), a ScanNet++ root split by metadata/<split>_samples.txt, or a folder of Parquet shards from `fit3d export-dataset`."})
    gaussians: str = field(metadata={"help": "Stage I output folder holding <scene_id>/gaussians.safetensors."})
    holdout_every: int = field(default=0, metadata={"help": "Scenes only: the 'val' split is every K-th view of each scene, the views `fit3d lift --holdout_every K` held out (0: the scenes' own test frames)."})
    train_split: str = field(default="train", metadata={"help": "Split of the frames to train on."})
    validation_split: str | None = field(default="val", metadata={"help": "Split for validation loss and consistency (None or '' to skip)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training frames."})
    max_validation_samples: int | None = field(default=64, metadata={"help": "Validate on at most N frames."})
    consistency_pairs: int = field(default=8, metadata={"help": "View pairs per validation scene for the multi-view consistency measure."})
    gaussian_cache_gb: float = field(default=8.0, metadata={"help": "Memory budget of the scene Gaussians kept loaded on the device."})
    skip_scenes_without_bundles: bool = field(
        default=False,
        metadata={"help": "Leave out the frames of scenes that have no Gaussian bundle in --gaussians (default: refuse to start)."},
    )
    allow_backbone_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Train even if the bundles were lifted with another backbone (other weights, model type, "
            "normalisation, resize rule or position-embedding resampling than --backbone), with a warning. By default "
            "such bundles are refused, since their targets are another model's features."
        },
    )


@dataclass
class FinetuningArguments:
    output_dir: str = field(metadata={"help": "Where checkpoints, logs and the final models go."})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (FiT3D: 1e-5 at a global batch of 2)."})
    scale_lr: str = field(
        default="none",
        metadata={
            "help": "Rescale --learning_rate for the global batch (train_batch_size x processes x accumulation) "
            "relative to FiT3D's 2: 'none' (use it as given), 'linear' (x batch/2) or 'sqrt' (x sqrt(batch/2), the "
            "usual rule for Adam). Not validated against the paper's numbers: its recipe is batch 2 at 1e-5.",
            "choices": ["none", "linear", "sqrt"],
        },
    )
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=0.1, metadata={"help": "Gradient clipping norm."})
    num_train_epochs: int = field(default=1, metadata={"help": "Epochs over the training frames."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Stop after N optimisation steps (overrides epochs)."})
    train_batch_size: int = field(default=2, metadata={"help": "Frames per device per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches accumulated per optimisation step."})
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "'no' (fp32, FiT3D), 'bf16' or 'fp16' (autocast of the backbone). Default: the `accelerate launch` "
            "setting (its config file or --mixed_precision), else 'no'. The precision used is printed at the start and "
            "written to metrics.json.",
            "choices": list(MIXED_PRECISIONS),
        },
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loading worker processes."})
    seed: int = field(default=42, metadata={"help": "Seed of the weights' data order and flips."})
    flip_probability: float = field(default=0.5, metadata={"help": "Probability of a horizontal flip of image, target and mask."})
    near_plane: float = field(
        default=0.2,
        metadata={"help": "Gaussians closer to the camera than this (camera z, scene units) are not rendered (FiT3D's rasterizer: 0.2)."},
    )
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps (0: never)."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint folder, or 'latest'."})
    report_to: str = field(default="tensorboard", metadata={"help": "Tracker of the losses and metrics ('all': every installed one).", "choices": list(TRACKERS)})
    tracker_project_name: str = field(default="fit3d-finetune", metadata={"help": "Project name for the trackers."})
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N steps."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the fine-tuned backbone and the FiT3DModel."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository of the FiT3DModel (backbone goes to <id>-backbone)."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})

    def __post_init__(self) -> None:
        # `fit3d_hf.cli.parse_args` reports these as argparse does (usage line, exit 2).
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISIONS:
            raise UsageError(f"--mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}; got {self.mixed_precision!r}")
        if self.report_to not in TRACKERS:
            raise UsageError(f"--report_to must be one of {', '.join(TRACKERS)}; got {self.report_to!r}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "logging_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "checkpoints_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise UsageError("--learning_rate and --max_grad_norm must be positive and --weight_decay 0 or more")
        if self.checkpointing_steps < 0 or self.dataloader_num_workers < 0:
            raise UsageError("--checkpointing_steps and --dataloader_num_workers must be 0 or more")
        if self.scale_lr not in ("none", "linear", "sqrt"):
            raise UsageError(f"--scale_lr must be 'none', 'linear' or 'sqrt', got {self.scale_lr!r}")
        if self.near_plane <= 0:
            raise UsageError(f"--near_plane must be positive, got {self.near_plane}")
        if not 0 <= self.flip_probability <= 1:
            raise UsageError(f"--flip_probability must be in [0, 1], got {self.flip_probability}")
        if self.push_to_hub and not self.hub_model_id:
            raise UsageError("--push_to_hub needs --hub_model_id")
        if self.report_to == "wandb" and self.hub_token is not None:
            raise UsageError("Refusing --report_to wandb with --hub_token: the token would be logged. Use `hf auth login`.")


# ----------------------------------------------------------------------------------------------------
# Data


def load_frames(path: str | Path, split: str, *, holdout_every: int = 0):
    """The `frames` of a split as a `datasets.Dataset`, from any of:

    - Parquet shards written by `fit3d export-dataset` (a folder holding `<split>-*.parquet`);
    - a ScanNet++ dataset root with `metadata/<split>_samples.txt` (the `scannetpp` builder, split by the lists);
    - a scene spec, the one `fit3d lift` takes (the `scenes` builder): a scene in any layout, a folder of scenes,
      a text file listing scenes, or a comma-separated list; `val` holds Stage I's held-out views when
      `holdout_every` > 0, else the scenes' own test frames.
    """
    from dataset_builders.scenes import is_sample_list_root, make_frames_builder

    spec = str(path)
    if "," not in spec and Path(spec).is_dir() and not is_sample_list_root(spec):
        shards = sorted(Path(spec).glob(f"**/{split}*.parquet")) or sorted(Path(spec).glob(f"**/{split}/*.parquet"))
        if shards:
            from datasets import load_dataset

            return load_dataset("parquet", data_files={split: [str(s) for s in shards]}, split=split)
        if any(Path(spec).glob("**/*.parquet")):
            raise MissingInputError(f"{spec}: no Parquet shards for split {split!r} (expected files like {split}-00000-of-00001.parquet)")
    builder = make_frames_builder(spec, "frames", holdout_every=holdout_every)
    builder.download_and_prepare()
    splits = {name: info.num_examples for name, info in (builder.info.splits or {}).items()}
    if not splits.get(split):  # absent, or present with no frames (datasets cannot read an empty split)
        what = f"an empty {split!r} split" if split in splits else f"no {split!r} split"
        raise MissingInputError(
            f"--frames {spec}: {what}; it has {', '.join(f'{k} ({v} frames)' for k, v in sorted(splits.items()))}"
            + ("" if holdout_every else " (pass --holdout_every K to hold out every K-th view of each scene, as Stage I does)")
        )
    return builder.as_dataset(split=split)


def bundle_path(gaussians_dir: str | Path, scene_id: str) -> Path:
    return Path(gaussians_dir) / scene_id / BUNDLE_FILENAME


def check_gaussians_dir(gaussians_dir) -> None:
    """Refuses a `--gaussians` folder that does not exist (before anything is loaded)."""
    path = Path(gaussians_dir)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise MissingInputError(
            f"--gaussians {path} {what}: pass the output folder of Stage I (`fit3d lift --out` or "
            "training/lift_features.py --out), which holds <scene_id>/gaussians.safetensors"
        )


def scenes_without_bundles(scene_ids, gaussians_dir) -> list[str]:
    """The scene ids (sorted) that have no bundle in `gaussians_dir`."""
    return sorted({s for s in scene_ids if not bundle_path(gaussians_dir, s).is_file()})


def check_frames_against_gaussians(
    scene_ids, gaussians_dir, backbone_dim: int, feature_dim: int | None = None, *, provenance: dict | None = None,
    allow_backbone_mismatch: bool = False,
) -> None:
    """Refuses, before training, frames whose scene has no bundle or a bundle for another backbone: another size,
    or (with `provenance`, `DenseFeatureExtractor.provenance()`) other weights, model type, normalisation, resize
    rule or position-embedding resampling. `allow_backbone_mismatch` turns the latter into a warning."""
    from .gaussians import read_bundle_metadata

    check_gaussians_dir(gaussians_dir)
    missing = scenes_without_bundles(scene_ids, gaussians_dir)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MissingInputError(
            f"{gaussians_dir} has no Gaussian bundle for {len(missing)} of the {len(set(scene_ids))} scenes of the "
            f"frames ({', '.join(missing[:5])}{more}); lift them first (`fit3d lift`), or pass "
            "--skip_scenes_without_bundles to train on the other scenes' frames"
        )
    warned = False
    for scene_id in sorted(set(scene_ids)):
        metadata = read_bundle_metadata(bundle_path(gaussians_dir, scene_id))
        found = int(metadata["backbone_dim"])
        if found != backbone_dim:
            raise BundleMismatchError(
                f"{bundle_path(gaussians_dir, scene_id)} decodes to {found} channels but the backbone has "
                f"{backbone_dim}: it was lifted with another backbone ({metadata.get('backbone')!r})"
            )
        if feature_dim is not None and int(metadata["feature_dim"]) != feature_dim:
            raise BundleMismatchError(f"{bundle_path(gaussians_dir, scene_id)} has feature dim {metadata['feature_dim']}, expected {feature_dim}")
        differences = check_provenance(metadata, provenance) if provenance else []
        if differences:
            message = (
                f"{bundle_path(gaussians_dir, scene_id)} was lifted with another backbone than the one being "
                f"fine-tuned: {'; '.join(differences)}"
            )
            if not allow_backbone_mismatch:
                raise BundleMismatchError(f"{message}. Lift the scenes with this backbone, or pass --allow_backbone_mismatch")
            if not warned:  # once, for the first such scene
                logger.warning("%s (--allow_backbone_mismatch: training anyway)", message)
                warned = True


class FrameDataset(torch.utils.data.Dataset):
    """Wraps a frames `datasets.Dataset`: image uint8 `[3, H, W]`, mask float `[1, H, W]`, camera, ids."""

    COLUMNS = ("scene_id", "image", "mask", "K", "world_to_camera")

    def __init__(self, frames):
        # Only the columns a step reads: datasets decodes every Image column of a row it returns, and frame
        # datasets may also carry depth and label images (the synthetic scenes and exported Parquet do).
        self.frames = frames.select_columns([c for c in self.COLUMNS if c in frames.column_names])

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict:
        row = self.frames[index]
        image = image_to_uint8(row["image"], "RGB")
        if row.get("mask") is not None:
            mask = (image_to_uint8(row["mask"], "L") > 127).float()
        else:
            mask = torch.ones(1, *image.shape[1:])
        return {
            "index": index,
            "scene_id": row["scene_id"],
            "image": image,
            "mask": mask,
            "K": torch.tensor(row["K"], dtype=torch.float32),
            "world_to_camera": torch.tensor(row["world_to_camera"], dtype=torch.float32),
        }


def collate_frames(samples: list[dict]) -> dict:
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) > 1:
        raise InputError(f"frames of one batch must share their size, got {sorted(sizes)}; use --train_batch_size 1")
    return {
        "index": torch.tensor([s["index"] for s in samples]),
        "scene_id": [s["scene_id"] for s in samples],
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "K": torch.stack([s["K"] for s in samples]),
        "world_to_camera": torch.stack([s["world_to_camera"] for s in samples]),
    }


class GaussianCache:
    """Scenes' Stage II tensors on the device, loaded on first use, least recently used evicted first
    once their total size passes the budget."""

    def __init__(self, gaussians_dir: str | Path, device: torch.device, budget_bytes: float, verify: bool = True):
        self.gaussians_dir, self.device, self.budget_bytes = Path(gaussians_dir), device, budget_bytes
        self._entries: OrderedDict[str, GaussianBundle] = OrderedDict()
        # Each bundle's checksums are checked the first time it is loaded (not again after an eviction):
        # scene id -> seconds the check took.
        self.verify = verify
        self.verify_seconds: dict[str, float] = {}

    @staticmethod
    def _size(bundle: GaussianBundle) -> int:
        tensors = (bundle.means, bundle.quats, bundle.log_scales, bundle.opacities, bundle.features, bundle.decoder_weight)
        return sum(t.numel() * t.element_size() for t in tensors)

    def get(self, scene_id: str) -> GaussianBundle:
        if scene_id in self._entries:
            self._entries.move_to_end(scene_id)
            return self._entries[scene_id]
        verify = self.verify and scene_id not in self.verify_seconds
        start = time.perf_counter()
        bundle = load_bundle(bundle_path(self.gaussians_dir, scene_id), verify=verify)
        if verify:
            self.verify_seconds[scene_id] = time.perf_counter() - start  # the read and the check
        bundle = bundle.to(self.device)
        bundle.metadata["colors"] = torch.zeros(len(bundle), 3, device=self.device)
        self._entries[scene_id] = bundle
        while len(self._entries) > 1 and sum(self._size(b) for b in self._entries.values()) > self.budget_bytes:
            self._entries.popitem(last=False)
        return bundle

    def __len__(self) -> int:
        return len(self._entries)


@torch.no_grad()
def render_targets(batch: dict, cache: GaussianCache, grid_size: tuple[int, int], device, near_plane: float = 0.2) -> torch.Tensor:
    """`[B, D, h, w]` targets: each frame's decoded feature render sampled on the patch grid. Frames of
    the same scene are rendered together, all their cameras in one rasterizer launch."""
    from .render import render

    height, width = batch["image"].shape[-2:]
    targets = [None] * len(batch["scene_id"])
    by_scene: dict[str, list[int]] = {}
    for i, scene_id in enumerate(batch["scene_id"]):
        by_scene.setdefault(scene_id, []).append(i)
    for scene_id, indices in by_scene.items():
        bundle = cache.get(scene_id)
        index = torch.tensor(indices)
        out = render(
            bundle.means, bundle.quats, bundle.scales, bundle.opacities, bundle.metadata["colors"], bundle.features,
            batch["K"][index].to(device), batch["world_to_camera"][index].to(device), width, height, render_depth=False,
            near_plane=near_plane,
        )  # fmt: skip
        decoded = decode_at_patch_grid(out.features, bundle.decoder_weight, grid_size)
        for row, i in enumerate(indices):
            targets[i] = decoded[row]
    return torch.stack(targets)


def build_train_dataloader(frames, args: FinetuningArguments) -> torch.utils.data.DataLoader:
    """Shuffled batches of whole frames (the last partial batch dropped); `accelerator.prepare` then
    gives every process a disjoint share."""
    return torch.utils.data.DataLoader(
        FrameDataset(frames), batch_size=args.train_batch_size, shuffle=True, drop_last=True,
        collate_fn=collate_frames, num_workers=args.dataloader_num_workers,
    )  # fmt: skip


def _flip_table(num_frames: int, probability: float, seed: int, epoch: int) -> torch.Tensor:
    """Which frames are flipped in an epoch: a fixed function of (seed, epoch, frame index), so that a
    resumed run flips exactly as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.rand(num_frames, generator=generator) < probability


def training_step_inputs(batch, cache, extractor, flips: torch.Tensor, device, near_plane: float = 0.2):
    """Images `[B, 3, H, W]` in [0, 1], targets `[B, D, h, w]` and soft masks `[B, 1, h, w]`, flipped."""
    images = batch["image"].to(device).float() / 255.0
    height, width = images.shape[-2:]
    grid = (height // extractor.patch_size, width // extractor.patch_size)
    targets = render_targets(batch, cache, grid, device, near_plane)
    masks = F.interpolate(batch["mask"].to(device), size=grid, mode="bilinear", align_corners=False)
    flip = flips[batch["index"].cpu()].to(device)[:, None, None, None]
    images = torch.where(flip, images.flip(-1), images)
    targets = torch.where(flip, targets.flip(-1), targets)
    masks = torch.where(flip, masks.flip(-1), masks)
    return images, targets, masks


# ----------------------------------------------------------------------------------------------------
# Consistency of features across views (validation)


@torch.no_grad()
def multiview_consistency(extractor, frames, cache: GaussianCache, pairs_per_scene: int, device, near_plane: float = 0.2) -> float:
    """Mean cosine similarity of the backbone's features at ground-truth correspondences between nearby
    views of each validation scene. Depth comes from the frames' `depth` column when they have one
    (synthetic scenes), otherwise from the scene's Gaussians (expected depth / alpha)."""
    from .evaluation import feature_consistency, patch_correspondences
    from .evaluation.rendered_depth import render_depth

    by_scene: dict[str, list[int]] = {}
    for index, scene_id in enumerate(frames["scene_id"]):
        by_scene.setdefault(scene_id, []).append(index)
    scores = []
    for scene_id, indices in tqdm(sorted(by_scene.items()), desc="multi-view consistency", unit="scene", leave=False):
        for a, b in list(zip(indices, indices[1:], strict=False))[:pairs_per_scene]:
            rows = [frames[a], frames[b]]
            images = torch.stack([image_to_tensor(r["image"]) for r in rows]).to(device)
            Ks = [torch.tensor(r["K"], dtype=torch.float64) for r in rows]
            poses = [torch.tensor(r["world_to_camera"], dtype=torch.float64) for r in rows]
            depths = []
            for r, K, pose in zip(rows, Ks, poses, strict=False):
                if r.get("depth") is not None:
                    depths.append(depth_to_tensor(r["depth"], "depth", depth_scale=1000.0))  # uint16 millimetres
                else:
                    depths.append(render_depth(cache.get(scene_id), K, pose, images.shape[-1], images.shape[-2], near_plane))
            features = extractor(images)
            matches = patch_correspondences(depths[0], Ks[0], poses[0], Ks[1], poses[1], tuple(features.shape[-2:]), depth_b=depths[1])
            if len(matches):
                scores.append(feature_consistency(features[0], features[1], matches, tuple(images.shape[-2:])))
    if not scores:
        return float("nan")
    return float(torch.cat(scores).mean())


# ----------------------------------------------------------------------------------------------------
# Training


def scaled_learning_rate(learning_rate: float, global_batch: int, rule: str, reference_batch: int = 2) -> float:
    """The learning rate for a global batch under `rule`: "none" (unchanged), "linear" (x batch / 2) or "sqrt"
    (x sqrt(batch / 2)), relative to FiT3D's batch of 2. Neither rule is validated against the paper."""
    if rule == "none":
        return learning_rate
    ratio = global_batch / reference_batch
    if rule == "linear":
        return learning_rate * ratio
    if rule == "sqrt":
        return learning_rate * math.sqrt(ratio)
    raise UsageError(f"--scale_lr must be 'none', 'linear' or 'sqrt', got {rule!r}")


def extractor_interpolation(extractor) -> str:
    """The position-embedding resampling of a (possibly LoRA-wrapped) extractor's backbone."""
    backbone = extractor.model
    backbone = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    from .modeling_fit3d import pos_embed_interpolation_of

    return pos_embed_interpolation_of(backbone)


def _checkpoints(output_dir: Path) -> list[Path]:
    """The complete `checkpoint-<step>` folders, oldest first (a folder left half-written by a crash of an
    older version, without its model file, is ignored)."""
    from .checkpoints import is_complete_checkpoint

    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted((p for p in found if is_complete_checkpoint(p)), key=lambda p: int(p.name.split("-")[1]))


def _latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = _checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _rotate_checkpoints(output_dir: Path, keep: int) -> None:
    """Deletes the oldest checkpoints so that at most `keep` remain."""
    checkpoints = _checkpoints(output_dir)
    for old in checkpoints[: max(len(checkpoints) - keep, 0)]:
        shutil.rmtree(old)


def _resolve_resume_checkpoint(output_dir: Path, value: str) -> Path | None:
    """`--resume_from_checkpoint`: "latest" (None when the output folder holds no checkpoint yet: a new
    run) or a checkpoint folder, which must exist and be complete."""
    from .checkpoints import is_complete_checkpoint

    if value == "latest":
        return _latest_checkpoint(output_dir)
    path = Path(value)
    if not path.is_dir():
        raise MissingInputError(
            f"--resume_from_checkpoint {value}: no such checkpoint folder; pass an existing checkpoint-<step> folder, "
            f"or 'latest' to resume from the newest one in {output_dir} (or start afresh when there is none)"
        )
    if not path.name.split("-", 1)[-1].isdigit() or not is_complete_checkpoint(path):
        raise InputError(f"--resume_from_checkpoint {value}: not a complete checkpoint-<step> folder written by this trainer")
    return path


def freeze_unused_parameters(extractor) -> list[str]:
    """Freezes the trainable weights that get no gradient from the dense features and returns their names.

    Some backbones hold weights the patch features never use (DINOv2's `mask_token`, used only with
    `bool_masked_pos`; poolers). Under DDP a trainable weight without a gradient stops training at the second
    step. Freezing them changes nothing else (AdamW skips weights without a gradient) and, unlike DDP's
    `find_unused_parameters=True`, costs nothing per step: one forward/backward of a zero image, in eval
    mode so that no dropout draws from the random generator.
    """
    was_training = extractor.training
    extractor.eval()
    side = 2 * extractor.patch_size
    device = next(extractor.parameters()).device
    extractor(torch.zeros(1, 3, side, side, device=device)).float().sum().backward()
    unused = [name for name, p in extractor.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in extractor.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    extractor.train(was_training)
    return unused


def _lora_wrap(extractor, model_args: ModelArguments):
    """Replaces the extractor's backbone by a peft LoRA model (only the adapters train)."""
    from peft import LoraConfig, get_peft_model

    if model_args.lora_target_modules == "all-linear":
        targets = "all-linear"  # peft's own choice: every linear layer of the backbone
    else:
        present = {name.rsplit(".", 1)[-1] for name, module in extractor.model.named_modules() if isinstance(module, torch.nn.Linear)}
        targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
        unknown = [t for t in targets if t not in present]
        if unknown or not targets:
            raise UsageError(f"--lora_target_modules {unknown or targets} are not linear layers of the backbone; it has {sorted(present)}")
    config = LoraConfig(r=model_args.lora_rank, lora_alpha=model_args.lora_alpha or model_args.lora_rank, target_modules=targets, lora_dropout=0.0)
    extractor.model = get_peft_model(extractor.model, config)
    return extractor


def _check_trackers(report_to: str) -> str | None:
    """Accelerate only warns when a tracker's package is missing; say it clearly and log nothing."""
    if report_to in ("none", "", None):
        return None
    import importlib.util

    package = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow"}.get(report_to, report_to)
    if importlib.util.find_spec(package) is None:
        logger.warning("--report_to %s: the %r package is not installed, so nothing will be logged (pip install %s)", report_to, package, package)
        return None
    return report_to


def train(model_args: ModelArguments, data_args: DataArguments, args: FinetuningArguments) -> dict:
    """Runs Stage II and writes `<output_dir>/finetuned` (the backbone, `AutoModel`-loadable),
    `<output_dir>/fit3d` (the FiT3DModel with its card) and `<output_dir>/metrics.json`.

    On the CPU the run is deterministic: the same seed gives the same weights, also across a resume."""
    with deterministic_algorithms(not torch.cuda.is_available()):
        return _train(model_args, data_args, args)


def _train(model_args: ModelArguments, data_args: DataArguments, args: FinetuningArguments) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    from .backbones import DenseFeatureExtractor
    from .checkpoints import save_state_atomically

    output_dir = Path(args.output_dir)
    check_gaussians_dir(data_args.gaussians)  # before anything loads: a wrong path is the commonest mistake
    # A checkpoint asked for that does not exist is refused before anything loads (not a silent fresh run).
    resume_path = _resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    tracker = _check_trackers(args.report_to)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    device = accelerator.device

    precision = accelerator.mixed_precision
    accelerator.print(f"Stage II precision: {'fp32' if precision == 'no' else precision} (--mixed_precision {precision})")
    learning_rate = scaled_learning_rate(
        args.learning_rate, args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps, args.scale_lr
    )
    if learning_rate != args.learning_rate:
        accelerator.print(f"--scale_lr {args.scale_lr}: learning rate {args.learning_rate:g} -> {learning_rate:g}")

    # Models: the trainable backbone and a frozen copy of the original (for the FiT3DModel and the
    # "before" measurements).
    extractor = DenseFeatureExtractor.from_pretrained(
        model_args.backbone, normalization=model_args.normalization, pos_embed_interpolation=model_args.pos_embed_interpolation
    )
    provenance = extractor.provenance()
    # Every weight trains, as in FiT3D (timm models have no frozen weights; transformers' ViT-MAE freezes its
    # position embeddings, which timm's MAE, and so the original, fine-tunes).
    extractor.model.requires_grad_(True)
    original = copy.deepcopy(extractor).eval().requires_grad_(False)

    # Data, checked against the Gaussians before anything trains.
    with accelerator.main_process_first():
        train_frames = load_frames(data_args.frames, data_args.train_split, holdout_every=data_args.holdout_every)
        if data_args.max_train_samples:
            train_frames = train_frames.select(range(min(data_args.max_train_samples, len(train_frames))))
        validation_frames = None
        if data_args.validation_split:
            try:
                validation_frames = load_frames(data_args.frames, data_args.validation_split, holdout_every=data_args.holdout_every)
            except (FileNotFoundError, ValueError, KeyError) as error:
                logger.warning("no validation split %r (%s): skipping validation", data_args.validation_split, error)
            if validation_frames is not None and data_args.max_validation_samples:
                validation_frames = validation_frames.select(range(min(data_args.max_validation_samples, len(validation_frames))))
    if data_args.skip_scenes_without_bundles:
        train_frames, validation_frames = _drop_scenes_without_bundles(train_frames, validation_frames, data_args.gaussians)
    scene_ids = set(train_frames["scene_id"]) | (set(validation_frames["scene_id"]) if validation_frames is not None else set())
    check_frames_against_gaussians(
        scene_ids, data_args.gaussians, extractor.hidden_size, provenance=provenance,
        allow_backbone_mismatch=data_args.allow_backbone_mismatch,
    )  # fmt: skip

    if model_args.lora_rank > 0:
        extractor = _lora_wrap(extractor, model_args)
    unused = freeze_unused_parameters(extractor)
    if unused:
        logger.info("frozen (they get no gradient from dense features): %s", ", ".join(unused))
    extractor.train()
    trainable = [p for p in extractor.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=args.weight_decay)
    loader = build_train_dataloader(train_frames, args)
    if len(loader) == 0:
        raise UsageError(f"{len(train_frames)} training frames are fewer than one batch of --train_batch_size {args.train_batch_size}")
    extractor, optimizer, loader = accelerator.prepare(extractor, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or steps_per_epoch * args.num_train_epochs
    epochs = math.ceil(max_steps / steps_per_epoch)
    cache = GaussianCache(data_args.gaussians, device, data_args.gaussian_cache_gb * 1e9)
    if tracker:
        accelerator.init_trackers(args.tracker_project_name, config={**asdict(model_args), **asdict(data_args), **asdict(args)})

    metrics: dict = {}
    unwrapped = accelerator.unwrap_model(extractor)
    if validation_frames is not None:
        original.to(device)
        metrics["validation_loss_before"] = _validation_loss(original, validation_frames, cache, accelerator, args)
        if accelerator.is_main_process:
            metrics["consistency_before"] = multiview_consistency(original, validation_frames, cache, data_args.consistency_pairs, device, args.near_plane)

    global_step, first_epoch, resume_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        path = resume_path
        if path is None:
            accelerator.print(f"no checkpoint in {output_dir} yet: starting a new run")
        else:
            accelerator.load_state(str(path))
            global_step = int(path.name.split("-")[1])
            first_epoch = global_step // steps_per_epoch
            resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
            accelerator.print(f"resumed from {path} at step {global_step}")

    progress = tqdm(total=max_steps, initial=global_step, desc="fine-tuning", disable=not accelerator.is_local_main_process)
    losses = []
    for epoch in range(first_epoch, epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        flips = _flip_table(len(train_frames), args.flip_probability, args.seed, epoch)
        epoch_loader = accelerator.skip_first_batches(loader, resume_batches) if epoch == first_epoch and resume_batches else loader
        for batch in epoch_loader:
            with accelerator.accumulate(extractor):
                images, targets, masks = training_step_inputs(batch, cache, unwrapped, flips, device, args.near_plane)
                with accelerator.autocast():
                    predictions = extractor(images)
                loss = masked_l1(predictions.float(), targets, masks)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                global_step += 1
                progress.update(1)
                loss_value = accelerator.gather(loss.detach()[None]).mean().item()
                losses.append(loss_value)
                progress.set_postfix(loss=f"{loss_value:.4f}")
                if global_step % args.logging_steps == 0 or global_step == 1:
                    accelerator.log({"train/loss": loss_value}, step=global_step)
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    accelerator.wait_for_everyone()
                    if accelerator.is_main_process and args.checkpoints_total_limit:
                        _rotate_checkpoints(output_dir, args.checkpoints_total_limit - 1)  # room for the new one
                    save_state_atomically(accelerator, output_dir / f"checkpoint-{global_step}")
                if global_step >= max_steps:
                    break
        if global_step >= max_steps:
            break
    progress.close()
    accelerator.wait_for_everyone()

    unwrapped = accelerator.unwrap_model(extractor)
    unwrapped.eval()
    metrics.update({"train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None, "steps": global_step})
    metrics.update({"mixed_precision": precision, "learning_rate": learning_rate, "pos_embed_interpolation": extractor_interpolation(unwrapped)})
    if cache.verify_seconds:  # what checking each bundle's checksums once cost (read included), per scene
        metrics["bundle_verify_seconds_per_scene"] = {k: round(v, 4) for k, v in sorted(cache.verify_seconds.items())}
    if validation_frames is not None:
        metrics["validation_loss"] = _validation_loss(unwrapped, validation_frames, cache, accelerator, args)
        if accelerator.is_main_process:
            metrics["consistency_after"] = multiview_consistency(unwrapped, validation_frames, cache, data_args.consistency_pairs, device, args.near_plane)
    if accelerator.is_main_process:
        _save_outputs(unwrapped, original, model_args, data_args, args, metrics)
    accelerator.log({k: v for k, v in metrics.items() if isinstance(v, float)}, step=global_step)
    # Teardown order, for gloo (CPU) runs: a gloo process group's destructor joins its worker threads while
    # holding the GIL, and a worker still freeing the last all-gather's tensors needs the GIL, so destroying
    # the group right after a collective can deadlock (torch 2.13; one run in two of the 2-process test hung in
    # the DDP Reducer's destructor). A barrier (it waits without the GIL) lets the workers finish first, and
    # dropping the DDP wrapper while the group is still registered keeps its Reducer from being the one that
    # destroys the group.
    accelerator.wait_for_everyone()
    extractor = None
    accelerator.free_memory()
    accelerator.end_training()
    return metrics


def _drop_scenes_without_bundles(train_frames, validation_frames, gaussians_dir):
    """`--skip_scenes_without_bundles`: the frames whose scene has a bundle (at least one training frame)."""
    kept = []
    for name, frames in (("training", train_frames), ("validation", validation_frames)):
        if frames is None:
            kept.append(None)
            continue
        missing = set(scenes_without_bundles(frames["scene_id"], gaussians_dir))
        if missing:
            frames = frames.filter(lambda scene_id, missing=missing: scene_id not in missing, input_columns="scene_id")
            logger.info("leaving out the %s frames of %d scene(s) without a bundle: %s", name, len(missing), ", ".join(sorted(missing)[:5]))
        kept.append(frames if len(frames) or name == "training" else None)  # no validation frames: no validation
    if len(kept[0]) == 0:
        raise MissingInputError(f"{gaussians_dir} has a Gaussian bundle for none of the training frames' scenes")
    return kept[0], kept[1]


def per_frame_masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[B]`: `masked_l1` of each frame on its own (the validation loss averages frames, not batches)."""
    error = (prediction - target).abs() * mask.to(prediction.dtype)
    return error.sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * prediction.shape[1]).clamp_min(1e-8)


@torch.no_grad()
def _validation_loss(extractor, frames, cache, accelerator, args) -> float:
    """Mean over the validation frames of each frame's masked L1: every frame counted once, whatever the
    number of processes (`gather_for_metrics` drops the duplicates that pad the last batches), summed in
    frame order in float64 so that any process count gives the same value."""
    loader = torch.utils.data.DataLoader(FrameDataset(frames), batch_size=args.train_batch_size, collate_fn=collate_frames)
    loader = accelerator.prepare_data_loader(loader)
    no_flips = torch.zeros(len(frames), dtype=torch.bool)
    losses, indices = [], []
    for batch in tqdm(loader, desc="validation loss", leave=False, disable=not accelerator.is_local_main_process):
        images, targets, masks = training_step_inputs(batch, cache, extractor, no_flips, accelerator.device, args.near_plane)
        with accelerator.autocast():
            predictions = extractor(images)
        frame_losses = per_frame_masked_l1(predictions.float(), targets, masks)
        frame_losses, frame_indices = accelerator.gather_for_metrics((frame_losses, batch["index"].to(accelerator.device)))
        losses.append(frame_losses.cpu())
        indices.append(frame_indices.cpu())
    if not losses:
        return float("nan")
    losses, indices = torch.cat(losses).double(), torch.cat(indices)
    if len(indices) != len(frames) or len(set(indices.tolist())) != len(frames):  # an internal invariant
        raise RuntimeError(f"validation saw frames {sorted(indices.tolist())} of {len(frames)}")
    return float(losses[torch.argsort(indices)].sum() / len(frames))


def _save_outputs(extractor, original, model_args, data_args, args, metrics) -> None:
    from .hub import make_model_card, push_to_hub
    from .modeling_fit3d import FiT3DModel

    output_dir = Path(args.output_dir)
    backbone = extractor.model
    if hasattr(backbone, "merge_and_unload"):  # LoRA: fold the adapters in, so loading needs no peft
        backbone = backbone.merge_and_unload()
        extractor.model = backbone
    finetuned_dir, fit3d_dir = output_dir / "finetuned", output_dir / "fit3d"
    backbone.save_pretrained(finetuned_dir)
    model = FiT3DModel.from_backbones(original.model, backbone, normalization=model_args.normalization)
    model.save_pretrained(fit3d_dir)
    card = make_model_card(
        base_model=model_args.backbone,
        datasets=[str(data_args.frames)],
        metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
        training={"lora_rank": model_args.lora_rank, "learning_rate": metrics.get("learning_rate", args.learning_rate), "steps": metrics.get("steps")},
        repo_id=args.hub_model_id,
    )
    card.save(fit3d_dir / "README.md")
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if args.push_to_hub:
        push_to_hub(fit3d_dir, args.hub_model_id, token=args.hub_token)
        push_to_hub(finetuned_dir, f"{args.hub_model_id}-backbone", token=args.hub_token)
