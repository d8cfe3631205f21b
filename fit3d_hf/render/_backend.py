"""Finding the compiled rasterizers: the CUDA extension (`fit3d_hf._C`) and the CPU extension
(`fit3d_hf._C_cpu`), each prebuilt by setup.py, else built on first use (JIT), else None (the PyTorch
reference serves).

Nothing is compiled at import: the first call of `load_extension()` / `load_cpu_extension()` tries, and its
outcome (module or failure) is cached for the process, so a persistent build failure fails fast. The build
recipe is `rasterizer_cuda/build.py` (shared with setup.py), so the JIT build only works from a source
checkout or an editable install. The two extensions expose the same functions with the same signatures;
`extension_for(device)` picks the one for a tensor's device.

Environment: `FIT3D_HF_NO_JIT=1` disables the JIT builds.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from pathlib import Path
from types import ModuleType

__all__ = [
    "cpu_extension_error",
    "extension_error",
    "extension_for",
    "load_cpu_extension",
    "load_extension",
    "require_extension",
]

logger = logging.getLogger(__name__)

_BUILD_FILE = Path(__file__).resolve().parents[2] / "rasterizer_cuda" / "build.py"
_NO_DEVICE = "no CUDA device is available"
# The oldest GPUs the CUDA kernels run on (rasterizer_cuda/build.py has the same value, and says why).
MIN_COMPUTE_CAPABILITY = (8, 0)
_UNSUPPORTED_GPU = "the CUDA rasterizer needs compute capability"
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
    import torch

    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if capability is not None and capability < MIN_COMPUTE_CAPABILITY:
        return None, (
            f"{_UNSUPPORTED_GPU} {'.'.join(map(str, MIN_COMPUTE_CAPABILITY))} or newer, and "
            f"{torch.cuda.get_device_name()} has {'.'.join(map(str, capability))}; render on the CPU (the CPU "
            "backend) or with backend='reference'"
        )
    try:
        from fit3d_hf import _C  # prebuilt by setup.py

        return _C, None
    except ImportError:
        pass

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
            extra_ldflags=params["extra_ldflags"],
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
    if reason is None or reason == _NO_DEVICE or reason.startswith(_UNSUPPORTED_GPU):
        return reason
    return f"{reason}. {_FIX}"


def require_extension() -> ModuleType:
    """The CUDA extension, or a RuntimeError that says why it is missing and how to fix it."""
    module = load_extension()
    if module is None:
        raise RuntimeError(f"The CUDA rasterizer is unavailable: {extension_error()}")
    return module


_CPU_FIX = (
    "To fix: install a C++ compiler (g++) and ninja, and build once with "
    "`pip install --no-build-isolation -e .`; or call render(..., backend='reference')."
)


@functools.lru_cache(maxsize=1)
def _load_cpu() -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, reason) for the CPU extension; cached, so each process tries once."""
    prebuilt_error = None
    if importlib.util.find_spec("fit3d_hf._C_cpu") is not None:  # prebuilt by setup.py
        try:
            return importlib.import_module("fit3d_hf._C_cpu"), None
        except ImportError as exc:  # present but unloadable (e.g. built against another torch)
            prebuilt_error = str(exc)
    if os.environ.get("FIT3D_HF_NO_JIT", "0") == "1":
        prebuilt = (
            "no prebuilt CPU extension"
            if prebuilt_error is None
            else f"the prebuilt CPU extension does not load ({prebuilt_error})"
        )
        return None, f"{prebuilt} and FIT3D_HF_NO_JIT=1 disables the JIT build"
    build = _load_build_module()
    if build is None:
        return None, f"no prebuilt CPU extension (fit3d_hf._C_cpu) and no sources at {_BUILD_FILE.parent}"
    problem = build.cpu_toolchain_problem()
    if problem is not None:
        return None, f"no prebuilt CPU extension and the JIT build is impossible: {problem}"
    from torch.utils.cpp_extension import load

    params = build.get_cpu_build_parameters()
    if prebuilt_error is not None:
        logger.warning(
            "The prebuilt CPU rasterizer does not load (%s); compiling it for this machine.", prebuilt_error
        )
    logger.warning(
        "Building the CPU rasterizer for this machine if needed (first use only; about a minute)..."
    )
    try:
        module = load(
            name=build.CPU_JIT_NAME,
            sources=params["sources"],
            extra_include_paths=params["include_dirs"],
            extra_cflags=params["extra_cflags"],
            extra_ldflags=params["extra_ldflags"],
        )
    except Exception as exc:  # any compiler/linker failure (or no ninja): report it once, use the reference
        return None, f"the JIT build of the CPU rasterizer failed: {exc}"
    return module, None


def load_cpu_extension() -> ModuleType | None:
    """The CPU extension module, or None where it is unavailable (see `cpu_extension_error()`)."""
    return _load_cpu()[0]


def cpu_extension_error() -> str | None:
    """Why the CPU extension is unavailable, with how to fix it; None when it loaded."""
    reason = _load_cpu()[1]
    return None if reason is None else f"{reason}. {_CPU_FIX}"


def extension_for(device) -> ModuleType:
    """The compiled rasterizer for tensors on `device` (a torch.device or its name): the CUDA extension for
    CUDA devices, the CPU extension for the CPU; a RuntimeError that says why when it is unavailable."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return require_extension()
    if device.type == "cpu":
        module = load_cpu_extension()
        if module is None:
            raise RuntimeError(f"The CPU rasterizer is unavailable: {cpu_extension_error()}")
        return module
    raise RuntimeError(f"No compiled rasterizer for {device} tensors; use render(..., backend='reference')")
