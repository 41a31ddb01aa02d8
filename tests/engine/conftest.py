"""Small simulated scans shared by the engine tests (unit tests make their own data)."""

import pytest

from ptychodus_torch_plugin.engine.simulate import simulate_dataset


@pytest.fixture(scope="session")
def small_scan():
    """N = 32 scan of a random object: 169 patterns at 1e5 photons."""
    return simulate_dataset(N=32, nphotons=1e5, seed=0)
