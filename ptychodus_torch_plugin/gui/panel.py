"""The TorchPINN parameter panel in Ptychodus's processing view.

``create_view_controller_factory(library, file_dialog_factory)`` is what the host's
registration calls (lazily, only when the GUI is built). Its factory builds one
:class:`TorchPINNPanel` per reconstructor (PINN, Supervised); all panels of a library share
one :class:`TrainingSession`, so one background task runs at a time and every panel shows it.

Threading rules: widgets and Ptychodus parameters are touched only here, on the GUI thread.
A run starts by reading everything it needs (the selected product's ``ReconstructInput``, the
settings as a flat dict) and hands it to a worker in its own ``QThread``
(:mod:`.workers`); the worker reports through queued signals. When training ends, the model is
adopted by the library's model slot, ``ModelPath`` is set, and the processing algorithm's
observers are notified so Ptychodus's "Infer" button enables at once.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptychodus.api.observer import Observable, Observer
from ptychodus.controller.processing import ReconstructorViewControllerFactory
from PyQt5.QtCore import QCoreApplication, QEvent, QObject, Qt, QTimer, pyqtSignal, pyqtSlot
from PyQt5.QtWidgets import (
    QComboBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ..host.names import LOGGER_NAME, MODEL_FILE_EXTENSION, MODEL_FILE_FILTER
from ..host.saving import default_model_directory
from ..host.settings import CHOICES
from ..host.settings import GROUPS as SETTINGS_GROUPS
from .model_info import ArchiveSummary, read_archive_summary
from .plots import LossPlot
from .workers import (
    LoadedModel,
    LoadModelWorker,
    TrainingJob,
    TrainingOutcome,
    TrainingWorker,
    WorkerThread,
)

logger = logging.getLogger(f"{LOGGER_NAME}.gui")

#: How long closing the window waits for a running worker to stop.
SHUTDOWN_TIMEOUT_S = 30.0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "scan"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParameterSpec:
    attribute: str  # TorchPINNSettings attribute
    label: str
    group: str
    description: str


GROUPS = ("Data", "Model", "Training", "Inference", "Execution")

PARAMETERS: tuple[ParameterSpec, ...] = (
    # Data: how the scan becomes network inputs
    ParameterSpec(
        "gridsize",
        "Grid size:",
        "Data",
        "Patterns per group side: each network input stacks gridsize x gridsize neighbouring "
        "diffraction patterns (1 = one pattern per input). A trained model keeps its own.",
    ),
    ParameterSpec(
        "neighbor_count",
        "Neighbours:",
        "Data",
        "Nearest scan positions searched when forming a group (used when grid size > 1).",
    ),
    ParameterSpec(
        "n_groups",
        "Training groups:",
        "Data",
        "Number of groups used for training; 0 = all of the scan.",
    ),
    ParameterSpec(
        "nphotons",
        "Photons per pattern:",
        "Data",
        "Expected photons per diffraction pattern for the Poisson model; 0 = measured from "
        "the data.",
    ),
    ParameterSpec(
        "probe_scale",
        "Probe scale:",
        "Data",
        "Normalisation scale of the probe in the physics model.",
    ),
    ParameterSpec(
        "validation_fraction",
        "Validation fraction:",
        "Data",
        "Fraction of the scan held out to compute the validation loss, not trained on (at "
        "gridsize > 1 a compact patch of positions); 0 trains on every pattern.",
    ),
    # Model: the network
    ParameterSpec(
        "n_filters_scale",
        "Filter scale:",
        "Model",
        "Width multiplier of the convolutional network; cost grows about with its square.",
    ),
    ParameterSpec(
        "amp_activation",
        "Amplitude activation:",
        "Model",
        "Output activation of the amplitude head.",
    ),
    ParameterSpec(
        "normalization",
        "Normalisation:",
        "Model",
        "Batch normalisation after each hidden convolution (not the output heads): more "
        "progress per epoch, each a little slower (none = the plain network).",
    ),
    # Training
    ParameterSpec("epochs", "Epochs:", "Training", "Passes over the training groups."),
    ParameterSpec(
        "batch_size",
        "Batch size:",
        "Training",
        "Groups per optimisation step; larger uses more memory.",
    ),
    ParameterSpec(
        "learning_rate",
        "Learning rate:",
        "Training",
        "Initial step size of the optimiser.",
    ),
    ParameterSpec(
        "scheduler",
        "LR scheduler:",
        "Training",
        "How the learning rate changes over the epochs.",
    ),
    ParameterSpec(
        "optimizer",
        "Optimiser:",
        "Training",
        "adam, or muon: Muon for the hidden convolutions and Adam for the rest, which reaches "
        "the same loss in fewer epochs (docs/performance.md).",
    ),
    ParameterSpec(
        "final_weights",
        "Keep weights of:",
        "Training",
        "Which network training hands over: the best epoch by validation loss, or the last "
        "epoch (with a decaying scheduler such as cosine the most converged one, and usually "
        "the better image of this scan).",
    ),
    ParameterSpec(
        "loss",
        "Loss:",
        "Training",
        "PINN training loss: Poisson negative log-likelihood of the counts, or mean absolute "
        "error of the amplitudes (the Supervised reconstructor fits the object directly).",
    ),
    ParameterSpec(
        "seed",
        "Seed:",
        "Training",
        "Random seed for weights, validation split and shuffling (reproducible runs).",
    ),
    ParameterSpec(
        "probe_refinement_epochs",
        "Probe refinement:",
        "Training",
        "Epochs of a per-scan fit of the probe before training (0 = use the probe as given). "
        "Use it when the probe may not be this scan's (another scan or defocus): with a "
        "mismatched probe the network learns a lattice instead of the object.",
    ),
    ParameterSpec(
        "probe_modes",
        "Probe modes:",
        "Training",
        "Incoherent probe modes the model uses (0 = as many as the probe has). More than the "
        "probe has are fitted by probe refinement; partially coherent beams need 2-3.",
    ),
    # Inference
    ParameterSpec(
        "patch_weighting",
        "Patch weighting:",
        "Inference",
        "How overlapping predicted patches are averaged when stitching: weighted by the "
        "probe intensity, or uniformly.",
    ),
    ParameterSpec(
        "subpixel",
        "Sub-pixel placement:",
        "Inference",
        "How a patch at a fractional scan position meets the image grid: lanczos3 resamples "
        "it onto the grid (sharp, the default), bilinear spreads each pixel over four (blurs "
        "by up to half a pixel).",
    ),
    ParameterSpec(
        "inference_batch_size",
        "Inference batch size:",
        "Inference",
        "Groups per forward pass during reconstruction.",
    ),
    ParameterSpec(
        "chunk_size",
        "Chunk size:",
        "Inference",
        "Groups per streamed result: the image and the progress bar update after each chunk, "
        "and Stop takes effect between chunks.",
    ),
    ParameterSpec(
        "crop_fraction",
        "Crop fraction:",
        "Inference",
        "Central fraction of each predicted patch used for stitching.",
    ),
    ParameterSpec(
        "inference_n_groups",
        "Inference groups:",
        "Inference",
        "Number of groups reconstructed; 0 = all of the scan.",
    ),
    ParameterSpec(
        "input_normalization",
        "Input normalisation:",
        "Inference",
        "Scale the diffraction data as measured now (recompute) or as during training (stored).",
    ),
    ParameterSpec(
        "phase_alignment",
        "Align patch phases",
        "Inference",
        "Turn each predicted patch by the phase that makes it agree with its neighbours "
        "before averaging: removes the slow phase drift of the image (the final image; the "
        "live previews are plain averages).",
    ),
    # Execution
    ParameterSpec(
        "accelerator",
        "Accelerator:",
        "Execution",
        "Where training and inference run; auto picks a GPU when PyTorch sees one.",
    ),
    ParameterSpec(
        "devices",
        "Devices:",
        "Execution",
        "Training devices: one inside Ptychodus (several would make Lightning re-launch "
        "Ptychodus itself); train on several GPUs with `ptychodus-torch train --devices N` "
        "and load the archive.",
    ),
    ParameterSpec(
        "precision",
        "Precision:",
        "Execution",
        "Numeric precision of training: bf16-mixed pays off on a GPU or a CPU with AMX "
        "(about 1.6x faster there; about 1.15x with AVX512-BF16 alone), and is much slower "
        "on CPUs without bfloat16 units.",
    ),
    ParameterSpec(
        "deterministic",
        "Deterministic:",
        "Execution",
        "Use deterministic algorithms (reproducible, sometimes slower).",
    ),
)


def _format_number(value: float | int) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def tool_tip(spec: ParameterSpec, parameter: Any, key: str) -> str:
    """The description, the allowed range or values, and the INI key (``Group.Name``)."""
    lines = [spec.description]
    name = key.rsplit(".", 1)[-1]
    if name in CHOICES:
        lines.append("Allowed: " + ", ".join(CHOICES[name]) + ".")
    elif spec.attribute == "devices":
        lines.append("Allowed: auto or 1.")
    elif hasattr(parameter, "get_minimum"):
        low, high = parameter.get_minimum(), parameter.get_maximum()
        if low is not None and high is not None:
            lines.append(f"Range: {_format_number(low)} to {_format_number(high)}.")
        elif low is not None:
            lines.append(f"Range: {_format_number(low)} or more.")
        elif high is not None:
            lines.append(f"Range: up to {_format_number(high)}.")
    else:
        lines.append("On or off.")
    lines.append(f"Setting: {key}")
    return "\n".join(lines)


def settings_keys(settings: Any) -> dict[str, str]:
    """``Group.Name`` (the INI section and key) of every panel setting, by attribute."""
    keys: dict[str, str] = {}
    groups = getattr(settings, "_groups", ())
    for group_name, group in zip(SETTINGS_GROUPS, groups, strict=False):
        try:
            items = list(group.parameters().items())
        except Exception:
            continue
        for spec in PARAMETERS:
            parameter = getattr(settings, spec.attribute)
            for name, candidate in items:
                if candidate is parameter:
                    keys[spec.attribute] = f"{group_name}.{name}"
    for spec in PARAMETERS:
        keys.setdefault(spec.attribute, spec.attribute)
    return keys


def build_parameter_widget(settings: Any, file_dialog_factory: Any = None) -> QWidget:
    """The grouped parameter editors, bound to the host's settings parameters."""
    from ptychodus.api.parameters import BooleanParameter, IntegerParameter, RealParameter
    from ptychodus.controller.parameters import ParameterViewBuilder

    builder = ParameterViewBuilder(file_dialog_factory)
    keys = settings_keys(settings)
    for group in GROUPS:
        for spec in (s for s in PARAMETERS if s.group == group):
            parameter = getattr(settings, spec.attribute)
            key = keys[spec.attribute]
            tip = tool_tip(spec, parameter, key)
            choice_name = key.rsplit(".", 1)[-1]
            if choice_name in CHOICES:
                builder.add_combo_box(
                    parameter, CHOICES[choice_name], spec.label, tool_tip=tip, group=group
                )
            elif isinstance(parameter, BooleanParameter):
                builder.add_check_box(parameter, spec.label, tool_tip=tip, group=group)
            elif isinstance(parameter, IntegerParameter):
                builder.add_spin_box(parameter, spec.label, tool_tip=tip, group=group)
            elif isinstance(parameter, RealParameter):
                builder.add_decimal_line_edit(parameter, spec.label, tool_tip=tip, group=group)
            else:
                builder.add_line_edit(parameter, spec.label, tool_tip=tip, group=group)
    widget = builder.build_widget(add_stretch=False)
    layout = widget.layout()
    if layout is not None:
        layout.setContentsMargins(0, 0, 0, 0)
    return widget


