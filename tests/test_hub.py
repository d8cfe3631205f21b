"""Model cards and Hub uploads, with HfApi.create_repo/create_commit patched: nothing reaches the network."""

import json
from unittest import mock

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from transformers import Dinov2Config

from fit3d_hf import FiT3DConfig, FiT3DModel
from fit3d_hf.cli import main as fit3d_main
from fit3d_hf.hub import FIT3D_CITATION, make_model_card, model_card_for_checkpoint, push_to_hub

ROWS = [
    {
        "task": "semantic segmentation",
        "dataset": "ScanNet++",
        "metric": "mIoU",
        "original": 41.25,
        "fit3d": 43.5,
    },
    {"task": "depth estimation", "dataset": "NYUv2", "metric": "RMSE", "original": 0.41, "fit3d": 0.385},
]


@pytest.fixture
def checkpoint(tmp_path):
    config = FiT3DConfig(
        backbone_config=Dinov2Config(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
        ),
        backbone="facebook/dinov2-small",
    )
    folder = tmp_path / "checkpoint"
    FiT3DModel(config).save_pretrained(folder)
    return folder


@pytest.fixture
def hub():
    """Patches the two HfApi calls push_to_hub makes and records what they were given."""
    with (
        mock.patch.object(HfApi, "create_repo", autospec=True) as create_repo,
        mock.patch.object(HfApi, "create_commit", autospec=True) as create_commit,
    ):
        create_commit.return_value = mock.Mock(commit_url="https://huggingface.co/user/fit3d/commit/abc")
        yield create_repo, create_commit


def _committed(create_commit):
    (call,) = create_commit.call_args_list
    operations = call.kwargs["operations"]
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    return call, {op.path_in_repo: op.path_or_fileobj for op in operations}


def test_model_card_metadata_table_and_citation(tmp_path):
    card = make_model_card(
        "facebook/dinov2-small", repo_id="user/fit3d-dinov2-small", feature_dim=768, metrics=ROWS,
        training={"learning_rate": 1e-5, "batch_size": 2},
    )  # fmt: skip
    data = card.data.to_dict()
    assert data["base_model"] == "facebook/dinov2-small"
    assert (data["license"], data["library_name"], data["pipeline_tag"]) == (
        "mit",
        "transformers",
        "image-feature-extraction",
    )
    assert {"fit3d", "3d-aware-fine-tuning"} <= set(data["tags"])
    results = data["model-index"][0]["results"]
    assert data["model-index"][0]["name"] == "user/fit3d-dinov2-small"
    assert [r["metrics"][0]["value"] for r in results] == [43.5, 0.385]
    assert [r["dataset"]["name"] for r in results] == ["ScanNet++", "NYUv2"]
    assert "| semantic segmentation | ScanNet++ | mIoU | 41.25 | 43.5 |" in card.text
    assert "| learning_rate | 1e-05 |" in card.text
    assert "768 channels: 384 from each backbone" in card.text
    assert "@inproceedings{yue2024improving" in card.text and FIT3D_CITATION in card.text
    assert 'AutoModel.from_pretrained("user/fit3d-dinov2-small", trust_remote_code=True)' in card.text
    card.save(tmp_path / "README.md")
    assert ModelCard.load(tmp_path / "README.md").data.to_dict() == data


def test_model_card_flat_metrics_and_bad_rows():
    card = make_model_card("facebook/dinov2-base", metrics={"val/loss": 0.125})
    assert "| val/loss | 0.125 |" in card.text and "model-index" not in card.data.to_dict()
    with pytest.raises(ValueError, match=r"metrics row 0 .* lacks \['original'\]"):
        make_model_card(
            "facebook/dinov2-base", metrics=[{"task": "t", "dataset": "d", "metric": "m", "fit3d": 1.0}]
        )


