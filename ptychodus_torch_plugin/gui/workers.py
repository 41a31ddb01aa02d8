"""Qt workers: training and model loading run in a ``QThread``, never on the GUI thread.

Each worker is a ``QObject`` moved to its own ``QThread``; its ``run`` slot does the work and
reports through signals only (Qt queues them to the GUI thread, in the order they were
emitted). A worker never touches a widget or a Ptychodus parameter: everything it needs
(a snapshot of the scan, the settings as a flat dict, the output path) is read on the GUI
thread before it starts and handed over in an immutable :class:`TrainingJob`.

Stop is cooperative. The engine checks its ``CancelToken`` after every batch; at N=64 on a
small CPU one batch can take several seconds, so a Lightning callback (built by
:func:`make_prompt_stop` and passed through ``engine.training.train(callbacks=...)``) also
checks the token before every layer of the forward pass and while the gradients flow back,
and ends ``Trainer.fit`` early the way Lightning's own tuner does. Training then returns
normally with the best weights of the epochs completed so far, which the worker saves and
hands back.

Heavy imports (torch, Lightning, the engine) happen inside ``run``, on the worker thread.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PyQt5.QtCore import QCoreApplication, QEvent, QObject, Qt, QThread, pyqtSignal, pyqtSlot

from ..engine.cancel import CancelToken
from ..host.names import LOGGER_NAME

logger = logging.getLogger(f"{LOGGER_NAME}.gui.workers")

__all__ = [
    "LoadedModel",
    "LoadModelWorker",
    "make_prompt_stop",
    "TrainingJob",
    "TrainingOutcome",
    "TrainingWorker",
    "WorkerThread",
    "describe_error",
]


def describe_error(exc: BaseException) -> str:
    """One readable line for the panel and the log (the exception's own words first)."""
    text = str(exc).strip() or repr(exc)
    kind = type(exc).__name__
    if kind in ("RuntimeError", "Exception"):
        return text
    return f"{text} ({kind})"


# ----------------------------------------------------------------------------- data handed over
@dataclass(frozen=True)
class TrainingJob:
    """Everything a training run needs, captured on the GUI thread."""

    reconstructor: str  # display name, e.g. "PINN"
    mode: str  # engine training mode: "pinn" or "supervised"
    reconstruct_input: Any  # ptychodus ReconstructInput (immutable snapshot of the scan)
    overrides: dict[str, Any]  # flat settings for create_training_payload (N set from the data)
    archive_path: Path  # where the trained model is written (atomically)
    product_name: str = ""


@dataclass(frozen=True)
class TrainingOutcome:
    """What a finished (or stopped) run hands back to the GUI thread."""

    job: TrainingJob
    model: Any | None  # engine TrainedModel, None when no epoch completed
    archive: Path | None  # the saved archive, None when nothing was saved
    history: list[Any] = field(default_factory=list)  # engine EpochRecords
    stopped: bool = False
    best_epoch: int | None = None
    seconds: float = 0.0
    save_problem: str | None = None  # the archive is not where it was meant to be: why
    divergence: Any | None = None  # engine Divergence: the loss stopped being finite


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # engine TrainedModel
    archive: Path


# ----------------------------------------------------------------------------- prompt stop
def make_prompt_stop(token: Any) -> Any:
    """A Lightning callback that ends ``fit`` within one layer of ``token.cancel()``.

    Lightning is imported here, on the worker thread. Without Lightning's early-exit
    exception (another Lightning release) it does nothing and the engine's per-batch check
    remains.
    """
    import torch
    from lightning.pytorch.callbacks import Callback

    from ..engine.training import early_exit_exception

    exit_exception = early_exit_exception()

    class _PromptStop(Callback):
        """Ends ``fit`` within one layer of ``token.cancel()``, also mid-batch."""

        def __init__(self) -> None:
            self.token = token
            self.triggered = False
            self._handles: list[Any] = []

        def _check(self) -> None:
            if exit_exception is not None and self.token.cancelled:
                self.triggered = True
                raise exit_exception("training stopped by request")

        def _grad_hook(self, grad: Any) -> None:
            self._check()

        def _forward_hook(self, module: Any, inputs: Any, output: Any) -> None:
            self._check()
            if (
                torch.is_grad_enabled()
                and isinstance(output, torch.Tensor)
                and output.requires_grad
            ):
                output.register_hook(self._grad_hook)  # runs while gradients flow back

        def _forward_pre_hook(self, module: Any, inputs: Any) -> None:
            self._check()

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if exit_exception is None:
                return
            for module in pl_module.modules():
                if next(module.children(), None) is None:  # leaf layers only
                    self._handles.append(module.register_forward_pre_hook(self._forward_pre_hook))
                    self._handles.append(module.register_forward_hook(self._forward_hook))

        def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

        def on_train_batch_start(self, *args: Any) -> None:
            self._check()

        def on_validation_batch_start(self, *args: Any) -> None:
            self._check()

    return _PromptStop()


# ----------------------------------------------------------------------------- workers
class TrainingWorker(QObject):
    """Trains on one scan; lives in its own QThread. Emits exactly one of finished/failed."""

    #: a phase of the run, for the panel's message line ("Preparing the scan...")
    phase = pyqtSignal(str)
    #: training started: total epochs, batches per epoch
    train_started = pyqtSignal(int, int)
    #: a batch finished: epoch (1-based), batch (1-based), batches per epoch, loss
    batch_progress = pyqtSignal(int, int, int, float)
    #: an epoch finished: the engine's EpochRecord (epoch, train_loss, val_loss, ...)
    epoch_finished = pyqtSignal(object)
    #: the run ended, normally or stopped: a TrainingOutcome
    finished = pyqtSignal(object)
    #: the run failed: a readable message
    failed = pyqtSignal(str)

    def __init__(self, job: TrainingJob) -> None:
        super().__init__()
        self.job = job
        self.token = CancelToken()
        self.stop_requested_at: float | None = None

    def request_stop(self) -> None:
        """Thread-safe: the run stops at the next layer or batch boundary."""
        if self.stop_requested_at is None:
            self.stop_requested_at = time.perf_counter()
        self.token.cancel()

    def _log_stop_timing(self, step: str) -> None:
        """Log how long after Stop ``step`` ended (INFO): where a slow stop spent its time.

        Why: a Stop is meant to end training within a layer; when it takes seconds, the log
        says whether training itself or saving the model held it up.
        """
        if self.stop_requested_at is not None:
            elapsed = time.perf_counter() - self.stop_requested_at
            logger.info("Stop: %s %.2f s after the request", step, elapsed)

    # -- engine observer (called on the worker thread; only emits signals)
    def on_train_start(self, total_epochs: int, batches_per_epoch: int) -> None:
        self.train_started.emit(int(total_epochs), int(batches_per_epoch))

    def on_batch_end(self, epoch: int, batch: int, batches: int, loss: float) -> None:
        self.batch_progress.emit(int(epoch) + 1, int(batch) + 1, int(batches), float(loss))

    def on_epoch_end(self, record: Any) -> None:
        self.epoch_finished.emit(record)

    @pyqtSlot()
    def run(self) -> None:
        started = time.perf_counter()
        job = self.job
        try:
            self.phase.emit("Preparing the scan...")
            from ..host.backend import require_backend

            require_backend()
            from ..engine.payload import create_training_payload
            from ..engine.training import train
            from ..host.convert import reconstruct_input_to_data
            from ..host.saving import save_trained_model

            data = reconstruct_input_to_data(
                job.reconstruct_input, with_object=job.mode == "supervised"
            )
            # The scan is in ``data`` now: the job (which the outcome keeps, and the panel
            # after the run) no longer holds Ptychodus's copy of every pattern.
            self.job = job = dataclasses.replace(job, reconstruct_input=None)
            payload = create_training_payload(dict(job.overrides, N=data.N))
            if self.token.cancelled:
                self.finished.emit(TrainingOutcome(job, None, None, [], True, None, 0.0))
                return
            self.phase.emit(
                f"Training {job.reconstructor} on {data.n_patterns} patterns of "
                f"{data.N} x {data.N} px..."
            )
            prompt_stop = make_prompt_stop(self.token)
            result = train(payload, data, observer=self, cancel=self.token, callbacks=[prompt_stop])
            stopped = bool(result.cancelled or self.token.cancelled)
            self._log_stop_timing("training ended")
            archive, save_problem = None, None
            if result.history:
                self.phase.emit("Saving the model...")
                saved = save_trained_model(result.model, job.archive_path)
                archive, save_problem = saved.file, saved.problem
                self._log_stop_timing("model saved")
            outcome = TrainingOutcome(
                job=job,
                model=result.model if result.history else None,
                archive=archive,
                history=list(result.history),
                stopped=stopped,
                best_epoch=result.best_epoch,
                seconds=time.perf_counter() - started,
                save_problem=save_problem,
                divergence=result.divergence,
            )
        except BaseException as exc:  # noqa: BLE001 - a Qt slot must never raise: PyQt5 aborts
            # the whole process on an exception escaping a slot, so even SystemExit or
            # KeyboardInterrupt in the worker ends as a message in the panel, not a crash.
            # The panel logs the message once (ERROR); the traceback is for developers only.
            logger.debug("training failed: %s", describe_error(exc), exc_info=True)
            self.failed.emit(describe_error(exc))
            return
        self.finished.emit(outcome)


class LoadModelWorker(QObject):
    """Checks and loads a model archive (imports torch and reads the weights) off the GUI."""

    phase = pyqtSignal(str)
    finished = pyqtSignal(object)  # LoadedModel
    failed = pyqtSignal(str)

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)

    def request_stop(self) -> None:  # loading is short; nothing to interrupt
        pass

    @pyqtSlot()
    def run(self) -> None:
        try:
            self.phase.emit(f"Loading {self.path.name}...")
            from ..host.backend import require_backend
            from ..host.model_slot import check_archive

            file = check_archive(self.path).resolve()
            require_backend()
            from ..engine.archive import load_archive

            model = load_archive(file)
        except Exception as exc:
            logger.debug("cannot load %s: %s", self.path, describe_error(exc), exc_info=True)
            self.failed.emit(describe_error(exc))
            return
        self.finished.emit(LoadedModel(model, file))


