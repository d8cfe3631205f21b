"""The one build recipe of the rasterizer's two extensions, used by setup.py (prebuilt `fit3d_hf._C` and
`fit3d_hf._C_cpu`) and by the JIT path in fit3d_hf/render/_backend.py, so the two cannot drift.

* the CUDA extension: the kernels `*.cu` + `ext.cpp`, where torch has CUDA and nvcc is found;
* the CPU extension: `cpu/*.cpp` (the same maths headers, compiled by the C++ compiler with FIT3D_CPU_ONLY),
  wherever a C++ compiler is found.

Loaded by file path (it is not part of the installed package), hence no package-relative imports.
Environment: `BUILD_NO_CUDA=1` skips the CUDA extension only (read by setup.py); `TORCH_CUDA_ARCH_LIST` picks
the GPU architectures as usual for torch extensions (e.g. "9.0" for H100); `CXX` names the C++ compiler.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

__all__ = [
    "CPU_EXTENSION_NAME",
    "EXTENSION_NAME",
    "SOURCE_DIR",
    "cpu_toolchain_problem",
    "cuda_toolkit_problem",
    "get_build_parameters",
    "get_cpu_build_parameters",
    "get_setuptools_extension",
    "optional_build_ext",
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
CPU_EXTENSION_NAME = "fit3d_hf._C_cpu"
CPU_JIT_NAME = "fit3d_hf_rasterizer_cpu"
CPU_SOURCES = (
    "cpu/ext_cpu.cpp",
    "cpu/project_cpu.cpp",
    "cpu/isect_cpu.cpp",
    "cpu/rasterize_fwd_cpu.cpp",
    "cpu/rasterize_bwd_cpu.cpp",
    "cpu/feature_loss_cpu.cpp",
)


# Links the C++ runtime that torch uses (the shared libstdc++.so.6), named by file: a plain -lstdc++ takes the
# first libstdc++ on the linker's path, and the g++ of the lent H100/H200 image (a wrapper whose own library
# directory, searched first, holds only libstdc++.a) gave the extensions a second, static copy of the runtime.
# With two copies in one process, raising an argument error crashed the interpreter there (2026-12-06), and
# error messages lost their numbers here (reproduced with -static-libstdc++). Linux only: elsewhere the
# platform's C++ runtime is already shared.
SHARED_CXX_RUNTIME = ["-Wl,-Bdynamic", "-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []


def get_build_parameters() -> dict:
    """Sources, include directories and compiler flags of the extension.

    Returns:
        dict with `sources` (absolute paths), `include_dirs`, `extra_cflags` (C++ compiler),
        `extra_cuda_cflags` (nvcc) and `extra_ldflags`. The C++ standard is left to torch (its headers set
        the minimum).
    """
    return {
        "sources": [str(SOURCE_DIR / name) for name in SOURCES],
        "include_dirs": [str(SOURCE_DIR)],
        "extra_cflags": ["-O3"],
        # no --use_fast_math: the forward and backward kernels must round alpha identically and stay
        # close to the float64 reference; __expf is used explicitly where precision allows
        "extra_cuda_cflags": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        "extra_ldflags": list(SHARED_CXX_RUNTIME),
    }


def get_cpu_build_parameters() -> dict:
    """Sources, include directories and compiler flags of the CPU extension.

    Returns:
        dict with `sources` (absolute paths), `include_dirs`, `extra_cflags` and `extra_ldflags`.
        `-ffp-contract=off`: the compiler fuses no multiply-add on its own, so the forward and the backward
        round alpha identically wherever they are inlined (splat_alpha's explicit fmaf stay fused).
        `-fno-math-errno`: sqrtf and the like become instructions (no errno to set); values do not change.
        `-g0`: no debug information (setuptools passes Python's `-g`), which halves the compile time of the
        file that includes torch's headers.
        `-fopenmp`: at::parallel_for is inlined from torch's headers and runs on torch's OpenMP pool.
    """
    return {
        "sources": [str(SOURCE_DIR / name) for name in CPU_SOURCES],
        "include_dirs": [str(SOURCE_DIR)],
        "extra_cflags": ["-O3", "-g0", "-DFIT3D_CPU_ONLY", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"],
        "extra_ldflags": ["-fopenmp", *SHARED_CXX_RUNTIME],
    }


def cpu_toolchain_problem() -> str | None:
    """Why the CPU extension cannot be built here, or None when torch and a C++ compiler are found."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed"
    import os

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH; install g++ or set CXX)"
    return None


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


def get_setuptools_extension(cuda: bool = True) -> tuple[list, dict]:
    """`(ext_modules, cmdclass)` for setup(): the extensions that can be built here (the CUDA one only with
    `cuda`), or `([], {})` where none can.

    The CPU extension is optional: should it fail to compile, the install goes on without it (the JIT build
    or the PyTorch reference serve instead, with a warning that names the cause).
    """
    extensions = []
    if cpu_toolchain_problem() is None:
        from torch.utils.cpp_extension import CppExtension

        params = get_cpu_build_parameters()
        extensions.append(
            CppExtension(
                name=CPU_EXTENSION_NAME,
                sources=_relative(params["sources"]),
                include_dirs=params["include_dirs"],
                extra_compile_args=params["extra_cflags"],
                extra_link_args=params["extra_ldflags"],
                optional=True,
            )
        )
    if cuda and cuda_toolkit_problem() is None:
        from torch.utils.cpp_extension import CUDAExtension

        params = get_build_parameters()
        extensions.append(
            CUDAExtension(
                name=EXTENSION_NAME,
                sources=_relative(params["sources"]),
                include_dirs=params["include_dirs"],
                extra_compile_args={"cxx": params["extra_cflags"], "nvcc": params["extra_cuda_cflags"]},
                extra_link_args=params["extra_ldflags"],
            )
        )
    if not extensions:
        return [], {}
    return extensions, {"build_ext": optional_build_ext()}


def optional_build_ext():
    """torch's BuildExtension, except that a failed build of an `optional` extension (the CPU one) only warns.

    setuptools skips failed optional extensions only on its own compiler errors; torch's ninja build raises a
    RuntimeError instead, which would fail the whole install.
    """
    from torch.utils.cpp_extension import BuildExtension

    class BuildOptionalExtension(BuildExtension):
        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as exc:
                if not getattr(ext, "optional", False):
                    raise
                self.warn(
                    f"building {ext.name} failed, the package installs without it (a JIT build or the PyTorch "
                    f"reference will serve): {exc}"
                )

    return BuildOptionalExtension


def _relative(paths: list[str]) -> list[str]:
    """setuptools wants source paths relative to setup.py."""
    root = SOURCE_DIR.parent
    return [str(Path(p).relative_to(root)) for p in paths]
