"""Helpers shared by the Space tests (client and browser)."""

import importlib.util
import socket
import sys
from pathlib import Path

SPACE_DIR = Path(__file__).resolve().parents[1] / "space"


def load_space_app():
    """Imports space/app.py (not a package) once per test session."""
    name = "fit3d_space_app"
    if str(SPACE_DIR) not in sys.path:  # app.py imports its sibling modules, as the Space runs it as a script
        sys.path.insert(0, str(SPACE_DIR))
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SPACE_DIR / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
