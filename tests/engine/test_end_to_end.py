"""A tiny end-to-end run: simulate, train (PINN, no ground truth), reconstruct, compare.

N = 32, 289 patterns, a few epochs on the CPU (well under a minute on this machine's two
cores). The reconstruction must beat a flat object against the ground truth, which the model
never saw.
"""

import numpy as np
import pytest
from engine_helpers import tiny_overrides

from ptychodus_torch_plugin.engine.inference import CanvasGeometry, reconstruct
from ptychodus_torch_plugin.engine.metrics import evaluate, scanned_region
from ptychodus_torch_plugin.engine.payload import create_training_payload
from ptychodus_torch_plugin.engine.simulate import simulate_dataset
from ptychodus_torch_plugin.engine.training import train


@pytest.fixture(scope="module")
def trained():
    data = simulate_dataset(
        object_kind="random", probe_kind="zoneplate", N=32, step=6, nphotons=1e5, seed=0
    )
    payload = create_training_payload(tiny_overrides(epochs=8, batch_size=8, learning_rate=2e-3))
    return data, train(payload, data)


def test_training_lowers_the_loss(trained):
    _, result = trained
    losses = [record.train_loss for record in result.history]
    assert len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses


def test_reconstruction_beats_a_flat_object(trained):
    data, result = trained
    height, width = data.object_guess.shape
    stitched = reconstruct(
        result.model, data, canvas=CanvasGeometry(0.0, 0.0, width, height)
    ).stitched
    mask = scanned_region(stitched.weights, erode=4)
    assert mask.sum() > 0.4 * mask.size  # the scan covers most of the object
    truth = np.abs(data.object_guess[mask])
    amplitude = np.abs(stitched.object[mask])
    correlation = np.corrcoef(amplitude, truth)[0, 1]
    assert correlation > 0.5, correlation  # a flat object has no correlation at all
    ours = evaluate(stitched.object, data.object_guess, mask)
    flat = evaluate(np.ones_like(stitched.object), data.object_guess, mask)
    # (SSIM is no fair yardstick here: a flat image scores ~0.4 on this low-contrast object.)
    assert ours.amplitude_psnr > flat.amplitude_psnr + 1.0, (ours, flat)
