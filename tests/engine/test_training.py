"""Lightning training: gridsize channels, observers, cancellation, schedulers, checkpoints."""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from engine_helpers import tiny_overrides
from lightning.pytorch.callbacks import Callback
from training_helpers import PoisonInputs, PoisonWeights, SkipNonFiniteSteps

from ptychodus_torch_plugin.engine.archive import load_archive, save_archive
from ptychodus_torch_plugin.engine.model import EpochRecord, TrainedModel
from ptychodus_torch_plugin.engine.payload import create_training_payload
from ptychodus_torch_plugin.engine.training import CancelToken, TrainingDivergedError, train


class Recorder:
    def __init__(self, cancel_at=None, token=None):
        self.events = []
        self.cancel_at = cancel_at
        self.token = token

    def on_train_start(self, total_epochs, batches_per_epoch):
        self.events.append(("start", total_epochs, batches_per_epoch))

    def on_batch_end(self, epoch, batch, batches, loss):
        self.events.append(("batch", epoch, batch, loss))
        if self.cancel_at == (epoch, batch):
            self.token.cancel()

    def on_epoch_end(self, record):
        self.events.append(("epoch", record))


@pytest.mark.parametrize("gridsize", [1, 2])
def test_training_runs_and_reports_in_order(small_scan, gridsize):
    recorder = Recorder()
    payload = create_training_payload(tiny_overrides(gridsize=gridsize))
    result = train(payload, small_scan, observer=recorder)
    first_conv = next(m for m in result.model.generator.modules() if hasattr(m, "in_channels"))
    assert first_conv.in_channels == gridsize * gridsize
    assert result.backend == "pytorch" and not result.cancelled and result.divergence is None
    assert [r.epoch for r in result.history] == [1, 2]
    assert all(r.train_loss > 0 and r.val_loss > 0 for r in result.history)  # full NLL >= 0
    kinds = [e[0] for e in recorder.events]
    assert kinds[0] == "start" and kinds[-1] == "epoch"
    n_batches = recorder.events[0][2]
    assert kinds.count("batch") == 2 * n_batches and kinds.count("epoch") == 2
    assert result.model.epochs_trained == 2


def test_cancel_stops_within_one_batch(small_scan, caplog):
    token = CancelToken()
    recorder = Recorder(cancel_at=(0, 2), token=token)
    payload = create_training_payload(tiny_overrides(epochs=20, batch_size=8))
    with caplog.at_level(logging.WARNING):
        result = train(payload, small_scan, observer=recorder, cancel=token)
    # The log says what the model is, not "epoch None".
    assert "stopped by request before its first epoch ended" in caplog.text
    assert "epoch None" not in caplog.text
    batches = [e for e in recorder.events if e[0] == "batch"]
    assert result.cancelled
    assert [(e[1], e[2]) for e in batches] == [(0, 0), (0, 1), (0, 2)]
    # The epoch cut short is not a finished epoch: nothing recorded, no "best" weights.
    assert result.history == [] and result.best_epoch is None
    assert not [e for e in recorder.events if e[0] == "epoch"]
    # The model is still usable.
    patches = result.model.predict(np.zeros((2, 1, 32, 32), np.float32))
    assert patches.shape == (2, 1, 32, 32) and np.isfinite(patches).all()


class ValidationCounter(Callback):
    def __init__(self, token):
        self.token = token
        self.after_cancel = 0

    def on_validation_batch_end(self, *args):
        self.after_cancel += self.token.cancelled


