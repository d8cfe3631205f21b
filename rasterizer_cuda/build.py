"""The one build recipe of the CUDA rasterizer, used by setup.py (prebuilt `fit3d_hf._C`) and by the JIT
path in fit3d_hf/render/_backend.py, so the two cannot drift.

Loaded by file path (it is not part of the installed package), hence no package-relative imports.
Environment: `BUILD_NO_CUDA=1` skips the extension (read by setup.py); `TORCH_CUDA_ARCH_LIST` picks the
GPU architectures as usual for torch extensions (e.g. "9.0" for H100).
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = [
    "EXTENSION_NAME",
    "SOURCE_DIR",
    "cuda_toolkit_problem",
    "get_build_parameters",
    "get_setuptools_extension",
]

SOURCE_DIR = Path(__file__).resolve().parent
# Module name of the prebuilt extension; the JIT build uses JIT_NAME (a top-level module in torch's cache).
EXTENSION_NAME = "fit3d_hf._C"
JIT_NAME = "fit3d_hf_rasterizer"
SOURCES = (
    "ext.cpp",
    "project_fwd.cu",
    "project_bwd.cu",
    "sh_fwd.cu",
    "sh_bwd.cu",
    "isect_tiles.cu",
    "rasterize_fwd.cu",
    "rasterize_bwd.cu",
    "feature_loss.cu",
)


def get_build_parameters() -> dict:
    """Sources, include directories and compiler flags of the extension.

    Returns:
        dict with `sources` (absolute paths), `include_dirs`, `extra_cflags` (C++ compiler) and
        `extra_cuda_cflags` (nvcc). The C++ standard is left to torch (its headers set the minimum).
    """
    return {
        "sources": [str(SOURCE_DIR / name) for name in SOURCES],
        "include_dirs": [str(SOURCE_DIR)],
        "extra_cflags": ["-O3"],
        # no --use_fast_math: the forward and backward kernels must round alpha identically and stay
        # close to the float64 reference; __expf is used explicitly where precision allows
        "extra_cuda_cflags": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
    }


def cuda_toolkit_problem() -> str | None:
    """Why the extension cannot be built here, or None when torch has CUDA and nvcc is found."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return None


def get_setuptools_extension() -> tuple[list, dict]:
    """`(ext_modules, cmdclass)` for setup(): the CUDA extension, or `([], {})` where it cannot be built."""
    if cuda_toolkit_problem() is not None:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    params = get_build_parameters()
    root = SOURCE_DIR.parent
    extension = CUDAExtension(
        name=EXTENSION_NAME,
        # setuptools wants paths relative to setup.py
        sources=[str(Path(p).relative_to(root)) for p in params["sources"]],
        include_dirs=params["include_dirs"],
        extra_compile_args={"cxx": params["extra_cflags"], "nvcc": params["extra_cuda_cflags"]},
    )
    return [extension], {"build_ext": BuildExtension}
