"""Build script: the Python package always, the rasterizer's extensions where they can be built.

* the CPU extension (`fit3d_hf._C_cpu`) wherever torch and a C++ compiler are present (optional: a failed
  compile leaves the install without it);
* the CUDA extension (`fit3d_hf._C`) when torch with CUDA support and nvcc are present and `BUILD_NO_CUDA`
  is not set to 1.

A missing extension is compiled on first use where possible, else the pure-PyTorch reference renderer serves
(see fit3d_hf/render/_backend.py). The recipe is rasterizer_cuda/build.py.
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
    build_file = ROOT / "rasterizer_cuda" / "build.py"
    if not build_file.exists():
        return [], {}
    return _load_build_module().get_setuptools_extension(cuda=os.environ.get("BUILD_NO_CUDA", "0") != "1")


ext_modules, cmdclass = get_ext_modules_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
