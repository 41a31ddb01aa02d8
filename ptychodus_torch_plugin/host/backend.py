"""The heavy backend (torch + Lightning), imported only when work starts.

Ptychodus builds every reconstructor library at start-up; importing torch there would slow
every start (and fail every start where torch is broken). The library therefore registers
without it, and each piece of work calls :func:`require_backend` first, which turns a missing
or broken install into one actionable ``RuntimeError``.
"""

from __future__ import annotations

import importlib
import importlib.util

from .names import BACKEND_HINT

_REQUIRED = ("torch", "lightning")


def backend_available() -> bool:
    """Cheap check (no import): are torch and lightning installed at all?"""
    try:
        return all(importlib.util.find_spec(name) is not None for name in _REQUIRED)
    except (ImportError, ValueError):
        return False


def require_backend() -> None:
    """Import torch and lightning, or raise ``RuntimeError`` saying how to install them."""
    for name in _REQUIRED:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken install raising anything
            raise RuntimeError(
                BACKEND_HINT.format(what=name, error=f"{type(exc).__name__}: {exc}")
            ) from exc
