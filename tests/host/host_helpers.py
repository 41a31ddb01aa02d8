"""Constants and helpers for the host tests (a uniquely named module: several conftest.py
files share the name ``conftest``, so tests never import from them)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from settings_helpers import settings_values  # noqa: F401 - re-exported for the tests

VENV_BIN = Path(sys.executable).parent

#: Fast CPU training settings (setting attribute -> value).
TINY = {
    "epochs": 1,
    "n_filters_scale": 1,
    "batch_size": 16,
    "accelerator": "cpu",
}


def run_python(code: str, *, env: dict | None = None, timeout: float = 120):
    """Run ``code`` in a fresh interpreter of the test venv; returns CompletedProcess."""
    full_env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    full_env.update(env or {})
    # cwd: not the checkout, whose ptychodus_torch_plugin/ would shadow the installed package
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=tempfile.gettempdir(),
    )
