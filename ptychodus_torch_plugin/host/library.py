"""The TorchPINN ``ReconstructorLibrary``: settings, the shared model slot, two reconstructors.

Built by the registration bootstrap right before Ptychodus builds its processing core, from
``(settings_registry, is_developer_mode_enabled)`` like the built-in libraries. Construction is
cheap and never imports torch: when torch or Lightning is missing the library still registers
(the user sees an actionable error when work starts instead of a missing entry).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ptychodus.api.observer import Observable, Observer
from ptychodus.api.reconstruct import Reconstructor, ReconstructorLibrary
from ptychodus.api.settings import SettingsRegistry

from .backend import backend_available
from .model_slot import ModelSlot
from .names import LIBRARY_NAME, LOGGER_NAME, PINN_NAME, RECONSTRUCTOR_MODES, SUPERVISED_NAME
from .reconstructor import TorchPINNReconstructor
from .settings import TorchPINNSettings


class TorchPINNLibrary(ReconstructorLibrary):
    """PtychoPINN in PyTorch: ``PINN`` (unsupervised) and ``Supervised`` reconstructors."""

    def __init__(
        self, settings_registry: SettingsRegistry, is_developer_mode_enabled: bool = False
    ) -> None:
        super().__init__(LOGGER_NAME)
        self.settings = TorchPINNSettings(settings_registry)
        self.model_slot = ModelSlot(self.settings)
        self._processing_core: Any = None
        self._task_manager: Any = None
        self._training_lock = threading.RLock()  # begin_training holds it around check_not_training
        self._training_where: str | None = None  # what trains now (None: nothing)
        self._epoch_listeners: list[Callable[[str, Any], None]] = []
        self.reconstructors = [
            TorchPINNReconstructor(name, RECONSTRUCTOR_MODES[name], self)
            for name in (PINN_NAME, SUPERVISED_NAME)
        ]
        logger = self.get_logger()
        try:
            version = importlib.metadata.version("ptychodus-torch-plugin")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        logger.debug("%s %s (ptychodus-torch-plugin %s)", LIBRARY_NAME, "ready", version)
        if not backend_available():
            logger.warning(
                "%s is registered, but torch and/or lightning are not installed: training "
                'and inference will fail until you run pip install "torch>=2.2" "lightning>=2.4"',
                LIBRARY_NAME,
            )

    @property
    def name(self) -> str:
        return LIBRARY_NAME

    def __iter__(self) -> Iterator[Reconstructor]:
        return iter(self.reconstructors)

    def reconstructor(self, name: str) -> TorchPINNReconstructor:
        """The reconstructor called ``name`` (case-insensitive, e.g. 'pinn')."""
        for reconstructor in self.reconstructors:
            if reconstructor.name.casefold() == name.casefold():
                return reconstructor
        raise KeyError(f"{LIBRARY_NAME} has no reconstructor {name!r}")

    # ------------------------------------------------------------------ host hooks
    def attach_host(self, processing_core: Any, task_manager: Any = None) -> None:
        """Called by the bootstrap once Ptychodus built its processing core around us."""
        self._processing_core = processing_core
        self._task_manager = task_manager
        self._model_path_observer = _ModelPathObserver(self._notify_algorithm_observers)
        self.settings.model_path.add_observer(self._model_path_observer)

    def _notify_algorithm_observers(self) -> None:
        """Let Ptychodus re-read ``is_model_loaded`` (its Infer button) after a model change."""
        parameter = getattr(self._processing_core, "algorithm_parameter", None)
        if parameter is not None and hasattr(parameter, "notify_observers"):
            parameter.notify_observers()

    @property
    def processing_core(self) -> Any:
        return self._processing_core

    def _task_monitor(self) -> Any:
        core = self._processing_core
        api = getattr(core, "processing_api", None)
        return getattr(api, "task_monitor", None)

    def is_stopping(self) -> bool:
        """True when the host asked its running task to stop.

        Either its Stop button (the processing task monitor) or Ptychodus shutting down: closing
        the window, or Ctrl-C in ``ptychodus -b``, stops the task manager and then waits for
        its worker thread, which is running our training. Without the second, that wait lasted
        every remaining epoch with the window gone, and a killed process lost the whole run.
        """
        manager = self._task_manager
        try:
            if manager is not None and bool(getattr(manager, "is_stopping", False)):
                return True
        except Exception:  # a host without the property: the monitor and generator closing
            pass
        monitor = self._task_monitor()
        if monitor is None:
            return False
        try:
            return bool(monitor.is_processing and monitor.is_stopping)
        except Exception:  # a host without these properties: rely on generator closing
            return False

    def run_on_host_thread(self, task: Callable[[], None]) -> None:
        """Run ``task`` on Ptychodus's foreground (Qt) thread, or now without a host."""
        manager = self._task_manager
        if manager is not None and hasattr(manager, "put_foreground_task"):
            manager.put_foreground_task(task)
        else:
            task()

    # ------------------------------------------------------------------ epochs of host training
    def add_epoch_listener(self, listener: Callable[[str, Any], None]) -> None:
        """Call ``listener(reconstructor_name, record)`` after every epoch of host training.

        Why: Ptychodus's own Train shows only a progress count; the panel listens here to draw
        the loss as it comes. Called on Ptychodus's worker thread: a GUI listener must hand
        the record over to its own thread (a Qt signal does).
        """
        self._epoch_listeners.append(listener)

    def report_epoch(self, reconstructor: str, record: Any) -> None:
        for listener in list(self._epoch_listeners):
            try:
                listener(reconstructor, record)
            except Exception as exc:  # a listener's failure must not stop the training
                self.get_logger().debug("epoch listener failed: %s", exc)

    # ------------------------------------------------------------------ one training at a time
    def begin_training(self, where: str) -> None:
        """Claim the library's one training run; a ``RuntimeError`` names the one running.

        Why: the panel's Train on this scan runs outside Ptychodus's task manager, so
        Ptychodus's own Train stays clickable meanwhile. Two runs would share the CPU, and the
        one finishing last would silently replace the other's model.
        """
        with self._training_lock:
            self.check_not_training()
            self._training_where = where

    def check_not_training(self) -> None:
        """A ``RuntimeError`` naming the training that runs, if one does (before a new one)."""
        with self._training_lock:
            if self._training_where is not None:
                raise RuntimeError(
                    f"a TorchPINN training is already running ({self._training_where}): "
                    "wait for it to finish, or stop it, then train again"
                )

    def training_now(self) -> str | None:
        """What is training now (as given to :meth:`begin_training`), or None."""
        with self._training_lock:
            return self._training_where

    def end_training(self) -> None:
        with self._training_lock:
            self._training_where = None

    @contextlib.contextmanager
    def training_run(self, where: str) -> Iterator[None]:
        """:meth:`begin_training` ... :meth:`end_training` around a block."""
        self.begin_training(where)
        try:
            yield
        finally:
            self.end_training()

    def publish_model(self, archive: Path) -> None:
        """Remember ``archive`` as the model path and let Ptychodus re-enable Infer.

        Touches Ptychodus parameters: call it on the host (Qt) thread.
        """
        self.model_slot.remember_path(archive)
        self._notify_algorithm_observers()  # also when the path is the same as before

    def on_model_trained(self, archive: Path) -> None:
        """After training on Ptychodus's worker thread: publish the model on the host thread."""
        self.run_on_host_thread(lambda: self.publish_model(archive))


class _ModelPathObserver(Observer):
    """Tells Ptychodus's Infer button when ``ModelPath`` changes however it changed.

    Why: Ptychodus enables Infer from ``is_model_loaded`` only when its algorithm parameter
    notifies; a settings file opened with another ``ModelPath`` (the algorithm unchanged)
    left the button as it was, greyed out with a usable model or enabled without one.
    """

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def _update(self, observable: Observable) -> None:
        self._notify()
