"""Helpers of the GUI tests: the window handle, signal recorder, tick timer, settings."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from settings_helpers import settings_values  # noqa: F401 - re-exported for the tests

PINN_KEY = "torchpinn_pinn"
SUPERVISED_KEY = "torchpinn_supervised"

#: Fast CPU training (TorchPINNSettings attribute -> value).
FAST = {
    "epochs": 2,
    "n_filters_scale": 1,
    "batch_size": 32,
    "accelerator": "cpu",
    "n_groups": 0,
    "validation_fraction": 0.05,
}


@dataclass
class Gui:
    app: Any
    model: Any
    view: Any
    controller: Any
    library: Any
    scans: dict[int, Path]  # N -> scan directory
    products: dict[int, int]  # N -> product index

    @property
    def processing(self) -> Any:
        return self.controller._processing_controller

    @property
    def stack(self) -> Any:
        return self.processing._stacked_widget

    @property
    def infer_button(self) -> Any:
        return self.processing._actions_view.reconstruct_button

    @property
    def product_combo(self) -> Any:
        return self.processing._product_view_controller.get_widget()

    @property
    def algorithm(self) -> Any:
        return self.model.processing_core.algorithm_parameter

    @property
    def monitor(self) -> Any:
        return self.model.processing_core.processing_api.task_monitor

    def select(self, key: str) -> Any:
        """Select an algorithm; returns the widget the processing stack shows."""
        self.algorithm.set_value(key)
        return self.stack.currentWidget()

    def panel(self, key: str = PINN_KEY) -> Any:
        return self.select(key)

    def select_product(self, N: int) -> None:  # noqa: N803
        self.product_combo.setCurrentIndex(self.products[N])

    def log_text(self) -> str:
        return self.view.processing_status_view.text_edit.toPlainText()

    def pump(self, seconds: float) -> None:
        from PyQt5.QtCore import QEventLoop

        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.app.processEvents(QEventLoop.AllEvents, 20)
            time.sleep(0.005)


class Recorder:
    """Records, on the GUI thread, every signal of the runs a session starts."""

    def __init__(self, session: Any) -> None:
        from PyQt5.QtCore import QThread

        self.session = session
        self.events: list[tuple] = []
        self.threads: set[Any] = set()
        self.worker_threads: list[Any] = []
        self.gui_thread = QThread.currentThread()
        self.plot_sizes: list[tuple[int, int]] = []
        session.worker_started.connect(self._on_worker_started)

    def _here(self) -> None:
        from PyQt5.QtCore import QThread

        self.threads.add(QThread.currentThread() is self.gui_thread)

    def _on_worker_started(self, kind: str, worker: Any) -> None:
        self.worker = worker
        self.events.append(("worker", kind, time.perf_counter()))
        worker.phase.connect(lambda text: self.events.append(("phase", text)))
        if kind == "train":
            worker.train_started.connect(self._on_train_started)
            worker.batch_progress.connect(self._on_batch)
            worker.epoch_finished.connect(self._on_epoch)
        worker.finished.connect(lambda outcome: self._end("finished", outcome))
        worker.failed.connect(lambda text: self._end("failed", text))

    def _on_train_started(self, epochs: int, batches: int) -> None:
        self._here()
        self.worker_threads.append(self.worker.thread())
        self.events.append(("train_started", epochs, batches, time.perf_counter()))

    def _on_batch(self, epoch: int, batch: int, batches: int, loss: float) -> None:
        self._here()
        self.events.append(("batch", epoch, batch, batches, time.perf_counter()))

    def _on_epoch(self, record: Any) -> None:
        self._here()
        panel_plot = self.panel_plot
        if panel_plot is not None:
            self.plot_sizes.append((record.epoch, len(panel_plot.training_points())))
        self.events.append(("epoch", record.epoch, time.perf_counter()))

    def _end(self, kind: str, value: Any) -> None:
        self._here()
        self.events.append((kind, value, time.perf_counter()))

    panel_plot: Any = None

    def kinds(self) -> list[str]:
        return [event[0] for event in self.events]

    def disconnect(self) -> None:
        try:
            self.session.worker_started.disconnect(self._on_worker_started)
        except TypeError:
            pass


class TickTimer:
    """A 50 ms QTimer on the GUI thread; the largest gap between ticks measures stalls."""

    def __init__(self, interval_ms: int = 50) -> None:
        from PyQt5.QtCore import QTimer

        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def start(self) -> None:
        self.ticks.clear()
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def gaps(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        ticks = [t for t in self.ticks if start <= t <= end]
        return [b - a for a, b in zip(ticks, ticks[1:], strict=False)]

    def max_gap(self, start: float = 0.0, end: float = float("inf")) -> float:
        gaps = self.gaps(start, end)
        return max(gaps) if gaps else float("inf")


class GcPauses:
    """Records the interpreter's garbage collections (start, seconds, generation) while on.

    A full collection holds the GIL for as long as it walks every tracked object, so in a
    long-lived test process it can stall the GUI thread for reasons that have nothing to do
    with the code under test; recording them says which stalls those were.
    """

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []
        self._began = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            now = time.perf_counter()
            self.pauses.append((self._began, now - self._began, int(info["generation"])))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def longest(self, count: int = 3) -> list[tuple[float, float, int]]:
        return sorted(self.pauses, key=lambda p: p[1], reverse=True)[:count]


def wait_until_idle(gui: Gui, session: Any, timeout: float) -> None:
    end = time.perf_counter() + timeout
    while session.is_running() and time.perf_counter() < end:
        gui.pump(0.05)
    gui.pump(0.1)
    assert not session.is_running(), f"the worker did not finish within {timeout} s"


def unload_model(library: Any) -> None:
    """Forget the library's model (a fresh session): no path, nothing in memory."""
    library.model_slot.clear()


def warm_backend() -> None:
    """Import torch and Lightning once, so a timing is not a first-import stall."""
    import lightning  # noqa: F401
    import torch  # noqa: F401

    from ptychodus_torch_plugin.engine import archive, training  # noqa: F401
