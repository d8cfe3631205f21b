"""Real weights from the original release (yuanwenyue/FiT3D), offline: a fake Hub cache holds tiny random weights
in the release's timm layout under its repo and file names, and the Space and `fit3d convert-original --from-hub`
must find, convert and cache them through hf_hub_download, with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_backbones import TINY, _to_timm_state_dict
from transformers import Dinov2Config, Dinov2Model

from fit3d_hf.errors import UsageError
from fit3d_hf.release import RELEASE_BACKBONES, RELEASE_REPO, release_filename

REPO = Path(__file__).resolve().parents[1]

# Runs with HF_HUB_CACHE pointing at the fake cache (huggingface_hub reads it at import).
_SCRIPT = """
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
from space_helpers import load_space_app
from fit3d_hf.backbones import DenseFeatureExtractor
from fit3d_hf.cli import main
from transformers import AutoModel

work = Path(sys.argv[2])
app = load_space_app()
entry = app.ModelEntry("FiT3D DINOv2-small", "fit3d-hf/fit3d-dinov2-small", "", "dinov2_small")
registry = app.load_models([entry], demo_model_dir=None, release_cache=work / "converted")
results = {"labels": list(registry.models), "failures": [m for _, m in registry.failures],
           "offline": [e.label for e in registry.offline], "status": app._status_markdown(registry)}
model = registry.models.get("FiT3D DINOv2-small")
images = torch.rand(1, 3, 28, 42)
if model is not None:
    with torch.no_grad():
        output = model.model(images)
        for name in ("original", "finetuned"):
            # the short name's backbones resample position embeddings as timm does (the original's)
            reference = DenseFeatureExtractor(AutoModel.from_pretrained(work / name), pos_embed_interpolation="timm")(images)
            results[name] = float((getattr(output, name + "_features") - reference).abs().max())
results["cached"] = sorted(p.name for p in (work / "converted" / "dinov2_small").iterdir())
# A second start needs neither the release file nor the Hub: the converted model is cached.
(Path(sys.argv[3])).unlink()
again = app.load_models([entry], demo_model_dir=None, release_cache=work / "converted")
results["again"] = list(again.models)
results["cli_missing_file"] = main(["convert-original", "--from-hub", "dinov2_reg_small", "--output_dir", str(work / "reg")])
print(json.dumps(results))
"""


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes | Path]) -> Path:
    """Lays out `cache` as huggingface_hub's cache: models--org--name/snapshots/<revision>/<file>, refs/main."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    work = tmp_path_factory.mktemp("release")
    config = Dinov2Config(**TINY, image_size=28, patch_size=14)
    torch.manual_seed(0)
    original, finetuned = Dinov2Model(config).eval(), Dinov2Model(config).eval()
    original.save_pretrained(work / "original")
    finetuned.save_pretrained(work / "finetuned")
    weights = work / "dinov2_small_finetuned.pth"
    torch.save(_to_timm_state_dict(finetuned), weights)  # the release's layout: a timm state dict
    cache = work / "hub"
    release = _fake_hub_cache(cache, RELEASE_REPO, {release_filename("dinov2_small"): weights})
    _fake_hub_cache(cache, "facebook/dinov2-small", {
        name: work / "original" / name for name in ("config.json", "model.safetensors")})  # fmt: skip
    return {"work": work, "cache": cache, "release_file": release / release_filename("dinov2_small")}


def test_space_builds_missing_models_from_the_release_offline(fake_hub):
    work = fake_hub["work"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(fake_hub["cache"]),
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(REPO / "tests"), str(work), str(fake_hub["release_file"])],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert (
        results["labels"] == ["FiT3D DINOv2-small"] and results["failures"] == [] and results["offline"] == []
    )
    assert results["status"] == ""  # nothing to report: the real model loaded
    assert results["original"] < 1e-5 and results["finetuned"] < 1e-5  # the release's weights, converted
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(
        results["cached"]
    )
    assert results["again"] == ["FiT3D DINOv2-small"]  # from the cache, without the release file
    assert (
        results["cli_missing_file"] == 1
    )  # dinov2_reg_small is not in the fake cache, and the Hub is offline


def test_convert_original_from_hub_command(fake_hub, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(fake_hub["cache"])}
    env.pop("FIT3D_DEBUG", None)
    if not fake_hub["release_file"].exists():  # the Space test removed it to prove the cache is used
        torch.save(
            _to_timm_state_dict(Dinov2Model.from_pretrained(fake_hub["work"] / "finetuned")),
            fake_hub["release_file"],
        )
    fit3d = [sys.executable, "-m", "fit3d_hf.cli", "convert-original"]
    result = subprocess.run([*fit3d, "--from-hub", "dinov2_small", "--output_dir", str(tmp_path / "out")],
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["backbone"] == "facebook/dinov2-small" and summary["changed_tensors"] > 0
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    result = subprocess.run([*fit3d, "--from-hub", "clip_base", "--output_dir", str(tmp_path / "clip")],
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"fit3d convert-original: error: clip_base_finetuned.pth of the original FiT3D release ({RELEASE_REPO}) is "
        f"not in the Hub cache ({fake_hub['cache']}) and the Hub is unreachable (HF_HUB_OFFLINE is set)"
    )
    assert not (tmp_path / "clip").exists()


def test_from_hub_replaces_backbone_and_weights(capsys):
    from fit3d_hf.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["convert-original", "--from-hub", "dinov2_small", "--weights", "w.pth", "--output_dir", "o"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "fit3d convert-original: error: --from_hub names the backbone and its weights: leave out --backbone and --weights"
    )


def test_release_names_are_checked_before_any_download():
    assert list(RELEASE_BACKBONES) == [
        "dinov2_small",
        "dinov2_reg_small",
        "clip_base",
        "mae_base",
        "deit3_base",
    ]
    with pytest.raises(UsageError, match="'dinov2_large' is not a backbone of the original FiT3D release"):
        release_filename("dinov2_large")
