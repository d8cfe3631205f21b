"""Silent corruption: bundle checksums, checksummed checkpoints of both stages, and `fit3d verify`."""

import json
import logging
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fit3d_hf.checkpoints import (
    MANIFEST_FILENAME,
    load_torch_checkpoint,
    save_torch_checkpoint,
    verify_checkpoint_folder,
    verify_path,
)
from fit3d_hf.cli import main as fit3d_main
from fit3d_hf.errors import CorruptFileError, Fit3DError, MissingInputError
from fit3d_hf.gaussians import FeatureGaussians, load_bundle, read_bundle_metadata, save_bundle
from fit3d_hf.gaussians.bundle import CHECKSUMS_KEY, verify_bundle


def _bundle(folder, n=200, seed=0):
    rng = np.random.default_rng(seed)
    gaussians = FeatureGaussians.from_points(
        rng.normal(size=(n, 3)), rng.integers(0, 255, (n, 3), dtype=np.uint8), 8
    )
    return save_bundle(folder, gaussians, torch.randn(16, 8, 3, 3), scene_id="scene", backbone="b")


def _data_start(path) -> int:
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def _same_content(a, b) -> bool:
    names = ("means", "quats", "log_scales", "opacities", "features", "decoder_weight", "sh")
    return a.metadata == b.metadata and all(torch.equal(getattr(a, n), getattr(b, n)) for n in names)


def test_bundles_record_checksums_of_every_tensor_and_of_the_metadata(tmp_path):
    path = _bundle(tmp_path)
    checksums = read_bundle_metadata(path)[CHECKSUMS_KEY]
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
    assert set(checksums) == names | {"__metadata__"}
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in checksums.values())
    report = verify_bundle(path)
    assert report["checksummed"] and report["tensors"] == len(names)
    assert torch.equal(load_bundle(path, verify=True).features, load_bundle(path).features)


def test_a_flipped_byte_in_every_tensor_is_caught_by_verify(tmp_path):
    """The case the issue measured (flipped tensor bytes loaded silently): each tensor, one flip."""
    path = _bundle(tmp_path)
    original = path.read_bytes()
    start = _data_start(path)
    with open(path, "rb") as handle:
        header = json.loads(handle.read(start)[8:])
    header.pop("__metadata__")
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        damaged = bytearray(original)
        damaged[start + (begin + end) // 2] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(
            CorruptFileError, match=rf"gaussians.safetensors: tensor '{name}' fails its checksum"
        ):
            verify_bundle(path)
        with pytest.raises(CorruptFileError, match="fails its checksum"):
            load_bundle(path, include_sh=True, verify=True)
    path.write_bytes(original)
    assert verify_bundle(path)["checksummed"]


def test_300_randomly_corrupted_copies_never_load_as_something_else(tmp_path):
    """The experiment of the issue, repeated with verification: 300 copies of a bundle, each truncated, its
    header damaged or bytes flipped anywhere. Each copy either raises a named error or loads exactly the
    original content (a flip of header padding whitespace changes nothing)."""
    path = _bundle(tmp_path / "original")
    reference = load_bundle(path, include_sh=True)
    original = path.read_bytes()
    start = _data_start(path)
    rng = random.Random(1234)
    copy = tmp_path / "copy" / "gaussians.safetensors"
    copy.parent.mkdir()
    outcomes = {"refused": 0, "identical": 0}
    for trial in range(300):
        data = bytearray(original)
        kind = trial % 3
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:
            data[rng.randrange(start)] ^= 1 << rng.randrange(8)
        else:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(start, len(data))] ^= 1 << rng.randrange(8)
        copy.write_bytes(bytes(data))
        try:
            loaded = load_bundle(copy, include_sh=True, verify=True)
        except Fit3DError as error:
            assert "gaussians.safetensors" in str(error)
            outcomes["refused"] += 1
            continue
        assert _same_content(loaded, reference), (
            f"trial {trial} (kind {kind}) loaded different content silently"
        )
        outcomes["identical"] += 1
    print(f"corrupted bundle copies: {outcomes}")  # noqa: T201
    assert outcomes["refused"] >= 290


