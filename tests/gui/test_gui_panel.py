"""The TorchPINN panel in the real Ptychodus processing view: layout, bindings, tooltips,
model files, and failures that end in a readable message with the GUI still usable."""

from __future__ import annotations

import time

from gui_helpers import FAST, PINN_KEY, SUPERVISED_KEY, Recorder, settings_values, wait_until_idle
from PyQt5.QtWidgets import QComboBox, QGroupBox, QPushButton, QSpinBox, QWidget


def test_panel_appears_in_the_processing_stack_when_selected(gui):
    from ptychodus_torch_plugin.gui.panel import TorchPINNPanel

    keys = list(gui.algorithm.available_reconstructors())
    assert PINN_KEY in keys and SUPERVISED_KEY in keys
    pinn = gui.select(PINN_KEY)
    assert isinstance(pinn, TorchPINNPanel) and pinn.reconstructor.name == "PINN"
    assert gui.stack.currentIndex() == keys.index(PINN_KEY)
    assert pinn.isVisible()
    supervised = gui.select(SUPERVISED_KEY)
    assert isinstance(supervised, TorchPINNPanel) and supervised.reconstructor.name == "Supervised"
    assert supervised is not pinn and supervised.session is pinn.session
    assert gui.processing._actions_view.train_button.isVisibleTo(gui.view)
    gui.select(PINN_KEY)


def test_panel_has_grouped_parameters_with_tooltips_and_the_actions(gui):
    panel = gui.panel(PINN_KEY)
    titles = [box.title() for box in panel.findChildren(QGroupBox)]
    for group in ("Data", "Model", "Training", "Inference", "Execution"):
        assert group in titles
    buttons = {b.text() for b in panel.findChildren(QPushButton)}
    assert {"Train on this scan", "Stop", "Load model...", "Save model as..."} <= buttons
    from ptychodus_torch_plugin.gui.panel import PARAMETERS

    editors = [
        w for w in panel.parameter_widget.findChildren(QWidget) if "Setting: " in w.toolTip()
    ]
    assert len(editors) == len(PARAMETERS) >= 20
    for editor in editors:
        tip = editor.toolTip()
        assert "Setting: TorchPINN" in tip
        assert any(word in tip for word in ("Range:", "Allowed:", "On or off")), tip
    epochs_tip = [e.toolTip() for e in editors if "TorchPINNTraining.Epochs" in e.toolTip()]
    assert epochs_tip and "Range: 1 to 100000." in epochs_tip[0]


def _editors(panel, kind, key):
    """The panel's editors of type ``kind`` whose tool tip names the setting ``key``."""
    return [e for e in panel.parameter_widget.findChildren(kind) if key in e.toolTip()]


def test_panel_editors_are_bound_to_the_host_settings(gui):
    panel = gui.panel(PINN_KEY)
    settings = gui.library.settings
    epochs = _editors(panel, QSpinBox, "TorchPINNTraining.Epochs")[0]
    loss = _editors(panel, QComboBox, "TorchPINNTraining.Loss")[0]
    old_epochs, old_loss = settings.epochs.get_value(), settings.loss.get_value()
    try:
        epochs.setValue(7)
        assert settings.epochs.get_value() == 7
        settings.epochs.set_value(11)
        assert epochs.value() == 11
        settings.loss.set_value("mae")
        assert loss.currentText() == "mae"
        other = gui.panel(SUPERVISED_KEY)  # every panel shows the same settings
        other_epochs = _editors(other, QSpinBox, "TorchPINNTraining.Epochs")[0]
        assert other_epochs.value() == 11
    finally:
        settings.epochs.set_value(old_epochs)
        settings.loss.set_value(old_loss)
        gui.select(PINN_KEY)


def test_status_line_and_buttons_without_a_model(gui):
    panel = gui.panel(PINN_KEY)
    old = gui.library.settings.get_model_path()
    try:
        gui.library.settings.set_model_path(None)
        gui.pump(0.05)
        assert panel.status_label.text().startswith("No model loaded")
        assert not panel.save_button.isEnabled()
        assert panel.train_button.isEnabled() and not panel.stop_button.isEnabled()
    finally:
        gui.library.settings.set_model_path(old)


