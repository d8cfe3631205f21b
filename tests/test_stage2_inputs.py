"""Stage II's inputs checked before it trains: scenes without a bundle are named (and can be skipped on request),
and a refused start leaves no output folder behind."""

from __future__ import annotations

import pytest
from backbone_helpers import tiny_stage2_workspace

from fit3d_hf.errors import MissingInputError
from fit3d_hf.finetuning import BackboneArguments, DataArguments, FinetuningArguments, load_frames, train
from fit3d_hf.lifting import lift_scene


@pytest.fixture(scope="module")
def half_lifted(tmp_path_factory):
    """One training and one validation scene; only the training scene is lifted (a short run)."""
    root = tmp_path_factory.mktemp("half-lifted")
    lift_args = tiny_stage2_workspace(root)
    train_scene = load_frames(root / "data", "train")["scene_id"][0]
    lift_scene(root / "data" / "scenes" / train_scene, lift_args, progress=False)
    validation_scene = load_frames(root / "data", "val")["scene_id"][0]
    return {"root": root, "validation_scene": validation_scene}


def _arguments(setup, output_dir, **data):
    root = setup["root"]
    return (
        BackboneArguments(backbone=str(root / "backbone")),
        DataArguments(frames=str(root / "data"), gaussians=str(root / "lifted"), consistency_pairs=1, **data),
        FinetuningArguments(
            output_dir=str(output_dir),
            max_train_steps=1,
            train_batch_size=1,
            checkpointing_steps=0,
            report_to="none",
        ),
    )


def test_scenes_without_bundles_are_named_or_skipped_on_request(half_lifted, tmp_path):
    scene = half_lifted["validation_scene"]
    with pytest.raises(
        MissingInputError,
        match=rf"no Gaussian bundle for 1 of the 2 scenes of the frames \({scene}\); lift them first .*--skip_scenes_without_bundles",
    ):
        train(*_arguments(half_lifted, tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()  # a refused start leaves no empty output folder
    metrics = train(*_arguments(half_lifted, tmp_path / "skipped", skip_scenes_without_bundles=True))
    assert (
        metrics["steps"] == 1 and "validation_loss" not in metrics
    )  # its only validation scene was left out
    assert (tmp_path / "skipped" / "fit3d" / "preprocessor_config.json").is_file()
