"""Helpers shared by the host and GUI tests (tests/ is on sys.path through tests/conftest.py)."""

import contextlib
from typing import Any


@contextlib.contextmanager
def settings_values(library: Any, **values: Any):
    """Temporarily set TorchPINN settings (attribute names of TorchPINNSettings)."""
    saved = {}
    for name, value in values.items():
        parameter = getattr(library.settings, name)
        saved[name] = parameter.get_value()
        parameter.set_value(value)
    try:
        yield
    finally:
        for name, value in saved.items():
            getattr(library.settings, name).set_value(value)
