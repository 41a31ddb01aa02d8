"""Training from the panel in the real Ptychodus window: worker thread, live feedback, Stop,
responsiveness, the model handed to Ptychodus's Infer, and closing the window mid-run."""

from __future__ import annotations

import gc
import logging
import sys
import time

import pytest
from gui_helpers import (
    FAST,
    PINN_KEY,
    GcPauses,
    Recorder,
    TickTimer,
    settings_values,
    unload_model,
    wait_until_idle,
    warm_backend,
)

from ptychodus_torch_plugin.host.names import LOGGER_NAME

#: Stop must end the run within this many seconds at N=64 (issue 6).
STOP_BOUND_S = 2.0
#: The GUI thread must never stall longer than this while training (issue 6).
MAX_TIMER_GAP_S = 0.25


def _infer_and_wait(gui, timeout: float = 120.0) -> None:
    """Click Ptychodus's Infer and wait for the reconstruction task to complete."""
    snapshot = gui.monitor.get_completed_runs()
    assert gui.infer_button.isEnabled()
    gui.infer_button.click()
    end = time.perf_counter() + timeout
    while gui.monitor.get_completed_runs() <= snapshot and time.perf_counter() < end:
        gui.pump(0.1)
    assert gui.monitor.get_completed_runs() > snapshot, "Infer did not finish"
    gui.pump(1.2)  # the GUI pump (1 s) applies the results
    assert gui.monitor.get_last_error() is None, gui.monitor.get_last_error()


@pytest.fixture(scope="module")
def training_run(gui):
    """One short training run started with the panel's button, fully recorded."""
    warm_backend()  # time the run, not Python's first import of torch
    panel = gui.panel(PINN_KEY)
    gui.select_product(32)
    unload_model(gui.library)
    gui.algorithm.notify_observers()
    gui.pump(0.2)
    infer_before = gui.infer_button.isEnabled()
    recorder = Recorder(panel.session)
    recorder.panel_plot = panel.loss_plot
    ticks = TickTimer(50)
    # Start from a collected heap: the garbage earlier tests left in this long-lived process
    # (not the training) would otherwise decide when a full collection stalls the GUI thread.
    gc.collect()
    with settings_values(gui.library, **FAST), GcPauses() as collections:
        ticks.start()
        clicked = time.perf_counter()
        panel.train_button.click()
        running_after_click = panel.session.is_running()
        stop_enabled_during_run = panel.stop_button.isEnabled()
        train_enabled_during_run = panel.train_button.isEnabled()
        wait_until_idle(gui, panel.session, timeout=240)
        ticks.stop()
    recorder.disconnect()
    result = {
        "panel": panel,
        "recorder": recorder,
        "ticks": ticks,
        "clicked": clicked,
        "infer_before": infer_before,
        "running_after_click": running_after_click,
        "stop_enabled_during_run": stop_enabled_during_run,
        "train_enabled_during_run": train_enabled_during_run,
        "seconds": time.perf_counter() - clicked,
        "collections": collections,
    }
    return result


def test_train_button_runs_training_in_a_worker_thread(training_run):
    recorder = training_run["recorder"]
    assert training_run["running_after_click"]
    assert training_run["stop_enabled_during_run"]
    assert not training_run["train_enabled_during_run"]
    assert recorder.kinds()[-1] == "finished", recorder.events[-1]
    # every slot ran on the GUI thread; the worker lived on another thread
    assert recorder.threads == {True}
    assert recorder.worker_threads and recorder.worker_threads[0] is not recorder.gui_thread


def test_progress_signals_arrive_in_order(training_run):
    events = training_run["recorder"].events
    kinds = [e[0] for e in events]
    assert kinds[0] == "worker"
    assert kinds.index("train_started") < kinds.index("batch") < kinds.index("epoch")
    (started,) = [e for e in events if e[0] == "train_started"]
    epochs, batches = started[1], started[2]
    assert epochs == FAST["epochs"] and batches >= 1
    expected = []
    for epoch in range(1, epochs + 1):
        expected += [("batch", epoch, b) for b in range(1, batches + 1)]
        expected.append(("epoch", epoch))
    seen = [(e[0], e[1], e[2]) if e[0] == "batch" else (e[0], e[1]) for e in events]
    seen = [s for s in seen if s[0] in ("batch", "epoch")]
    assert seen == expected
    times = [e[-1] for e in events if e[0] in ("train_started", "batch", "epoch", "finished")]
    assert times == sorted(times)


