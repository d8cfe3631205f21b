"""Stage II's frames: the split as a `datasets.Dataset`, and the torch dataset and batches the loop reads."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InputError, MissingInputError
from ..row_decoding import image_to_uint8

if TYPE_CHECKING:
    from .arguments import FinetuningArguments

__all__ = ["FrameDataset", "build_train_dataloader", "collate_frames", "load_frames"]


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
        shards = sorted(Path(spec).glob(f"**/{split}*.parquet")) or sorted(
            Path(spec).glob(f"**/{split}/*.parquet")
        )
        if shards:
            from datasets import load_dataset

            return load_dataset("parquet", data_files={split: [str(s) for s in shards]}, split=split)
        if any(Path(spec).glob("**/*.parquet")):
            raise MissingInputError(
                f"{spec}: no Parquet shards for split {split!r} (expected files like {split}-00000-of-00001.parquet)"
            )
    builder = make_frames_builder(spec, "frames", holdout_every=holdout_every)
    builder.download_and_prepare()
    splits = {name: info.num_examples for name, info in (builder.info.splits or {}).items()}
    if not splits.get(split):  # absent, or present with no frames (datasets cannot read an empty split)
        what = f"an empty {split!r} split" if split in splits else f"no {split!r} split"
        raise MissingInputError(
            f"--frames {spec}: {what}; it has {', '.join(f'{k} ({v} frames)' for k, v in sorted(splits.items()))}"
            + (
                ""
                if holdout_every
                else " (pass --holdout_every K to hold out every K-th view of each scene, as Stage I does)"
            )
        )
    return builder.as_dataset(split=split)


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
        raise InputError(
            f"frames of one batch must share their size, got {sorted(sizes)}; use --train_batch_size 1"
        )
    return {
        "index": torch.tensor([s["index"] for s in samples]),
        "scene_id": [s["scene_id"] for s in samples],
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "K": torch.stack([s["K"] for s in samples]),
        "world_to_camera": torch.stack([s["world_to_camera"] for s in samples]),
    }


def build_train_dataloader(frames, args: FinetuningArguments) -> torch.utils.data.DataLoader:
    """Shuffled batches of whole frames (the last partial batch dropped); `accelerator.prepare` then
    gives every process a disjoint share. On CUDA the batches are pinned, so that their upload
    can run asynchronously (the trainer's `non_blocking` data loader setting)."""
    return torch.utils.data.DataLoader(
        FrameDataset(frames), batch_size=args.train_batch_size, shuffle=True, drop_last=True,
        collate_fn=collate_frames, num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
