"""`fit3d demo` end to end at a smaller size: every artefact exists and the report's numbers come from the run."""

import json

import pytest
from transformers import AutoModel

import fit3d_hf  # noqa: F401
from fit3d_hf.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo") / "out"
    argv = ["demo", "--output_dir", str(output_dir), "--seed", "0", "--num_views", "16", "--lift_iterations", "400",
            "--finetune_steps", "24", "--probe_steps", "40", "--width", "64", "--height", "48"]  # fmt: skip
    assert main(argv) == 0
    return output_dir


def test_demo_writes_every_artefact(demo):
    for path in [
        "report.md", "report.json", "features_pca.png", "fit3d/config.json", "fit3d/model.safetensors", "fit3d/README.md",
        "finetune/finetuned/config.json", "eval_correspondence/results.json", "eval_segmentation/results.json",
        "eval_normals/results.json", "data/scenes/synth01000/normals/DSC00000.png",
        "data/metadata/train_samples.txt", "raw/splits/nvs_sem_train.txt",
    ]:  # fmt: skip
        assert (demo / path).is_file(), path
    scenes = sorted(p.name for p in (demo / "gaussians").iterdir())
    assert scenes == ["synth00000", "synth00001", "synth01000"]
    for scene in scenes:
        assert (demo / "gaussians" / scene / "gaussians.safetensors").is_file()
        assert (demo / "gaussians" / scene / "preview_rgb.png").is_file()
    model = AutoModel.from_pretrained(demo / "fit3d")
    assert type(model).__name__ == "FiT3DModel"


def test_report_numbers_come_from_the_run(demo):
    report = json.loads((demo / "report.json").read_text())
    text = (demo / "report.md").read_text()
    finetune = json.loads((demo / "finetune" / "metrics.json").read_text())
    assert report["finetuning"]["consistency_after"] == finetune["consistency_after"]
    assert f"{finetune['consistency_before']:.3f} before, {finetune['consistency_after']:.3f} after" in text
    for scene in report["lifting"]:
        metrics = json.loads((demo / "gaussians" / scene["scene_id"] / "metrics.json").read_text())
        assert f"| {scene['scene_id']} | {metrics['num_gaussians']} | {metrics['psnr_train']:.2f} |" in text
    probe = json.loads((demo / "eval_segmentation" / "results.json").read_text())
    reported = {row["variant"]: row for row in report["evaluation"]["segmentation"]["rows"]}
    assert [row["variant"] for row in probe["rows"]] == list(reported) == ["original", "finetuned", "fit3d"]
    for row in probe["rows"]:
        assert (reported[row["variant"]]["mIoU"], reported[row["variant"]]["aAcc"]) == (
            row["mIoU"],
            row["aAcc"],
        )
    table = [
        line
        for line in (demo / "eval_segmentation" / "results.md").read_text().splitlines()
        if line.startswith("|")
    ]
    assert table and all(line in text for line in table)  # the probe's own table, in the report


def test_report_includes_the_normals_probe(demo):
    """The surface-normal probe on the synthetic scenes' analytic normals, original vs fine-tuned vs FiT3D."""
    results = json.loads((demo / "eval_normals" / "results.json").read_text())
    assert [row["name"] for row in results["rows"]] == ["original", "fine-tuned", "FiT3D"]
    text = (demo / "report.md").read_text()
    assert (
        "### normals" in text
        and "| features | channels | mean ↓ | median ↓ | 11.25° ↑ | 22.5° ↑ | 30° ↑ |" in text
    )
    for row in results["rows"]:
        assert (
            0 < row["mean"] < 90 and row["num_pixels"] > 0
        )  # a trained head beats the 90° of an orthogonal guess
        assert f"| {row['name']} | {row['channels']} | {row['mean']:.2f}° | {row['median']:.2f}° |" in text


def test_finetuning_improves_multiview_consistency_on_held_out_views(demo):
    report = json.loads((demo / "report.json").read_text())
    assert report["consistency_improved"] is True
    assert report["finetuning"]["consistency_after"] > report["finetuning"]["consistency_before"] + 0.05
    assert "fine-tuning improved multi-view consistency" in (demo / "report.md").read_text()


def test_notebook_runs_on_the_demo_model(demo, tmp_path, monkeypatch):
    """The notebook is executed end to end (nbclient), so it never goes stale."""
    from pathlib import Path

    import nbclient
    import nbformat

    notebook_path = Path(__file__).parents[1] / "notebooks" / "fit3d_demo.ipynb"
    notebook = nbformat.read(notebook_path, as_version=4)
    monkeypatch.setenv("FIT3D_MODEL", str(demo / "fit3d"))
    nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(notebook_path.parent)}},
    ).execute()
    outputs = [
        "".join(o.get("text", "") for o in cell.get("outputs", []))
        for cell in notebook.cells
        if cell.cell_type == "code"
    ]
    assert "FiT3DModel with backbone dinov2" in outputs[0]
    assert (
        "original (1, 64, 60, 80) fine-tuned (1, 64, 60, 80) FiT3D (1, 128, 60, 80)" in outputs[1]
    )  # 320x240 examples, patch 4
    assert "similarity at the centre patch: [1.0, 1.0]" in outputs[-1]
    figures = [
        o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(figures) == 3  # PCA, K-Means and similarity plots
