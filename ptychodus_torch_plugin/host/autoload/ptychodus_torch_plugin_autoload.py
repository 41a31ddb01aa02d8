"""Registers ptychodus-torch-plugin with Ptychodus (installed as ptychodus/plugins/<this>.py).

Ptychodus imports every module in ``ptychodus/plugins/`` at start-up and calls its
``register_plugins(registry)``. This module uses the standard library only and calls the
plugin's bootstrap inside a catch-all ``try``: a broken or mismatched plugin logs one warning
and never stops Ptychodus from starting. If the plugin cannot even be imported, a settings
file that selects its library gets an ERROR instead of a silent do-nothing reconstructor.
"""

import configparser
import logging

_LOGGER = logging.getLogger("ptychodus_torch_plugin.autoload")
_LIBRARY = "torchpinn"
_MARK = "_ptychodus_torch_plugin_autoload_guard"


def _guard_selection(reason):
    """Log an ERROR whenever a settings file selects our (unavailable) library."""
    from ptychodus.api.settings import SettingsRegistry

    original = SettingsRegistry.open_settings
    if getattr(original, _MARK, False):
        return

    def open_settings(self, file_path, *args, **kwargs):
        result = original(self, file_path, *args, **kwargs)
        try:
            config = configparser.ConfigParser(interpolation=None)
            config.read(file_path)
            key = config.get("Processing", "Algorithm", fallback="").strip().casefold()
            if key.split("_", 1)[0] == _LIBRARY:
                try:  # an unknown key leaves the algorithm Ptychodus had: name it
                    kept = str(self["Processing"].parameters()["Algorithm"].get_value())
                except Exception:
                    kept = "the algorithm it had selected"
                _LOGGER.error(
                    "The settings file %s selects %s, but ptychodus-torch-plugin failed to "
                    "load (%s): Ptychodus keeps %s instead (none_none reconstructs nothing). "
                    "Reinstall it: pip install ptychodus-torch-plugin",
                    file_path,
                    key,
                    reason,
                    kept,
                )
        except Exception:
            pass
        return result

    setattr(open_settings, _MARK, True)
    SettingsRegistry.open_settings = open_settings


def register_plugins(registry):
    """Ptychodus's plugin hook: install the TorchPINN bootstrap (never raises)."""
    try:
        from ptychodus_torch_plugin.host.registration import bootstrap
    except (Exception, SystemExit) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        _LOGGER.warning(
            "ptychodus-torch-plugin is installed but cannot be imported (%s); the TorchPINN "
            "reconstructors are not available",
            reason,
        )
        try:
            _guard_selection(reason)
        except Exception:
            pass
        return
    try:
        bootstrap()
    except (Exception, SystemExit) as exc:
        _LOGGER.warning(
            "ptychodus-torch-plugin registration failed: %s: %s", type(exc).__name__, exc
        )
