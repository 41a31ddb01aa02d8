"""Screenshots of the TorchPINN panel in the real Ptychodus window, for docs/user-guide.md.

Run under a virtual X server (the real window, not the offscreen platform)::

    bash scripts/ensure_env.sh   # the installed plugin is what Ptychodus loads: refresh it
    xvfb-run -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py [OUT_DIR]

It simulates a small scan with Ptychodus's own simulator and writers, starts Ptychodus's
``ModelCore``/``ViewCore``/``ControllerCore`` with the installed plugin, selects TorchPINN
PINN and writes (default ``docs/images/``):

* ``gui_panel.png``: the processing view with the panel (parameters, model status, actions);
* ``gui_panel_probe.png``: the panel scrolled to its training fields, probe refinement set as
  the user guide suggests for a probe that may not be the scan's (reset before training);
* ``gui_training.png``: "Train on this scan" in progress: progress bars, time left, live loss;
* ``gui_reconstructed.png``: Ptychodus's object view showing the result of "Infer" with the
  model just trained.

Training uses the panel's own button (a worker thread), so the script also shows that a
whole session works end to end. Takes a few minutes on a CPU.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
N = int(os.environ.get("SCREENSHOT_N", "32"))
EPOCHS = int(os.environ.get("SCREENSHOT_EPOCHS", "25"))
SNAPSHOT_EPOCH = int(os.environ.get("SCREENSHOT_AT_EPOCH", "6"))


def _scroll_areas(widget: Any) -> list[Any]:
    from PyQt5.QtWidgets import QScrollArea

    areas = []
    while widget is not None:
        if isinstance(widget, QScrollArea):
            areas.append(widget)
        widget = widget.parentWidget()
    return areas


def show_probe_settings(panel: Any, settings: Any) -> None:
    """Scroll the panel to the training fields with probe refinement set as the guide says."""
    from PyQt5.QtWidgets import QLabel

    settings.probe_refinement_epochs.set_value(50)
    settings.probe_modes.set_value(3)
    labels = [w for w in panel.findChildren(QLabel) if w.text() == "Probe modes:"]
    if not labels:
        raise RuntimeError("no 'Probe modes:' field in the panel")
    for area in _scroll_areas(labels[0]):
        area.ensureWidgetVisible(labels[0], 50, 120)


def scroll_to_top(panel: Any) -> None:
    for area in _scroll_areas(panel):
        area.verticalScrollBar().setValue(0)


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else ROOT / "docs" / "images"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="torchpinn-shots-"))
    os.environ.setdefault("PTYCHODUS_TORCH_MODEL_DIR", str(work / "models"))

    from ptychodus_torch_plugin.host.demo import simulate_batch_input

    scan = simulate_batch_input(work / "scan", N=N, scan_points=12, step_px=N / 8, seed=0)
    print(f"simulated {scan.n_patterns} patterns of {scan.N} px in {scan.directory}")

    from ptychodus.model import ModelCore
    from PyQt5.QtCore import QEventLoop
    from PyQt5.QtWidgets import QApplication

    app = QApplication(sys.argv[:1])
    with ModelCore(log_level=logging.INFO) as model:
        from ptychodus.controller import ControllerCore
        from ptychodus.view import ViewCore

        from ptychodus_torch_plugin.host.registration import registered_library

        view = ViewCore(is_developer_mode_enabled=False)
        controller = ControllerCore(model, view, is_developer_mode_enabled=False)
        library = registered_library(model.processing_core.algorithm_parameter)
        settings = library.settings
        settings.set_model_path(None)

        def pump(seconds: float) -> None:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                app.processEvents(QEventLoop.AllEvents, 30)
                time.sleep(0.01)

        def grab(name: str) -> None:
            pump(0.5)
            path = out / name
            view.grab().save(str(path))
            print(f"wrote {path}")

        view.setWindowTitle("Ptychodus with the TorchPINN plugin")
        view.resize(1600, 1000)
        view.show()
        workflow = model.workflow_api
        data = workflow.load_assembled_diffraction_data(scan.directory / "diffraction.h5")
        workflow.load_product(scan.directory / "product.h5", diffraction=data)
        model.processing_core.algorithm_parameter.set_value("torchpinn_pinn")
        view.processing_action.trigger()
        processing = controller._processing_controller
        panel = processing._stacked_widget.currentWidget()
        settings.epochs.set_value(EPOCHS)
        settings.batch_size.set_value(16)
        settings.n_filters_scale.set_value(1)
        settings.accelerator.set_value("cpu")
        model.processing_core.algorithm_parameter.notify_observers()
        pump(1.0)
        grab("gui_panel.png")
        show_probe_settings(panel, settings)
        pump(1.0)
        grab("gui_panel_probe.png")
        settings.probe_refinement_epochs.set_value(0)  # the demo trains with the given probe
        settings.probe_modes.set_value(0)
        scroll_to_top(panel)

        epochs_seen: list[int] = []
        panel.session.worker_started.connect(
            lambda kind, worker: worker.epoch_finished.connect(
                lambda record: epochs_seen.append(record.epoch)
            )
        )
        panel.train_button.click()
        shot = False
        while panel.session.is_running():
            pump(0.2)
            if not shot and len(epochs_seen) >= SNAPSHOT_EPOCH:
                pump(1.5)  # a few batches into the next epoch: both bars and the time left
                grab("gui_training.png")
                shot = True
        if panel.session.last_outcome is None:
            print(f"training failed: {panel.session.last_error}")
            return 1
        print(panel.message_label.text())
        if not shot:  # the committed gui_training.png would silently stay an old one
            print(f"training ended before epoch {SNAPSHOT_EPOCH}: no gui_training.png written")
            return 1

        monitor = model.processing_core.processing_api.task_monitor
        snapshot = monitor.get_completed_runs()
        processing._actions_view.reconstruct_button.click()  # Ptychodus's own "Infer"
        deadline = time.monotonic() + 300
        while monitor.get_completed_runs() <= snapshot:
            if time.monotonic() > deadline:
                print("inference did not finish within 5 minutes (did Infer start a run?)")
                return 1
            pump(0.2)
        pump(2.5)
        if monitor.get_last_error() is not None:
            print(f"inference failed: {monitor.get_last_error()}")
            return 1
        repository = model.product_core.product_repository
        result_index = len(repository) - 1
        print(f"reconstructed product: {repository[result_index].get_name()}")

        view.object_action.trigger()
        object_view = controller._object_controller._view
        tree = object_view.tree_view
        tree.setCurrentIndex(tree.model().index(result_index, 0))
        pump(2.0)
        from PyQt5.QtWidgets import QComboBox, QPushButton, QToolButton

        for combo in view.findChildren(QComboBox):  # show the phase, the PINN's sharper part
            if combo.isVisible() and combo.findText("Phase") >= 0:
                combo.setCurrentText("Phase")
                combo.textActivated.emit("Phase")
        pump(1.0)
        for combo in view.findChildren(QComboBox):  # a sequential colour map for the phase
            if combo.isVisible() and combo.findText("viridis") >= 0:
                combo.setCurrentText("viridis")
                combo.textActivated.emit("viridis")
        pump(0.5)
        for button in view.findChildren(QPushButton):  # data range: auto (fit the phase)
            if button.isVisible() and button.text() == "Auto":
                button.click()
        pump(1.0)
        for button in view.findChildren(QToolButton):  # "Home": zoom the image to fit
            if button.isVisible() and button.toolTip() == "Home":
                button.click()
        pump(2.0)
        grab("gui_reconstructed.png")
        view.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
