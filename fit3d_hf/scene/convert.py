"""Scene conversion: any scenes fit3d-hf reads, written in another layout (`fit3d convert-scene`).

No stage needs it (every stage reads every layout), but other tools do: nerfstudio reads `transforms.json`,
COLMAP and 3DGS read COLMAP text models, and FiT3D's original code reads the preprocessed ScanNet++ layout.
Each output is self-contained: the frames' files are copied next to it. Distorted captures are written
undistorted (pinhole), as every reader returns them.

Output layouts under the output folder:

- ``scannetpp``: a dataset root, `scenes/<scene_id>/` (see `write_scannetpp_scene`) plus `metadata/` with
  `train_samples.txt` / `val_samples.txt` (`<scene_id>_<image_id>`, split as the `scenes` builder splits) and
  `nvs_sem_train.txt` (the scene ids), so that the `scannetpp` builder reads it;
- ``nerfstudio``: `<scene_id>/transforms.json` with `images/`, `masks/`, ... beside it;
- ``colmap``: `<scene_id>/sparse/0/{cameras,images,points3D}.txt` with `<scene_id>/images/`, ... (the test
  split is lost: COLMAP has none).
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

from fit3d_hf.errors import InputError, UsageError
from fit3d_hf.scene.readers import read_scene
from fit3d_hf.scene.specs import resolve_scene_list, split_views
from fit3d_hf.scene.writers import (
    copy_frame_files,
    write_colmap_text,
    write_nerfstudio_transforms,
    write_scannetpp_scene,
)
from fit3d_hf.utils import atomic_folder, atomic_write_text

__all__ = ["CONVERSION_LAYOUTS", "convert_scenes"]

logger = logging.getLogger(__name__)

CONVERSION_LAYOUTS = ("scannetpp", "nerfstudio", "colmap")


def _write_one(scene, layout: str, folder: Path) -> None:
    if layout == "scannetpp":
        write_scannetpp_scene(scene, folder)
    elif layout == "nerfstudio":
        write_nerfstudio_transforms(copy_frame_files(scene, folder), folder / "transforms.json")
    else:
        copied = copy_frame_files(scene, folder)
        write_colmap_text(copied, folder / "sparse" / "0", images_dir=folder / "images")


def convert_scenes(
    spec: str,
    layout: str,
    output_dir: Path | str,
    *,
    holdout_every: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Reads every scene of a spec and writes it in `layout` under `output_dir`.

    The output is built in a temporary folder beside `output_dir` and renamed into place at the end, so a
    failed conversion leaves nothing behind.

    Args:
        spec: the scenes (see `fit3d_hf.scene.specs`).
        layout: "scannetpp", "nerfstudio" or "colmap".
        output_dir: the folder to create.
        holdout_every: ScanNet++ output: the `val` samples are Stage I's held-out views (`--holdout_every`)
            instead of the scenes' own test frames.
        overwrite: replace an existing non-empty `output_dir`.
        progress: show a progress bar.

    Returns:
        The written scene folders (or files the readers take), in the spec's order.

    Raises:
        UsageError: an unknown layout, or `output_dir` exists and `overwrite` is off.
        InputError: two scenes of the spec have the same scene id.
    """
    if layout not in CONVERSION_LAYOUTS:
        raise UsageError(f"--to must be one of {', '.join(CONVERSION_LAYOUTS)}, got {layout!r}")
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise UsageError(f"{output_dir} already exists and is not empty; pass --overwrite to replace it")
    paths = resolve_scene_list(spec)
    written, sources, samples = [], {}, {"train": [], "val": []}
    with atomic_folder(output_dir) as staging:  # swapped in whole at the end (an existing one replaced)
        for path in tqdm(paths, desc=f"converting to {layout}", unit="scene", disable=not progress):
            scene = read_scene(path)
            if scene.scene_id in sources:
                raise InputError(
                    f"{path} and {sources[scene.scene_id]} are both scene {scene.scene_id!r}; rename one folder"
                )
            sources[scene.scene_id] = path
            if layout == "scannetpp":
                relative = Path("scenes") / scene.scene_id
                split = split_views(scene.image_ids, scene.test_image_ids, holdout_every)
                for name, image_ids in split.items():
                    samples[name] += [
                        f"{scene.scene_id}_{image_id.replace('/', '__')}" for image_id in image_ids
                    ]
            else:
                relative = Path(scene.scene_id)
            _write_one(scene, layout, staging / relative)
            written.append(relative)
        if layout == "scannetpp":
            for name, lines in samples.items():
                atomic_write_text(
                    staging / "metadata" / f"{name}_samples.txt", "".join(f"{s}\n" for s in lines)
                )
            atomic_write_text(staging / "metadata" / "nvs_sem_train.txt", "".join(f"{s}\n" for s in sources))
    logger.info("wrote %d scene(s) as %s into %s", len(written), layout, output_dir)
    return [output_dir / relative for relative in written]
