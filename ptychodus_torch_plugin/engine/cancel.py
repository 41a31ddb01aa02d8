"""Cooperative cancellation shared by every front end (CLI, Ptychodus host, Qt worker).

Kept free of torch so the GUI and the host can create and set a token without paying for a
torch import on the Qt thread.
"""

from __future__ import annotations

import threading


class CancelToken:
    """A stop request, safe to set from another thread; training checks it every batch."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()
