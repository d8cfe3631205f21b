"""The export lists hold what they promise: every name in an `__all__` resolves."""

import importlib
import importlib.machinery
import importlib.util
import pkgutil

import pytest

import fit3d_hf


def test_every_name_in_the_package_all_resolves():
    assert len(fit3d_hf.__all__) == len(set(fit3d_hf.__all__))
    missing = [name for name in fit3d_hf.__all__ if not hasattr(fit3d_hf, name)]
    assert not missing, f"fit3d_hf.__all__ names {missing}, which fit3d_hf does not define"
    for name in ("FiT3DConfig", "FiT3DModel", "DenseFeatureExtractor", "push_to_hub", "make_model_card"):
        assert name in fit3d_hf.__all__


def _library_modules():
    for info in pkgutil.walk_packages(fit3d_hf.__path__, prefix="fit3d_hf."):
        origin = importlib.util.find_spec(info.name).origin or ""
        if origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            continue  # compiled pybind11 bindings (fit3d_hf._C, _C_cpu): their Python wrappers state the API
        yield info.name


@pytest.mark.parametrize("module_name", sorted(_library_modules()))
def test_every_module_all_resolves(module_name):
    """Every module imports (the test extra installs every optional package) and states its exports."""
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{module_name} has no __all__: list its public names (or [] for none)"
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing, f"{module_name}.__all__ names {missing}, which the module does not define"