def test_model_card_for_checkpoint_reads_config(checkpoint, tmp_path):
    card = model_card_for_checkpoint(checkpoint, repo_id="user/x")
    assert card.data.base_model == "facebook/dinov2-small"
    assert "64 channels: 32 from each backbone" in card.text
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        model_card_for_checkpoint(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(ValueError, match="expected 'fit3d'"):
        model_card_for_checkpoint(tmp_path / "other")


def test_push_to_hub_commits_exactly_the_checkpoint_files(checkpoint, hub):
    create_repo, create_commit = hub
    (checkpoint / ".cache").mkdir()
    (checkpoint / ".cache" / "lock").write_text("local state")
    (checkpoint / "sub").mkdir()
    (checkpoint / "sub" / "notes.txt").write_text("kept")
    (checkpoint / "sub" / ".notes.txt.swp").write_text("editor state")  # hidden below the top too
    commit = push_to_hub(checkpoint, "user/fit3d", private=True, commit_message="first upload")

    assert commit.commit_url.endswith("/commit/abc")
    (repo_call,) = create_repo.call_args_list
    assert repo_call.args[1] == "user/fit3d"
    assert repo_call.kwargs["private"] is True and repo_call.kwargs["exist_ok"] is True
    call, files = _committed(create_commit)
    assert call.kwargs["repo_id"] == "user/fit3d" and call.kwargs["commit_message"] == "first upload"
    assert sorted(files) == [
        "config.json",
        "configuration_fit3d.py",
        "dense_features_fit3d.py",
        "model.safetensors",
        "modeling_fit3d.py",
        "preprocessor_config.json",
        "sub/notes.txt",
    ]
    assert files["model.safetensors"] == str(checkpoint / "model.safetensors")


def test_push_to_hub_refuses_pickles_and_missing_folders(checkpoint, tmp_path, hub):
    torch.save({"w": torch.zeros(1)}, checkpoint / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle-format files \\['pytorch_model.bin'\\]"):
        push_to_hub(checkpoint, "user/fit3d")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        push_to_hub(tmp_path / "missing", "user/fit3d")
    assert not hub[0].called and not hub[1].called


def test_push_command_writes_the_card_and_commits_it(checkpoint, tmp_path, hub, capsys):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(ROWS))
    argv = [
        "push",
        "--model_dir",
        str(checkpoint),
        "--repo_id",
        "user/fit3d",
        "--private",
        "--metrics_file",
        str(metrics),
    ]
    assert fit3d_main(argv) == 0
    card = ModelCard.load(checkpoint / "README.md")
    assert card.data.base_model == "facebook/dinov2-small"
    assert card.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == 43.5
    _, files = _committed(hub[1])
    assert sorted(files) == [
        "README.md",
        "config.json",
        "configuration_fit3d.py",
        "dense_features_fit3d.py",
        "model.safetensors",
        "modeling_fit3d.py",
        "preprocessor_config.json",
    ]
    assert hub[0].call_args.kwargs["private"] is True
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["repo_id"] == "user/fit3d"

    # An existing card is kept as it is.
    (checkpoint / "README.md").write_text("---\nlicense: apache-2.0\n---\nmine\n")
    assert fit3d_main(["push", "--model_dir", str(checkpoint), "--repo_id", "user/fit3d"]) == 0
    assert (checkpoint / "README.md").read_text().endswith("mine\n")


def test_push_command_adds_a_missing_image_processor_and_reports_an_offline_hub(checkpoint, hub, capsys):
    processor = checkpoint / "preprocessor_config.json"
    expected = json.loads(processor.read_text())
    processor.unlink()  # a checkpoint saved before FiT3DModel.save_pretrained wrote it
    assert fit3d_main(["push", "--model_dir", str(checkpoint), "--repo_id", "user/fit3d"]) == 0
    assert json.loads(processor.read_text()) == expected
    assert "preprocessor_config.json" in _committed(hub[1])[1]


def test_push_offline_is_one_line(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert fit3d_main(["push", "--model_dir", str(checkpoint), "--repo_id", "user/fit3d"]) == 1
    assert capsys.readouterr().err == (
        "fit3d push: error: cannot upload to user/fit3d: the Hub is unreachable because HF_HUB_OFFLINE is set; "
        "unset it and try again\n"
    )
