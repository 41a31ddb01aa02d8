"""Shared fixtures for the host tests: one real Ptychodus ModelCore, one simulated scan, one
tiny trained model. Everything runs against the installed package and the installed host."""

from __future__ import annotations

import logging
import os

import pytest
from host_helpers import TINY, settings_values

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


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
    from ptychodus_torch_plugin.host.registration import registered_library

    return registered_library(model_core.processing_core.algorithm_parameter)


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