def test_loss_curve_gains_one_point_per_epoch(training_run):
    recorder = training_run["recorder"]
    panel = training_run["panel"]
    assert recorder.plot_sizes == [(e, e) for e in range(1, FAST["epochs"] + 1)]
    train = panel.loss_plot.training_points()
    assert [p[0] for p in train] == list(range(1, FAST["epochs"] + 1))
    assert all(v > 0 for _, v in train)
    assert len(panel.loss_plot.validation_points()) == FAST["epochs"]
    assert panel.loss_plot.axes.get_yscale() == "log"


def test_trained_model_is_loaded_and_infer_uses_it(gui, training_run):
    panel = training_run["panel"]
    outcome = panel.session.last_outcome
    assert outcome is not None and not outcome.stopped
    assert outcome.archive is not None and outcome.archive.is_file()
    assert gui.library.settings.get_model_path() == outcome.archive.resolve()
    assert gui.library.model_slot.is_loaded()
    assert f"{FAST['epochs']} epochs trained" in panel.status_label.text()
    assert "N=32" in panel.status_label.text() and "gridsize 1" in panel.status_label.text()
    assert "loaded" in panel.message_label.text()
    assert not training_run["infer_before"]
    assert gui.infer_button.isEnabled()
    assert gui.infer_button.text() == "Infer"
    assert not panel.epoch_bar.isHidden() and panel.epoch_bar.value() == FAST["epochs"]
    ended = panel.time_label.text()  # how long and how far, not a frozen "... left"
    assert ended.startswith("finished after ") and f"{FAST['epochs']} of {FAST['epochs']}" in ended
    assert "left" not in ended
    assert panel.loss_plot.training_points() == [  # the loaded model's history, as it was drawn
        (r.epoch, r.train_loss) for r in outcome.history
    ]
    # Ptychodus's own Infer runs with the model just trained (no reload, no restart)
    before = len(gui.model.product_core.product_repository)
    _infer_and_wait(gui)
    assert len(gui.model.product_core.product_repository) == before + 1
    reconstructed = gui.model.product_core.product_repository[before].get_product()
    assert [loss.epoch for loss in reconstructed.losses] == list(range(1, FAST["epochs"] + 1))


def test_gui_thread_stays_responsive_while_training(training_run):
    ticks = training_run["ticks"]
    gap = ticks.max_gap()
    print(
        f"\n[gui] training run {training_run['seconds']:.1f} s, {len(ticks.ticks)} ticks of "
        f"50 ms, largest gap between ticks {gap * 1000:.0f} ms",
        file=sys.stderr,
    )
    clicked = training_run["clicked"]
    worst = sorted(
        ((b - a, a - clicked) for a, b in zip(ticks.ticks, ticks.ticks[1:], strict=False)),
        reverse=True,
    )[:3]
    timeline = [
        (e[0], round(e[-1] - clicked, 2))
        for e in training_run["recorder"].events
        if e[0] in ("train_started", "epoch", "finished")
    ]
    pauses = [
        (round(at - clicked, 2), round(seconds, 3), generation)
        for at, seconds, generation in training_run["collections"].longest()
    ]
    print(f"[gui] worst gaps (s, at s) {worst}; {timeline}", file=sys.stderr)
    print(f"[gui] longest garbage collections (at s, s, generation) {pauses}", file=sys.stderr)
    assert len(ticks.ticks) > 10
    assert gap < MAX_TIMER_GAP_S


