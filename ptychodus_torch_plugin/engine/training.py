"""Training: a Lightning Trainer built from the execution config, behaviour added by Callbacks.

``train(payload, data, ...)`` is the one entry point used by the CLI, the Ptychodus host and the
Qt worker. What differs between them (a progress bar, a live loss plot, a Stop button) is
attached through ``TrainingObserver`` and ``CancelToken``, adapted here into Lightning Callback
hooks, not threaded through the training code as flags.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import itertools
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from .atomic import atomic_write_path
from .cancel import CancelToken
from .config import SUPPORTED_BACKEND, ExecutionConfig
from .data import PtychoData
from .devices import resolve_accelerator, select_device
from .model import EpochRecord, TrainedModel
from .module import TRAIN_LOSS, VAL_LOSS, PINNModule, SupervisedModule
from .payload import TrainingPayload
from .prepare import (
    GroupDataset,
    PreparedScan,
    prepare_scan,
    prepared_probe,
    split_for_validation,
)
from .probe_refinement import ProbeRefinement, refine_probe

logger = logging.getLogger(__name__)

__all__ = [
    "CancelToken",
    "Divergence",
    "TrainingDivergedError",
    "TrainingObserver",
    "TrainingResult",
    "train",
]


class TrainingObserver(Protocol):
    """What a front end (CLI, Ptychodus, Qt) hears during training. All methods optional."""

    def on_train_start(self, total_epochs: int, batches_per_epoch: int) -> None: ...

    def on_batch_end(self, epoch: int, batch: int, batches: int, loss: float) -> None: ...

    def on_epoch_end(self, record: EpochRecord) -> None: ...


@dataclass(frozen=True)
class Divergence:
    """Where training diverged: the first batch whose loss was not finite (NaN or infinite)."""

    epoch: int  # 1-based, as in the history
    batch: int  # 1-based, within the epoch
    loss: float
    learning_rate: float  # the rate of that batch (schedules move it)
    configured_learning_rate: float  # the rate the user set (the schedule's peak)
    precision: str = "32-true"

    def __str__(self) -> str:
        return (
            f"the training loss became {self.loss} in epoch {self.epoch}, batch {self.batch}, "
            f"at learning rate {self.learning_rate:.3g}"
        )

    @property
    def advice(self) -> str:
        rate = self.configured_learning_rate
        text = f"lower the learning rate (set to {rate:.3g}; try {rate / 4:.2g})"
        if self.precision.startswith("16"):  # float16's range ends at 65504
            text += " or train in bf16-mixed or 32-true precision"
        return f"{text} and train again"


class TrainingDivergedError(RuntimeError):
    """Training diverged before any epoch finished with finite weights: there is no model."""


@dataclass
class TrainingResult:
    """What training returns: the model and how the run went.

    The model holds the weights chosen by ``TrainingConfig.final_weights``: the best epoch
    by the monitored metric so far (default), or the last finished epoch; ``best_epoch`` is
    the epoch whose weights those are.
    """

    model: TrainedModel
    history: list[EpochRecord]
    cancelled: bool
    best_epoch: int | None
    output_dir: Path | None
    backend: str = SUPPORTED_BACKEND
    checkpoint_paths: list[Path] = field(default_factory=list)
    #: The probe refinement that ran before training (``probe_refinement_epochs > 0``).
    probe_refinement: ProbeRefinement | None = None
    #: Set when training stopped early because its loss stopped being finite; the model then
    #: holds weights from before that (an epoch that finished).
    divergence: Divergence | None = None
    #: The settings training ran with: those given, except where training had to differ
    #: (``16-mixed`` on the CPU trains in ``bf16-mixed``; without validation data the
    #: training loss is monitored). The model's config records the same values.
    payload: TrainingPayload | None = None


# ----------------------------------------------------------------------------- callbacks
class _GuardedObserver:
    """Calls a progress observer's methods; a method that raises is logged and muted.

    Why: observers report progress (a console line, a Qt signal, Ptychodus's log); a closed
    pipe (``ptychodus-torch train ... | head``) or a deleted widget must not throw away the
    epochs already trained. Training goes on and returns its result as usual. Only the
    method that failed is muted: an observer may also keep time in another one (the quality
    benchmark's budget cancels from ``on_batch_end`` and prints from ``on_epoch_end``).
    """

    def __init__(self, observer: Any) -> None:
        self._observer = observer
        self._failed: set[str] = set()

    def __call__(self, name: str, *args: Any) -> None:
        method = None if name in self._failed else getattr(self._observer, name, None)
        if method is None:
            return
        try:
            method(*args)
        except Exception:
            self._failed.add(name)
            logger.exception(
                "the progress observer %s failed in %s; training goes on without it",
                type(self._observer).__name__,
                name,
            )


class _ObserverCallback(Callback):
    def __init__(self, observer: _GuardedObserver) -> None:
        self._call = observer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._call("on_train_start", trainer.max_epochs, int(trainer.num_training_batches))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float("nan")
        # Lightning hands back the loss divided by accumulate_grad_batches (what it
        # back-propagates); observers are shown the batch's own loss, as the logs are.
        value *= int(trainer.accumulate_grad_batches)
        self._call(
            "on_batch_end", trainer.current_epoch, idx, int(trainer.num_training_batches), value
        )


def early_exit_exception() -> type[BaseException] | None:
    """The exception Lightning treats as "end ``fit`` now, normally" (its tuner uses it).

    Raised from a callback it ends ``fit`` at once: no validation pass, no epoch-end hooks
    for the epoch cut short. Private to Lightning (pinned in constraints.txt), hence looked up
    defensively: ``None`` means the callers fall back to ``trainer.should_stop``.
    """
    try:
        from lightning.pytorch.utilities.exceptions import _TunerExitException
    except Exception:  # another Lightning release
        return None
    return _TunerExitException


class _BatchStop(Callback):
    """Ends ``fit`` right after a batch, for a reason; the epoch cut short is not recorded.

    Shared by the Stop button (:class:`_CancelCallback`) and the divergence guard
    (:class:`_DivergenceCallback`): both end ``fit`` at once (:func:`early_exit_exception`),
    and :class:`_HistoryCallback` asks them whether an epoch that still ends was cut short.
    """

    def __init__(self) -> None:
        self.fired = False
        self._exit = early_exit_exception()

    def _stop(self, trainer: L.Trainer, why: str) -> None:
        self.fired = True
        trainer.should_stop = True
        if self._exit is not None:
            raise self._exit(why)


class _CancelCallback(_BatchStop):
    """Ends training within one batch of ``token.cancel()``: checked around every batch.

    Checked before and after every training batch and before every validation batch, and it
    ends ``fit`` at once (:func:`early_exit_exception`), so Stop never waits for a validation
    pass over a large test scan and the epoch cut short is never recorded as finished: the
    model handed back is chosen among the whole epochs (``final_weights``: the best so far,
    or the last). It must run after every other batch-end hook (``train`` adds it last), so
    a cancel raised by an observer or another thread during batch k stops training right
    after batch k.
    """

    def __init__(self, token: CancelToken) -> None:
        super().__init__()
        self.token = token

    @property
    def cancelled(self) -> bool:
        return self.fired

    def _check(self, trainer: L.Trainer) -> None:
        if self.token.cancelled:
            self._stop(trainer, "training stopped by request")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._check(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._check(trainer)

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._check(trainer)


def _batches_per_epoch(trainer: L.Trainer) -> int:
    """Training batches per epoch (Lightning says inf for a loader without a length)."""
    value = float(trainer.num_training_batches)
    return int(value) if math.isfinite(value) else 1_000


def _broken(module: torch.nn.Module) -> bool:
    """True when a floating-point weight or buffer of ``module`` holds NaN or infinity."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class _DivergenceCallback(_BatchStop):
    """Stops training once a non-finite loss has broken the weights, before they are kept.

    Why: after a NaN or infinite loss the optimiser step writes NaN into the weights, so every
    later batch is wasted time and the last epoch's weights would make an image of NaN.
    Stopping there keeps the weights chosen among the epochs that finished (``final_weights``),
    and ``train`` says what happened and what to change, instead of a run that ends normally
    with a useless model.

    The first non-finite loss is remembered and the weights (and batch-norm buffers) are
    checked after every batch until the optimiser has stepped on it: with
    ``accumulate_grad_batches`` = k that is up to k - 1 batches later. If they stay finite
    (a float16 gradient scaler skipped the step) training goes on, unless every loss of a
    whole epoch's worth of batches in a row is non-finite. Every epoch's end checks the
    weights too, before the history keeps them (a finite loss can still have infinite
    gradients). The decision is taken together by all processes of a multi-GPU run (one
    process's NaN batch breaks everyone's weights at the shared step; stopping alone would
    leave the others waiting for it). Cost: a scalar check per batch (and, on several GPUs, a
    one-number all-reduce), the weights only while a non-finite loss is pending and once per
    epoch.

    Runs first among the callbacks, so nothing else sees a batch or an epoch end with broken
    weights (an observer, a weight average, the history, a checkpoint).
    """

    def __init__(self, configured_learning_rate: float, precision: str) -> None:
        super().__init__()
        self.configured_learning_rate = configured_learning_rate
        self.precision = str(precision)
        self.divergence: Divergence | None = None
        self._rate = math.nan
        self._pending: Divergence | None = None  # the first non-finite loss not yet cleared
        self._checked_since = 0  # batches since then with finite weights
        self._bad_in_a_row = 0

    def _record(self, trainer: L.Trainer, batch: int, loss: float) -> Divergence:
        return Divergence(
            epoch=trainer.current_epoch + 1,
            batch=batch,
            loss=loss,
            learning_rate=self._rate,
            configured_learning_rate=self.configured_learning_rate,
            precision=self.precision,
        )

    def _stop_if(self, trainer: L.Trainer, broken: bool, batch: int) -> None:
        if trainer.strategy.reduce_boolean_decision(broken, all=False):
            # another process's loss, when this one's own stayed finite
            self.divergence = self._pending or self._record(trainer, batch, math.nan)
            self._stop(trainer, "training diverged")

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        # the rate of this batch: on an epoch's last batch Lightning steps the epoch schedulers
        # before on_train_batch_end
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._rate = float(optimizer.param_groups[0]["lr"]) if optimizer else math.nan

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        finite = not isinstance(loss, torch.Tensor) or bool(torch.isfinite(loss.detach()).all())
        self._bad_in_a_row = 0 if finite else self._bad_in_a_row + 1
        if not finite and self._pending is None:
            value = float(loss.detach()) * int(trainer.accumulate_grad_batches)
            self._pending, self._checked_since = self._record(trainer, idx + 1, value), 0
        broken = False
        if self._pending is not None:
            broken = _broken(pl_module) or self._bad_in_a_row >= max(1, _batches_per_epoch(trainer))
            self._checked_since += 1
            if not broken and finite and self._checked_since >= trainer.accumulate_grad_batches:
                self._pending = None  # the step was skipped: nothing broke
        self._stop_if(trainer, broken, idx + 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if(trainer, _broken(pl_module), _batches_per_epoch(trainer))


class _ChannelsLastCallback(Callback):
    """Trains in channels-last memory format on the CPU.

    oneDNN's convolutions run faster in NHWC: a training epoch of the Run1084 benchmark
    (N = 64, gridsize 2, ``n_filters_scale`` 1, two threads) took 8.9 s instead of 10.8 s.
    Only the layout changes, not the values; prediction uses the same layout
    (``TrainedModel.predict``).
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.strategy.root_device.type == "cpu":
            pl_module.to(memory_format=torch.channels_last)


class _HistoryCallback(Callback):
    """Per-epoch records and the weights to return, kept in memory (no disk needed).

    ``keep_last``: the weights of every finished epoch replace the previous ones (the last
    epoch's are returned); otherwise only an epoch that improves the monitored metric does.
    Why both: with a schedule that decays the learning rate, the last epoch is the most
    converged, and on the training scan itself its image is better (Run1084: amplitude SSIM
    +0.000 to +0.005 at gridsize 2 and 1e6 photons, +0.016 at 1e4, +0.05 at gridsize 1 and
    1e4, where the validation NLL turns up while the image still improves); with a constant
    rate the best epoch guards against a late divergence.
    """

    def __init__(
        self,
        monitor: str,
        mode: str,
        observer: _GuardedObserver | None,
        keep_last: bool = False,
        stops: Sequence[_BatchStop] = (),
    ) -> None:
        self.monitor = monitor
        self.mode = mode
        self.observer = observer
        self.keep_last = keep_last
        #: Once one of them has stopped training at a batch boundary, an epoch that still ends
        #: was cut short (Lightning without the early exit): not recorded, its weights not
        #: kept. Their flags, not the cancel token: a cancel arriving after the last check of
        #: a finished epoch leaves that epoch whole.
        self.stops = tuple(stops)
        self.history: list[EpochRecord] = []
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self._started = time.perf_counter()
        self._learning_rate = 0.0
        self._stall_reported = False  # once is enough: a dead network repeats every epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        # The rate this epoch trains with: Lightning steps epoch-interval schedulers
        # (exponential, cosine) after the last batch, before on_train_epoch_end, so reading
        # it there would record the next epoch's rate.
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._learning_rate = float(optimizer.param_groups[0]["lr"]) if optimizer else 0.0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        train_loss = metrics.get(f"{TRAIN_LOSS}_epoch", metrics.get(TRAIN_LOSS))
        if train_loss is None or any(stop.fired for stop in self.stops):
            return  # stopped inside this epoch: it did not finish
        val_loss = metrics.get(VAL_LOSS)
        record = EpochRecord(
            epoch=len(self.history) + 1,
            train_loss=float(train_loss),
            val_loss=None if val_loss is None else float(val_loss),
            learning_rate=self._learning_rate,
            seconds=time.perf_counter() - self._started,
        )
        self.history.append(record)
        if not self._stall_reported and _stalled(self.history[-3:]):
            self._stall_reported = True
            logger.warning(
                "training has stalled: epochs %d to %d ended with the same loss, so the "
                "network's outputs no longer change (saturated or dead units). Restart with a "
                "lower learning rate (e.g. half of %.2g).",
                record.epoch - 2,
                record.epoch,
                record.learning_rate,
            )
        value = metrics.get(self.monitor)
        better = False
        if value is not None and math.isfinite(float(value)):  # a NaN would never be beaten
            value = float(value)
            better = (
                self.best_value is None
                or (self.mode == "min" and value < self.best_value)
                or (self.mode == "max" and value > self.best_value)
            )
            if better:
                self.best_value = value
        if better or self.keep_last:
            self.best_epoch = record.epoch
            self.best_state = copy.deepcopy(pl_module.autoencoder.state_dict())
        if self.observer is not None:
            self.observer("on_epoch_end", record)


def _stalled(records: Sequence[EpochRecord], tolerance: float = 5e-6) -> bool:
    """Three consecutive epochs with training losses equal to rounding: the outputs are stuck.

    A dead or saturated network only reorders the same per-sample losses (shuffling), so its
    epoch training loss repeats to float32 rounding: a learning rate of 1000 on the tiny test
    scan (batch normalisation) gave 11177.873, 11177.896, 11177.903 (2e-6 apart). The
    validation loss is not compared: batch normalisation's running statistics keep moving in a
    stuck network (11107, 11062, 11068 there). One repeat is not enough: late in a long run a
    learning network's epoch loss moves by only a few 1e-4, and the Run1084 gridsize-1
    benchmark once ended epochs 127 and 128 (of 133) within 1e-6 of each other while still
    learning. Two repeats in a row are not a coincidence.
    """
    if len(records) < 3:
        return False
    losses = [record.train_loss for record in records]
    return all(
        abs(a - b) <= tolerance * max(abs(a), abs(b), 1e-30)
        for a, b in zip(losses, losses[1:], strict=False)
    )


# ----------------------------------------------------------------------------- trainer


def _logger(execution: ExecutionConfig, root: Path) -> Any:
    if execution.logger == "none":
        return False
    if execution.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(root, name="logs")
    if execution.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(root, name="tensorboard")
    from lightning.pytorch.loggers import MLFlowLogger

    # absolute: a file URI cannot be relative (the CLI's default output folder is)
    return MLFlowLogger(tracking_uri=(root.absolute() / "mlruns").as_uri())


def _deterministic(execution: ExecutionConfig, accelerator: str) -> bool | str:
    """On CUDA, warn instead of crashing: the bilinear gathers' backward is a scatter-add,
    which CUDA does not always run deterministically (not tested on a GPU here)."""
    if not execution.deterministic:
        return False
    cuda_possible = accelerator in ("cuda", "auto") and torch.cuda.is_available()
    return "warn" if cuda_possible else True


@contextlib.contextmanager
def _run_directory(output_dir: Path | None) -> Iterator[Path]:
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        yield output_dir
    else:
        with tempfile.TemporaryDirectory(prefix="ptychodus-torch-") as tmp:
            yield Path(tmp)


def _supervised_targets(data: PtychoData, role: str) -> np.ndarray:
    if data.object_guess is None:
        raise ValueError(
            f"objectGuess: not found in the {role}, expected a ground-truth object for "
            "supervised training; use the PINN (unsupervised) mode for data without ground truth"
        )
    from .simulate import extract_patches

    patches = extract_patches(data.object_guess, data.xcoords, data.ycoords, data.N)
    spread = max(float(np.ptp(patches.real)), float(np.ptp(patches.imag)))
    if spread <= 1e-6 * float(np.abs(patches).max()):
        # Ptychodus's initial object (its "Random" builder defaults to no variation) reaches
        # here through a batch folder's product.h5: hours of training on a constant target.
        raise ValueError(
            f"objectGuess: the {role}'s object is uniform where the scan lies, so there is "
            "nothing to learn from it; supervised training needs a reconstructed object (from "
            "an iterative reconstruction or a simulation) as its target; use the PINN mode "
            "for data without one"
        )
    # The amplitude head is bounded (sigmoid): learn amplitudes relative to the object's peak.
    peak = float(np.abs(data.object_guess).max()) or 1.0
    return (patches / peak).astype(np.complex64)


#: Environment variables Lightning's Trainer and seeding set for the whole process.
_LIGHTNING_ENVIRONMENT = ("CUBLAS_WORKSPACE_CONFIG", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Puts back, after training, what Lightning changes for the whole process.

    Why: inside Ptychodus training shares the process with the host and with other torch
    reconstructors. ``Trainer(deterministic=...)`` switches torch's deterministic-algorithms
    mode (on, or off when the host had set it) and cuDNN's benchmark, and sets
    ``CUBLAS_WORKSPACE_CONFIG``; ``seed_everything`` reseeds Python's, NumPy's and torch's
    global generators. A later reconstruction would have run under our strict mode (where
    CUDA kernels without a deterministic form raise) or with our seeds.
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    environment = {name: os.environ.get(name) for name in _LIGHTNING_ENVIRONMENT}
    python_state, numpy_state = random.getstate(), np.random.get_state()
    # CUDA generators only where CUDA is already up: forking them would initialise it
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def train(
    payload: TrainingPayload,
    data: PtychoData,
    *,
    test_data: PtychoData | None = None,
    output_dir: str | Path | None = None,
    observer: Any | None = None,
    cancel: CancelToken | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainingResult:
    """Train a generator on ``data`` as configured by ``payload``.

    Validation uses ``test_data`` when given, else a seeded ``validation_fraction`` split
    (``prepare.split_for_validation``). ``observer`` may define ``on_train_start``,
    ``on_batch_end`` and ``on_epoch_end`` (progress only: a method that raises is logged and
    no longer called, and training goes on). Returns the best weights by the monitored metric
    (the last ones when nothing was monitored), or the last finished epoch's with
    ``final_weights = "last"``, also when training was cancelled. The process's torch modes,
    global random generators and Lightning's environment variables are as before afterwards.
    """
    with _process_state_kept():
        return _train(
            payload,
            data,
            test_data=test_data,
            output_dir=output_dir,
            observer=observer,
            cancel=cancel,
            callbacks=callbacks,
        )


def _train(
    payload: TrainingPayload,
    data: PtychoData,
    *,
    test_data: PtychoData | None,
    output_dir: str | Path | None,
    observer: Any | None,
    cancel: CancelToken | None,
    callbacks: Sequence[Callback],
) -> TrainingResult:
    grid, execution = payload.grid, payload.execution
    accelerator = resolve_accelerator(execution.accelerator)
    if execution.precision == "16-mixed" and select_device(execution.accelerator).type == "cpu":
        # Lightning would switch to bf16-mixed itself; said and recorded here, so that the
        # archive, history.json and the divergence advice name what really ran.
        logger.warning(
            "precision = '16-mixed' has no float16 autocast on the CPU: training in "
            "'bf16-mixed' instead, as Lightning would (float16 needs a GPU)"
        )
        execution = dataclasses.replace(execution, precision="bf16-mixed")
        payload = dataclasses.replace(payload, execution=execution)
    L.seed_everything(payload.data.seed, workers=True, verbose=False)

    given_probe = data.probe
    # Everything that can refuse the scans runs before the probe refinement (minutes to
    # hours): the mode count, grouping (n_groups, positions for the gridsize), blank
    # patterns, the test scan and the validation split. Only the probe changes afterwards.
    data = _with_probe_modes(data, payload)
    scan = prepare_scan(data, grid, payload.data)
    supervised = payload.training.mode == "supervised"
    targets = _supervised_targets(data, "training data") if supervised else None
    val_scan: PreparedScan | None = None
    if test_data is not None:
        val_scan = _prepare_test_scan(test_data, payload, scan.input_scale)
        train_rows = np.arange(scan.n_groups)
        val_targets = _supervised_targets(test_data, "test data") if supervised else None
        val_set = GroupDataset(val_scan, targets=val_targets)
    else:
        scan, train_rows, val_rows = split_for_validation(scan, data, grid, payload.data)
        val_set = GroupDataset(scan, val_rows, targets=targets) if len(val_rows) else None
    train_set = GroupDataset(scan, train_rows, targets=targets)
    refinement = _refined_probe(data, payload, cancel)
    if refinement is not None:  # the model is built with the refined probe
        scan = dataclasses.replace(
            scan, probe=prepared_probe(refinement.probe, payload.data.probe_scale)
        )

    checkpointing = execution.checkpointing
    monitor = checkpointing.monitor
    if val_set is None and monitor == VAL_LOSS:
        if payload.data.validation_fraction == 0:  # asked for: every pattern is trained on
            logger.info("validation_fraction = 0: no validation data; monitoring %s", TRAIN_LOSS)
        else:
            logger.warning(
                "no validation data (validation_fraction = %g of %d pattern(s) leaves none; "
                "at gridsize > 1 each side needs neighbor_count = %d patterns): monitoring %s",
                payload.data.validation_fraction,
                len(data.xcoords),
                grid.neighbor_count,
                TRAIN_LOSS,
            )
        monitor = TRAIN_LOSS
        # The archive's config and the result say what really ran, not what was asked for.
        checkpointing = dataclasses.replace(checkpointing, monitor=monitor)
        execution = dataclasses.replace(execution, checkpointing=checkpointing)
        payload = dataclasses.replace(payload, execution=execution)

    model = TrainedModel.build(
        payload.to_flat(),
        scan.probe,
        input_scale=scan.input_scale,
        intensity_scale=scan.intensity_scale,
        nphotons=scan.nphotons,
    )
    if refinement is not None:
        model.starting_probe = np.asarray(given_probe, dtype=np.complex64)
    model.pixel_size_m = data.pixel_size_m
    module_kwargs: dict[str, Any] = {
        "learning_rate": execution.learning_rate,
        "scheduler": execution.scheduler,
        "optimizer": execution.optimizer,
        "max_epochs": payload.training.epochs,
        "monitor": monitor,
    }
    if supervised:
        module: L.LightningModule = SupervisedModule(model.autoencoder, **module_kwargs)
    else:
        mask = None if scan.bad_pixels is None else torch.from_numpy(scan.bad_pixels)
        val_mask = None  # a separate test scan brings its own detector mask (or none)
        if val_scan is not None:
            val_bad = val_scan.bad_pixels
            if val_bad is None:
                val_bad = np.zeros(val_scan.inputs.shape[-2:], dtype=bool)
            val_mask = torch.from_numpy(val_bad)
        module = PINNModule(
            model.autoencoder,
            intensity_scale=scan.intensity_scale,
            val_intensity_scale=None if val_scan is None else val_scan.intensity_scale,
            loss=payload.training.loss,
            bad_pixels=mask,
            val_bad_pixels=val_mask,
            **module_kwargs,
        )

    generator = torch.Generator().manual_seed(payload.data.seed)
    loader_kwargs: dict[str, Any] = {
        "batch_size": payload.training.batch_size,
        "num_workers": execution.num_workers,
        "persistent_workers": execution.num_workers > 0,
    }
    train_loader = DataLoader(train_set, shuffle=True, generator=generator, **loader_kwargs)
    val_loader = DataLoader(val_set, shuffle=False, **loader_kwargs) if val_set else None

    keep_last = payload.training.final_weights == "last"
    cancel_cb = _CancelCallback(cancel or CancelToken())
    divergence_cb = _DivergenceCallback(execution.learning_rate, execution.precision)
    guarded = None if observer is None else _GuardedObserver(observer)
    history_cb = _HistoryCallback(
        monitor, checkpointing.mode, guarded, keep_last=keep_last, stops=(cancel_cb, divergence_cb)
    )
    # the divergence guard first: no other hook sees broken weights
    all_callbacks: list[Callback] = [
        _ChannelsLastCallback(),
        divergence_cb,
        history_cb,
        *callbacks,
    ]
    if guarded is not None:
        all_callbacks.append(_ObserverCallback(guarded))
    if execution.early_stop_patience is not None:
        all_callbacks.append(
            EarlyStopping(monitor, patience=execution.early_stop_patience, mode=checkpointing.mode)
        )

    out = None if output_dir is None else Path(output_dir)
    with _run_directory(out) as root:
        checkpoint_cb = None
        if checkpointing.enable and out is not None:
            earlier = sorted((root / "checkpoints").glob("*.ckpt"))
            if earlier:
                logger.warning(
                    "%s already holds %d checkpoint(s) of an earlier run: this run's replace "
                    "last.ckpt (and any of the same name), the others stay; history.json "
                    "lists this run's",
                    root / "checkpoints",
                    len(earlier),
                )
            checkpoint_cb = ModelCheckpoint(
                dirpath=root / "checkpoints",
                filename="epoch{epoch:03d}-{" + monitor + ":.4f}",
                auto_insert_metric_name=False,
                monitor=monitor,
                mode=checkpointing.mode,
                save_top_k=checkpointing.save_top_k,
                save_last=True,
                # last.ckpt is this run's, not last-v1.ckpt beside an earlier run's last.ckpt
                enable_version_counter=False,
            )
            all_callbacks.append(checkpoint_cb)
        all_callbacks.append(cancel_cb)  # last: sees a cancel raised by any hook before it
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=execution.devices,
            num_nodes=execution.num_nodes,
            strategy=execution.strategy,
            precision=execution.precision,
            deterministic=_deterministic(execution, accelerator),
            max_epochs=payload.training.epochs,
            gradient_clip_val=execution.gradient_clip_val,
            accumulate_grad_batches=execution.accumulate_grad_batches,
            logger=_logger(execution, root),
            enable_checkpointing=checkpoint_cb is not None,
            enable_progress_bar=execution.enable_progress_bar,
            enable_model_summary=False,
            callbacks=all_callbacks,
            default_root_dir=root,
            plugins=[_AtomicCheckpointIO()],
            num_sanity_val_steps=0,
            log_every_n_steps=1,
        )
        trainer.fit(module, train_loader, val_loader)
        checkpoint_paths = _checkpoint_files(checkpoint_cb)

    if history_cb.best_state is not None:
        model.autoencoder.load_state_dict(history_cb.best_state)
    model.autoencoder.cpu()
    model.history = list(history_cb.history)
    model.training_device = str(trainer.strategy.root_device)
    divergence = divergence_cb.divergence
    if divergence is not None:
        if history_cb.best_state is None:  # the weights are the diverged ones
            raise TrainingDivergedError(
                f"training diverged: {divergence} before any epoch finished with finite "
                f"losses, so there is no model; {divergence.advice}"
            )
        logger.warning(
            "training diverged and stopped: %s; keeping the %s model of the %d finished "
            "epoch(s) (epoch %s); %s",
            divergence,
            payload.training.final_weights,
            len(model.history),
            history_cb.best_epoch,
            divergence.advice,
        )
    elif cancel_cb.cancelled and not model.history:
        logger.warning(
            "training stopped by request before its first epoch ended: the model holds the "
            "weights after the last batch it trained, part of one pass over the scan; train "
            "for at least a few epochs before relying on its images"
        )
    elif cancel_cb.cancelled and history_cb.best_epoch is None:
        logger.warning(
            "training stopped by request after %d epoch(s), none with a finite %s: the model "
            "holds the weights after the last batch it trained",
            len(model.history),
            history_cb.monitor,
        )
    elif cancel_cb.cancelled:
        logger.warning(
            "training stopped by request after %d epoch(s); keeping the %s model so far (epoch %s)",
            len(model.history),
            payload.training.final_weights,
            history_cb.best_epoch,
        )
    return TrainingResult(
        model=model,
        history=model.history,
        cancelled=cancel_cb.cancelled,
        best_epoch=history_cb.best_epoch,
        divergence=divergence,
        output_dir=out,
        backend=model.backend,
        checkpoint_paths=checkpoint_paths,
        probe_refinement=refinement,
        payload=payload,
    )


def _with_probe_modes(data: PtychoData, payload: TrainingPayload) -> PtychoData:
    """``data`` with its probe cut to ``probe_modes`` when no refinement will fit them.

    Why here, before anything is prepared: a mode count the data cannot give is refused at
    once, and the cut applies whenever the probe is not refined, supervised training
    included (it ignores ``probe_refinement_epochs``, so that setting must not decide whether
    its probe is cut). A refinement fits ``probe_modes`` modes itself (``refine_probe``).
    """
    training = payload.training
    modes, present = training.probe_modes, data.probe.shape[0]
    if training.refines_probe:
        return data
    if modes > present:
        if training.mode == "supervised":
            advice = (
                "supervised training does not refine the probe, so it cannot add modes; "
                f"set probe_modes to 0 (all) or at most {present}"
            )
        else:
            advice = (
                f"allowed 0 to {present} without refinement; set probe_refinement_epochs > 0 "
                "to fit the additional modes"
            )
        raise ValueError(
            f"TrainingConfig.probe_modes = {modes} is invalid for data with {present} probe "
            f"mode(s): {advice}"
        )
    if 0 < modes < present:
        return dataclasses.replace(data, probe=data.probe[:modes].copy())
    return data


def _prepare_test_scan(
    test_data: PtychoData, payload: TrainingPayload, input_scale: float
) -> PreparedScan:
    """The test scan prepared for validation; its errors say that they are about it.

    Why the prefix: the checks are the training scan's (too few positions for the gridsize,
    blank patterns), so a bare message read as if the training data were at fault and gave
    its advice ("use a gridsize-1 model") where dropping or fixing the test data is the cure.
    Every group of the test scan is used: n_groups sizes the training scan's share (it
    refused a test scan with fewer patterns, and validated only part of a larger one).
    """
    try:
        return prepare_scan(
            test_data,
            payload.grid,
            payload.data,
            n_groups=0,
            input_scale=input_scale,
            role="validation (the test data)",
        )
    except ValueError as exc:
        raise ValueError(
            f"test data: {exc} (or train without this test scan: a validation_fraction of "
            "the training data is then held out instead)"
        ) from exc


def _refined_probe(
    data: PtychoData, payload: TrainingPayload, cancel: CancelToken | None
) -> ProbeRefinement | None:
    """The probe refinement asked for (``probe_refinement_epochs > 0``), or None."""
    training = payload.training
    epochs = training.probe_refinement_epochs
    if epochs == 0:
        return None
    if not training.refines_probe:  # supervised training: no physics model
        logger.warning(
            "probe_refinement_epochs = %d ignored: supervised training has no physics model "
            "that the probe would enter",
            epochs,
        )
        return None
    _check_trainer_settings(payload.execution)
    device = select_device(payload.execution.accelerator)
    if device.type == "mps":  # complex autograd on MPS is incomplete; the CPU does it
        device = torch.device("cpu")
    elif device.type == "cuda":  # each process of a multi-GPU run refines on its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    refinement = refine_probe(
        data, epochs, training.probe_modes, seed=payload.data.seed, cancel=cancel, device=device
    )
    if device.type == "cuda":  # hand the refinement's cached blocks back before training
        torch.cuda.empty_cache()
    return refinement


def _check_trainer_settings(execution: ExecutionConfig) -> None:
    """Let Lightning refuse the hardware settings now, not after the probe refinement.

    Why: the Trainer is built after the refinement, which can take many minutes; a device
    count the node does not have (``devices = 2`` on one GPU) or an unknown strategy name was
    reported only then. Building one with the same hardware settings checks them in
    milliseconds; nothing runs on it. Its information lines ("GPU available: ...") are held
    back: the real Trainer prints them.
    """
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        L.Trainer(
            accelerator=resolve_accelerator(execution.accelerator),
            devices=execution.devices,
            num_nodes=execution.num_nodes,
            strategy=execution.strategy,
            precision=execution.precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    finally:
        quiet.setLevel(level)


class _AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint beside its target and renames it into place; a failed write
    is logged and training goes on.

    Why: Lightning stages a checkpoint in the system temp folder and moves it; where that is
    another file system (output on NFS or GPFS, as on beamline and cluster machines) the
    move copies onto ``last.ckpt`` in place, so a crash or a second Ctrl-C during the copy
    left a truncated one. And checkpoints are a by-product: the model is kept in memory and
    returned at the end, so a full disk, a quota or a network file system error while one is
    written must not end training and throw the finished epochs away.

    After a failed write the checkpoint that it would have replaced is not removed (Lightning
    asks right after the save), so the folder keeps the last checkpoint that was written.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last_save_failed = False

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:  # TorchCheckpointIO's TypeError: nothing uses them
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        # Serialised in memory first, as Lightning does: a write error is then an OSError
        # (torch.save onto a file reports a full disk as a RuntimeError).
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            with atomic_write_path(path) as tmp, open(tmp, "wb") as handle:
                handle.write(buffer.getbuffer())
        except OSError as exc:
            self._last_save_failed = True
            logger.warning(
                "checkpoint %s not written (%s): training goes on and keeps its model in "
                "memory; free space in %s for later checkpoints, or turn checkpointing off "
                "(checkpoint_enable = false, --disable-checkpointing)",
                path,
                exc.strerror or exc,
                Path(path).parent,
            )
            return
        self._last_save_failed = False

    def remove_checkpoint(self, path: str | Path) -> None:
        if self._last_save_failed:
            logger.info("%s kept: the checkpoint meant to replace it was not written", path)
            return
        super().remove_checkpoint(path)


def _checkpoint_files(checkpoint_cb: ModelCheckpoint | None) -> list[Path]:
    if checkpoint_cb is None or not checkpoint_cb.dirpath:
        return []
    # This run's files only (the folder may also hold an earlier run's).
    names = {*checkpoint_cb.best_k_models, checkpoint_cb.last_model_path}
    return sorted(Path(name) for name in names if name and Path(name).is_file())