def test_bundles_without_checksums_load_with_one_notice(tmp_path, caplog):
    import fit3d_hf.gaussians.bundle_integrity as integrity_module

    for scene in ("a", "b"):
        path = _bundle(tmp_path / scene)
        with safe_open(str(path), framework="pt") as handle:
            metadata = {k: v for k, v in handle.metadata().items() if k != CHECKSUMS_KEY}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(CorruptFileError, match="a version-4 bundle without its checksums"):
            load_bundle(path, verify=True)  # version 4 always has them: their absence is damage
        metadata["format_version"] = "3"  # as written before checksums existed
        save_file(tensors, str(path), metadata=metadata)
    integrity_module._notice_unverifiable.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fit3d_hf.gaussians.bundle_integrity"):
        first = load_bundle(tmp_path / "a", verify=True)
        load_bundle(tmp_path / "b", verify=True)
    notices = [r for r in caplog.records if "without verification" in r.getMessage()]
    assert len(notices) == 1
    assert len(first) == 200 and verify_bundle(tmp_path / "b")["checksummed"] is False


def test_stage1_checkpoints_catch_flipped_bytes(tmp_path):
    state = {
        "iteration": 40,
        "gaussians": {"means": torch.randn(500, 3)},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(500, 3)}}},
    }
    path = save_torch_checkpoint(state, tmp_path / "checkpoint.pt")
    loaded = load_torch_checkpoint(path)
    assert loaded["iteration"] == 40 and torch.equal(
        loaded["gaussians"]["means"], state["gaussians"]["means"]
    )
    data = bytearray(path.read_bytes())
    needle = state["gaussians"]["means"][100, 1].numpy().tobytes()
    offset = bytes(data).index(needle)
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(
        CorruptFileError, match=r"checkpoint.pt: tensors \['gaussians/means'\] fail their checksums"
    ):
        load_torch_checkpoint(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptFileError, match="checkpoint.pt: not a readable checkpoint"):
        load_torch_checkpoint(path)
    with pytest.raises(MissingInputError):
        load_torch_checkpoint(tmp_path / "none.pt")


def _stage2_checkpoint(folder):
    """A Stage II checkpoint folder as `save_state_atomically` leaves it (files + manifest)."""
    from fit3d_hf.checkpoints import _manifest

    folder.mkdir(parents=True)
    save_file({"w": torch.randn(64)}, str(folder / "model.safetensors"))
    torch.save({"state": {}}, folder / "optimizer.bin")
    (folder / MANIFEST_FILENAME).write_text(json.dumps(_manifest(folder)))
    return folder


def test_stage2_checkpoint_manifest_catches_damage(tmp_path):
    folder = _stage2_checkpoint(tmp_path / "checkpoint-4")
    assert verify_checkpoint_folder(folder) == {
        "path": str(folder), "files": 2, "checksummed": True,
        "bytes": (folder / "model.safetensors").stat().st_size + (folder / "optimizer.bin").stat().st_size,
    }  # fmt: skip
    data = bytearray((folder / "optimizer.bin").read_bytes())
    data[-30] ^= 0x04
    (folder / "optimizer.bin").write_bytes(bytes(data))
    with pytest.raises(
        CorruptFileError, match=r"checkpoint-4: files \['optimizer.bin'\] fail their checksums"
    ):
        verify_checkpoint_folder(folder)
    (folder / "optimizer.bin").unlink()
    with pytest.raises(CorruptFileError, match=r"lacks the files \['optimizer.bin'\]"):
        verify_checkpoint_folder(folder)


def test_fit3d_verify_checks_a_whole_output_folder(tmp_path, capsys):
    good = _bundle(tmp_path / "out" / "scene_a")
    bad = _bundle(tmp_path / "out" / "scene_b", seed=1)
    data = bytearray(bad.read_bytes())
    data[-5] ^= 0xFF
    bad.write_bytes(bytes(data))
    save_torch_checkpoint({"x": torch.ones(3)}, tmp_path / "out" / "scene_c" / "checkpoint.pt")
    _stage2_checkpoint(tmp_path / "out" / "run" / "checkpoint-2")
    (tmp_path / "out" / "run" / ".partial-checkpoint-4").mkdir()  # a save cut short: not a checkpoint
    assert fit3d_main(["verify", str(tmp_path / "out")]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "4 item(s): 3 ok, 0 unverified (no checksums), 1 damaged"
    assert (
        sum(
            line.startswith("DAMAGED") and "scene_b" in line and "fails its checksum" in line
            for line in lines
        )
        == 1
    )
    assert any(line.startswith("ok") and str(good) in line for line in lines)
    assert fit3d_main(["verify", str(good), str(tmp_path / "out" / "run" / "checkpoint-2"), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(r["kind"], r["ok"], r["checksummed"]) for r in records] == [
        ("bundle", True, True),
        ("stage2-checkpoint", True, True),
    ]
    with pytest.raises(MissingInputError, match="does not exist"):
        verify_path(tmp_path / "nothing")
