"""The original FiT3D release on the Hub (`yuanwenyue/FiT3D`): its fine-tuned weights as FiT3DModel checkpoints.

The release holds one timm state dict per backbone (`<name>_finetuned.pth`). `converted_release_model` downloads
one with `hf_hub_download` (which reuses the Hub cache, also offline), converts it through the same path as
`fit3d convert-original` and keeps the result in a cache folder, so that later calls (and later starts of
the Space) load it directly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import HubUnavailableError, InputError, UsageError

__all__ = [
    "RELEASE_BACKBONES",
    "RELEASE_REPO",
    "converted_release_model",
    "default_release_cache",
    "download_release_weights",
    "release_filename",
]

logger = logging.getLogger(__name__)

RELEASE_REPO = "yuanwenyue/FiT3D"
# Backbone name -> how its timm weights convert: onto native transformers models (DINOv2) or through timm.
RELEASE_BACKBONES = {
    "dinov2_small": "transformers",
    "dinov2_reg_small": "transformers",
    "clip_base": "timm",
    "mae_base": "timm",
    "deit3_base": "timm",
}


def release_filename(name: str) -> str:
    """The release's file of a backbone: `<name>_finetuned.pth`."""
    if name not in RELEASE_BACKBONES:
        raise UsageError(
            f"{name!r} is not a backbone of the original FiT3D release; it has {', '.join(RELEASE_BACKBONES)}"
        )
    return f"{name}_finetuned.pth"


def default_release_cache() -> Path:
    """Where converted release models are kept: `$FIT3D_RELEASE_CACHE`, else `<HF_HOME>/fit3d/original-release`."""
    if os.environ.get("FIT3D_RELEASE_CACHE"):
        return Path(os.environ["FIT3D_RELEASE_CACHE"])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "fit3d" / "original-release"


def download_release_weights(name: str, *, revision: str | None = None) -> Path:
    """The local path of the release's `<name>_finetuned.pth`, downloaded (or found in the Hub cache).

    Raises:
        UsageError: `name` is not a backbone of the release.
        HubUnavailableError: the file is not in the Hub cache and the Hub cannot be reached.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    from .hub import is_network_error

    filename = release_filename(name)
    try:
        return Path(hf_hub_download(RELEASE_REPO, filename, revision=revision))
    except LocalEntryNotFoundError as error:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no connection"
        raise HubUnavailableError(
            f"{filename} of the original FiT3D release ({RELEASE_REPO}) is not in the Hub cache "
            f"({constants.HF_HUB_CACHE}) and the Hub is unreachable ({why})"
        ) from error
    except (EntryNotFoundError, RepositoryNotFoundError) as error:
        raise InputError(f"{RELEASE_REPO} on the Hub has no file {filename}: {error}") from error
    except Exception as error:
        if is_network_error(error):
            raise HubUnavailableError(
                f"cannot download {filename} from {RELEASE_REPO}: the Hub is unreachable"
            ) from error
        raise


def converted_release_model(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    via: str | None = None,
    original: str | None = None,
    revision: str | None = None,
) -> Path:
    """The folder of the FiT3DModel made from the release's fine-tuned `name` weights, built on first use.

    Args:
        name: A backbone of the release (`RELEASE_BACKBONES`).
        cache_dir: Where converted models are kept (`<cache_dir>/<name>/`); `default_release_cache()` if None.
        via: `"transformers"` or `"timm"`; by default native transformers models for DINOv2, timm otherwise.
        original: Hub id or folder of the original backbone (default: the one `fit3d convert-original` uses).
        revision: Revision of the release repo.

    Returns:
        The checkpoint folder (`config.json`, `model.safetensors`, image processor, model card).
    """
    from .commands.convert_original import convert_original_weights, save_checkpoint_atomically
    from .hub import make_model_card

    release_filename(name)  # refuses unknown names before any download
    folder = Path(cache_dir if cache_dir is not None else default_release_cache()) / name
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    weights = download_release_weights(name, revision=revision)
    logger.info("converting %s of %s into a FiT3DModel in %s", weights.name, RELEASE_REPO, folder)
    model, _ = convert_original_weights(name, weights, original=original, via=via or RELEASE_BACKBONES[name])
    card = make_model_card(
        model.config.backbone,
        feature_dim=model.config.feature_dim,
        training_data=f"ScanNet++ (the original FiT3D release's weights, {RELEASE_REPO}/{weights.name}, converted)",
    )
    save_checkpoint_atomically(model, folder, card=card, overwrite=True)
    return folder
