"""Scene specs and view splits: how every stage names the scenes it reads and which views it holds out.

A *scene spec* is a string that `fit3d lift`, Stage II (`--frames`), `fit3d evaluate`, `fit3d export-dataset`
and `fit3d convert-scene` all accept, resolved here once for all of them:

- one scene in any layout `read_scene` reads (a ScanNet++ scene folder, a folder or `transforms*.json` of a
  nerfstudio / instant-ngp capture, a COLMAP text model folder);
- a folder of scene folders (a dataset root holding `scenes/` counts as the folder of its scenes);
- a text file listing scenes, one per line (relative lines are relative to the file; `#` starts a comment);
- a comma-separated list of any of these.

The held-out views of a scene are Stage I's (`--holdout_every K`): view indices K-1, 2K-1, ... in the
scene's frame order. Stage I reports its held-out PSNR on them, and the `scenes` datasets builder puts the
same views in its `val` split, so that Stage II validates on views Stage I never trained on.
"""

from __future__ import annotations

from pathlib import Path

from fit3d_hf.errors import MissingInputError, UsageError, file_problem
from fit3d_hf.scene.readers import detect_layout

__all__ = ["heldout_view_indices", "is_scene", "resolve_scene_list", "split_views"]


def is_scene(path: Path | str) -> bool:
    """Whether `read_scene` can read `path` (the readers' own layout detection decides)."""
    try:
        detect_layout(path)
    except FileNotFoundError:
        return False
    return True


def _scene_file(path: Path) -> bool:
    """A file that is itself a scene (a transforms json, a COLMAP text file), not a list of scenes."""
    return path.suffix == ".json" or path.name in ("cameras.txt", "images.txt", "points3D.txt")


def _list_file(path: Path) -> list[Path]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        entry = Path(line).expanduser()
        entry = entry if entry.is_absolute() else path.parent / entry
        if not entry.exists():
            raise MissingInputError(file_problem(path, f"line {number}: {entry} does not exist"))
        if not is_scene(entry):
            raise MissingInputError(
                file_problem(path, f"line {number}: {entry} holds no scene that fit3d-hf reads")
            )
        entries.append(entry)
    if not entries:
        raise MissingInputError(file_problem(path, "lists no scenes"))
    return entries


def _resolve_one(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if not path.exists():
        raise MissingInputError(f"scene spec {spec!r} is neither a file nor a folder")
    if path.is_file():
        if _scene_file(path):
            detect_layout(path)  # raises with the reason when the file is no scene
            return [path]
        return _list_file(path)
    if (path / "scenes").is_dir():
        path = path / "scenes"
    if is_scene(path):
        return [path]
    scenes = sorted(child for child in path.iterdir() if child.is_dir() and is_scene(child))
    if not scenes:
        raise MissingInputError(
            f"{path}: no scene found in it or in its subfolders (expected transforms_train.json + points3D.txt, "
            "transforms.json, or a COLMAP text model)"
        )
    return scenes


def resolve_scene_list(spec: str) -> list[Path]:
    """The scenes a spec names (see the module docstring), in order, each once.

    Args:
        spec: a scene, a folder of scenes, a text file listing scenes, or a comma-separated list of these.

    Returns:
        Paths that `fit3d_hf.scene.read_scene` reads (folders, or scene files such as a `transforms.json`).

    Raises:
        MissingInputError: a part of the spec does not exist or holds no scene.
    """
    parts = [part.strip() for part in str(spec).split(",")]
    if not any(parts):
        raise UsageError("the scene spec is empty; pass a scene folder, a folder of scenes or a list file")
    scenes, seen = [], set()
    for part in parts:
        if not part:
            continue
        for path in _resolve_one(part):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                scenes.append(path)
    return scenes


def heldout_view_indices(num_views: int, holdout_every: int) -> list[int]:
    """Stage I's held-out views: every `holdout_every`-th index (K-1, 2K-1, ...); none when it is 0.

    Args:
        num_views: number of frames of the scene.
        holdout_every: K (0: nothing held out; 1 is refused: it would hold out every view).
    """
    if holdout_every < 0 or holdout_every == 1:
        raise UsageError(f"--holdout_every must be 0 or at least 2, got {holdout_every}")
    if not holdout_every:
        return []
    return list(range(holdout_every - 1, num_views, holdout_every))


def split_views(image_ids: list[str], test_image_ids: set[str], holdout_every: int) -> dict[str, list[str]]:
    """The `train` / `val` image ids of one scene.

    With `holdout_every` K > 0, `val` holds Stage I's held-out views (`heldout_view_indices`); with 0, the
    test frames the scene's own files name (ScanNet++ `test_frames`, nerfstudio `test_filenames`).

    Args:
        image_ids: the scene's frames, in its order.
        test_image_ids: the frames its files list as test frames.
        holdout_every: K, or 0 to use the scene's own split.

    Returns:
        `{"train": [...], "val": [...]}`, each in the scene's order.
    """
    if holdout_every:
        held = set(heldout_view_indices(len(image_ids), holdout_every))
        val = {image_id for index, image_id in enumerate(image_ids) if index in held}
    else:
        val = set(test_image_ids)
    return {
        "train": [image_id for image_id in image_ids if image_id not in val],
        "val": [image_id for image_id in image_ids if image_id in val],
    }
