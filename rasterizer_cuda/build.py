"""The one build recipe of the rasterizer's two extensions, used by setup.py (prebuilt `fit3d_hf._C` and
`fit3d_hf._C_cpu`) and by the JIT path in fit3d_hf/render/_backend.py, so the two cannot drift.

* the CUDA extension: the kernels `*.cu` + `ext.cpp`, where torch has CUDA and nvcc is found;
* the CPU extension: `cpu/*.cpp` (the same maths headers, compiled by the C++ compiler with FIT3D_CPU_ONLY),
  wherever a C++ compiler is found.

Loaded by file path (it is not part of the installed package), hence no package-relative imports.
Environment: `BUILD_NO_CUDA=1` skips the CUDA extension only (read by setup.py); `TORCH_CUDA_ARCH_LIST` picks
the GPU architectures as usual for torch extensions (e.g. "9.0" for H100; compute capability 8.0 or newer, see
`architecture_problem`); `CXX` names the C++ compiler.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from pathlib import Path

__all__ = [
    "CPU_EXTENSION_NAME",
    "EXTENSION_NAME",
    "MIN_COMPUTE_CAPABILITY",
    "SOURCE_DIR",
    "architecture_problem",
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
    "ssim.cu",
    "adam.cu",
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


# The CUDA kernels use warp reductions and TF32 tensor cores of compute capability 8.0 (common.h refuses
# older targets); fit3d_hf/render/_backend.py checks the GPU against the same value.
MIN_COMPUTE_CAPABILITY = (8, 0)
# The architecture names TORCH_CUDA_ARCH_LIST may use (torch.utils.cpp_extension), by compute capability.
_NAMED_ARCHITECTURES = {"kepler": (3, 5), "maxwell": (5, 0), "pascal": (6, 0), "volta": (7, 0),
                        "turing": (7, 5), "ampere": (8, 0), "ada": (8, 9), "hopper": (9, 0)}  # fmt: skip

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
        "extra_cflags": [
            "-O3",
            "-g0",
            "-DFIT3D_CPU_ONLY",
            "-ffp-contract=off",
            "-fno-math-errno",
            "-fopenmp",
        ],
        "extra_ldflags": ["-fopenmp", *SHARED_CXX_RUNTIME],
    }


def cpu_toolchain_problem() -> str | None:
    """Why the CPU extension cannot be built here, or None when torch and a C++ compiler are found."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH; install g++ or set CXX)"
    return None


def _capability_of(entry: str) -> tuple[int, int] | None:
    """(major, minor) of a TORCH_CUDA_ARCH_LIST entry ("8.6", "9.0a", "8.0+PTX", "Ampere"), else None."""
    match = re.match(r"(\d+)\.(\d+)", entry)
    if match:
        return int(match.group(1)), int(match.group(2))
    return _NAMED_ARCHITECTURES.get(entry.split("+")[0].lower())


def architecture_problem(arch_list: str | None, capabilities: list[tuple[int, int]]) -> str | None:
    """Why the CUDA kernels cannot be built for the architectures torch would target, or None.

    Args:
        arch_list: TORCH_CUDA_ARCH_LIST (None or empty: torch targets the visible GPUs, or, where none is
            visible, every architecture of its CUDA version, older ones included).
        capabilities: (major, minor) of each visible GPU.
    """
    minimum = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
    if arch_list:
        entries = arch_list.replace(";", " ").split()
        old = [e for e in entries if (_capability_of(e) or MIN_COMPUTE_CAPABILITY) < MIN_COMPUTE_CAPABILITY]
        if old:
            return (
                f"TORCH_CUDA_ARCH_LIST={arch_list!r} names architectures older than compute capability "
                f"{minimum} ({', '.join(old)}), which the CUDA rasterizer does not support; leave them out"
            )
        return None
    if not capabilities:
        return (
            "no GPU is visible and TORCH_CUDA_ARCH_LIST is unset, so torch would build for every "
            f"architecture of its CUDA version, some older than compute capability {minimum}; set it to "
            "your GPUs' (e.g. TORCH_CUDA_ARCH_LIST=9.0 for H100)"
        )
    old = sorted(
        {f"{major}.{minor}" for major, minor in capabilities if (major, minor) < MIN_COMPUTE_CAPABILITY}
    )
    if old:
        return (
            f"this machine's GPU has compute capability {', '.join(old)}; the CUDA rasterizer needs "
            f"{minimum} or newer (A100, RTX 30xx, H100 and later)"
        )
    return None


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


def cuda_toolkit_problem() -> str | None:
    """Why the extension cannot be built here, or None when torch has CUDA, nvcc is found and the targeted
    GPU architectures are supported (`architecture_problem`)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    visible = torch.cuda.is_available()
    capabilities = (
        [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] if visible else []
    )
    return architecture_problem(os.environ.get("TORCH_CUDA_ARCH_LIST"), capabilities)


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
    cuda_problem = cuda_toolkit_problem() if cuda else None
    if cuda_problem is not None and _torch_has_cuda():  # a CPU-only torch wants no CUDA build: no warning
        warnings.warn(f"fit3d-hf installs without its CUDA rasterizer: {cuda_problem}", stacklevel=2)
    if cuda and cuda_problem is None:
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