def test_invalid_setting_fails_with_a_readable_message_and_the_gui_stays_usable(gui):
    panel = gui.panel(PINN_KEY)
    gui.select_product(32)
    recorder = Recorder(panel.session)
    # a value the engine refuses: the worker fails and says which setting and what is allowed
    with settings_values(gui.library, **dict(FAST, loss="bogus")):
        panel.train_button.click()
        wait_until_idle(gui, panel.session, timeout=60)
    recorder.disconnect()
    assert recorder.kinds()[-1] == "failed"
    text = panel.message_label.text()
    assert text.startswith("Training failed:") and "loss" in text and "'bogus'" in text
    assert "poisson" in text and "mae" in text
    assert "b00020" in panel.message_label.styleSheet()  # shown as an error
    end = time.perf_counter() + 3
    while "bogus" not in gui.log_text() and time.perf_counter() < end:
        gui.pump(0.1)
    log = gui.log_text()
    assert "Training failed" in log and "bogus" in log
    # said once, as a line: no second copy from the worker, no traceback for a setting error
    assert log.count("Training failed") == 1 and "Traceback" not in log
    # still usable: buttons back, and a setting refused before the worker starts is reported
    assert panel.train_button.isEnabled() and not panel.stop_button.isEnabled()
    assert panel.load_button.isEnabled()
    with settings_values(gui.library, devices="two"):
        assert panel.train_on_this_scan() is False
    assert not panel.session.is_running()
    assert "Cannot start training" in panel.message_label.text()
    assert "Devices" in panel.message_label.text()


def test_load_and_save_model_buttons(gui, tmp_path, monkeypatch):
    import numpy as np

    from ptychodus_torch_plugin.engine.archive import load_archive, save_archive
    from ptychodus_torch_plugin.engine.model import EpochRecord, TrainedModel
    from ptychodus_torch_plugin.engine.payload import create_training_payload

    payload = create_training_payload(dict(FAST, N=32, gridsize=1))
    model = TrainedModel.build(
        payload.to_flat(),
        np.ones((1, 32, 32), np.complex64),
        input_scale=1.0,
        intensity_scale=1.0,
        nphotons=1e6,
        history=[EpochRecord(1, 2.0, 1.5, 1e-3, 1.0), EpochRecord(2, 1.0, 0.9, 1e-3, 1.0)],
    )
    source = save_archive(model, tmp_path / "given.h5.zip")
    panel = gui.panel(PINN_KEY)
    factory = panel._file_dialog_factory
    monkeypatch.setattr(factory, "get_open_file_path", lambda *a, **k: (source, ""))
    panel.load_button.click()
    wait_until_idle(gui, panel.session, timeout=60)
    assert gui.library.settings.get_model_path() == source.resolve()
    assert "given.h5.zip" in panel.status_label.text()
    assert "2 epochs trained" in panel.status_label.text()
    assert panel.loss_plot.training_points() == [(1, 2.0), (2, 1.0)]
    assert gui.infer_button.isEnabled()

    target = tmp_path / "copy"
    monkeypatch.setattr(factory, "get_save_file_path", lambda *a, **k: (target, ""))
    assert panel.save_button.isEnabled()
    panel.save_button.click()
    saved = tmp_path / "copy.h5.zip"
    assert saved.is_file() and "saved as" in panel.message_label.text()
    assert load_archive(saved).epochs_trained == 2

    broken = tmp_path / "broken.h5.zip"
    broken.write_bytes(b"not a zip")
    monkeypatch.setattr(factory, "get_open_file_path", lambda *a, **k: (broken, ""))
    panel.load_button.click()
    wait_until_idle(gui, panel.session, timeout=30)
    assert panel.message_label.text().startswith("Loading the model failed:")
    assert "broken.h5.zip" in panel.message_label.text()
    assert gui.library.settings.get_model_path() == source.resolve()  # unchanged


