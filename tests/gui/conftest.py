"""The real Ptychodus GUI, offscreen, with the installed plugin: one window per test session.

``ModelCore`` (which loads the plugin from ``ptychodus/plugins/``), ``ViewCore`` and
``ControllerCore`` are built exactly as ``ptychodus`` builds them; two simulated scans
(N=32 and N=64, 100 patterns each, made with Ptychodus's own simulator and writers) are
loaded as products 0 and 1.
"""

from __future__ import annotations

import logging
import os

import pytest
from gui_helpers import PINN_KEY, Gui

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("trained-models")
    os.environ["PTYCHODUS_TORCH_MODEL_DIR"] = str(directory)
    return directory


@pytest.fixture(scope="session")
def scans(tmp_path_factory):
    from ptychodus_torch_plugin.host.demo import simulate_batch_input

    result = {}
    for N, step in ((32, 4.0), (64, 8.0)):  # noqa: N806
        directory = tmp_path_factory.mktemp(f"scan{N}")
        simulate_batch_input(directory, N=N, scan_points=10, step_px=step)
        result[N] = directory
    return result


@pytest.fixture(scope="session")
def gui(qapp, scans, model_dir):
    from ptychodus.model import ModelCore

    from ptychodus_torch_plugin.host.registration import registered_library

    model = ModelCore(log_level=logging.WARNING)
    model.__enter__()
    from ptychodus.controller import ControllerCore
    from ptychodus.view import ViewCore

    view = ViewCore(is_developer_mode_enabled=False)
    controller = ControllerCore(model, view, is_developer_mode_enabled=False)
    library = registered_library(model.processing_core.algorithm_parameter)
    library.settings.set_model_path(None)
    view.resize(1500, 950)
    view.show()
    view.processing_action.trigger()

    workflow = model.workflow_api
    products = {}
    for N, directory in scans.items():  # noqa: N806
        data = workflow.load_assembled_diffraction_data(directory / "diffraction.h5")
        workflow.load_product(directory / "product.h5", diffraction=data)
        products[N] = len(products)
    result = Gui(qapp, model, view, controller, library, dict(scans), products)
    result.select(PINN_KEY)
    result.pump(0.5)
    yield result
    for panel in [result.stack.widget(i) for i in range(result.stack.count())]:
        session = getattr(panel, "session", None)
        if session is not None:
            session.shutdown(30.0)
    view.close()
    model.__exit__(None, None, None)
