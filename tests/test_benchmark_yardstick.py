"""The iterative yardstick's patch extraction is the simulator's, pinned by a test.

Why: ``benchmarks/iterative_reference.py`` fits the object through a torch twin of the
simulator's bilinear extraction (it needs autograd, which the numpy simulator has not). Its
Run1084 scores in docs/performance.md are a yardstick only if both sample the object at the
same sub-pixel points; until now that was checked only through the benchmark's near-perfect
fit. Benchmarks are scripts, not part of the package, so the module is loaded from its file.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ptychodus_torch_plugin.engine.simulate import extract_patches

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "iterative_reference.py"


@pytest.fixture(scope="module")
def yardstick():  # noqa: ANN201 - a module object
    if not BENCHMARK.exists():
        pytest.skip(f"{BENCHMARK} not found (tests run from a checkout)")
    spec = importlib.util.spec_from_file_location("iterative_reference", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_torch_patches_equal_the_simulators_at_sub_pixel_positions(yardstick) -> None:  # noqa: ANN001
    rng = np.random.default_rng(3)
    n, height, width = 16, 48, 52
    obj = (rng.random((height, width)) + 1j * rng.random((height, width))).astype(np.complex128)
    # fractional and whole positions, all patches inside the object (with the +1 neighbour)
    x = np.concatenate([rng.uniform(n / 2, width - n / 2 - 1, 20), [20.0, 30.0]])
    y = np.concatenate([rng.uniform(n / 2, height - n / 2 - 1, 20), [12.0, 25.0]])
    expected = extract_patches(obj, x, y, n)

    rows = yardstick._sample_grid(torch.from_numpy(y), n)
    cols = yardstick._sample_grid(torch.from_numpy(x), n)
    obj_t = torch.from_numpy(obj.astype(np.complex64)).requires_grad_()
    patches = yardstick._patches(obj_t, rows, cols)

    assert patches.shape == (len(x), n, n)
    np.testing.assert_allclose(patches.detach().numpy(), expected, rtol=0, atol=1e-5)
    # the yardstick fits the object through these patches: the gradient must reach it
    patches.abs().square().sum().backward()
    assert obj_t.grad is not None and float(obj_t.grad.abs().sum()) > 0
