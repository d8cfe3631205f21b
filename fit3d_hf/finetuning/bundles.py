"""The Stage I bundles Stage II trains against: where each scene's lies, and the checks made before training
(every scene has one, made with this backbone) or the frames left out (`--skip_scenes_without_bundles`)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import MissingInputError
from ..gaussians import BundleMismatchError
from ..gaussians.bundle import check_provenance
from ..gaussians.cache import bundle_path

__all__ = [
    "bundle_path",
    "check_frames_against_gaussians",
    "check_gaussians_dir",
    "drop_scenes_without_bundles",
    "scenes_without_bundles",
]

logger = logging.getLogger(__name__)


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
    scene_ids,
    gaussians_dir,
    backbone_dim: int,
    feature_dim: int | None = None,
    *,
    provenance: dict | None = None,
    allow_backbone_mismatch: bool = False,
) -> None:
    """Refuses, before training, frames whose scene has no bundle or a bundle for another backbone: another size,
    or (with `provenance`, `DenseFeatureExtractor.provenance()`) other weights, model type, normalisation, resize
    rule or position-embedding resampling. `allow_backbone_mismatch` turns the latter into a warning."""
    from ..gaussians import read_bundle_metadata

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
            raise BundleMismatchError(
                f"{bundle_path(gaussians_dir, scene_id)} has feature dim {metadata['feature_dim']}, expected {feature_dim}"
            )
        differences = check_provenance(metadata, provenance) if provenance else []
        if differences:
            message = (
                f"{bundle_path(gaussians_dir, scene_id)} was lifted with another backbone than the one being "
                f"fine-tuned: {'; '.join(differences)}"
            )
            if not allow_backbone_mismatch:
                raise BundleMismatchError(
                    f"{message}. Lift the scenes with this backbone, or pass --allow_backbone_mismatch"
                )
            if not warned:  # once, for the first such scene
                logger.warning("%s (--allow_backbone_mismatch: training anyway)", message)
                warned = True


def drop_scenes_without_bundles(train_frames, validation_frames, gaussians_dir):
    """`--skip_scenes_without_bundles`: the frames whose scene has a bundle (at least one training frame)."""
    kept = []
    for name, frames in (("training", train_frames), ("validation", validation_frames)):
        if frames is None:
            kept.append(None)
            continue
        missing = set(scenes_without_bundles(frames["scene_id"], gaussians_dir))
        if missing:
            frames = frames.filter(
                lambda scene_id, missing=missing: scene_id not in missing, input_columns="scene_id"
            )
            logger.info(
                "leaving out the %s frames of %d scene(s) without a bundle: %s",
                name,
                len(missing),
                ", ".join(sorted(missing)[:5]),
            )
        kept.append(
            frames if len(frames) or name == "training" else None
        )  # no validation frames: no validation
    if len(kept[0]) == 0:
        raise MissingInputError(
            f"{gaussians_dir} has a Gaussian bundle for none of the training frames' scenes"
        )
    return kept[0], kept[1]