# ----------------------------------------------------------------------------- observers
class _Watcher(Observer):
    """Ptychodus observer that forwards to a Qt signal (queued when off the GUI thread)."""

    def __init__(self, signal: Any) -> None:
        super().__init__()
        self._signal = signal
        self._observables: list[Observable] = []

    def watch(self, observable: Observable) -> None:
        observable.add_observer(self)
        self._observables.append(observable)

    def detach(self) -> None:
        for observable in self._observables:
            observable.remove_observer(self)
        self._observables.clear()

    def _update(self, observable: Observable) -> None:
        try:
            self._signal.emit()
        except RuntimeError:  # the widget is gone
            self.detach()


# ----------------------------------------------------------------------------- session
class TrainingSession(QObject):
    """One per library: runs training / model loading in a worker thread, one at a time.

    Panels connect to ``worker_started`` to follow a run's signals; the session itself
    adopts trained or loaded models (GUI thread) and reports through ``message``.
    """

    #: a worker is about to start: (kind "train" | "load", worker); connect its signals now
    worker_started = pyqtSignal(str, object)
    busy_changed = pyqtSignal(bool)
    #: a line for every panel's message area: (text, is_error)
    message = pyqtSignal(str, bool)
    #: the library's model changed (trained or loaded): the archive path
    model_changed = pyqtSignal(object)
    #: an epoch of training started by Ptychodus's own Train: (reconstructor name, record)
    host_epoch = pyqtSignal(str, object)

    def __init__(self, library: Any, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.library = library
        self.model_directory: Path | None = None  # None: default_model_directory()
        self.runner = WorkerThread(self)
        self.runner.idle.connect(self._on_idle)
        listen = getattr(library, "add_epoch_listener", None)
        if listen is not None:  # emitted on Ptychodus's worker thread, delivered on ours
            listen(lambda name, record: self.host_epoch.emit(name, record))
        #: This session holds the library's one training run (see begin_training).
        self._holds_training = False
        self.kind: str | None = None
        self.last_outcome: TrainingOutcome | None = None
        self.last_error: str | None = None
        self.stop_requested_at: float | None = None
        #: seconds from Stop to the run's end (signal handled on the GUI thread)
        self.last_stop_latency: float | None = None
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)

    # ------------------------------------------------------------------ state
    def is_running(self) -> bool:
        return self.runner.is_running()

    @property
    def processing_core(self) -> Any:
        return getattr(self.library, "processing_core", None)

    def _processing_api(self) -> Any:
        core = self.processing_core
        api = getattr(core, "processing_api", None)
        if api is None:
            raise RuntimeError(
                "the TorchPINN library is not attached to Ptychodus's processing core; "
                "restart Ptychodus with the plugin installed"
            )
        return api

    def archive_path_for(self, product_name: str, mode: str) -> Path:
        directory = self.model_directory or default_model_directory()
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return directory / f"{_slug(product_name)}-{mode}-{stamp}{MODEL_FILE_EXTENSION}"

    # ------------------------------------------------------------------ training
    def start_training(
        self, reconstructor_name: str, product_index: int, product_name: str
    ) -> bool:
        """Snapshot the scan and settings (GUI thread) and train in a worker."""
        if self.is_running():
            self._report("A TorchPINN task is already running: stop it first.", error=True)
            return False
        try:
            reconstructor = self.library.reconstructor(reconstructor_name)
            api = self._processing_api()
            if product_index < 0:
                raise RuntimeError(
                    "no product selected: load a scan and choose it in the Product list above"
                )
            # Refusals first: the scan's copy below takes seconds (and memory) for a big scan.
            check_not_training = getattr(self.library, "check_not_training", None)
            if check_not_training is not None:
                check_not_training()
            self.last_outcome = None  # its model and history: not kept beside a new scan copy
            reconstruct_input = api.get_reconstruct_input(product_index=product_index)
            patterns = reconstruct_input.diffraction_patterns
            overrides = self.library.settings.training_overrides(
                reconstructor.mode, int(patterns.shape[-1])
            )
            job = TrainingJob(
                reconstructor=reconstructor.name,
                mode=reconstructor.mode,
                reconstruct_input=reconstruct_input,
                overrides=overrides,
                archive_path=self.archive_path_for(product_name, reconstructor.mode),
                product_name=product_name,
            )
            begin = getattr(self.library, "begin_training", None)
            if begin is not None:
                begin(f"{reconstructor.name}, started from the panel")
                self._holds_training = True
        except Exception as exc:
            self._fail(f"Cannot start training: {_text(exc)}")
            return False
        worker = TrainingWorker(job)
        worker.finished.connect(self._on_training_finished)
        worker.failed.connect(self._on_failed)
        self.last_outcome, self.last_error = None, None
        self.stop_requested_at, self.last_stop_latency = None, None
        self._start("train", worker)
        logger.info(
            "%s training started from the panel on %s (%d patterns); the model will be saved to %s",
            job.reconstructor,
            product_name or f"product {product_index}",
            len(patterns),
            job.archive_path,
        )
        self.flush_log_pane()
        return True

    def stop(self) -> None:
        if not self.is_running():
            return
        if self.stop_requested_at is None:
            self.stop_requested_at = time.perf_counter()
            self.message.emit("Stopping...", False)
        self.runner.request_stop()

    # The worker's results are slots of this object (pyqtSlot), not plain methods: PyQt
    # delivers a plain method through a hidden proxy object, which the shutdown's flush of
    # this object's queued calls (``WorkerThread.shutdown``) does not reach, so on a quit the
    # run's last words (where the model was saved) were never handled or logged.
    @pyqtSlot(object)
    def _on_training_finished(self, outcome: TrainingOutcome) -> None:
        self._note_stop_latency()
        self.last_outcome = outcome
        if outcome.archive is None or outcome.model is None:
            text = (
                "Training stopped before the first epoch finished: no model was saved."
                if outcome.stopped
                else "Training ended without a finished epoch: no model was saved."
            )
            logger.warning(text)
            self._report(text, error=False)
            return
        self._adopt(outcome.model, outcome.archive)
        epochs = len(outcome.history)
        if outcome.divergence is not None:
            text = (
                f"Training diverged: {outcome.divergence}. Kept "
                f"{outcome.model.kept_weights(outcome.best_epoch)} of {epochs} finished "
                f"epoch{'s' if epochs != 1 else ''}, saved to {outcome.archive} and loaded. "
                f"To improve it, {outcome.divergence.advice}."
            )
            logger.warning(text)
        elif outcome.stopped:
            text = (
                f"Stopped after {epochs} epoch{'s' if epochs != 1 else ''}: kept "
                f"{outcome.model.kept_weights(outcome.best_epoch)}, saved to {outcome.archive} "
                "and loaded. Infer uses it now; Save model as... keeps a copy elsewhere."
            )
            logger.warning(text)
        else:
            text = (
                f"Trained {epochs} epochs in {_duration(outcome.seconds)} "
                f"({outcome.model.kept_weights(outcome.best_epoch)}); saved to "
                f"{outcome.archive} and loaded: Infer uses it now."
            )
            logger.info(text)
        if outcome.save_problem is not None:
            text = f"{text} Note: {outcome.save_problem}."
            logger.error("%s", outcome.save_problem)
        problem = outcome.save_problem is not None or outcome.divergence is not None
        self._report(text, error=problem)

    # ------------------------------------------------------------------ model files
    def load_model(self, path: Path) -> bool:
        if self.is_running():
            self._report("A TorchPINN task is already running: stop it first.", error=True)
            return False
        training = getattr(self.library, "training_now", lambda: None)()
        if training is not None:  # its model would replace this one when it ends
            self._report(
                f"A TorchPINN training is running ({training}): the model it trains is loaded "
                "when it ends, replacing this one. Load the model after it, or Stop it first.",
                error=True,
            )
            return False
        worker = LoadModelWorker(Path(path))
        worker.finished.connect(self._on_model_loaded)
        worker.failed.connect(self._on_failed)
        self.last_error = None
        self._start("load", worker)
        return True

    @pyqtSlot(object)
    def _on_model_loaded(self, loaded: LoadedModel) -> None:
        self._adopt(loaded.model, loaded.archive)
        text = f"Model loaded from {loaded.archive}: Infer uses it now."
        logger.info(text)
        self._report(text, error=False)

    def save_model(self, path: Path) -> Path | None:
        try:
            target = self.library.model_slot.save_copy(Path(path))
        except Exception as exc:
            self._fail(f"Cannot save the model: {_text(exc)}")
            return None
        text = f"Model saved as {target}."
        logger.info(text)
        self._report(text, error=False)
        return target

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
        """Stop a running worker and wait for its thread (window closing / app quitting)."""
        if not self.is_running():
            return True
        logger.warning("stopping the running TorchPINN %s: the window is closing", self.kind)
        self.stop_requested_at = self.stop_requested_at or time.perf_counter()
        return self.runner.shutdown(timeout_s)

    # ------------------------------------------------------------------ internals
    def _start(self, kind: str, worker: Any) -> None:
        self.kind = kind
        self.worker_started.emit(kind, worker)  # before start: panels connect first
        self.runner.start(worker, name=f"torchpinn-{kind}")
        self.busy_changed.emit(True)

    def _on_idle(self) -> None:
        """The worker's thread ended (GUI thread): free the training run, then the buttons."""
        if self._holds_training:
            self._holds_training = False
            self.library.end_training()
        self.busy_changed.emit(False)

    def _note_stop_latency(self) -> None:
        if self.stop_requested_at is not None:
            self.last_stop_latency = time.perf_counter() - self.stop_requested_at

    def _adopt(self, model: Any, archive: Path) -> None:
        """Make ``model`` the library's model (GUI thread) and let Ptychodus enable Infer."""
        self.library.model_slot.adopt(model, archive)
        self.library.publish_model(archive)
        self.model_changed.emit(Path(archive))

    @pyqtSlot(str)
    def _on_failed(self, text: str) -> None:
        self._note_stop_latency()
        kind = "Training" if self.kind == "train" else "Loading the model"
        self._fail(f"{kind} failed: {text}")

    def _fail(self, text: str) -> None:
        self.last_error = text
        logger.error(text)
        self._report(text, error=True)

    def _report(self, text: str, *, error: bool) -> None:
        self.message.emit(text, error)
        self.flush_log_pane()

    def flush_log_pane(self) -> None:
        """Let Ptychodus's status view drain its log handler into the log pane now."""
        api = getattr(self.processing_core, "processing_api", None)
        monitor = getattr(api, "task_monitor", None)
        if monitor is not None and hasattr(monitor, "notify_observers"):
            try:
                monitor.notify_observers()
            except Exception:  # cosmetic: the pane drains on the next task anyway
                pass