def test_an_archive_with_an_odd_history_neither_aborts_ptychodus_nor_draws_garbage(gui, tmp_path):
    """The status line and the plot run in Qt slots, where an exception ends the application;
    an archive is data from outside (here: a loss stored as text, a record without one)."""
    import json
    import zipfile

    path = tmp_path / "odd.h5.zip"
    history = [
        {"epoch": 1, "train_loss": 2.0, "val_loss": None},
        {"epoch": 2, "train_loss": "1.5"},  # a number as text: read as the number
        {"epoch": 3, "loss": 0.4},  # no train_loss: skipped
        {"epoch": "x", "train_loss": 1.0},  # no epoch number: skipped
        "not a record",
    ]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("manifest.json", json.dumps({"backend": "pytorch"}))
        archive.writestr("config.json", json.dumps({"config": {"N": 32}, "history": history}))
    panel = gui.panel(PINN_KEY)
    before = gui.library.settings.get_model_path()
    try:
        gui.library.settings.set_model_path(path)  # Open Settings / Load Model... do this
        gui.pump(0.2)
        panel.refresh_model_status()
        assert "2 epochs trained" in panel.status_label.text()
        assert panel.loss_plot.training_points() == [(1, 2.0), (2, 1.5)]
        path.write_bytes(b"not a zip any more")
        panel.refresh_model_status()
        assert "cannot be read" in panel.status_label.text()
        assert panel.loss_plot.training_points() == []  # not the previous model's curve
    finally:
        gui.library.settings.set_model_path(before)
        gui.pump(0.2)


def test_a_forged_archive_is_refused_by_the_status_line_without_inflating_it(gui, tmp_path):
    """The status line reads the archive on the GUI thread whenever ModelPath changes: a
    manifest that declares 200 bytes and deflates to 32 MiB must not be inflated (it was, up
    to a gigabyte per step, before the status line used the loader's capped reader)."""
    import json
    import tracemalloc
    import zipfile

    from archive_helpers import with_declared_size

    bomb = tmp_path / "bomb.h5.zip"
    manifest = json.dumps({"backend": "pytorch"}).encode() + b" " * (32 << 20)
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", manifest)
        archive.writestr("config.json", json.dumps({"config": {"N": 32}, "history": []}))
    forged = with_declared_size(bomb, tmp_path / "forged.h5.zip", "manifest.json", 200)
    panel = gui.panel(PINN_KEY)
    before = gui.library.settings.get_model_path()
    try:
        gui.library.settings.set_model_path(forged)
        gui.pump(0.2)
        tracemalloc.start()
        try:
            panel.refresh_model_status()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert "cannot be read" in panel.status_label.text()
        assert "not a valid or complete model archive" in panel.status_label.text()
        assert peak < 8 << 20, f"the status line held {peak / 2**20:.0f} MiB"
    finally:
        gui.library.settings.set_model_path(before)
        gui.pump(0.2)


def test_every_spin_box_holds_its_setting_range(gui):
    """A bound beyond Qt's signed 32-bit spin box stops the panel, and Ptychodus, building."""
    from ptychodus.api.parameters import IntegerParameter

    from ptychodus_torch_plugin.host.settings import SPIN_BOX_MAX

    settings = gui.library.settings
    integers = [p for p in vars(settings).values() if isinstance(p, IntegerParameter)]
    assert len(integers) >= 8
    assert all(p.get_maximum() is not None and p.get_maximum() <= SPIN_BOX_MAX for p in integers)
    # The panel's spin boxes take their ranges from those settings (not Qt's default of 99).
    spins = gui.panel(PINN_KEY).parameter_widget.findChildren(QSpinBox)
    assert spins and {s.maximum() for s in spins} <= {p.get_maximum() for p in integers}


