"""Stage II's `--torch_compile`: the compiled run trains as the eager one (same losses with dynamo's 'eager'
backend on the CPU), and its checkpoints and saved models keep the eager names (no `_orig_mod.`)."""

from __future__ import annotations

import json

import pytest
import torch
from backbone_helpers import tiny_stage2_workspace
from safetensors.torch import load_file

from fit3d_hf.cli import parse_args
from fit3d_hf.errors import UsageError
from fit3d_hf.finetuning import BackboneArguments, DataArguments, FinetuningArguments, train
from fit3d_hf.finetuning.backbone_setup import compile_backbone, uncompile_backbone
from fit3d_hf.lifting import lift_scene, resolve_scene_list


@pytest.fixture(scope="module")
def lifted(tmp_path_factory):
    """One training and one validation scene of 4 views, both lifted by a short run of the tiny backbone."""
    root = tmp_path_factory.mktemp("compile")
    lift_args = tiny_stage2_workspace(root)
    for scene in resolve_scene_list(str(root / "data")):
        lift_scene(scene, lift_args, progress=False)
    return root


def _train(root, output_dir, **options):
    return train(
        BackboneArguments(backbone=str(root / "backbone")),
        DataArguments(frames=str(root / "data"), gaussians=str(root / "lifted"), consistency_pairs=1),
        FinetuningArguments(
            output_dir=str(output_dir),
            learning_rate=1e-3,
            max_train_steps=2,
            train_batch_size=2,
            checkpointing_steps=2,
            report_to="none",
            seed=1,
            **options,
        ),
    )


def test_compiled_run_trains_as_the_eager_one_and_keeps_the_weight_names(lifted, tmp_path):
    from torch._dynamo.utils import counters

    eager = _train(lifted, tmp_path / "eager")
    counters.clear()
    compiled = _train(lifted, tmp_path / "compiled", torch_compile=True, torch_compile_backend="eager")
    assert counters["stats"]["unique_graphs"] > 0  # dynamo did capture the training forward

    assert (eager["steps"], compiled["steps"]) == (2, 2)
    for key in ("train_loss_first", "train_loss_last", "validation_loss_before", "validation_loss"):
        assert compiled[key] == pytest.approx(eager[key], abs=1e-5), key
    assert eager["torch_compile"] is False and "torch_compile_backend" not in eager
    saved = json.loads((tmp_path / "compiled" / "metrics.json").read_text())
    assert (saved["torch_compile"], saved["torch_compile_backend"], saved["torch_compile_mode"]) == (
        True,
        "eager",
        None,
    )

    # The checkpoint (accelerate's model.safetensors) and both saved models: the eager names and weights.
    for name in ("checkpoint-2/model.safetensors", "finetuned/model.safetensors", "fit3d/model.safetensors"):
        first, second = load_file(tmp_path / "eager" / name), load_file(tmp_path / "compiled" / name)
        assert not [key for key in second if "_orig_mod" in key], name
        assert sorted(first) == sorted(second), name
        for key in first:
            torch.testing.assert_close(second[key], first[key], rtol=0, atol=1e-5)


def test_compile_backbone_is_in_place_and_undone():
    module = torch.nn.Linear(3, 2)
    keys = list(module.state_dict())
    assert compile_backbone(module, "eager") is module
    assert module._compiled_call_impl is not None and list(module.state_dict()) == keys
    x = torch.rand(4, 3)
    torch.testing.assert_close(module(x), module.forward(x))
    assert uncompile_backbone(module)._compiled_call_impl is None


def test_unknown_backend_or_mode_is_a_usage_error():
    import torch._dynamo

    with pytest.raises(UsageError, match="--torch_compile_backend must be one of") as error:
        FinetuningArguments(output_dir="o", torch_compile=True, torch_compile_backend="nope")
    assert "'nope'" in str(error.value)
    assert all(backend in str(error.value) for backend in torch._dynamo.list_backends())
    with pytest.raises(
        UsageError, match="--torch_compile_mode must be one of .*max-autotune.*; got 'fastest'"
    ):
        FinetuningArguments(output_dir="o", torch_compile=True, torch_compile_mode="fastest")
    with pytest.raises(UsageError, match="need --torch_compile"):
        FinetuningArguments(output_dir="o", torch_compile_backend="eager")
    args = FinetuningArguments(output_dir="o", torch_compile=True, torch_compile_mode="max-autotune")
    assert (args.torch_compile_backend, args.torch_compile_mode) == ("inductor", "max-autotune")


def test_the_flags_on_the_command_line(capsys):
    argv = ["--backbone", "b", "--frames", "f", "--gaussians", "g", "--output_dir", "o"]
    classes = [BackboneArguments, DataArguments, FinetuningArguments]
    *_, args = parse_args(
        "finetune", None, classes, [*argv, "--torch_compile", "--torch_compile_backend", "eager"]
    )
    assert (args.torch_compile, args.torch_compile_backend, args.torch_compile_mode) == (True, "eager", None)
    with pytest.raises(SystemExit) as exit_:
        parse_args("finetune", None, classes, [*argv, "--torch_compile", "--torch_compile_backend", "nope"])
    assert exit_.value.code == 2 and "--torch_compile_backend must be one of" in capsys.readouterr().err
