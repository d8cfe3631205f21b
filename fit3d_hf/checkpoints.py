"""Crash-safe, verifiable checkpoints of both stages, and the checks behind `fit3d verify`.

* Stage I (`<out>/<scene>/checkpoint.pt`, one `torch.save` file written through `atomic_path`): the saved
  state carries the checksum of each of its tensors (`save_torch_checkpoint`), checked when it is loaded
  (`load_torch_checkpoint`). torch's zip format checks nothing of the tensor bytes itself.
* Stage II (`<output_dir>/checkpoint-<step>/`, an accelerate `save_state` folder of several files):
  `save_state_atomically` writes the folder under a hidden temporary name, adds a manifest with the SHA-256
  of every file, and renames it into place only then (`fit3d_hf.utils.replace_folder`), so that a crash
  during a save leaves the previous checkpoints untouched and no half-written `checkpoint-<step>` folder
  that `--resume_from_checkpoint latest` could take for a whole one.
* `verify_path` checks any of these, or a Gaussian bundle, and says what it found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .errors import CorruptFileError, InputError, MissingInputError, file_problem
from .gaussians.bundle import BUNDLE_FILENAME, _tensor_digest, verify_bundle
from .utils import atomic_path, replace_folder

__all__ = [
    "MANIFEST_FILENAME",
    "PARTIAL_PREFIX",
    "is_complete_checkpoint",
    "load_torch_checkpoint",
    "map_tensors",
    "save_state_atomically",
    "save_torch_checkpoint",
    "verify_checkpoint_folder",
    "verify_path",
]

logger = logging.getLogger(__name__)

CHECKSUMS_KEY = "__fit3d_checksums__"
MANIFEST_FILENAME = "fit3d_manifest.json"
PARTIAL_PREFIX = ".partial-"  # a Stage II checkpoint folder being written (never matched by `checkpoint-*`)


# ---------------------------------------------------------------------------------------------------
# Stage I: one torch.save file


def _tensor_leaves(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested dict / list state, keyed by its path ("optimizer/state/0/exp_avg")."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, (list, tuple))
        else ()
    )
    leaves = {}
    for key, item in items:
        leaves.update(_tensor_leaves(item, f"{prefix}/{key}" if prefix else str(key)))
    return leaves


def map_tensors(value, function):
    """`value` (nested dicts, lists and tuples) with `function` applied to each of its tensors; other leaves kept."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {key: map_tensors(item, function) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(item, function) for item in value)
    return value


def _checksums(state: dict) -> dict[str, str]:
    return {name: _tensor_digest(name, tensor) for name, tensor in _tensor_leaves(state).items()}


def save_torch_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """`torch.save`s `state` (tensors and plain values only) atomically, with the checksum of every tensor.
    Tensors on a GPU are saved as CPU tensors (copied once, before the checksums read them)."""
    path = Path(path)
    state = map_tensors(state, lambda tensor: tensor.detach().cpu())
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        # through a Python file object, not the path: torch's own file writer holds the GIL while it finishes the
        # file (0.25-0.35 s for 600 MB on a 2-core machine), which stalls a training loop writing in the background
        torch.save({**state, CHECKSUMS_KEY: _checksums(state)}, file)
    return path


def load_torch_checkpoint(path: str | os.PathLike) -> dict:
    """Loads a `save_torch_checkpoint` file (`weights_only=True`, CPU) and checks its tensors.

    Raises:
        MissingInputError: no file at `path`.
        CorruptFileError: the file cannot be read or a tensor fails its checksum.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError / UnpicklingError / zip errors for damaged files
        raise CorruptFileError(
            file_problem(
                path,
                f"not a readable checkpoint ({type(error).__name__}: {error}); delete it to start that work afresh",
            )
        ) from error
    if not isinstance(state, dict):
        raise CorruptFileError(file_problem(path, f"holds a {type(state).__name__}, not a checkpoint's dict"))
    if CHECKSUMS_KEY not in state:  # written before checksums existed
        logger.warning("%s records no checksums: resuming from it unverified", path)
        return state
    expected = state.pop(CHECKSUMS_KEY)
    if not isinstance(expected, dict):
        raise CorruptFileError(file_problem(path, "its checksums are not a table of tensor digests"))
    found = _checksums(state)
    if found.keys() != expected.keys():
        raise CorruptFileError(
            file_problem(path, f"holds tensors {sorted(found)} but records checksums of {sorted(expected)}")
        )
    damaged = [name for name in found if found[name] != expected[name]]
    if damaged:
        raise CorruptFileError(
            file_problem(
                path,
                f"tensors {damaged[:5]} fail their checksums: the file is damaged; delete it to start that work afresh",
            )
        )
    return state


# ---------------------------------------------------------------------------------------------------
# Stage II: accelerate save_state folders


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    return {
        file.relative_to(folder).as_posix(): _file_digest(file)
        for file in sorted(folder.rglob("*"))
        if file.is_file() and file.name != MANIFEST_FILENAME
    }


def save_state_atomically(accelerator, folder: str | os.PathLike) -> Path:
    """`accelerator.save_state` into `folder` as one atomic step (call it on every process).

    Every process writes into `<parent>/.partial-<name>`; the main process then adds the manifest and
    renames the folder to `folder`, replacing an older folder of the same name (a resumed run that saves
    the same step again).
    """
    folder = Path(folder)
    partial = folder.parent / f"{PARTIAL_PREFIX}{folder.name}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while it saved
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        manifest = json.dumps(
            _manifest(partial), indent=1, sort_keys=True
        )  # before the manifest's own temp file exists
        with atomic_path(partial / MANIFEST_FILENAME) as temporary:
            temporary.write_text(manifest)
        replace_folder(partial, folder)
    accelerator.wait_for_everyone()
    return folder


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether a Stage II checkpoint folder was finished (it has its manifest); folders written before
    manifests existed count as complete when they hold accelerate's model file."""
    folder = Path(folder)
    return (
        (folder / MANIFEST_FILENAME).is_file()
        or any(folder.glob("model*.safetensors"))
        or any(folder.glob("pytorch_model*.bin"))
    )


