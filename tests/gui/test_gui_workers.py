"""The worker pieces without the window: mid-batch Stop, no effect on the numbers, and the
thread owner's clean start/stop."""

from __future__ import annotations

import time

import numpy as np
import pytest
from gui_helpers import warm_backend


@pytest.fixture(scope="module")
def tiny():
    warm_backend()
    from ptychodus_torch_plugin.engine.payload import create_training_payload
    from ptychodus_torch_plugin.engine.simulate import simulate_dataset

    data = simulate_dataset(N=32, nphotons=1e5, seed=0)
    overrides = {
        "N": 32,
        "n_filters_scale": 1,
        "epochs": 1,
        "batch_size": 32,
        "accelerator": "cpu",
        "logger": "none",
        "enable_progress_bar": False,
        "n_groups": 64,
        "seed": 3,
    }
    return data, create_training_payload(overrides)


def test_prompt_stop_leaves_training_unchanged_when_not_stopped(tiny):
    from ptychodus_torch_plugin.engine.cancel import CancelToken
    from ptychodus_torch_plugin.engine.training import train
    from ptychodus_torch_plugin.gui.workers import make_prompt_stop

    data, payload = tiny
    plain = train(payload, data)
    token = CancelToken()
    hooked = train(payload, data, cancel=token, callbacks=[make_prompt_stop(token)])
    assert not hooked.cancelled
    assert [r.train_loss for r in hooked.history] == pytest.approx(
        [r.train_loss for r in plain.history], rel=1e-6
    )
    a = plain.model.generator.state_dict()
    b = hooked.model.generator.state_dict()
    assert all(np.allclose(a[k].numpy(), b[k].numpy()) for k in a)


def test_prompt_stop_ends_fit_in_the_middle_of_a_batch(tiny):
    from lightning.pytorch.callbacks import Callback

    from ptychodus_torch_plugin.engine.cancel import CancelToken
    from ptychodus_torch_plugin.engine.training import train
    from ptychodus_torch_plugin.gui.workers import make_prompt_stop

    data, payload = tiny
    token = CancelToken()
    batches_done = []

    class CancelDuringBackward(Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            token.cancel()  # the engine's own check would only see it after the batch

        def on_train_batch_end(self, *args):
            batches_done.append(args[-1])

    prompt = make_prompt_stop(token)
    started = time.perf_counter()
    result = train(payload, data, cancel=token, callbacks=[CancelDuringBackward(), prompt])
    assert time.perf_counter() - started < 60
    assert prompt.triggered
    assert batches_done == []  # the first batch never completed
    assert result.history == []


def test_worker_thread_runs_a_worker_off_the_gui_thread_and_cleans_up(qtbot):
    from PyQt5.QtCore import QObject, QThread, pyqtSignal, pyqtSlot

    from ptychodus_torch_plugin.gui.workers import WorkerThread

    class Sleeper(QObject):
        finished = pyqtSignal(object)
        failed = pyqtSignal(str)

        def __init__(self):
            super().__init__()
            self.stop = False
            self.ran_on = None

        def request_stop(self):
            self.stop = True

        @pyqtSlot()
        def run(self):
            self.ran_on = QThread.currentThread()
            while not self.stop:
                time.sleep(0.01)
            self.finished.emit("stopped")

    owner = WorkerThread()
    worker = Sleeper()
    results = []
    worker.finished.connect(results.append)
    with qtbot.waitSignal(owner.idle, timeout=5000):
        owner.start(worker)
        assert owner.is_running()
        with pytest.raises(RuntimeError):
            owner.start(Sleeper())
        qtbot.wait(50)
        owner.request_stop()
    assert results == ["stopped"]
    assert worker.ran_on is not QThread.currentThread()
    assert not owner.is_running()
    # shutdown() joins a running worker synchronously (window closing)
    other = Sleeper()
    owner.start(other)
    qtbot.wait(20)
    assert owner.shutdown(5.0)
    assert not owner.is_running()


def test_shutdown_waits_out_a_step_that_does_not_look_at_stop(qtbot, caplog):
    """Giving up after the timeout let Ptychodus exit with the thread running: Qt aborts."""
    from PyQt5.QtCore import QObject, pyqtSignal, pyqtSlot

    from ptychodus_torch_plugin.gui.workers import WorkerThread

    class Saving(QObject):  # e.g. writing the model archive: Stop is not looked at
        finished = pyqtSignal(object)
        failed = pyqtSignal(str)

        def request_stop(self):
            pass

        @pyqtSlot()
        def run(self):
            time.sleep(1.0)
            self.finished.emit("saved")

    owner = WorkerThread()
    results = []
    worker = Saving()
    worker.finished.connect(results.append)
    owner.start(worker)
    qtbot.wait(20)
    with caplog.at_level("WARNING", logger="ptychodus_torch_plugin"):
        assert owner.shutdown(0.1)  # waited past the timeout, and said so
    assert "has not stopped after 0 s" in caplog.text and "waiting for it" in caplog.text
    assert not owner.is_running()
    qtbot.waitUntil(lambda: results == ["saved"], timeout=2000)  # the model was saved
    owner.start(Saving())
    qtbot.wait(20)
    assert not owner.shutdown(0.1, then_wait=False)  # the old behaviour, on request
    assert owner.wait(5.0)