def test_stop_during_training_ends_quickly_and_keeps_a_usable_model(gui, caplog):
    caplog.set_level(logging.INFO, logger=f"{LOGGER_NAME}.gui.workers")
    warm_backend()
    panel = gui.panel(PINN_KEY)
    gui.select_product(64)
    recorder = Recorder(panel.session)
    settings = dict(FAST, epochs=50, n_filters_scale=2, batch_size=16, n_groups=48)
    with settings_values(gui.library, **settings):
        panel.train_button.click()
        assert panel.session.is_running()
        end = time.perf_counter() + 180
        # wait for one finished epoch and a batch into the next one, then stop mid-batch
        while time.perf_counter() < end and not any(
            e[0] == "batch" and e[1] == 2 for e in recorder.events
        ):
            gui.pump(0.05)
            assert panel.session.is_running(), recorder.events[-1]
        gui.pump(0.3)
        stop_clicked = time.perf_counter()
        panel.stop_button.click()
        while panel.session.is_running() and time.perf_counter() - stop_clicked < 30:
            gui.pump(0.01)
        latency = time.perf_counter() - stop_clicked
    recorder.disconnect()
    # where the time went after the click (the worker logs when training ended and the
    # model was saved), so a slow stop says which step held it up
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Stop:")]
    print(
        f"\n[gui] Stop at N=64 (batch 16, filter scale 2): worker ended {latency:.2f} s after "
        f"the click (session measured {panel.session.last_stop_latency:.2f} s); {steps}",
        file=sys.stderr,
    )
    assert not panel.session.is_running()
    assert [s.split(" ")[1] for s in steps] == ["training", "model"], steps
    assert latency < STOP_BOUND_S, steps
    outcome = panel.session.last_outcome
    assert outcome is not None and outcome.stopped
    assert len(outcome.history) >= 1 and outcome.archive is not None
    assert "Stopped after" in panel.message_label.text()
    # the bars show where it stopped, not the epoch cut short
    assert panel.epoch_bar.value() == len(outcome.history)
    assert panel.batch_bar.format() == "stopped"
    # the run's result no longer holds Ptychodus's copy of the scan (a whole scan in memory
    # until the next run, two during its start)
    assert outcome.job.reconstruct_input is None
    assert "N=64" in panel.status_label.text()
    assert gui.library.settings.get_model_path() == outcome.archive.resolve()
    assert panel.train_button.isEnabled() and not panel.stop_button.isEnabled()
    _infer_and_wait(gui)  # the kept model reconstructs


def _train_until_the_first_batch(gui, panel, recorder, timeout: float = 120.0) -> None:
    """Click the panel's Train and pump the GUI until a batch has run (a run in full swing)."""
    panel.train_button.click()
    end = time.perf_counter() + timeout
    while time.perf_counter() < end and "batch" not in recorder.kinds():
        gui.pump(0.05)
    assert "batch" in recorder.kinds(), f"no batch within {timeout} s: {recorder.kinds()}"


def test_closing_the_window_during_training_stops_the_worker(gui):
    panel = gui.panel(PINN_KEY)
    gui.select_product(32)
    recorder = Recorder(panel.session)
    with settings_values(gui.library, **dict(FAST, epochs=50)):
        _train_until_the_first_batch(gui, panel, recorder)
        closed = time.perf_counter()
        gui.view.close()  # the main window's close event stops and joins the worker
        seconds = time.perf_counter() - closed
        assert not panel.session.is_running()
    recorder.disconnect()
    gui.pump(0.3)
    batches = sum(1 for kind in recorder.kinds() if kind == "batch")
    print(
        f"\n[gui] window closed during training (after {batches} batches): worker stopped "
        f"and joined in {seconds:.2f} s",
        file=sys.stderr,
    )
    assert seconds < 10
    assert recorder.kinds()[-1] == "finished"
    assert panel.session.last_outcome.stopped
    # progress the worker had queued before the close does not bring back a live view
    assert panel.time_label.text().startswith("stopped after"), panel.time_label.text()
    assert not panel.message_label.text().startswith("Epoch"), panel.message_label.text()
    gui.view.show()
    gui.view.processing_action.trigger()
    gui.pump(0.2)
    assert panel.train_button.isEnabled()


