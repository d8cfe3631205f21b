"""Build script: the Python package always, the CUDA rasterizer extension only where it can be built.

The extension (`fit3d_hf._C`) is built when torch with CUDA support and nvcc are present and
`BUILD_NO_CUDA` is not set to 1. Otherwise the package installs without it and the pure-PyTorch
reference renderer is used (or the extension is compiled on first use, see fit3d_hf/render/_backend.py).
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _load_build_module():
    spec = importlib.util.spec_from_file_location("_fit3d_build", ROOT / "rasterizer_cuda" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_ext_modules_and_cmdclass():
    if os.environ.get("BUILD_NO_CUDA", "0") == "1":
        return [], {}
    build_file = ROOT / "rasterizer_cuda" / "build.py"
    if not build_file.exists():
        return [], {}
    return _load_build_module().get_setuptools_extension()


ext_modules, cmdclass = get_ext_modules_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
