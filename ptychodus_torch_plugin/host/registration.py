"""Registration bootstrap: add every ``ptychodus.reconstructors`` library to Ptychodus 1.7.

Ptychodus 1.7 reads no reconstructor entry points. It does import every module in
``ptychodus/plugins/`` while ``ModelCore.__init__`` runs, *before* it builds its processing
core, and it looks the core's class up as a module global at that moment. So the autoload
module (and the ``ptychodus-torch launch`` command) call :func:`bootstrap`, which

1. checks the host version (1.7.x) and the constructor signatures it relies on;
2. replaces ``ptychodus.model.core.ProcessingCore`` by a subclass that builds every library of
   the entry-point group and appends it to the built-in ones;
3. arranges that ``ptychodus.controller.core.ProcessingController`` gets the same treatment
   for the GUI view factories, lazily, with an import hook: batch mode never imports Qt.

Everything is idempotent (a second bootstrap, or the launcher plus the autoload module, changes
nothing) and fail-safe: any mismatch or error logs one warning and leaves Ptychodus as it was,
except a guard that logs an ERROR when a settings file selects a library that failed to load
(Ptychodus itself would silently fall back to a do-nothing reconstructor).
"""

from __future__ import annotations

import configparser
import functools
import importlib.abc
import importlib.metadata
import inspect
import logging
import sys
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .names import (
    ENTRY_POINT_GROUP,
    LIBRARY_NAME,
    LOGGER_NAME,
    SETTINGS_PREFIX,
    SUPPORTED_HOST_SERIES,
)

logger = logging.getLogger(f"{LOGGER_NAME}.registration")

_MARK = "_ptychodus_torch_plugin_wrapped"
_MODEL_MODULE = "ptychodus.model.core"
_CONTROLLER_MODULE = "ptychodus.controller.core"
_CORE_PARAMETERS = [
    "self",
    "task_manager",
    "settings_registry",
    "product_api",
    "algorithm_libraries",
]
_CONTROLLER_PARAMETERS = [
    "self",
    "algorithm_parameter",
    "processing_api",
    "product_repository",
    "product_table_model",
    "globus",
    "genesis",
    "view",
    "status_view",
    "file_dialog_factory",
    "view_controller_factories",
]

#: Libraries that did not load: casefolded name -> reason (read by the selection guard).
FAILED_LIBRARIES: dict[str, str] = {}
#: Why the processing core could not be patched (registration failed), if it could not.
_NOT_REGISTERED: list[str] = []


@dataclass
class RegisteredLibrary:
    """One library built from the entry-point group, and the object that built it."""

    name: str
    plugin: Any
    library: Any


#: Libraries per processing core, keyed by its algorithm parameter (what the controller gets).
_REGISTERED: weakref.WeakKeyDictionary[Any, list[RegisteredLibrary]] = weakref.WeakKeyDictionary()
_WARNED_VIEWS: set[str] = set()


# ----------------------------------------------------------------------------- checks
def host_version() -> str:
    import ptychodus

    return str(getattr(ptychodus, "__version__", "unknown"))


