"""The object our ``ptychodus.reconstructors`` entry point names.

Light on purpose: loading the entry point imports nothing heavy. It knows how to build the
``ReconstructorLibrary`` from ``(settings_registry, is_developer_mode_enabled)`` and, only when
the GUI is built, the view-controller factory from ``(library, file_dialog_factory)``. Both are
named by dotted paths (``module:attribute``) and imported on demand, so a GUI module that is
missing or broken costs one warning and leaves the library usable.

Third-party plugins can publish the same shape (or just a library class) under the group.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .names import LIBRARY_NAME, VIEW_FACTORY


def load_object(dotted: str) -> Any:
    """Import ``package.module:attribute`` (``attribute`` may be dotted)."""
    module_name, _, attribute = dotted.partition(":")
    value: Any = importlib.import_module(module_name)
    for part in filter(None, attribute.split(".")):
        value = getattr(value, part)
    return value


@dataclass(frozen=True)
class ReconstructorPlugin:
    """A reconstructor library and, optionally, its GUI, declared by dotted paths."""

    name: str
    library_factory: str
    view_factory: str | None = None

    def create_library(self, settings_registry: Any, is_developer_mode_enabled: bool) -> Any:
        return load_object(self.library_factory)(settings_registry, is_developer_mode_enabled)

    def create_view_controller_factory(self, library: Any, file_dialog_factory: Any) -> Any:
        """The GUI factory, or None when this plugin declares none."""
        if self.view_factory is None:
            return None
        return load_object(self.view_factory)(library, file_dialog_factory)


PLUGIN = ReconstructorPlugin(
    name=LIBRARY_NAME,
    library_factory="ptychodus_torch_plugin.host.library:TorchPINNLibrary",
    view_factory=VIEW_FACTORY,
)
