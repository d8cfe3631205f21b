"""The compiled extensions share torch's C++ runtime (libstdc++.so.6) even where the compiler would link a copy
statically, as the g++ of the lent GPU image does: with two copies in one process the extensions' error messages
lost their numbers, or the interpreter crashed when one was raised (rasterizer_cuda/build.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fit3d_build", ROOT / "rasterizer_cuda" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

COMPILER = os.environ.get("CXX", "g++")  # the compiler the extensions are built with
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which(COMPILER) is None,
    reason=f"needs Linux and {COMPILER}",
)

# Formats a message the way the extensions' argument checks do (std::ostringstream with numbers).
_SOURCE = r"""
#include <cstring>
#include <sstream>
extern "C" void format_message(char* out, int size) {
    std::ostringstream message;
    message << "bad sh_degree " << 7 << " for " << 16 << " coefficients";
    std::strncpy(out, message.str().c_str(), size);
}
"""


def _message_from_library(tmp_path: Path, link_flags: list[str]) -> str:
    """Builds the formatter with a statically linked libstdc++ plus `link_flags`, and runs it in a fresh
    interpreter that has loaded torch (and with it the shared libstdc++)."""
    source = tmp_path / "format_message.cpp"
    source.write_text(_SOURCE)
    library = tmp_path / f"format_message_{len(link_flags)}.so"
    compiled = subprocess.run(
        [COMPILER, "-shared", "-fPIC", "-O2", "-static-libstdc++", str(source), *link_flags, "-o", str(library)],
        capture_output=True, text=True,
    )  # fmt: skip
    if compiled.returncode != 0:
        pytest.skip(f"{COMPILER} cannot link libstdc++ statically here: {compiled.stderr[-300:]}")
    code = (
        "import ctypes, torch; buffer = ctypes.create_string_buffer(128); "
        f"ctypes.CDLL({str(library)!r}).format_message(buffer, 128); print(buffer.value.decode())"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


def test_the_build_recipe_links_the_shared_cxx_runtime(tmp_path):
    full = "bad sh_degree 7 for 16 coefficients"
    assert "-l:libstdc++.so.6" in build.get_build_parameters()["extra_ldflags"]
    assert "-l:libstdc++.so.6" in build.get_cpu_build_parameters()["extra_ldflags"]
    # compiled as the lent GPU image's g++ would (its own copy of the runtime, linked statically) plus the recipe's
    # flags: the message keeps its numbers. Without them it lost them on the 2-core CI machine and crashed the
    # interpreter on the lent H100 (2026-12-06).
    assert _message_from_library(tmp_path, build.SHARED_CXX_RUNTIME) == full


@pytest.mark.parametrize("module", ["fit3d_hf._C_cpu", "fit3d_hf._C"])
def test_built_extensions_need_the_shared_libstdcxx(module):
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        pytest.skip(f"{module} is not built here")
    if shutil.which("ldd") is None:
        pytest.skip("no ldd")
    needed = subprocess.run(["ldd", spec.origin], capture_output=True, text=True).stdout
    assert "libstdc++.so" in needed, needed
