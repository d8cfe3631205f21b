"""The options of Stage II: three dataclasses that `HfArgumentParser` turns into command-line flags.

`BackboneArguments` (what is fine-tuned), `DataArguments` (frames and Gaussians) and `FinetuningArguments` (the
optimisation, following diffusers' flag names). Their `__post_init__` range checks raise `UsageError`, which
`fit3d_hf.cli.parse_args` reports as argparse does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError
from ..trackers import TRACKERS

__all__ = ["BackboneArguments", "DataArguments", "FinetuningArguments", "MIXED_PRECISIONS"]

MIXED_PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class BackboneArguments:
    """Which backbone Stage II fine-tunes, and how (all weights, or LoRA adapters)."""

    backbone: str = field(
        metadata={"help": "Backbone to fine-tune: Hub id, local folder or short name (dinov2_small, ...)."}
    )
    normalization: str = field(
        default="imagenet",
        metadata={
            "help": "'imagenet' (FiT3D) or 'processor' input normalisation.",
            "choices": ["imagenet", "processor"],
        },
    )
    pos_embed_interpolation: str | None = field(
        default=None,
        metadata={
            "help": "Position-embedding resampling to the frames' patch grid: 'timm' (bicubic with antialiasing, as the "
            "original FiT3D's timm backbones) or 'native' (transformers'). Default: 'timm' for the short names "
            "(dinov2_small, ...), else what the backbone's config records, else 'native'. Use the one Stage I used.",
            "choices": ["timm", "native"],
        },
    )
    lora_rank: int = field(
        default=0,
        metadata={
            "help": "Fine-tune rank-R LoRA adapters (peft) instead of all weights (0: full fine-tuning)."
        },
    )
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha (default: equal to the rank)."}
    )
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Comma-separated names of the linear layers that get adapters, or 'all-linear'."},
    )


@dataclass
class DataArguments:
    """The frames to train on and the Stage I Gaussians that give their targets."""

    frames: str = field(
        metadata={
            "help": "Frames: the scenes as `fit3d lift` takes them (a scene in any layout, a folder of scenes, a text file listing scenes, or a comma-separated list), a ScanNet++ root split by metadata/<split>_samples.txt, or a folder of Parquet shards from `fit3d export-dataset`."
        }
    )
    gaussians: str = field(
        metadata={"help": "Stage I output folder holding <scene_id>/gaussians.safetensors."}
    )
    holdout_every: int = field(
        default=0,
        metadata={
            "help": "Scenes only: the 'val' split is every K-th view of each scene, the views `fit3d lift --holdout_every K` held out (0: the scenes' own test frames)."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split of the frames to train on."})
    validation_split: str | None = field(
        default="val", metadata={"help": "Split for validation loss and consistency (None or '' to skip)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training frames."}
    )
    max_validation_samples: int | None = field(default=64, metadata={"help": "Validate on at most N frames."})
    consistency_pairs: int = field(
        default=8,
        metadata={"help": "View pairs per validation scene for the multi-view consistency measure."},
    )
    gaussian_cache_gb: float = field(
        default=8.0, metadata={"help": "Memory budget of the scene Gaussians kept loaded on the device."}
    )
    skip_scenes_without_bundles: bool = field(
        default=False,
        metadata={
            "help": "Leave out the frames of scenes that have no Gaussian bundle in --gaussians (default: refuse to start)."
        },
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
    """The optimisation, checkpoints, trackers and Hub upload (diffusers' flag names)."""

    output_dir: str = field(metadata={"help": "Where checkpoints, logs and the final models go."})
    learning_rate: float = field(
        default=1e-5, metadata={"help": "AdamW learning rate (FiT3D: 1e-5 at a global batch of 2)."}
    )
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
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Stop after N optimisation steps (overrides epochs)."}
    )
    train_batch_size: int = field(default=2, metadata={"help": "Frames per device per step."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Batches accumulated per optimisation step."}
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "'no' (fp32, FiT3D), 'bf16' or 'fp16' (autocast of the backbone). Default: the `accelerate launch` "
            "setting (its config file or --mixed_precision), else 'no'. The precision used is printed at the start and "
            "written to metrics.json.",
            "choices": list(MIXED_PRECISIONS),
        },
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the backbone's forward (in place: checkpoints and saved weights keep their names). "
            "In benchmarks/finetune.py --compile it raised the whole DINOv2-S step (batch 32, bf16) from 226 to 302 images/s on an H100; "
            "the first steps are slower while it compiles. Recorded in metrics.json."
        },
    )
    torch_compile_backend: str = field(
        default="inductor",
        metadata={
            "help": "Backend of --torch_compile: one of torch._dynamo.list_backends() (or 'eager', ...)."
        },
    )
    torch_compile_mode: str | None = field(
        default=None,
        metadata={
            "help": "Mode of --torch_compile ('default', 'reduce-overhead', 'max-autotune', ...; default: torch's)."
        },
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loading worker processes."})
    seed: int = field(default=42, metadata={"help": "Seed of the weights' data order and flips."})
    flip_probability: float = field(
        default=0.5, metadata={"help": "Probability of a horizontal flip of image, target and mask."}
    )
    near_plane: float = field(
        default=0.2,
        metadata={
            "help": "Gaussians closer to the camera than this (camera z, scene units) are not rendered (FiT3D's rasterizer: 0.2)."
        },
    )
    checkpointing_steps: int = field(
        default=500, metadata={"help": "Save a resumable checkpoint every N steps (0: never)."}
    )
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "Keep at most N checkpoints."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest'."}
    )
    report_to: str = field(
        default="tensorboard",
        metadata={
            "help": "Tracker of the losses and metrics ('all': every installed one).",
            "choices": list(TRACKERS),
        },
    )
    tracker_project_name: str = field(
        default="fit3d-finetune", metadata={"help": "Project name for the trackers."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N steps."})
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the fine-tuned backbone and the FiT3DModel."}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository of the FiT3DModel (backbone goes to <id>-backbone)."}
    )
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})

    def __post_init__(self) -> None:
        # `fit3d_hf.cli.parse_args` reports these as argparse does (usage line, exit 2).
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISIONS:
            raise UsageError(
                f"--mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}; got {self.mixed_precision!r}"
            )
        if self.report_to not in TRACKERS:
            raise UsageError(f"--report_to must be one of {', '.join(TRACKERS)}; got {self.report_to!r}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "logging_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "checkpoints_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise UsageError(
                "--learning_rate and --max_grad_norm must be positive and --weight_decay 0 or more"
            )
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
        _check_torch_compile(self.torch_compile, self.torch_compile_backend, self.torch_compile_mode)
        if self.report_to == "wandb" and self.hub_token is not None:
            raise UsageError(
                "Refusing --report_to wandb with --hub_token: the token would be logged. Use `hf auth login`."
            )


def _check_torch_compile(enabled: bool, backend: str, mode: str | None) -> None:
    """`--torch_compile_backend` and `--torch_compile_mode` name what torch.compile knows, and come with
    `--torch_compile` (torch is asked only then: importing dynamo takes a second)."""
    if not enabled:
        if backend != "inductor" or mode is not None:
            raise UsageError("--torch_compile_backend and --torch_compile_mode need --torch_compile")
        return
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())  # with the debug ones ('eager', 'aot_eager')
    if backend not in known:
        raise UsageError(
            f"--torch_compile_backend must be one of torch._dynamo.list_backends(): "
            f"{', '.join(torch._dynamo.list_backends())} (or a debug backend such as 'eager' or 'aot_eager'); "
            f"got {backend!r}"
        )
    if mode is not None:
        import torch._inductor

        modes = list(torch._inductor.list_mode_options())
        if mode not in modes:
            raise UsageError(f"--torch_compile_mode must be one of {', '.join(modes)}; got {mode!r}")
