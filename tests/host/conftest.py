"""Shared fixtures for the host tests: one real Ptychodus ModelCore, one simulated scan, one
tiny trained model. Everything runs against the installed package and the installed host."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from settings_helpers import settings_values  # noqa: F401 - re-exported for the tests

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

VENV_BIN = Path(sys.executable).parent

#: Fast CPU training settings (setting attribute -> value).
TINY = {
    "epochs": 1,
    "n_filters_scale": 1,
    "batch_size": 16,
    "accelerator": "cpu",
}


def run_python(code: str, *, env: dict | None = None, timeout: float = 120):
    """Run ``code`` in a fresh interpreter of the test venv; returns CompletedProcess."""
    full_env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    full_env.update(env or {})
    # cwd: not the checkout, whose ptychodus_torch_plugin/ would shadow the installed package
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=tempfile.gettempdir(),
    )


@pytest.fixture(scope="session")
def scan_dir(tmp_path_factory):
    from ptychodus_torch_plugin.host.demo import simulate_batch_input

    directory = tmp_path_factory.mktemp("scan")
    simulate_batch_input(directory, N=32, scan_points=10, step_px=4.0)
    return directory


@pytest.fixture(scope="session")
def model_core():
    from ptychodus.model import ModelCore

    core = ModelCore(log_level=logging.WARNING)
    return core


@pytest.fixture(scope="session")
def library(model_core):
    from ptychodus_torch_plugin.host.registration import registered_libraries

    (entry,) = [
        r
        for r in registered_libraries(model_core.processing_core.algorithm_parameter)
        if r.name == "TorchPINN"
    ]
    return entry.library


@pytest.fixture(scope="session")
def reconstruct_input(scan_dir):
    from ptychodus.api.io import load_diffraction_data, load_product
    from ptychodus.api.reconstruct import prepare_reconstruct_input

    return prepare_reconstruct_input(
        load_diffraction_data(scan_dir / "diffraction.h5"), load_product(scan_dir / "product.h5")
    )


@pytest.fixture(scope="session")
def trained_archive(library, scan_dir, tmp_path_factory):
    """A one-epoch PINN model trained through the reconstructor's own train()."""
    out = tmp_path_factory.mktemp("trained")
    reconstructor = library.reconstructor("PINN")
    with settings_values(library, **TINY):
        outputs = list(reconstructor.train(scan_dir, out))
    assert [o.progress for o in outputs] == [1]
    return out / "wts.h5.zip"