def test_a_quit_without_a_window_close_still_handles_and_logs_the_run_result(gui, caplog):
    """aboutToQuit -> shutdown(): no event loop runs after it, so the worker's result must be
    delivered by shutdown's own flush (it names where the model was saved)."""
    panel = gui.panel(PINN_KEY)
    gui.select_product(32)
    recorder = Recorder(panel.session)
    with settings_values(gui.library, **dict(FAST, epochs=50)):
        _train_until_the_first_batch(gui, panel, recorder)
        with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
            assert panel.session.shutdown()  # what aboutToQuit calls; no pump afterwards
            outcome = panel.session.last_outcome
    recorder.disconnect()
    assert outcome is not None and outcome.stopped
    assert "Stopped after" in caplog.text or "stopped before the first epoch" in caplog.text
    gui.pump(0.3)


def test_one_training_at_a_time_between_the_panel_and_ptychodus_train(gui, tmp_path):
    """The panel trains outside Ptychodus's task manager: the library lets one run at a time."""
    panel = gui.panel(PINN_KEY)
    gui.select_product(32)
    library = gui.library
    library.begin_training("PINN, started by Ptychodus's Train")  # as while the host trains
    try:
        assert not panel.train_on_this_scan()
        gui.pump(0.2)
        assert not panel.session.is_running()
        text = panel.message_label.text()
        assert "Cannot start training: a TorchPINN training is already running" in text
        assert "started by Ptychodus's Train" in text
        # a model loaded now would be replaced by that training's when it ends
        assert not panel.session.load_model(tmp_path / "any.h5.zip")
        assert not panel.session.is_running()
        assert "Load the model after it" in panel.message_label.text()
    finally:
        library.end_training()
    # and the other way round: while the panel trains, Ptychodus's Train is refused
    with settings_values(library, **FAST):
        assert panel.train_on_this_scan()
        try:
            with pytest.raises(RuntimeError, match="already running .*started from the panel"):
                next(library.reconstructor("PINN").train(tmp_path, tmp_path))
        finally:
            panel.session.stop()
            wait_until_idle(gui, panel.session, 60.0)
    library.begin_training("free again")  # released when the panel's run ended
    library.end_training()


def test_ptychodus_own_train_draws_the_loss_in_the_panel_live(gui, tmp_path):
    """Ptychodus's Train shows only a count; the panel plots each epoch as it finishes."""
    panel = gui.panel(PINN_KEY)
    gui.select_product(32)
    seen = []

    def look(name, record):  # connected after the panel's slot: sees the plot it drew
        points = [epoch for epoch, _ in panel.loss_plot.training_points()]
        seen.append((name, record.epoch, points, panel.loss_plot.title))

    panel.session.host_epoch.connect(look)
    api = gui.model.processing_core.processing_api
    try:
        with settings_values(gui.library, **{**FAST, "epochs": 3}):
            api.train(gui.scans[32], tmp_path, product_index=gui.products[32], block=True)
            gui.pump(0.5)  # deliver the queued epoch signals
    finally:
        panel.session.host_epoch.disconnect(look)
    title = "PINN training (Ptychodus's Train)"
    assert seen == [
        ("PINN", 1, [1], title),
        ("PINN", 2, [1, 2], title),
        ("PINN", 3, [1, 2, 3], title),
    ]
    assert (tmp_path / "wts.h5.zip").is_file()


def test_a_diverged_run_is_reported_in_red_and_keeps_its_finished_epochs(gui, monkeypatch):
    from training_helpers import make_training_diverge

    make_training_diverge(monkeypatch, epoch=2, batch=1)  # NaN in the second epoch
    warm_backend()
    panel = gui.panel(PINN_KEY)
    gui.select_product(32)
    with settings_values(gui.library, **dict(FAST, epochs=3)):
        panel.train_button.click()
        wait_until_idle(gui, panel.session, timeout=240)
    outcome = panel.session.last_outcome
    assert outcome.divergence is not None and len(outcome.history) == 1
    assert outcome.archive is not None and outcome.model.epochs_trained == 1
    text = panel.message_label.text()
    assert text.startswith("Training diverged: the training loss became nan in epoch 2, batch 1")
    assert "lower the learning rate" in text
    assert "b00020" in panel.message_label.styleSheet()  # shown as an error
