"""The differentiable forward model and the simulator agree on ground-truth patches.

Two independent implementations of the same physics (torch for training, numpy for making
data): if they disagreed, the network would be trained against the wrong physics.
"""

import numpy as np
import pytest
import torch

from ptychodus_torch_plugin.engine.config import GridConfig, ModelConfig
from ptychodus_torch_plugin.engine.grouping import group_positions
from ptychodus_torch_plugin.engine.physics import ForwardModel, disk_mask
from ptychodus_torch_plugin.engine.simulate import (
    extract_patches,
    far_field_amplitude,
    random_object,
    raster_scan,
    zone_plate_probe,
)

N = 32


def _scan():
    obj = random_object((128, 128), seed=3)
    x, y = raster_scan(10, 10, 5.0, origin=(24.0, 24.0))  # integer positions, overlapping
    probe = zone_plate_probe(N)
    return obj, x, y, probe


def _probe_factor(probe, probe_scale=4.0):
    """The probe normalisation the forward model applies: P_used = P / factor."""
    return probe_scale * np.mean(np.abs(probe * disk_mask(N).numpy()))


@pytest.mark.parametrize("gridsize", [1, 2])
def test_forward_model_reproduces_the_simulators_noise_free_amplitudes(gridsize):
    obj, x, y, probe = _scan()
    patches = extract_patches(obj, x, y, N)
    expected = far_field_amplitude(patches, probe)  # the simulator, raw probe
    groups = group_positions(x, y, gridsize, neighbor_count=4)
    config = ModelConfig(grid=GridConfig(N=N, gridsize=gridsize))
    model = ForwardModel.from_config(config, probe)
    with torch.no_grad():
        predicted = model(
            torch.from_numpy(patches[groups.indices]),
            torch.from_numpy(groups.offsets.astype(np.float32)),
        ).numpy()
    predicted *= _probe_factor(probe)  # back to the raw probe's scale
    reference = expected[groups.indices]
    relative = np.abs(predicted - reference).max() / reference.max()
    assert relative < 1e-5, relative
