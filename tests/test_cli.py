"""`fit3d demo` and `fit3d export-dataset`, run through the real CLI entry point."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from datasets import load_dataset
from PIL import Image
from test_readers import make_scannetpp_root

from dataset_builders.scannetpp import FRAME_FEATURES, POINT_FEATURES
from fit3d_hf.cli import COMMANDS, main


def test_commands_are_registered_with_help(capsys):
    assert COMMANDS["demo"] == "demo" and COMMANDS["export-dataset"] == "export_dataset"
    with pytest.raises(SystemExit) as exit_info:
        main(["export-dataset", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--data_dir", "--output_dir", "--config", "--max_shard_size", "--overwrite"):
        assert flag in help_text
    assert "{frames,points}" in help_text


def test_export_dataset_writes_standalone_parquet(tmp_path, capsys):
    root = tmp_path / "root"
    info = make_scannetpp_root(root, np.random.default_rng(0))
    source_image = np.asarray(Image.open(root / "scenes" / "scene_a" / "images" / "DSC00000.JPG"))
    out = tmp_path / "export"
    argv = ["export-dataset", "--data_dir", str(root), "--output_dir", str(out), "--max_shard_size", "1KB"]
    assert main(argv + ["--writer_batch_size", "1"]) == 0
    assert "train: 4 shard(s)" in capsys.readouterr().out
    shards = sorted(p.name for p in (out / "data").iterdir())
    assert shards == [f"train-{i:05d}-of-00004.parquet" for i in range(4)] + [
        f"validation-{i:05d}-of-00002.parquet" for i in range(2)
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temporary folder left

    shutil.move(root, tmp_path / "moved")  # the export must not need the source files any more
    files = {split: str(out / "data" / f"{split}-*.parquet") for split in ("train", "validation")}
    dataset = load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache"))
    assert dataset["train"].features == FRAME_FEATURES
    assert dataset["train"]["image_id"] == ["DSC00000", "DSC00001", "DSC00000", "DSC00001"]
    first = dataset["train"][0]
    np.testing.assert_array_equal(np.asarray(first["image"]), source_image)
    np.testing.assert_allclose(first["world_to_camera"], info["scene_a"]["w2c"]["DSC00000"], atol=1e-6)
    raw = dataset["train"].with_format("arrow")[:1]["image"].to_pylist()[0]
    assert raw["bytes"] is not None and len(raw["bytes"]) > 100
    # the README's configs header makes the folder loadable by name too, and ScanNet++'s "val" split is named
    # "validation" however the files are loaded (datasets infers that name from val-* files)
    assert load_dataset(str(out), cache_dir=str(tmp_path / "cache2"))["validation"]["scene_id"] == [
        "val_c",
        "val_c",
    ]
    inferred = load_dataset(str(out / "data"), cache_dir=str(tmp_path / "cache4"))
    assert set(inferred) == {"train", "validation"}

    # an existing output is not touched without --overwrite
    shutil.move(tmp_path / "moved", root)
    assert main(argv) == 2  # a usage error: the remedy is --overwrite
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(f"fit3d export-dataset: error: {out} already exists")
    )
    assert len(list((out / "data").iterdir())) == 6
    assert main(argv + ["--overwrite", "--config", "points"]) == 0
    points = load_dataset(str(out), cache_dir=str(tmp_path / "cache3"))
    assert points["train"].features == POINT_FEATURES
    np.testing.assert_array_equal(
        points["validation"].with_format("numpy")[0]["xyz"], info["val_c"]["points"].astype(np.float32)
    )


def test_export_dataset_bad_input_leaves_nothing(tmp_path, capsys):
    root = tmp_path / "root"
    make_scannetpp_root(root, np.random.default_rng(1))
    (root / "scenes" / "val_c" / "images" / "DSC00001.JPG").unlink()
    assert main(["export-dataset", "--data_dir", str(root), "--output_dir", str(tmp_path / "out")]) == 1
    assert re.search(
        r"val_c/transforms_train.json, frames\[1\] \(DSC00001.JPG\): image .* does not exist",
        capsys.readouterr().err,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert (
        main(["export-dataset", "--data_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "out")])
        == 1
    )
    assert "none' is neither a file nor a folder" in capsys.readouterr().err  # read as a scene spec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