def check_host_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless the host is a supported Ptychodus release (1.7.x)."""
    version = host_version() if version is None else version
    parts = version.split(".")
    try:
        series = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        series = None
    if series not in SUPPORTED_HOST_SERIES:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_HOST_SERIES)
        raise RuntimeError(
            f"Ptychodus {version} is not supported by this plugin (supported: {supported}); "
            "install a matching ptychodus-torch-plugin release"
        )


def _check_signature(cls: type, expected: Sequence[str]) -> None:
    found = list(inspect.signature(cls.__init__).parameters)
    if found != list(expected):
        raise RuntimeError(
            f"{cls.__module__}.{cls.__qualname__}.__init__{tuple(found)} differs from the "
            f"expected {tuple(expected)}: this Ptychodus build is not supported"
        )


def is_developer_mode_enabled() -> bool:
    """What ``ModelCore.is_developer_mode_enabled`` computes (its module logger at DEBUG)."""
    return logging.getLogger(_MODEL_MODULE).getEffectiveLevel() <= logging.DEBUG


# ----------------------------------------------------------------------------- entry points
def _entry_points() -> list[importlib.metadata.EntryPoint]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = (entry_point.name, entry_point.value)
        if key not in seen:
            seen.add(key)
            unique.append(entry_point)
    return unique


def _validate_library(library: Any, name: str, taken: set[str]) -> None:
    from ptychodus.api.reconstruct import ReconstructorLibrary

    if not isinstance(library, ReconstructorLibrary):
        raise TypeError(f"{type(library).__name__} is not a ptychodus ReconstructorLibrary")
    if "_" in library.name:
        raise ValueError(f"library name {library.name!r} contains '_' (the key separator)")
    if library.name.casefold() in taken:
        raise ValueError(f"library name {library.name!r} is already taken")
    if library.name.casefold() != name.casefold():
        logger.debug("entry point %r provides library %r", name, library.name)


def build_libraries(
    settings_registry: Any, existing: Iterable[Any]
) -> tuple[list[RegisteredLibrary], list[Any]]:
    """Build every entry-point library; returns (registered, placeholders for failures)."""
    taken = {library.name.casefold() for library in existing}
    developer = is_developer_mode_enabled()
    registered: list[RegisteredLibrary] = []
    placeholders: list[Any] = []
    for entry_point in _entry_points():
        try:
            plugin = entry_point.load()
            if hasattr(plugin, "create_library"):
                library = plugin.create_library(settings_registry, developer)
            else:
                library = plugin(settings_registry, developer)
            _validate_library(library, entry_point.name, taken)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "reconstructor plugin %r (%s) failed to load and is not available: %s",
                entry_point.name,
                entry_point.value,
                reason,
            )
            FAILED_LIBRARIES[entry_point.name.casefold()] = reason
            placeholder = _placeholder_library(entry_point.name, reason, taken)
            if placeholder is not None:
                placeholders.append(placeholder)
                taken.add(entry_point.name.casefold())
            continue
        taken.add(library.name.casefold())
        FAILED_LIBRARIES.pop(library.name.casefold(), None)
        registered.append(RegisteredLibrary(library.name, plugin, library))
        logger.debug("registered reconstructor library %s", library.name)
    return registered, placeholders


def _placeholder_library(name: str, reason: str, taken: set[str]) -> Any:
    """A library whose reconstructors fail with ``reason``: settings selecting it still map."""
    if name.casefold() != LIBRARY_NAME.casefold() or name.casefold() in taken:
        return None
    from .placeholder import FailedLibrary

    return FailedLibrary(name, reason)


# ----------------------------------------------------------------------------- model side
def _wrap_processing_core(original: type) -> type:
    class PluginProcessingCore(original):  # type: ignore[misc, valid-type]
        """Ptychodus's processing core with the entry-point libraries appended."""

        def __init__(
            self,
            task_manager: Any,
            settings_registry: Any,
            product_api: Any,
            algorithm_libraries: Sequence[Any],
        ) -> None:
            libraries = list(algorithm_libraries)
            try:
                registered, placeholders = build_libraries(settings_registry, libraries)
            except Exception as exc:  # never stop Ptychodus
                logger.warning("reconstructor plugins not loaded: %s", exc)
                registered, placeholders = [], []
            extra = [r.library for r in registered] + placeholders
            super().__init__(task_manager, settings_registry, product_api, libraries + extra)
            _REGISTERED[self.algorithm_parameter] = registered
            for entry in registered:
                attach = getattr(entry.library, "attach_host", None)
                if attach is not None:
                    try:
                        attach(self, task_manager)
                    except Exception as exc:
                        logger.warning("%s: attach_host failed: %s", entry.name, exc)
            install_selection_guard()

    PluginProcessingCore.__name__ = original.__name__
    PluginProcessingCore.__qualname__ = original.__qualname__
    setattr(PluginProcessingCore, _MARK, True)
    return PluginProcessingCore


def registered_libraries(algorithm_parameter: Any) -> list[RegisteredLibrary]:
    """The plugin libraries of the processing core that owns ``algorithm_parameter``."""
    return list(_REGISTERED.get(algorithm_parameter, []))


def registered_library(algorithm_parameter: Any, name: str = LIBRARY_NAME) -> Any:
    """The library registered as ``name`` (ours by default) in that processing core.

    For tools and tests that drive a real Ptychodus session and need our library object.
    """
    matches = [r.library for r in registered_libraries(algorithm_parameter) if r.name == name]
    if len(matches) != 1:
        raise LookupError(
            f"{name}: found {len(matches)} registered libraries of this name, expected 1; "
            "was the plugin bootstrapped before the ModelCore was created?"
        )
    return matches[0]


