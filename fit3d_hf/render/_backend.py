"""Finding the CUDA extension: the prebuilt `fit3d_hf._C`, else a JIT build, else None (reference backend).

Nothing is compiled at import: the first call of `load_extension()` tries, and its outcome (module or
failure) is cached for the process, so a persistent build failure fails fast. The build recipe is
`rasterizer_cuda/build.py` (shared with setup.py), so this only works from a source checkout or an
editable install when no prebuilt extension exists.

Environment: `FIT3D_HF_NO_JIT=1` disables the JIT build.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path
from types import ModuleType

__all__ = ["extension_error", "load_extension", "require_extension"]

logger = logging.getLogger(__name__)

_BUILD_FILE = Path(__file__).resolve().parents[2] / "rasterizer_cuda" / "build.py"
_NO_DEVICE = "no CUDA device is available"
_FIX = (
    "To fix: install a CUDA toolkit whose major version matches torch.version.cuda, put nvcc on PATH "
    "(or set CUDA_HOME), and build once with "
    "`TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .` "
    "(9.0 for H100; use your GPU's compute capability); or call render(..., backend='reference')."
)


def _load_build_module() -> ModuleType | None:
    if not _BUILD_FILE.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_fit3d_hf_build", _BUILD_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, reason); cached, so each process tries once."""
    try:
        from fit3d_hf import _C  # prebuilt by setup.py

        return _C, None
    except ImportError:
        pass
    import torch

    if os.environ.get("FIT3D_HF_NO_JIT", "0") == "1":
        return None, "no prebuilt extension and FIT3D_HF_NO_JIT=1 disables the JIT build"
    if not torch.cuda.is_available():
        return None, _NO_DEVICE
    build = _load_build_module()
    if build is None:
        return (
            None,
            f"no prebuilt extension (fit3d_hf._C) and no sources at {_BUILD_FILE.parent} for a JIT build",
        )
    problem = build.cuda_toolkit_problem()
    if problem is not None:
        return None, f"no prebuilt extension and the JIT build is impossible: {problem}"
    from torch.utils.cpp_extension import load

    params = build.get_build_parameters()
    logger.warning("Compiling the CUDA rasterizer for this machine (first use only; about a minute)...")
    try:
        module = load(
            name=build.JIT_NAME,
            sources=params["sources"],
            extra_include_paths=params["include_dirs"],
            extra_cflags=params["extra_cflags"],
            extra_cuda_cflags=params["extra_cuda_cflags"],
        )
    except Exception as exc:  # any compiler/linker failure: report it once, fall back to the reference
        return None, f"the JIT build of the CUDA rasterizer failed: {exc}"
    return module, None


def load_extension() -> ModuleType | None:
    """The CUDA extension module, or None where it is unavailable (see `extension_error()`)."""
    return _load()[0]


def extension_error() -> str | None:
    """Why the extension is unavailable, with how to fix it; None when it loaded."""
    reason = _load()[1]
    if reason is None or reason == _NO_DEVICE:
        return reason
    return f"{reason}. {_FIX}"


def require_extension() -> ModuleType:
    """The CUDA extension, or a RuntimeError that says why it is missing and how to fix it."""
    module = load_extension()
    if module is None:
        raise RuntimeError(f"The CUDA rasterizer is unavailable: {extension_error()}")
    return module