def _text(exc: BaseException) -> str:
    from .workers import describe_error

    return describe_error(exc)


# ----------------------------------------------------------------------------- panel
class TorchPINNPanel(QWidget):
    """The panel for one reconstructor: model status, actions, live progress, parameters."""

    _model_path_changed = pyqtSignal()

    def __init__(
        self,
        session: TrainingSession,
        reconstructor: Any,
        file_dialog_factory: Any = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.session = session
        self.library = session.library
        self.reconstructor = reconstructor
        self._file_dialog_factory = file_dialog_factory
        self.setObjectName(f"torchpinn-panel-{reconstructor.name.casefold()}")
        self._run_started = 0.0
        self._epochs = 0
        self._batches = 0
        self._done_batches = 0
        #: (time, batches done) at the first finished batch: the pace is measured from there
        self._pace_origin: tuple[float, int] | None = None
        self._last_batch_at = 0.0  # when the latest batch finished
        self._showing_live = False
        self._window_filtered: QWidget | None = None

        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.train_button = QPushButton("Train on this scan")
        self.train_button.setToolTip(
            f"Train the {reconstructor.name} model on the product selected above, with the "
            "settings below, in the background; the model is loaded when training ends."
            + (
                " Supervised training fits the product's current object (ground truth)."
                if reconstructor.mode == "supervised"
                else ""
            )
        )
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip(
            "Stop training within a few seconds; the weights Keep weights of chooses among "
            "the finished epochs (the best, by default) are kept and loaded."
        )
        self.load_button = QPushButton("Load model...")
        self.load_button.setToolTip(f"Load a trained model archive ({MODEL_FILE_FILTER}).")
        self.save_button = QPushButton("Save model as...")
        self.save_button.setToolTip("Save a copy of the current model archive.")
        self.epoch_bar = QProgressBar()
        self.epoch_bar.setFormat("epoch %v of %m")
        self.batch_bar = QProgressBar()
        self.batch_bar.setFormat("batch %v of %m")
        self.time_label = QLabel()
        self.message_label = QLabel()
        self.message_label.setWordWrap(True)
        self.message_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.loss_plot = LossPlot()
        self._clock = QTimer(self)
        self._clock.setInterval(1000)
        self._clock.timeout.connect(self._update_time_label)

        self._build_layout()

        self.train_button.clicked.connect(self.train_on_this_scan)
        self.stop_button.clicked.connect(session.stop)
        self.load_button.clicked.connect(self._choose_model_to_load)
        self.save_button.clicked.connect(self._choose_model_to_save)
        session.worker_started.connect(self._on_worker_started)
        session.busy_changed.connect(self._on_busy_changed)
        session.host_epoch.connect(self._on_host_epoch)
        session.message.connect(self.show_message)
        session.model_changed.connect(lambda _path: self.refresh_model_status())

        self._model_path_changed.connect(self.refresh_model_status)
        self._watcher = _Watcher(self._model_path_changed)
        self._watcher.watch(self.library.settings.model_path)
        self.destroyed.connect(self._watcher.detach)

        self._set_progress_visible(False)
        self._on_busy_changed(session.is_running())
        self.refresh_model_status()

    # ------------------------------------------------------------------ layout
    def _build_layout(self) -> None:
        model_box = QGroupBox(f"{self.library.name} {self.reconstructor.name} model")
        buttons = QGridLayout()
        buttons.addWidget(self.train_button, 0, 0)
        buttons.addWidget(self.stop_button, 0, 1)
        buttons.addWidget(self.load_button, 1, 0)
        buttons.addWidget(self.save_button, 1, 1)
        progress = QHBoxLayout()
        progress.addWidget(self.epoch_bar)
        progress.addWidget(self.batch_bar)
        box_layout = QVBoxLayout()
        box_layout.addWidget(self.status_label)
        box_layout.addLayout(buttons)
        box_layout.addLayout(progress)
        box_layout.addWidget(self.time_label)
        box_layout.addWidget(self.message_label)
        box_layout.addWidget(self.loss_plot)
        model_box.setLayout(box_layout)

        self.parameter_widget = build_parameter_widget(
            self.library.settings, self._file_dialog_factory
        )
        layout = QVBoxLayout()
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(model_box)
        layout.addWidget(self.parameter_widget)
        layout.addStretch()
        self.setLayout(layout)
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Minimum)

    def _set_progress_visible(self, visible: bool) -> None:
        for widget in (self.epoch_bar, self.batch_bar, self.time_label):
            widget.setVisible(visible)

    # ------------------------------------------------------------------ model status
    def refresh_model_status(self) -> None:
        path = self.library.settings.get_model_path()
        if path is None:
            self.status_label.setText(
                "No model loaded: train one on this scan, or load a model archive "
                f"(*{MODEL_FILE_EXTENSION})."
            )
            self.status_label.setToolTip("")
            if not self._showing_live:
                self.loss_plot.clear("Loss (no model loaded)")
            self._sync_buttons()
            return
        # A slot: nothing may escape it (PyQt5 ends the whole application on an exception in
        # a slot), whatever the archive holds.
        try:
            summary: ArchiveSummary = read_archive_summary(path)
            self.status_label.setText(f"Model: {summary.path.name} · {summary.describe()}")
            if not self._showing_live:
                self.loss_plot.set_history(summary.history, title="Loss of the loaded model")
        except Exception as exc:
            self.status_label.setText(f"Model: {path} (cannot be read: {_text(exc)})")
            if not self._showing_live:
                self.loss_plot.clear("Loss (the model cannot be read)")
        self.status_label.setToolTip(str(path))
        self._sync_buttons()

    # ------------------------------------------------------------------ actions
    def train_on_this_scan(self) -> bool:
        index, name = self._selected_product()
        self.show_message("Preparing the scan...", False)
        return self.session.start_training(self.reconstructor.name, index, name)

    def _selected_product(self) -> tuple[int, str]:
        """The product chosen in the processing view's Product list (index, name)."""
        combo = self._find_product_combo()
        if combo is None:
            return -1, ""
        return combo.currentIndex(), combo.currentText()

    def _find_product_combo(self) -> QComboBox | None:
        try:
            from ptychodus.controller.product.core import ProductRepositoryComboProxyModel
        except Exception:  # another host layout: no product list to find
            return None
        widget: QWidget | None = self.parentWidget()
        while widget is not None:
            for combo in widget.findChildren(QComboBox):
                if isinstance(combo.model(), ProductRepositoryComboProxyModel):
                    return combo
            widget = widget.parentWidget()
        return None

    def _choose_model_to_load(self) -> None:
        if self._file_dialog_factory is None:
            self.show_message("No file dialog available in this host.", True)
            return
        path, _ = self._file_dialog_factory.get_open_file_path(
            self,
            "Load Model",
            name_filters=[MODEL_FILE_FILTER, "All files (*)"],
            selected_name_filter=MODEL_FILE_FILTER,
        )
        if path:
            self.session.load_model(Path(path))

    def _choose_model_to_save(self) -> None:
        if self._file_dialog_factory is None:
            self.show_message("No file dialog available in this host.", True)
            return
        path, _ = self._file_dialog_factory.get_save_file_path(
            self,
            "Save Model As",
            name_filters=[MODEL_FILE_FILTER],
            selected_name_filter=MODEL_FILE_FILTER,
        )
        if path:
            self.session.save_model(Path(path))

    # ------------------------------------------------------------------ run feedback
    def _on_worker_started(self, kind: str, worker: Any) -> None:
        self._install_close_filter()
        worker.phase.connect(self._on_phase)
        if kind != "train":
            self._set_progress_visible(False)  # an earlier run's bars are not this task's
            return
        self._showing_live = True
        self._run_started = time.perf_counter()
        self._epochs = self._batches = self._done_batches = 0
        self._pace_origin = None
        self.loss_plot.clear(f"{worker.job.reconstructor} training on {worker.job.product_name}")
        self.epoch_bar.setRange(0, max(1, int(worker.job.overrides.get("epochs", 1))))
        self.epoch_bar.setValue(0)
        self.batch_bar.setRange(0, 1)
        self.batch_bar.setValue(0)
        self.batch_bar.setFormat("preparing...")  # reading the scan, probe refinement
        self._set_progress_visible(True)
        self._update_time_label()
        self._clock.start()
        worker.train_started.connect(self._on_train_started)
        worker.batch_progress.connect(self._on_batch_progress)
        worker.epoch_finished.connect(self._on_epoch_finished)

    def _on_host_epoch(self, reconstructor: str, record: Any) -> None:
        """An epoch of Ptychodus's own Train of this reconstructor: the loss, live."""
        if reconstructor != self.reconstructor.name or self.session.is_running():
            return
        if int(record.epoch) == 1:
            self.loss_plot.clear(f"{reconstructor} training (Ptychodus's Train)")
            self._set_progress_visible(False)  # the panel's bars are of an earlier run
        self.loss_plot.add_record(record)

    def _on_phase(self, text: str) -> None:
        if self.session.is_running():  # not a phase queued before a window close ended it
            self.show_message(text, False)

    def _on_train_started(self, epochs: int, batches: int) -> None:
        if not self._showing_live:
            return
        self._epochs, self._batches = epochs, batches
        self.epoch_bar.setRange(0, max(1, epochs))
        self.batch_bar.setRange(0, max(1, batches))
        self.batch_bar.setFormat("batch %v of %m")

    def _on_batch_progress(self, epoch: int, batch: int, batches: int, loss: float) -> None:
        # Progress of this run only: a window close ends the run (and the live view) while
        # the worker's last events may still be queued.
        if not self._showing_live:
            return
        self._batches = batches
        self._done_batches = (epoch - 1) * batches + batch
        self._last_batch_at = time.perf_counter()
        if self._pace_origin is None:
            self._pace_origin = (self._last_batch_at, self._done_batches)
        self.epoch_bar.setValue(epoch)  # "epoch 3 of 50" while epoch 3 runs
        self.batch_bar.setRange(0, max(1, batches))
        self.batch_bar.setValue(batch)
        self._update_time_label()

    def _on_epoch_finished(self, record: Any) -> None:
        if not self._showing_live:
            return
        self.epoch_bar.setValue(int(record.epoch))
        self.loss_plot.add_record(record)
        val = "" if record.val_loss is None else f", validation {record.val_loss:.4g}"
        self.show_message(f"Epoch {record.epoch}: loss {record.train_loss:.4g}{val}", False)
        # The engine's warnings of this epoch (a stall, say) in Ptychodus's log pane now: it
        # drains its handler only when a task monitor notifies, else at the run's end.
        self.session.flush_log_pane()

    def _update_time_label(self) -> None:
        now = time.perf_counter()
        elapsed = now - self._run_started
        text = f"elapsed {_duration(elapsed)}"
        total = self._epochs * self._batches
        origin = self._pace_origin
        if origin is not None and self._done_batches > origin[1] and total > 0:
            # Paced from the first finished batch on: the first one also pays for start-up
            # (threads, allocations), which made a 4-minute run announce over an hour. Paced
            # up to the latest finished batch, with the time since then taken off: pacing up
            # to now counted the batch still running as done, and the estimate climbed by a
            # second every second of a slow batch or a validation pass.
            rate = (self._last_batch_at - origin[0]) / (self._done_batches - origin[1])
            left = (total - self._done_batches) * rate - (now - self._last_batch_at)
            left = max(0.0, left)
            text += f" · about {_duration(left)} left"
        elif self.session.is_running():
            text += " · estimating time left..."
        self.time_label.setText(text)

    def _on_busy_changed(self, busy: bool) -> None:
        if not busy:
            self._clock.stop()
            if self._showing_live:
                self._showing_live = False
                self._show_run_ended()
                # No run now: the plot shows the loaded model's history (the new model's, or
                # the earlier one's when this run saved none), as the user guide says.
                self.refresh_model_status()
        self._sync_buttons()

    def _show_run_ended(self) -> None:
        """The time label after a run: how long it took and how far it got, not a stale ETA."""
        outcome = self.session.last_outcome
        done = 0 if outcome is None else len(outcome.history)
        if outcome is None:
            how = "failed"
        elif outcome.divergence is not None:
            how = "diverged"
        elif outcome.stopped:
            how = "stopped"
        else:
            how = "finished"
        planned = f" of {self._epochs}" if self._epochs else ""
        if how != "finished":  # the bars showed the epoch cut short, or "preparing..."
            self.epoch_bar.setValue(done)
            self.batch_bar.setRange(0, 1)
            self.batch_bar.setValue(0)
            self.batch_bar.setFormat(how)
        self.time_label.setText(
            f"{how} after {_duration(time.perf_counter() - self._run_started)} · "
            f"{done}{planned} epoch{'s' if (self._epochs or done) != 1 else ''}"
        )

    def _sync_buttons(self) -> None:
        busy = self.session.is_running()
        training = busy and self.session.kind == "train"
        self.train_button.setEnabled(not busy)
        self.stop_button.setEnabled(training)
        self.load_button.setEnabled(not busy)
        self.save_button.setEnabled(self.library.settings.get_model_path() is not None)

    def show_message(self, text: str, error: bool = False) -> None:
        self.message_label.setStyleSheet("color: #b00020;" if error else "")
        self.message_label.setText(text)

    # ------------------------------------------------------------------ window closing
    def _install_close_filter(self) -> None:
        window = self.window()
        if window is self or window is self._window_filtered:
            return
        window.installEventFilter(self)
        self._window_filtered = window

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt API
        if watched is self._window_filtered and event.type() == QEvent.Close:
            if self.session.is_running():
                self.session.shutdown()
        return False

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        super().showEvent(event)
        self._install_close_filter()