# ----------------------------------------------------------------------------- GUI side
def _view_factories(
    algorithm_parameter: Any, file_dialog_factory: Any, existing: Iterable[Any]
) -> list[Any]:
    taken = {factory.name.casefold() for factory in existing}
    factories = []
    for entry in registered_libraries(algorithm_parameter):
        create = getattr(entry.plugin, "create_view_controller_factory", None)
        if create is None or entry.name.casefold() in taken:
            continue
        try:
            factory = create(entry.library, file_dialog_factory)
            if factory is None:
                continue
            if factory.name.casefold() != entry.name.casefold():
                raise ValueError(
                    f"view factory name {factory.name!r} differs from library {entry.name!r}"
                )
        except Exception as exc:
            if entry.name not in _WARNED_VIEWS:
                _WARNED_VIEWS.add(entry.name)
                logger.warning(
                    "%s: no custom parameter panel (%s: %s); the reconstructors still work",
                    entry.name,
                    type(exc).__name__,
                    exc,
                )
            continue
        factories.append(factory)
    return factories


def _wrap_processing_controller(original: type) -> type:
    class PluginProcessingController(original):  # type: ignore[misc, valid-type]
        """Ptychodus's processing controller with the plugin view factories appended."""

        def __init__(
            self,
            algorithm_parameter: Any,
            processing_api: Any,
            product_repository: Any,
            product_table_model: Any,
            globus: Any,
            genesis: Any,
            view: Any,
            status_view: Any,
            file_dialog_factory: Any,
            view_controller_factories: Iterable[Any],
        ) -> None:
            factories = list(view_controller_factories)
            try:
                factories += _view_factories(algorithm_parameter, file_dialog_factory, factories)
            except Exception as exc:  # never stop Ptychodus
                logger.warning("plugin parameter panels not loaded: %s", exc)
            super().__init__(
                algorithm_parameter,
                processing_api,
                product_repository,
                product_table_model,
                globus,
                genesis,
                view,
                status_view,
                file_dialog_factory,
                factories,
            )

    PluginProcessingController.__name__ = original.__name__
    PluginProcessingController.__qualname__ = original.__qualname__
    setattr(PluginProcessingController, _MARK, True)
    return PluginProcessingController


def patch_controller_module(module: Any) -> None:
    """Wrap ``module.ProcessingController`` (``ptychodus.controller.core``) once."""
    try:
        original = module.ProcessingController
        if getattr(original, _MARK, False):
            return
        _check_signature(original, _CONTROLLER_PARAMETERS)
        module.ProcessingController = _wrap_processing_controller(original)
    except Exception as exc:
        logger.warning("plugin parameter panels disabled: %s", exc)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Calls ``patch(module)`` right after ``fullname`` is first imported.

    Why: importing ``ptychodus.model.core`` (pydantic_ai, openai) or the Qt controller just
    to patch them would make every Ptychodus tool that loads plugins but never builds a
    ``ModelCore`` (``ptychodus-reconstruct-*``, file converters) about 2 s slower.
    """

    def __init__(self, fullname: str, patch: Callable[[Any], None]) -> None:
        self.fullname = fullname
        self.patch = patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.fullname:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module
        patch = self.patch

        def exec_module(module: Any) -> None:
            original_exec(module)
            patch(module)

        try:
            loader.exec_module = exec_module  # this spec's own loader instance
        except Exception as exc:
            logger.warning("%s plugin: %s not patched: %s", LIBRARY_NAME, fullname, exc)
        return spec


def patch_on_import(fullname: str, patch: Callable[[Any], None]) -> None:
    """``patch(module)`` now if ``fullname`` is imported, else right after its first import."""
    module = sys.modules.get(fullname)
    if module is not None:
        patch(module)
        return
    hooks = (f for f in sys.meta_path if isinstance(f, _PatchOnImport))
    if not any(hook.fullname == fullname for hook in hooks):
        sys.meta_path.insert(0, _PatchOnImport(fullname, patch))


def install_controller_hook() -> None:
    patch_on_import(_CONTROLLER_MODULE, patch_controller_module)


# ----------------------------------------------------------------------------- selection guard
def selected_algorithm(settings_file: Path) -> str | None:
    """The casefolded ``[Processing] Algorithm`` of an INI file, if it sets one."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(settings_file)
    if not config.has_option("Processing", "Algorithm"):
        return None
    return config.get("Processing", "Algorithm").strip().casefold()


def _plugin_algorithms() -> dict[str, list[str]]:
    """Casefolded plugin library name -> its algorithm keys (``library_reconstructor``)."""
    known: dict[str, list[str]] = {}
    for entries in list(_REGISTERED.values()):
        for entry in entries:
            name = str(entry.library.name)
            keys = [f"{name}_{reconstructor.name}" for reconstructor in entry.library]
            known[name.casefold()] = keys
    return known


def _algorithm_in_effect(registry: Any) -> str | None:
    """The ``[Processing] Algorithm`` Ptychodus holds after reading a settings file.

    Ptychodus refuses an unknown key by keeping the algorithm it had (its start-up default is
    pty-chi's LSQML, ``none_none`` where pty-chi is missing), so this is what batch mode runs.
    """
    try:
        return str(registry["Processing"].parameters()["Algorithm"].get_value())
    except Exception:
        return None


