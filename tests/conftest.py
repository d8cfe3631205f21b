"""Shared pytest setup: offline Hub, deterministic seeds, small thread pools on the 2-core CI machine."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def cuda_extension():
    """The compiled CUDA extension; skips the test where there is no GPU or no extension (see
    `render_helpers.cuda_test`)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fit3d_hf.render._backend import extension_error, load_extension

    ext = load_extension()
    if ext is None:
        pytest.skip(f"CUDA extension unavailable: {extension_error()}")
    return ext


def pytest_terminal_summary(terminalreporter):
    """How many inputs each property-based (fuzz) target was fed in this session."""
    import sys

    helpers = sys.modules.get("fuzz_helpers")
    if helpers is not None and helpers.FUZZ_COUNTS:
        counts = helpers.FUZZ_COUNTS
        refused = helpers.FUZZ_REFUSED
        targets = ", ".join(
            f"{name} {number} ({refused[name]} refused)" for name, number in sorted(counts.items())
        )
        terminalreporter.write_line(f"fuzzing: {sum(counts.values())} inputs tried ({targets})")
