"""Model cards and Hub uploads for FiT3D checkpoints.

Every upload goes through `push_to_hub`: `HfApi.create_repo`, then one `HfApi.create_commit` of the folder's
files, chosen as `upload_folder` chooses them (huggingface_hub's `filter_repo_objects` with ignore patterns).
`upload_folder` itself is not used: it validates the card's YAML on the Hub and, with hf_xet installed, commits
through its own upload pipeline, so it reaches the network however it is mocked; `create_commit` is the one
path tests can intercept completely.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

from .errors import HubUnavailableError, InputError, MissingInputError, UsageError
from .utils import atomic_write_text

logger = logging.getLogger(__name__)

FIT3D_CITATION = """@inproceedings{yue2024improving,
  title     = {Improving 2D Feature Representations by 3D-Aware Fine-Tuning},
  author    = {Yue, Yuanwen and Das, Anurag and Engelmann, Francis and Tang, Siyu and Lenssen, Jan Eric},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024}
}"""

DEFAULT_TRAINING_DATA = "ScanNet++ (DSLR images of the training scenes, with their camera poses)"

# Weights are shipped as safetensors only; a pickle in the folder is refused rather than uploaded.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Hidden files and folders (.cache, .git, editor swap files) are local state, not part of the checkpoint:
# `upload_folder`-style patterns (`*` crosses "/") for a hidden name at the top or anywhere below it.
UPLOAD_IGNORE_PATTERNS = (".*", "*/.*")
_METRIC_KEYS = ("task", "dataset", "metric", "original", "fit3d")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def _check_metric_rows(metrics: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for index, row in enumerate(metrics):
        missing = [key for key in _METRIC_KEYS if key not in row]
        if missing:
            raise InputError(
                f"metrics row {index} ({dict(row)}) lacks {missing}; every row needs {list(_METRIC_KEYS)}"
            )
        rows.append(dict(row))
    return rows


def _format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def make_model_card(
    base_model: str,
    *,
    repo_id: str | None = None,
    feature_dim: int | None = None,
    training_data: str = DEFAULT_TRAINING_DATA,
    datasets: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    training: Mapping[str, Any] | None = None,
    license: str = "mit",
    tags: Sequence[str] = (),
) -> ModelCard:
    """Writes the model card of a FiT3D checkpoint.

    Args:
        base_model: Hub id of the original backbone (e.g. `"facebook/dinov2-small"`).
        repo_id: The repo the card is for; names the model in the card and its `model-index`.
        feature_dim: Channels of the FiT3D features (2 x the backbone's hidden size), if known.
        training_data: One line on the data the fine-tuning used.
        datasets: Dataset ids for the card metadata.
        metrics: Either evaluation rows, each a mapping with `task`, `dataset`, `metric`, `original` (the
            original backbone's score) and `fit3d` (this model's score), which fill a comparison table and the
            `model-index`; or a flat `{name: value}` mapping (e.g. training metrics), shown as a table.
        training: Fine-tuning hyper-parameters `{name: value}`, shown as a table.
        license: License id for the metadata.
        tags: Extra tags besides the FiT3D ones.

    Returns:
        A `huggingface_hub.ModelCard` (metadata header + markdown body).
    """
    flat_metrics = dict(metrics) if isinstance(metrics, Mapping) else {}
    rows = [] if isinstance(metrics, Mapping) else _check_metric_rows(metrics or [])
    name = repo_id or f"FiT3D ({base_model})"
    card_data = _card_data(base_model, name, rows, datasets=datasets, license=license, tags=tags)
    lines = _card_description(base_model, name, repo_id, feature_dim, training_data)
    lines += _card_tables(training, rows, flat_metrics)
    lines += ["## Citation", "", "```bibtex", FIT3D_CITATION, "```", ""]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _card_data(
    base_model: str, name: str, rows: list[dict[str, Any]], *, datasets, license: str, tags
) -> ModelCardData:
    """The card's metadata header, with a `model-index` entry per evaluation row."""
    eval_results = [
        EvalResult(
            task_type=_slug(row["task"]),
            task_name=str(row["task"]),
            dataset_type=_slug(row["dataset"]),
            dataset_name=str(row["dataset"]),
            metric_type=_slug(row["metric"]),
            metric_name=str(row["metric"]),
            metric_value=row["fit3d"],
        )
        for row in rows
    ]
    return ModelCardData(
        base_model=base_model,
        datasets=list(datasets) if datasets else None,
        library_name="transformers",
        license=license,
        pipeline_tag="image-feature-extraction",
        tags=["fit3d", "3d-aware-fine-tuning", "dense-features", "vision", *tags],
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )


def _card_description(
    base_model: str, name: str, repo_id: str | None, feature_dim: int | None, training_data: str
) -> list[str]:
    """The card's title, method, training data and usage sections, as Markdown lines."""
    dims = f" ({feature_dim} channels: {feature_dim // 2} from each backbone)" if feature_dim else ""
    return [
        f"# {name}",
        "",
        f"Dense image features from [{base_model}](https://huggingface.co/{base_model}) made 3D-aware with "
        "FiT3D (*Improving 2D Feature Representations by 3D-Aware Fine-Tuning*, ECCV 2024).",
        "",
        "## Method",
        "",
        "FiT3D first lifts the backbone's patch features of every training scene into a 3D Gaussian "
        "representation (each Gaussian carries a low-dimensional feature, decoded per scene to the "
        "backbone's width), so that features rendered from any viewpoint agree across views. It then "
        "fine-tunes all backbone weights to regress these rendered, multi-view consistent features with a "
        "masked L1 loss. At inference the features of the original and the fine-tuned backbone are "
        f"concatenated{dims}; this checkpoint holds both backbones.",
        "",
        "## Training data",
        "",
        training_data,
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModel",
        "",
        f'model = AutoModel.from_pretrained("{repo_id or "path/to/checkpoint"}", trust_remote_code=True)',
        "images = torch.rand(1, 3, 584, 876)  # RGB in [0, 1], any size; resized to a patch multiple inside",
        "features = model(images).features  # (1, 2 * D, h, w): original channels first, then fine-tuned",
        "```",
        "",
        "With `fit3d-hf` installed, `import fit3d_hf` registers the model type and `trust_remote_code` is "
        "not needed.",
        "",
    ]


def _card_tables(
    training: Mapping[str, Any] | None, rows: list[dict[str, Any]], flat_metrics: dict[str, Any]
) -> list[str]:
    """The hyper-parameter and evaluation tables (only those with content), as Markdown lines."""
    lines = []
    if training:
        lines += ["## Training hyper-parameters", "", "| name | value |", "| --- | --- |"]
        lines += [f"| {key} | {_format_value(value)} |" for key, value in training.items()] + [""]
    if rows or flat_metrics:
        lines += ["## Evaluation", ""]
    if rows:
        lines += ["| task | dataset | metric | original | FiT3D |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {row['task']} | {row['dataset']} | {row['metric']} | {_format_value(row['original'])} | "
            f"{_format_value(row['fit3d'])} |"
            for row in rows
        ] + [""]
    if flat_metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {_format_value(value)} |" for key, value in flat_metrics.items()] + [""]
    return lines


def model_card_for_checkpoint(folder: str | os.PathLike, **kwargs) -> ModelCard:
    """Builds the card of a saved FiT3D checkpoint from its `config.json` (`backbone`, `feature_dim`).

    Args:
        folder: A folder written by `FiT3DModel.save_pretrained`.
        **kwargs: Passed to `make_model_card` (e.g. `repo_id`, `metrics`).

    Returns:
        The model card.
    """
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise MissingInputError(f"{config_path} does not exist: is {folder} a saved FiT3D checkpoint?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{config_path} is not valid JSON: {error}") from error
    if config.get("model_type") != "fit3d":
        raise InputError(f"{config_path} has model_type {config.get('model_type')!r}, expected 'fit3d'")
    base_model = config.get("backbone") or config.get("backbone_config", {}).get("_name_or_path")
    if not base_model:
        raise InputError(f"{config_path} names no original backbone ('backbone'); pass base_model explicitly")
    kwargs.setdefault("feature_dim", config.get("feature_dim"))
    return make_model_card(base_model, **kwargs)


def write_image_processor(folder: str | os.PathLike) -> Path:
    """Writes the image processor (`preprocessor_config.json`) of the FiT3D checkpoint in `folder`, for
    checkpoints saved before `FiT3DModel.save_pretrained` wrote it."""
    from .configuration_fit3d import FiT3DConfig
    from .modeling_fit3d import IMAGE_PROCESSOR_FILENAME, fit3d_image_processor_dict

    config_path = Path(folder) / "config.json"
    try:
        config = FiT3DConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise InputError(f"{config_path} is not the config of a FiT3D checkpoint: {error}") from error
    return atomic_write_text(
        Path(folder) / IMAGE_PROCESSOR_FILENAME,
        json.dumps(fit3d_image_processor_dict(config), indent=2) + "\n",
    )


def save_model_card(card: ModelCard, folder: str | os.PathLike) -> Path:
    """Writes `card` to `folder/README.md` through a temporary file, so no half-written card is left."""
    folder = Path(folder)
    target = folder / "README.md"
    return atomic_write_text(target, str(card))


def _files_to_upload(folder: Path) -> list[str]:
    """The folder's files to commit, as paths relative to it (POSIX), sorted; refuses an empty folder and pickles."""
    from huggingface_hub.utils import filter_repo_objects

    found = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    files = list(filter_repo_objects(found, ignore_patterns=list(UPLOAD_IGNORE_PATTERNS)))
    if not files:
        raise InputError(f"{folder} holds no files to upload")
    pickles = [name for name in files if Path(name).suffix.lower() in _PICKLE_SUFFIXES]
    if pickles:
        raise InputError(
            f"{folder} holds pickle-format files {pickles}; FiT3D checkpoints are uploaded as safetensors "
            "only (save_pretrained writes model.safetensors). Remove them and try again."
        )
    return files


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload FiT3D model with fit3d-hf",
):
    """Uploads every file of a checkpoint folder to a Hub model repo in one commit (creating the repo).

    Args:
        folder: The folder to upload (e.g. written by `FiT3DModel.save_pretrained`, with a README.md card).
        repo_id: Target repo, `"user/name"`.
        token: Hub token; by default the one from `hf auth login` or `HF_TOKEN`.
        private: Create the repo as private (only applies when it does not exist yet).
        commit_message: Message of the commit.

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"{folder} is not a folder")
    files = _files_to_upload(folder)
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    with _hub_errors(repo_id):
        api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        logger.info("Committing %d files from %s to %s", len(operations), folder, repo_id)
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message,
            token=token,
            repo_type="model",
        )


@contextlib.contextmanager
def _hub_errors(repo_id: str):
    """The Hub's failures a person can act on, as the project's known errors."""
    from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled as error:
        raise HubUnavailableError(
            f"cannot upload to {repo_id}: the Hub is unreachable because HF_HUB_OFFLINE is set; unset it and "
            "try again"
        ) from error
    except LocalTokenNotFoundError as error:
        raise UsageError(
            f"cannot upload to {repo_id}: no Hub token; run `hf auth login` or set HF_TOKEN"
        ) from error
    except Exception as error:
        if is_network_error(error):
            raise HubUnavailableError(
                f"cannot upload to {repo_id}: the Hub is unreachable ({error})"
            ) from error
        raise


def is_network_error(error: BaseException) -> bool:
    """Whether `error` (or its cause) means the Hub could not be reached: offline mode, no connection, a
    time-out. Checked by class name for the HTTP clients' errors, so that no client needs importing."""
    network_names = {"TransportError", "NetworkError", "ConnectError", "ConnectTimeout", "TimeoutException"}
    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in network_names for cls in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False


__all__ = [
    "FIT3D_CITATION",
    "UPLOAD_IGNORE_PATTERNS",
    "is_network_error",
    "make_model_card",
    "model_card_for_checkpoint",
    "push_to_hub",
    "save_model_card",
    "write_image_processor",
]
