"""Loading a script of benchmarks/ as a module (the folder is no package), for the tests of its helpers."""

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]

__all__ = ["load_benchmark"]


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py, imported under the name `<name>_benchmark`."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
