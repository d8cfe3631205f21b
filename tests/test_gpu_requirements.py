"""The CUDA rasterizer needs compute capability 8.0 (warp reductions, TF32 tensor cores): a build for older
architectures is skipped with the reason (not a compiler error that stops `pip install`), and on an older GPU
`render()` says why it renders with the reference instead of failing at the first kernel launch."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from fit3d_hf.render import _backend, backend

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "fit3d_build_requirements", ROOT / "rasterizer_cuda" / "build.py"
)
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


@pytest.mark.parametrize(
    ("arch_list", "capabilities"),
    [
        ("9.0", []),
        ("8.0;8.6;9.0a", []),
        ("8.6+PTX 9.0", []),
        ("Ampere;Hopper", []),
        (None, [(9, 0), (8, 6)]),
        ("", [(8, 0)]),
        ("12.0", [(7, 5)]),
    ],  # fmt: skip
)
def test_supported_architectures_build(arch_list, capabilities):
    assert build.architecture_problem(arch_list, capabilities) is None


@pytest.mark.parametrize(
    ("arch_list", "capabilities", "named"),
    [
        ("7.5;8.6", [], "(7.5)"),
        ("Turing Ampere", [], "(Turing)"),
        ("7.0+PTX;7.5;9.0", [(9, 0)], "(7.0+PTX, 7.5)"),
        (None, [(7, 5)], "compute capability 7.5;"),
        (None, [(9, 0), (6, 1)], "compute capability 6.1;"),
    ],  # fmt: skip
)
def test_older_architectures_are_refused_by_name(arch_list, capabilities, named):
    problem = build.architecture_problem(arch_list, capabilities)
    assert problem is not None and named in problem and "8.0" in problem


def test_no_gpu_and_no_architecture_list_asks_for_one():
    problem = build.architecture_problem(None, [])
    assert problem is not None and "TORCH_CUDA_ARCH_LIST" in problem and "no GPU is visible" in problem


def test_the_minimum_is_the_same_in_the_kernels_the_build_and_the_runtime():
    common = (ROOT / "rasterizer_cuda" / "common.h").read_text()
    major, minor = build.MIN_COMPUTE_CAPABILITY
    assert int(re.search(r"__CUDA_ARCH__ < (\d+)", common).group(1)) == 100 * major + 10 * minor
    assert _backend.MIN_COMPUTE_CAPABILITY == build.MIN_COMPUTE_CAPABILITY


def test_setup_warns_when_it_installs_without_the_cuda_rasterizer(monkeypatch):
    problem = "this machine's GPU has compute capability 7.5; the CUDA rasterizer needs 8.0 or newer"
    monkeypatch.setattr(build, "cuda_toolkit_problem", lambda: problem)
    monkeypatch.setattr(build, "_torch_has_cuda", lambda: True)
    with pytest.warns(UserWarning, match="installs without its CUDA rasterizer: this machine's GPU has"):
        extensions, _ = build.get_setuptools_extension(cuda=True)
    assert build.EXTENSION_NAME not in [extension.name for extension in extensions]


def test_setup_is_silent_about_cuda_for_a_cpu_only_torch(monkeypatch, recwarn):
    monkeypatch.setattr(build, "cuda_toolkit_problem", lambda: "torch 2.13.0+cpu was built without CUDA")
    monkeypatch.setattr(build, "_torch_has_cuda", lambda: False)
    extensions, _ = build.get_setuptools_extension(cuda=True)
    assert build.EXTENSION_NAME not in [extension.name for extension in extensions]
    assert not [w for w in recwarn if "CUDA rasterizer" in str(w.message)]


def test_an_older_gpu_gets_the_reference_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    _backend._load.cache_clear()
    try:
        assert _backend.load_extension() is None and backend("cuda") == "reference"
        reason = _backend.extension_error()
    finally:
        _backend._load.cache_clear()
    assert reason.startswith(
        "the CUDA rasterizer needs compute capability 8.0 or newer, and Tesla T4 has 7.5"
    )
    assert "install a CUDA toolkit" not in reason  # no build would help