# ----------------------------------------------------------------------------- thread owner
class WorkerThread(QObject):
    """Runs one worker at a time in a fresh ``QThread`` and cleans up after it.

    ``start`` moves the worker to the thread and calls its ``run`` slot there; the worker's
    ``finished``/``failed`` end the thread's event loop (a direct connection: it works even
    while the GUI thread is blocked in :meth:`shutdown`). ``idle`` is emitted on the GUI
    thread once the thread has ended.
    """

    idle = pyqtSignal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._thread: QThread | None = None
        self._worker: QObject | None = None

    @property
    def worker(self) -> QObject | None:
        return self._worker

    def is_running(self) -> bool:
        return self._thread is not None

    def start(self, worker: QObject, name: str = "torchpinn-worker") -> None:
        if self._thread is not None:
            raise RuntimeError("a TorchPINN task is already running: stop it first")
        thread = QThread()
        thread.setObjectName(name)
        worker.moveToThread(thread)
        thread.started.connect(worker.run)  # type: ignore[attr-defined]
        worker.finished.connect(thread.quit, Qt.DirectConnection)  # type: ignore[attr-defined]
        worker.failed.connect(thread.quit, Qt.DirectConnection)  # type: ignore[attr-defined]
        thread.finished.connect(self._on_thread_finished)
        self._thread, self._worker = thread, worker
        thread.start()

    def request_stop(self) -> None:
        worker = self._worker
        if worker is not None:
            worker.request_stop()  # type: ignore[attr-defined]

    def wait(self, timeout_s: float) -> bool:
        """Block until the thread ended (True) or ``timeout_s`` passed (False)."""
        thread = self._thread
        if thread is None:
            return True
        if math.isinf(timeout_s):
            return bool(thread.wait())  # QThread.wait() without a deadline
        return bool(thread.wait(max(0, int(timeout_s * 1000))))

    def shutdown(self, timeout_s: float = 30.0, *, then_wait: bool = True) -> bool:
        """Ask the worker to stop and wait for its thread (window closing, app quitting).

        After ``timeout_s`` the worker is in a step that does not look at Stop (reading a
        large scan, starting up, saving the model): with ``then_wait`` the wait goes on, said
        in the log. Why: giving up let Ptychodus exit with the thread running, which Qt ends
        by aborting the process ("QThread: Destroyed while thread is still running"), losing
        the model the worker was about to save. The worker sends its signals without waiting
        for the GUI thread, so the wait cannot deadlock.
        """
        self.request_stop()
        done = self.wait(timeout_s)
        if not done and then_wait:
            logger.warning(
                "the TorchPINN worker has not stopped after %.0f s (it is reading the scan, "
                "starting up or saving the model, steps that do not look at Stop): waiting for "
                "it so that nothing it saves is lost; end the process to abandon it",
                timeout_s,
            )
            done = self.wait(math.inf)
        if done:
            # Deliver the run's last signals now (the worker's result to the session, the
            # thread's ``finished`` to us), so nothing is left queued for deleted objects.
            for receiver in (self.parent(), self):
                if receiver is not None:
                    QCoreApplication.sendPostedEvents(receiver, QEvent.MetaCall)
            self._on_thread_finished()
        else:
            logger.error("the TorchPINN worker did not stop within %.0f s", timeout_s)
        return done

    @pyqtSlot()
    def _on_thread_finished(self) -> None:
        thread = self._thread
        sender = self.sender()  # None when called directly from shutdown()
        if thread is None or (sender is not None and sender is not thread):
            return  # a late signal of a thread shutdown() already cleaned up
        thread.wait()  # ``finished`` comes from the thread just before it really ends
        # Dropping the last references deletes both objects (Python owns them).
        self._thread, self._worker = None, None
        self.idle.emit()
