"""Stage II: fine-tune a backbone so that its patch features match features rendered from 3D Gaussians.

FiT3D's step (§3.2 of the paper; `engine.train_one_epoch` of the original), with its settings as defaults:
for every frame, render its scene's low-dimensional feature map at its camera (no gradients), decode it
with the scene's decoder and resample it to the backbone's patch grid (done here only where the grid
samples it, see `fit3d_hf.targets`), flip image, target and mask together at random, and regress the
backbone's last-layer normalised patch features with a masked L1; AdamW lr 1e-5, weight decay 1e-4,
gradient clipping 0.1, one epoch.

The loop follows the diffusers/accelerate example scripts (Accelerator, `accumulate`, `save_state`
checkpoints, `--resume_from_checkpoint latest`, trackers), so it runs on one GPU, several GPUs or a CPU.

The package, one step of the data flow per module: `arguments` (the options), `frames` (the frames as a
dataset), `bundles` (the checks against Stage I's output), `rendered_targets` (the Gaussian cache and the
targets of a step), `backbone_setup` (LoRA, frozen weights), `validation` (loss and multi-view consistency),
`checkpointing` (resumable checkpoints), `trainer` (the run) and `outputs` (the saved models and card).
"""

from .arguments import BackboneArguments, DataArguments, FinetuningArguments
from .backbone_setup import freeze_unused_parameters
from .bundles import bundle_path, check_frames_against_gaussians
from .frames import build_train_dataloader, load_frames
from .rendered_targets import GaussianCache
from .trainer import scaled_learning_rate, train

__all__ = [
    "BackboneArguments",
    "DataArguments",
    "FinetuningArguments",
    "GaussianCache",
    "build_train_dataloader",
    "bundle_path",
    "check_frames_against_gaussians",
    "freeze_unused_parameters",
    "load_frames",
    "scaled_learning_rate",
    "train",
]