# ----------------------------------------------------------------------------- factory
class TorchPINNViewControllerFactory(ReconstructorViewControllerFactory):
    """Ptychodus ``ReconstructorViewControllerFactory`` for the TorchPINN library."""

    def __init__(self, library: Any, file_dialog_factory: Any = None) -> None:
        super().__init__()
        self._library = library
        self._file_dialog_factory = file_dialog_factory
        self.session = TrainingSession(library)
        self.panels: list[TorchPINNPanel] = []

    @property
    def name(self) -> str:
        return str(self._library.name)

    def create_view_controller(self, reconstructor_name: str) -> QWidget:
        """Our panel, or a label saying why it is missing: Ptychodus builds every panel while
        it starts, so an exception here would stop the whole application, not only ours."""
        try:
            reconstructor = self._library.reconstructor(reconstructor_name)
            panel = TorchPINNPanel(self.session, reconstructor, self._file_dialog_factory)
        except Exception as exc:
            logger.warning(
                "the %s %s panel could not be built (%s: %s); its reconstructor still runs "
                "with the settings file's values",
                self.name,
                reconstructor_name,
                type(exc).__name__,
                exc,
            )
            label = QLabel(
                f"The TorchPINN {reconstructor_name} panel could not be built:\n"
                f"{type(exc).__name__}: {exc}\n\nThe reconstructor still runs with the "
                "settings file's values; please report this with the log."
            )
            label.setWordWrap(True)
            label.setAlignment(Qt.AlignmentFlag.AlignCenter)
            return label
        self.panels.append(panel)
        return panel


def create_view_controller_factory(
    library: Any, file_dialog_factory: Any = None
) -> TorchPINNViewControllerFactory:
    """Entry point named by the plugin (``host.names.VIEW_FACTORY``)."""
    return TorchPINNViewControllerFactory(library, file_dialog_factory)