def _what_runs_instead(effective: str | None) -> str:
    if effective is None:
        return "Ptychodus keeps the algorithm it had selected"
    if effective.casefold() == "none_none":
        return "Ptychodus keeps none_none, which reconstructs and trains nothing"
    return f"Ptychodus keeps {effective}, and `ptychodus -b` runs that instead"


def _has_our_settings(settings_file: Path) -> bool:
    config = configparser.ConfigParser(interpolation=None)
    config.read(settings_file)
    prefix = SETTINGS_PREFIX.casefold()
    return any(section.casefold().startswith(prefix) for section in config.sections())


def _check_selection(settings_file: Any, registry: Any = None) -> None:
    key = selected_algorithm(Path(settings_file))
    effective = _algorithm_in_effect(registry)
    if key is None:
        ours = set(_plugin_algorithms())
        in_effect = (effective or "").casefold().partition("_")[0]
        if _has_our_settings(Path(settings_file)) and in_effect not in ours:
            logger.warning(
                "The settings file %s holds %s settings but sets no [Processing] Algorithm: "
                "%s. Add, e.g., [Processing] Algorithm = %s_PINN to use them.",
                settings_file,
                SETTINGS_PREFIX,
                _what_runs_instead(effective),
                LIBRARY_NAME,
            )
        return
    library, _, _ = key.partition("_")
    if library in FAILED_LIBRARIES:
        if (effective or "").casefold() == key:  # our stand-in library holds the key
            outcome = (
                f"{effective} stays selected, as a stand-in that stops every reconstruction "
                "and training with this error"
            )
        else:
            outcome = _what_runs_instead(effective)
        logger.error(
            "The settings file %s selects the %s library, which failed to load (%s): %s. "
            "See the warning logged at start-up.",
            settings_file,
            library,
            FAILED_LIBRARIES[library],
            outcome,
        )
        return
    keys = _plugin_algorithms().get(library)
    if keys is not None and key not in {k.casefold() for k in keys}:
        # Ptychodus keeps its earlier algorithm for an unknown key, without a word (a debug
        # line): say so where the user looks, and what will run instead.
        logger.error(
            "The settings file %s sets [Processing] Algorithm = %s, which names no %s "
            "reconstructor: %s. Use one of: %s.",
            settings_file,
            key,
            library,
            _what_runs_instead(effective),
            ", ".join(keys),
        )


def install_selection_guard() -> None:
    """ERROR whenever a settings file selects a plugin library that failed to load, or a
    reconstructor that a plugin library does not have (Ptychodus would silently run nothing)."""
    from ptychodus.api.settings import SettingsRegistry

    original = SettingsRegistry.open_settings
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def open_settings(self: Any, file_path: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, file_path, *args, **kwargs)
        try:
            _check_selection(file_path, self)
        except Exception:  # the guard must never break settings loading
            pass
        return result

    setattr(open_settings, _MARK, True)
    SettingsRegistry.open_settings = open_settings  # type: ignore[method-assign]


def _mark_all_failed(reason: str) -> None:
    names = {LIBRARY_NAME}
    try:
        names |= {entry_point.name for entry_point in _entry_points()}
    except Exception:
        pass
    for name in names:
        FAILED_LIBRARIES[name.casefold()] = reason


# ----------------------------------------------------------------------------- bootstrap
def bootstrap() -> bool:
    """Register the entry-point libraries with Ptychodus; True when active. Idempotent."""
    try:
        check_host_version()
        # ptychodus.model.core is patched when it is imported (at once if it already is).
        patch_on_import(_MODEL_MODULE, patch_model_module)
        install_controller_hook()
        return not _NOT_REGISTERED
    except Exception as exc:
        _not_registered(exc)
        return False


def patch_model_module(module: Any) -> None:
    """Wrap ``module.ProcessingCore`` (``ptychodus.model.core``) once; never raises."""
    try:
        original = module.ProcessingCore
        if not getattr(original, _MARK, False):
            _check_signature(original, _CORE_PARAMETERS)
            module.ProcessingCore = _wrap_processing_core(original)
    except Exception as exc:
        _not_registered(exc)


def _not_registered(exc: BaseException) -> None:
    reason = f"{type(exc).__name__}: {exc}"
    _NOT_REGISTERED.append(reason)
    logger.warning("%s plugin not registered: %s", LIBRARY_NAME, reason)
    _mark_all_failed(reason)
    try:
        install_selection_guard()
    except Exception:
        pass