@pytest.mark.parametrize(
    ("final_weights", "early_exit"), [("best", True), ("last", True), ("best", False)]
)
def test_cancel_mid_epoch_keeps_the_last_whole_epoch_and_skips_validation(
    small_scan, final_weights, early_exit, monkeypatch
):
    """Stop in epoch 2 with a test scan: no validation pass, epoch 1's network comes back.

    Without Lightning's early exit (another release) the engine falls back to
    ``should_stop``: Lightning then validates the cut-off epoch, which must still not count.
    """
    from ptychodus_torch_plugin.engine import training

    if not early_exit:
        monkeypatch.setattr(training, "early_exit_exception", lambda: None)
    token = CancelToken()
    recorder = Recorder(cancel_at=(1, 1), token=token)
    counter = ValidationCounter(token)
    kept = {}

    class Snapshot(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            kept[trainer.current_epoch] = {
                k: v.detach().clone() for k, v in pl_module.autoencoder.state_dict().items()
            }

    payload = create_training_payload(
        tiny_overrides(epochs=5, batch_size=8, final_weights=final_weights)
    )
    result = train(
        payload,
        small_scan,
        test_data=small_scan,
        observer=recorder,
        cancel=token,
        callbacks=[counter, Snapshot()],
    )
    assert result.cancelled and [r.epoch for r in result.history] == [1]
    assert result.best_epoch == 1
    if early_exit:
        assert counter.after_cancel == 0
        assert list(kept) == [0]  # no epoch-end hook ran for the cut-off epoch
    state = result.model.autoencoder.state_dict()
    assert all(torch.equal(state[k].cpu(), v.cpu()) for k, v in kept[0].items())


@pytest.mark.parametrize("epochs", [1, 2])
def test_a_cancel_after_the_last_check_of_a_finished_epoch_keeps_that_epoch(small_scan, epochs):
    """Stop pressed during the last validation batch: the epoch is whole and counts."""
    token = CancelToken()

    class LateCancel(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == epochs - 1:
                token.cancel()

    payload = create_training_payload(tiny_overrides(epochs=epochs))
    result = train(payload, small_scan, cancel=token, callbacks=[LateCancel()])
    assert [r.epoch for r in result.history] == list(range(1, epochs + 1))
    assert result.best_epoch is not None and not result.cancelled


def test_cpu_training_runs_in_channels_last_and_saves_plain_weights(small_scan, tmp_path):
    """The faster NHWC layout is used while training; archives and predictions do not care."""
    layouts = []

    class Layout(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, idx):
            convs = [m for m in pl_module.modules() if isinstance(m, torch.nn.Conv2d)]
            layouts.append(
                all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
            )

    payload = create_training_payload(tiny_overrides(gridsize=2, epochs=1))
    result = train(payload, small_scan, callbacks=[Layout()])
    assert layouts and all(layouts)
    inputs = np.random.default_rng(0).random((3, 4, 32, 32)).astype(np.float32)
    before = result.model.predict(inputs)
    path = save_archive(result.model, tmp_path / "wts.h5.zip")
    after = load_archive(path).predict(inputs)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


def test_bf16_mixed_training_keeps_the_physics_and_the_loss_in_float32(small_scan):
    """precision="bf16-mixed" on the CPU: the network rounds, the diffraction model does not."""
    seen = []

    class Dtypes(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, idx):
            if not seen:
                model = pl_module.autoencoder.forward_model
                model.register_forward_hook(lambda m, args, out: seen.append(out.dtype))

    payload = create_training_payload(tiny_overrides(gridsize=2, precision="bf16-mixed"))
    result = train(payload, small_scan, callbacks=[Dtypes()])
    assert seen and set(seen) == {torch.float32}
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert all(np.isfinite(r.val_loss) for r in result.history)
    patches = result.model.predict(np.ones((2, 4, 32, 32), np.float32))  # plain fp32 predict
    assert patches.dtype == np.complex64 and np.isfinite(patches).all()


@pytest.mark.parametrize("scheduler", ["exponential", "cosine"])
def test_schedulers_really_step(small_scan, scheduler):
    payload = create_training_payload(tiny_overrides(epochs=4, scheduler=scheduler, n_groups=48))
    rates = [r.learning_rate for r in train(payload, small_scan).history]
    # each epoch records the rate it trained with: the first one the configured rate (the
    # cosine's one-epoch warm-up ends at it), not the rate the scheduler set after it
    assert rates[0] == pytest.approx(payload.execution.learning_rate), rates
    assert len(set(rates)) >= 3 and rates[-1] < rates[-2] < rates[1], rates


def test_observers_see_each_batch_loss_unscaled_by_accumulation(small_scan):
    recorder = Recorder()
    payload = create_training_payload(
        tiny_overrides(epochs=1, n_groups=48, accumulate_grad_batches=2, validation_fraction=0)
    )
    result = train(payload, small_scan, observer=recorder)
    losses = [event[3] for event in recorder.events if event[0] == "batch"]
    assert len(losses) == 3  # 48 groups in batches of 16
    # the epoch's logged loss is the mean of its batches' (equal batch sizes)
    assert np.mean(losses) == pytest.approx(result.history[0].train_loss, rel=1e-5)


class _RateSpy(Callback):
    """Each epoch's learning rate, and the metric the scheduler was told to watch."""

    def __init__(self):
        self.rates, self.monitors = [], set()

    def on_train_epoch_end(self, trainer, pl_module):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.monitors.update(config.monitor for config in trainer.lr_scheduler_configs)


@pytest.mark.parametrize(
    ("validation_fraction", "monitor"), [(0.1, "val_loss"), (0.0, "train_loss")]
)
def test_plateau_scheduler_halves_the_rate_when_the_monitored_loss_stalls(
    small_scan, validation_fraction, monitor
):
    """A rate too small to move the losses: no improvement, so after patience 2 it halves."""
    spy = _RateSpy()
    overrides = tiny_overrides(epochs=5, scheduler="plateau", n_groups=48, learning_rate=1e-12)
    overrides["validation_fraction"] = validation_fraction
    train(create_training_payload(overrides), small_scan, callbacks=[spy])
    assert spy.monitors == {monitor}
    assert spy.rates[:3] == [1e-12] * 3 and spy.rates[-1] == pytest.approx(0.5e-12)


class _ValidateUntrained(Callback):
    """Validates the given epochs (0-based, as Lightning counts) with the untrained weights.

    Their validation loss is then the untrained network's, worse than that of any epoch that
    learned, while their training (and training loss) go on as usual: the best epoch by
    validation loss then differs from the best by training loss, and from the worst.
    """

    def __init__(self, epochs) -> None:
        self.epochs = set(epochs)
        self._initial: dict[str, torch.Tensor] | None = None
        self._trained: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _copy(module):
        return {k: v.detach().clone() for k, v in module.autoencoder.state_dict().items()}

    def on_train_start(self, trainer, pl_module):
        self._initial = self._copy(pl_module)

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch in self.epochs:
            self._trained = self._copy(pl_module)
            pl_module.autoencoder.load_state_dict(self._initial)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._trained is not None:
            pl_module.autoencoder.load_state_dict(self._trained)
            self._trained = None


def test_checkpoints_and_csv_logs_on_the_real_metric(small_scan, tmp_path):
    payload = create_training_payload(
        tiny_overrides(logger="csv", epochs=3, n_groups=64, checkpoint_save_top_k=1)
    )
    result = train(payload, small_scan, output_dir=tmp_path, callbacks=[_ValidateUntrained({2})])
    names = [p.name for p in result.checkpoint_paths]
    assert "last.ckpt" in names and any("epoch" in n for n in names), names
    metrics = list(tmp_path.glob("logs/*/metrics.csv"))
    assert metrics, list(tmp_path.rglob("*"))
    header = metrics[0].read_text().splitlines()[0]
    assert "val_loss" in header and "train_loss_epoch" in header
    # The kept top-1 checkpoint is the epoch with the lowest validation loss: not the one with
    # the lowest training loss (epoch 3, validated untrained), nor the worst.
    val_losses = [r.val_loss for r in result.history]
    train_losses = [r.train_loss for r in result.history]
    best = int(np.argmin(val_losses)) + 1
    assert int(np.argmin(train_losses)) + 1 == 3 and best != 3, (train_losses, val_losses)
    (kept,) = [n for n in names if n.startswith("epoch")]
    assert int(kept[len("epoch") : len("epoch") + 3]) + 1 == best, (kept, val_losses)
    assert kept.endswith(f"-{min(val_losses):.4f}.ckpt"), (kept, val_losses)
    assert result.best_epoch == best

    # A second run into the same folder: its own last.ckpt (not last-v1.ckpt beside the first
    # run's), and only its own files listed.
    first_last = (tmp_path / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    stale = tmp_path / "checkpoints" / "epoch099-1.0000.ckpt"
    stale.write_bytes(b"an earlier run's")
    again = train(payload, small_scan, output_dir=tmp_path)
    assert not list(tmp_path.glob("checkpoints/*-v1.ckpt"))
    assert (tmp_path / "checkpoints" / "last.ckpt").stat().st_mtime_ns > first_last
    assert stale.is_file() and stale not in again.checkpoint_paths  # kept, not listed
    assert tmp_path / "checkpoints" / "last.ckpt" in again.checkpoint_paths


class _EpochWeights(Callback):
    """The generator's weights at the end of every epoch."""

    def __init__(self):
        self.states = []

    def on_train_epoch_end(self, trainer, pl_module):
        state = pl_module.autoencoder.state_dict()
        self.states.append({k: v.detach().clone() for k, v in state.items()})


class _SpoilLastEpoch(Callback):
    """Scales every weight by 5 as epoch 3 starts: that epoch's validation loss is the worst."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            with torch.no_grad():
                for parameter in pl_module.autoencoder.parameters():
                    parameter.mul_(5.0)


@pytest.mark.parametrize("final_weights", ["best", "last"])
def test_final_weights_best_or_last_epoch(small_scan, final_weights):
    # the spoilt last epoch makes "best" (lowest validation loss) an earlier one, so the two
    # choices pick different epochs whatever the tiny run's loss curve does otherwise
    payload = create_training_payload(
        tiny_overrides(epochs=3, n_groups=48, final_weights=final_weights)
    )
    weights = _EpochWeights()
    result = train(payload, small_scan, callbacks=[_SpoilLastEpoch(), weights])
    losses = [r.val_loss for r in result.history]
    assert int(np.argmin(losses)) + 1 != 3, losses
    expected = 3 if final_weights == "last" else int(np.argmin(losses)) + 1
    assert result.best_epoch == expected
    returned = result.model.autoencoder.state_dict()
    for name, value in weights.states[expected - 1].items():
        torch.testing.assert_close(returned[name], value, msg=name)
    if expected != 3:  # the last epoch's weights really differ from the ones returned
        assert any(not torch.equal(returned[k], v) for k, v in weights.states[2].items())


def test_final_weights_is_validated():
    with pytest.raises(ValueError, match=r"TrainingConfig.final_weights.*best.*last"):
        create_training_payload({"final_weights": "middle"})


def test_early_stopping_uses_the_monitored_metric(small_scan):
    """Patience 2: epochs 2 and 3 do not beat epoch 1, so training ends after epoch 3."""
    overrides = tiny_overrides(epochs=5, n_groups=48)
    later = range(1, 5)  # from epoch 2 on the validation loss is the untrained network's
    stopping = create_training_payload(dict(overrides, early_stop_patience=2))
    result = train(stopping, small_scan, callbacks=[_ValidateUntrained(later)])
    losses = [r.val_loss for r in result.history]
    assert len(result.history) == 3, losses
    assert min(losses[1:]) > losses[0], losses  # the later epochs really were worse
    assert result.best_epoch == 1 and not result.cancelled
    # the same run without early stopping trains every epoch
    without = train(
        create_training_payload(overrides), small_scan, callbacks=[_ValidateUntrained(later)]
    )
    assert len(without.history) == 5


class _ValidationCount(Callback):
    def __init__(self):
        self.groups = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args):
        self.groups += int(batch["inputs"].shape[0])


def test_test_data_is_used_for_validation(small_scan):
    payload = create_training_payload(tiny_overrides(epochs=1, n_groups=32))
    counter = _ValidationCount()
    result = train(
        payload,
        small_scan.subset(np.arange(64)),
        test_data=small_scan.subset(np.arange(64, 84)),
        callbacks=[counter],
    )
    assert result.history[0].val_loss is not None
    # Every one of the test scan's 20 patterns: n_groups = 32 is the training scan's share
    # (it refused this test scan, "allowed <= 20", and took 32 of a larger one).
    assert counter.groups == 20


def test_supervised_mode_needs_ground_truth(small_scan):
    payload = create_training_payload(tiny_overrides(epochs=1, mode="supervised", n_groups=32))
    result = train(payload, small_scan)
    assert result.history[0].train_loss > 0
    no_truth = small_scan.subset(np.arange(small_scan.n_patterns))
    object.__setattr__(no_truth, "object_guess", None)
    with pytest.raises(ValueError, match="objectGuess: not found"):
        train(payload, no_truth)
    # Ptychodus's initial guess (a uniform object) is no ground truth either.
    flat = small_scan.subset(np.arange(small_scan.n_patterns))
    uniform = np.full_like(small_scan.object_guess, 0.8 * np.exp(0.3j))
    object.__setattr__(flat, "object_guess", uniform)
    with pytest.raises(ValueError, match="object is uniform where the scan lies"):
        train(payload, flat)


def test_the_model_records_the_training_scans_pixel_size(small_scan):
    payload = create_training_payload(tiny_overrides(epochs=1, n_groups=16))
    sized = dataclasses.replace(small_scan, pixel_size_m=(12e-9, 12e-9))
    assert train(payload, sized).model.pixel_size_m == (12e-9, 12e-9)


def test_unavailable_gpu_is_a_clear_error(small_scan):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    payload = create_training_payload(tiny_overrides(accelerator="gpu"))
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        train(payload, small_scan)


def test_a_stalled_run_is_reported(small_scan, caplog):
    payload = create_training_payload(tiny_overrides(epochs=3, n_groups=32, learning_rate=1e-30))
    with caplog.at_level("WARNING"):
        train(payload, small_scan)
    assert "training has stalled" in caplog.text and "lower learning rate" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        train(create_training_payload(tiny_overrides(epochs=4, n_groups=32)), small_scan)
    assert "stalled" not in caplog.text  # a run that learns is not reported


@pytest.mark.parametrize("final_weights", ["best", "last"])
def test_a_diverged_run_stops_and_keeps_the_last_finite_weights(small_scan, caplog, final_weights):
    recorder = Recorder()
    payload = create_training_payload(
        tiny_overrides(epochs=4, n_groups=64, learning_rate=2e-3, final_weights=final_weights)
    )
    with caplog.at_level("WARNING"):
        result = train(
            payload, small_scan, observer=recorder, callbacks=[PoisonWeights(epoch=2, batch=2)]
        )
    divergence = result.divergence
    assert (divergence.epoch, divergence.batch) == (2, 2) and np.isnan(divergence.loss)
    assert divergence.configured_learning_rate == 2e-3
    # stopped at the bad batch, before observers hear it: no more batches or epochs, epoch 2
    # not recorded
    batches = [event[1:3] for event in recorder.events if event[0] == "batch"]
    assert batches[-1] == (1, 0) and len(result.history) == 1 and result.best_epoch == 1
    assert not result.cancelled
    weights = result.model.generator.state_dict().values()
    assert all(torch.isfinite(w).all() for w in weights if w.is_floating_point())
    patches = result.model.predict(np.ones((2, 1, 32, 32), np.float32))
    assert np.isfinite(patches).all()
    assert "training diverged and stopped" in caplog.text
    assert "epoch 2, batch 2" in caplog.text and "try 0.0005" in caplog.text


def test_a_run_that_diverges_in_its_first_epoch_is_an_error(small_scan):
    payload = create_training_payload(tiny_overrides(epochs=2, n_groups=64))
    with pytest.raises(TrainingDivergedError, match="no model; lower the learning rate"):
        train(payload, small_scan, callbacks=[PoisonWeights(epoch=1, batch=2)])


def test_a_nan_loss_is_caught_when_an_accumulated_step_applies_it(small_scan):
    """The NaN batch does not step (accumulation); the guard waits for the step and names it."""
    payload = create_training_payload(
        tiny_overrides(epochs=3, n_groups=64, accumulate_grad_batches=2, final_weights="last")
    )
    result = train(payload, small_scan, callbacks=[PoisonInputs(epoch=2, batch=1)])
    assert (result.divergence.epoch, result.divergence.batch) == (2, 1)
    assert len(result.history) == 1
    weights = result.model.generator.state_dict().values()
    assert all(torch.isfinite(w).all() for w in weights if w.is_floating_point())


def test_a_nan_loss_whose_step_was_skipped_is_not_a_divergence(small_scan):
    payload = create_training_payload(tiny_overrides(epochs=2, n_groups=64))
    callbacks = [PoisonInputs(epoch=1, batch=2), SkipNonFiniteSteps()]
    result = train(payload, small_scan, callbacks=callbacks)
    assert result.divergence is None and len(result.history) == 2
    assert np.isnan(result.history[0].train_loss) and np.isfinite(result.history[1].train_loss)


def test_one_repeated_epoch_loss_is_a_coincidence_two_in_a_row_a_stall():
    from ptychodus_torch_plugin.engine.training import _stalled

    def epochs(*losses):
        return [EpochRecord(i + 1, loss, None, 1e-3, 1.0) for i, loss in enumerate(losses)]

    # the quality benchmark's epochs 126-129: 127 and 128 agree to 1e-6 by chance
    assert not _stalled(epochs(4641.89, 4640.51, 4640.5105))
    assert not _stalled(epochs(4640.51, 4640.5105, 4638.71))
    assert _stalled(epochs(4640.51, 4640.5105, 4640.5102))
    assert not _stalled(epochs(4640.51, 4640.51))  # too few epochs to tell
    # learning rate 1000 on the tiny scan with batch norm: stuck, while the validation loss
    # still moves with the running statistics
    losses = zip((11177.873, 11177.896, 11177.903), (11107.2, 11061.7, 11068.4), strict=True)
    assert _stalled([EpochRecord(i + 1, t, v, 1e3, 1.0) for i, (t, v) in enumerate(losses)])


def test_a_loaded_model_can_be_trained_again_after_predicting(small_scan, tmp_path):
    """predict() re-lays out the weights; they must stay ordinary (non-inference) tensors."""
    result = train(create_training_payload(tiny_overrides(epochs=1)), small_scan)
    model = load_archive(save_archive(result.model, tmp_path / "wts.h5.zip"))
    model.predict(np.zeros((2, 1, 32, 32), np.float32))
    generator = model.generator.train()
    generator(torch.rand(2, 1, 32, 32)).abs().sum().backward()
    assert all(p.grad is not None for p in generator.parameters() if p.requires_grad)


def test_loss_counts_are_the_measured_counts_with_a_hot_pixel_flagged_bad(small_scan):
    """A saturated pixel excluded from the loss must not inflate the dose the loss assumes."""
    import dataclasses

    from ptychodus_torch_plugin.engine.prepare import prepare_scan

    hot = np.zeros((32, 32), bool)
    hot[3, 5] = True
    amplitudes = small_scan.amplitudes.copy()
    amplitudes[:, 3, 5] = np.sqrt(65535.0)
    data = dataclasses.replace(small_scan, amplitudes=amplitudes, bad_pixels=hot)
    payload = create_training_payload(tiny_overrides())
    scan = prepare_scan(data, payload.grid, payload.data)
    counts = (scan.intensity_scale * scan.inputs.astype(np.float64)) ** 2
    measured = amplitudes.astype(np.float64) ** 2
    np.testing.assert_allclose(counts[:, ~hot], measured[:, ~hot], rtol=1e-4, atol=1e-6)
    original = small_scan.amplitudes[:, 3, 5].astype(np.float64) ** 2
    assert scan.nphotons == pytest.approx(small_scan.mean_photons() - original.mean())


def test_a_test_scan_at_another_dose_is_scored_against_its_own_counts(small_scan, monkeypatch):
    from ptychodus_torch_plugin.engine import training
    from ptychodus_torch_plugin.engine.prepare import prepare_scan
    from ptychodus_torch_plugin.engine.simulate import simulate_dataset

    low = simulate_dataset(N=32, nphotons=1e3, seed=1)
    seen = {}

    class Spy(training.PINNModule):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(training, "PINNModule", Spy)
    payload = create_training_payload(tiny_overrides(epochs=1))
    result = train(payload, small_scan, test_data=low)
    assert result.history[0].val_loss > 0
    val = prepare_scan(low, payload.grid, payload.data)
    counts = (seen["val_intensity_scale"] * val.inputs.astype(np.float64)) ** 2
    np.testing.assert_allclose(counts, low.amplitudes.astype(np.float64) ** 2, rtol=1e-4, atol=1e-6)
    assert seen["intensity_scale"] ** 2 == pytest.approx(
        100 * seen["val_intensity_scale"] ** 2, rel=0.05
    )


def test_a_test_scan_is_scored_with_its_own_bad_pixel_mask(small_scan, monkeypatch):
    from ptychodus_torch_plugin.engine import training

    seen = []

    class Spy(training.PINNModule):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(training, "PINNModule", Spy)
    mask = np.zeros((32, 32), bool)
    mask[3, 4] = True
    masked = dataclasses.replace(small_scan, bad_pixels=mask)
    payload = create_training_payload(tiny_overrides(epochs=1, n_groups=32))
    train(payload, small_scan.subset(np.arange(64)), test_data=masked.subset(np.arange(64, 96)))
    train(payload, masked.subset(np.arange(64)), test_data=small_scan.subset(np.arange(64, 96)))
    train(payload, masked)  # a split of the training scan: its mask for both
    first, second, split = seen
    assert first["bad_pixels"] is None and torch.equal(first["val_bad_pixels"], torch.tensor(mask))
    assert second["bad_pixels"][3, 4] and not second["val_bad_pixels"].any()
    assert split["val_bad_pixels"] is None  # the module then uses the training mask
    model = TrainedModel.build(
        payload.to_flat(), masked.probe, input_scale=1.0, intensity_scale=1.0, nphotons=1e5
    )
    module = Spy(
        model.autoencoder,
        intensity_scale=1.0,
        bad_pixels=torch.tensor(mask),
        learning_rate=1e-3,
        scheduler="constant",
        max_epochs=1,
        optimizer="adam",
    )
    assert torch.equal(module.val_bad_pixels, module.bad_pixels)


class _BrokenPipeObserver(Recorder):
    """A console observer whose reader went away (``ptychodus-torch train ... | head``)."""

    def on_batch_end(self, epoch, batch, batches, loss):
        super().on_batch_end(epoch, batch, batches, loss)
        if (epoch, batch) == (0, 1):
            raise BrokenPipeError(32, "Broken pipe")


def test_a_failing_observer_method_is_muted_and_training_finishes(small_scan, caplog):
    observer = _BrokenPipeObserver()
    payload = create_training_payload(tiny_overrides(epochs=2))
    with caplog.at_level("ERROR", logger="ptychodus_torch_plugin"):
        result = train(payload, small_scan, observer=observer)
    assert [r.epoch for r in result.history] == [1, 2] and not result.cancelled
    assert result.model.epochs_trained == 2
    # on_batch_end is called up to its failure, then never again; the others still are.
    assert [e[0] for e in observer.events] == ["start", "batch", "batch", "epoch", "epoch"]
    failures = [r for r in caplog.records if "progress observer" in r.getMessage()]
    assert len(failures) == 1 and "_BrokenPipeObserver" in failures[0].getMessage()
    assert failures[0].exc_info[0] is BrokenPipeError


class _BudgetWithBrokenPrint(Recorder):
    """Like the quality benchmark's budget: cancels from on_batch_end, prints per epoch."""

    def on_epoch_end(self, record):
        super().on_epoch_end(record)
        raise BrokenPipeError(32, "Broken pipe")


def test_an_observer_that_keeps_time_still_cancels_after_its_print_failed(small_scan):
    token = CancelToken()
    observer = _BudgetWithBrokenPrint(cancel_at=(1, 2), token=token)
    payload = create_training_payload(tiny_overrides(epochs=5))
    result = train(payload, small_scan, observer=observer, cancel=token)
    assert result.cancelled and [r.epoch for r in result.history] == [1]


def test_training_leaves_the_process_torch_modes_and_random_generators_as_they_were(
    small_scan, monkeypatch
):
    """Inside Ptychodus training shares the process: Lightning's deterministic mode, seeds and
    environment variables used to stay behind for every later reconstruction."""
    import os
    import random

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    payload = create_training_payload(tiny_overrides(epochs=1, n_groups=16, deterministic=True))
    train(payload, small_scan)
    assert not torch.are_deterministic_algorithms_enabled()
    assert "PL_GLOBAL_SEED" not in os.environ and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_float16_mixed_on_the_cpu_trains_and_is_recorded_as_bfloat16(small_scan, caplog):
    """Lightning swaps 16-mixed for bf16-mixed on the CPU; the archive used to say 16-mixed."""
    payload = create_training_payload(
        tiny_overrides(epochs=1, n_groups=16, precision="16-mixed", accelerator="cpu")
    )
    with caplog.at_level("WARNING", logger="ptychodus_torch_plugin"):
        result = train(payload, small_scan)
    assert "training in 'bf16-mixed' instead" in caplog.text
    assert result.model.config["precision"] == "bf16-mixed"
    assert len(result.history) == 1


def test_the_archive_records_the_metric_really_monitored(small_scan):
    """validation_fraction = 0: no validation data, so the training loss picks the weights;
    the model's config (the archive's config.json) and the result say so, not "val_loss"."""
    overrides = tiny_overrides(epochs=1, n_groups=16, validation_fraction=0)
    payload = create_training_payload(overrides)
    assert payload.execution.checkpointing.monitor == "val_loss"  # the default asked for
    result = train(payload, small_scan)
    assert result.model.config["checkpoint_monitor"] == "train_loss"
    assert result.payload.execution.checkpointing.monitor == "train_loss"
    # with validation data the configured metric stays
    split = train(create_training_payload(dict(overrides, validation_fraction=0.2)), small_scan)
    assert split.model.config["checkpoint_monitor"] == "val_loss"


def _two_mode_scan(scan):
    return dataclasses.replace(scan, probe=np.stack([scan.probe[0], 0.1 * scan.probe[0]]))


@pytest.mark.parametrize("refinement_epochs", [0, 5])
def test_supervised_training_cuts_the_probe_modes_whatever_the_refinement_setting(
    small_scan, refinement_epochs
):
    """Supervised training ignores probe_refinement_epochs, so it must not decide the cut."""
    payload = create_training_payload(
        tiny_overrides(
            epochs=1,
            n_groups=16,
            mode="supervised",
            probe_modes=1,
            probe_refinement_epochs=refinement_epochs,
        )
    )
    result = train(payload, _two_mode_scan(small_scan))
    assert result.model.probe.shape == (1, 32, 32) and result.probe_refinement is None


def test_supervised_training_cannot_add_probe_modes(small_scan):
    payload = create_training_payload(
        tiny_overrides(epochs=1, mode="supervised", probe_modes=3, probe_refinement_epochs=5)
    )
    with pytest.raises(
        ValueError,
        match=r"probe_modes = 3 is invalid for data with 2 probe mode\(s\): supervised training "
        r"does not refine the probe, so it cannot add modes; set probe_modes to 0 \(all\) or at "
        r"most 2",
    ):
        train(payload, _two_mode_scan(small_scan))


def _three_patterns(scan):
    return scan.subset(np.arange(3))


def _blank(scan):
    return dataclasses.replace(scan, amplitudes=np.zeros_like(scan.amplitudes))


@pytest.mark.parametrize(
    ("overrides", "training", "test", "message"),
    [
        ({"n_groups": 500}, None, None, r"n_groups = 500"),
        ({}, _blank, None, r"all zero"),
        ({"gridsize": 2}, None, _three_patterns, r"^test data: xcoords: found 3 positions"),
        ({}, None, _blank, r"^test data: diff3d: the patterns are all zero"),
    ],
    ids=["n_groups", "blank-training-scan", "small-test-scan", "blank-test-scan"],
)
def test_the_scans_are_checked_before_the_probe_refinement(
    small_scan, monkeypatch, overrides, training, test, message
):
    """A refinement can take hours: data it would end in an error for is refused first."""
    from ptychodus_torch_plugin.engine import training as training_module

    def refine_probe(*args, **kwargs):
        raise AssertionError("the probe refinement ran before the scans were checked")

    monkeypatch.setattr(training_module, "refine_probe", refine_probe)
    payload = create_training_payload(
        tiny_overrides(epochs=1, probe_refinement_epochs=5, **overrides)
    )
    data = small_scan if training is None else training(small_scan)
    test_data = None if test is None else test(small_scan)
    with pytest.raises(ValueError, match=message):
        train(payload, data, test_data=test_data)


@pytest.mark.parametrize(
    ("gridsize", "make_test", "original"),
    [
        (2, _three_patterns, "xcoords: found 3 positions, expected at least gridsize**2 = 4"),
        (1, _blank, "diff3d: the patterns are all zero"),
    ],
)
def test_errors_about_the_test_scan_say_so(small_scan, gridsize, make_test, original):
    """They read as the training scan's otherwise (and "use a gridsize-1 model" misleads)."""
    payload = create_training_payload(tiny_overrides(epochs=1, gridsize=gridsize))
    with pytest.raises(ValueError) as caught:
        train(payload, small_scan, test_data=make_test(small_scan))
    text = str(caught.value)
    assert text.startswith(f"test data: {original}"), text
    assert "train without this test scan" in text


def test_the_mae_loss_is_the_one_trained(small_scan):
    """loss = "mae": an amplitude misfit (well below 1 in normalised units), not the Poisson
    NLL (tens of thousands of counts on this scan)."""
    payload = create_training_payload(tiny_overrides(epochs=1, n_groups=32, loss="mae"))
    result = train(payload, small_scan)
    assert 0 < result.history[0].train_loss < 1, result.history
    assert 0 < result.history[0].val_loss < 1, result.history


def test_a_checkpoint_that_cannot_be_written_does_not_end_training(small_scan, tmp_path, caplog):
    """From epoch 2 on, no file may grow past half a checkpoint (EFBIG, as a full disk gives
    ENOSPC): training still finishes with its model, and the epoch-1 checkpoints stay whole."""
    resource = pytest.importorskip("resource")
    import signal

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    checkpoints = tmp_path / "checkpoints"

    class FileSizeLimit(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                size = (checkpoints / "last.ckpt").stat().st_size
                resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, limit[1]))

    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a kill
    # the training loss monitored (no validation data) falls every epoch: each one saves
    payload = create_training_payload(tiny_overrides(epochs=3, n_groups=32, validation_fraction=0))
    try:
        with caplog.at_level("WARNING", logger="ptychodus_torch_plugin"):
            result = train(payload, small_scan, output_dir=tmp_path, callbacks=[FileSizeLimit()])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert [r.epoch for r in result.history] == [1, 2, 3] and not result.cancelled
    losses = [r.train_loss for r in result.history]
    assert losses[2] < losses[1] < losses[0], losses  # epochs 2 and 3 did try to save
    assert caplog.text.count("not written") == 4 and "training goes on" in caplog.text
    # epoch 1's checkpoints are whole and loadable (the best one was not removed for a newer
    # one that was never written), and nothing half-written lies beside them
    names = sorted(p.name for p in checkpoints.iterdir())
    assert len(names) == 2 and names[0].startswith("epoch000-") and names[1] == "last.ckpt"
    for name in names:
        assert torch.load(checkpoints / name, weights_only=False)["epoch"] == 0


def test_checkpoints_are_written_beside_their_target(small_scan, tmp_path, monkeypatch):
    """Not staged in the system temp folder and moved: across file systems that move copies
    onto last.ckpt in place, and a crash during it left a truncated checkpoint."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-system-temp-folder"))
    payload = create_training_payload(tiny_overrides(epochs=1, n_groups=16))
    out = tmp_path / "run"
    result = train(payload, small_scan, output_dir=out)
    assert out / "checkpoints" / "last.ckpt" in result.checkpoint_paths
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0
    assert not (tmp_path / "no-system-temp-folder").exists()