def verify_checkpoint_folder(folder: str | os.PathLike) -> dict:
    """Checks a Stage II checkpoint folder against its manifest.

    Returns:
        `{"path", "files", "bytes", "checksummed"}` (`checksummed` False for a folder without manifest,
        whose safetensors files are then only opened and read).

    Raises:
        MissingInputError, CorruptFileError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"no checkpoint folder at {folder}")
    manifest_path = folder / MANIFEST_FILENAME
    if not manifest_path.is_file():
        if not is_complete_checkpoint(folder):
            raise CorruptFileError(
                file_problem(folder, "holds no model weights and no manifest: an incomplete checkpoint")
            )
        from safetensors import safe_open

        files = sorted(folder.glob("*.safetensors"))
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():
                        handle.get_tensor(key)
            except Exception as error:
                raise CorruptFileError(
                    file_problem(file, f"not a readable safetensors file ({error})")
                ) from error
        return {
            "path": str(folder),
            "files": len(files),
            "bytes": sum(f.stat().st_size for f in files),
            "checksummed": False,
        }
    try:
        expected = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptFileError(file_problem(manifest_path, f"not valid JSON ({error})")) from error
    if not isinstance(expected, dict):
        raise CorruptFileError(file_problem(manifest_path, "not a table of file checksums"))
    found = _manifest(folder)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CorruptFileError(file_problem(folder, f"lacks the files {missing[:5]} its manifest lists"))
    damaged = sorted(name for name in expected if found[name] != expected[name])
    if damaged:
        raise CorruptFileError(
            file_problem(folder, f"files {damaged[:5]} fail their checksums: the checkpoint is damaged")
        )
    size = sum((folder / name).stat().st_size for name in expected)
    return {"path": str(folder), "files": len(expected), "bytes": size, "checksummed": True}


# ---------------------------------------------------------------------------------------------------
# fit3d verify


def _raw_keys(path: Path) -> set:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return set()  # load_torch_checkpoint reports the damage
    return set(state) if isinstance(state, dict) else set()


def _kind(path: Path) -> str:
    if path.is_dir():
        if (path / BUNDLE_FILENAME).is_file():
            return "bundle"
        if (path / MANIFEST_FILENAME).is_file() or path.name.startswith("checkpoint-"):
            return "stage2-checkpoint"
        return "folder"
    if path.suffix == ".safetensors":
        return "bundle"
    if path.suffix == ".pt":
        return "stage1-checkpoint"
    return "unknown"


def _targets(path: Path) -> list[tuple[str, Path]]:
    """What `fit3d verify` checks under `path`: itself, or every bundle and checkpoint found below a folder."""
    kind = _kind(path)
    if kind != "folder":
        return [(kind, path)]
    found = []
    for child in sorted(path.rglob("*")):
        if child.name.startswith(".partial-") or any(
            part.startswith(".partial-") for part in child.relative_to(path).parts[:-1]
        ):
            continue
        if child.is_file() and child.name == BUNDLE_FILENAME:
            found.append(("bundle", child))
        elif child.is_file() and child.name == "checkpoint.pt":
            found.append(("stage1-checkpoint", child))
        elif child.is_dir() and child.name.startswith("checkpoint-"):
            found.append(("stage2-checkpoint", child))
    return found


def verify_path(path: str | os.PathLike) -> list[dict]:
    """Verifies a bundle, a checkpoint, or every bundle and checkpoint under a folder.

    Returns one record per item: `{"path", "kind", "ok", "checksummed", "problem"}`; a damaged item is
    reported there, not raised. Raises `MissingInputError` when `path` does not exist and `InputError`
    when it holds nothing to verify.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path} does not exist")
    targets = _targets(path)
    if not targets:
        raise InputError(file_problem(path, "holds no Gaussian bundle and no checkpoint to verify"))
    records = []
    for kind, target in targets:
        record = {"path": str(target), "kind": kind, "ok": True, "checksummed": False, "problem": None}
        try:
            if kind == "bundle":
                record["checksummed"] = verify_bundle(target)["checksummed"]
            elif kind == "stage1-checkpoint":
                record["checksummed"] = CHECKSUMS_KEY in _raw_keys(target)
                load_torch_checkpoint(target)
            elif kind == "stage2-checkpoint":
                record["checksummed"] = verify_checkpoint_folder(target)["checksummed"]
            else:
                raise InputError(
                    file_problem(
                        target,
                        "is neither a bundle (.safetensors) nor a checkpoint (.pt, checkpoint-<step>/)",
                    )
                )
        except (InputError, MissingInputError) as error:
            record.update(ok=False, problem=str(error))
        records.append(record)
    return records