def test_a_settings_file_with_huge_counts_loads_into_the_built_panel(gui, tmp_path):
    """Open Settings... with counts beyond a spin box: clamped, not an OverflowError.

    A value over 2**31 - 1 reached the panel's QSpinBox.setValue inside a Qt slot, which
    aborts Ptychodus (PyQt5); every integer setting now has a maximum Ptychodus clamps to.
    """
    from ptychodus_torch_plugin.host.settings import INFERENCE_GROUP, SPIN_BOX_MAX, TRAINING_GROUP

    settings = gui.library.settings
    path = tmp_path / "huge.ini"
    path.write_text(
        f"[{INFERENCE_GROUP}]\nChunkSize = 3000000000\nNGroups = 9999999999\n"
        f"[{TRAINING_GROUP}]\nNGroups = 3000000000\n"
    )
    try:
        gui.model.settings_registry.open_settings(path)
        gui.pump(0.3)
        assert settings.chunk_size.get_value() == SPIN_BOX_MAX
        assert settings.inference_n_groups.get_value() == SPIN_BOX_MAX
        assert settings.n_groups.get_value() == SPIN_BOX_MAX
        spins = gui.panel(PINN_KEY).parameter_widget.findChildren(QSpinBox)
        assert SPIN_BOX_MAX in {spin.value() for spin in spins}
    finally:
        settings.chunk_size.set_value(256)
        settings.inference_n_groups.set_value(0)
        settings.n_groups.set_value(0)


def test_a_panel_that_cannot_be_built_becomes_a_label_not_a_crash(gui, monkeypatch, caplog):
    from PyQt5.QtWidgets import QLabel

    from ptychodus_torch_plugin.gui import panel as panel_module

    def broken(*args, **kwargs):
        raise OverflowError("argument 2 overflowed")

    monkeypatch.setattr(panel_module, "TorchPINNPanel", broken)
    factory = panel_module.TorchPINNViewControllerFactory(gui.library)
    widget = factory.create_view_controller("PINN")
    assert isinstance(widget, QLabel) and "OverflowError: argument 2 overflowed" in widget.text()
    assert "panel could not be built" in caplog.text and not factory.panels


def test_a_choice_spelt_in_another_case_shows_in_its_drop_down(gui):
    panel = gui.panel(PINN_KEY)
    settings = gui.library.settings
    combos = _editors(panel, QComboBox, "TorchPINNTraining.Scheduler")
    assert len(combos) == 1
    original = settings.scheduler.get_value()
    try:
        settings.scheduler.set_value("Cosine")  # as a settings file may spell it
        gui.pump(0.2)
        assert settings.scheduler.get_value() == "cosine"
        assert combos[0].currentText() == "cosine"
    finally:
        settings.scheduler.set_value(original)


def test_time_left_is_paced_from_the_first_finished_batch(gui, monkeypatch):
    """200 epochs of 10 batches at 1 s each after a slow 100 s first batch: ~33 min left.

    Pacing from the run's start (first batch included) announced 1.4 hours.
    """
    from ptychodus_torch_plugin.gui import panel as panel_module

    panel = gui.panel(PINN_KEY)
    clock = {"now": 0.0}
    monkeypatch.setattr(panel_module.time, "perf_counter", lambda: clock["now"])
    panel._run_started, panel._pace_origin, panel._showing_live = 0.0, None, True
    panel._on_train_started(200, 10)
    clock["now"] = 100.0
    panel._on_batch_progress(1, 1, 10, 1.0)
    assert "about" not in panel.time_label.text()  # one batch: no pace yet
    clock["now"] = 101.0
    panel._on_batch_progress(1, 2, 10, 1.0)
    assert "about 33:18 left" in panel.time_label.text(), panel.time_label.text()
    # A slow batch (or a validation pass) running: the estimate counts down, it does not
    # climb (paced up to now, the running batch counted as done: 33:18 -> 1:06:32 at 10 s).
    clock["now"] = 111.0
    panel._update_time_label()
    assert "about 33:08 left" in panel.time_label.text(), panel.time_label.text()
    panel._pace_origin = None
    panel._on_busy_changed(False)
