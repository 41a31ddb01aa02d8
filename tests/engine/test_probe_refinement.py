"""Probe refinement: a probe that is not the scan's is fitted back to what the data say.

What a user checks: with a mismatched probe the data misfit falls to about the noise floor
after refinement; with the right probe refinement leaves it where it is; modes are added or
cut as asked; bad settings and Stop behave; training uses the refined probe and says so.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from engine_helpers import tiny_overrides

from ptychodus_torch_plugin.engine.cancel import CancelToken
from ptychodus_torch_plugin.engine.config import TrainingConfig
from ptychodus_torch_plugin.engine.payload import create_training_payload
from ptychodus_torch_plugin.engine.probe_refinement import (
    bilinear_patches,
    refine_probe,
    sample_grid,
)
from ptychodus_torch_plugin.engine.simulate import (
    extract_patches,
    random_object,
    scan_for_object,
    simulate_from_object,
    zone_plate_probe,
)
from ptychodus_torch_plugin.engine.training import train

N = 32


@pytest.fixture(scope="module")
def defocused_scan():
    """121 patterns (N = 32, 1e6 photons) taken with a zone-plate probe of curvature 4 rad."""
    obj = random_object((96, 96), seed=0)
    x, y = scan_for_object((96, 96), N, 6.0, "raster", 0.5, 1)
    return simulate_from_object(obj, zone_plate_probe(N, curvature=4.0), x, y, seed=2)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(abs(np.vdot(a, b)) / np.linalg.norm(a) / np.linalg.norm(b))


def test_a_mismatched_probe_is_refined_to_the_noise_floor(defocused_scan) -> None:
    # The scientist's probe has the wrong defocus: 1.5 rad less quadratic phase at the edge.
    wrong = dataclasses.replace(
        defocused_scan, probe=zone_plate_probe(N, curvature=2.5)[np.newaxis]
    )
    result = refine_probe(wrong, 100, batch_size=16)

    assert result.probe.shape == (1, N, N) and result.probe.dtype == np.complex64
    assert result.epochs == 100 and result.fixed_epochs == 20 and not result.cancelled
    # Poisson noise on amplitudes has variance ~1/4 per lit pixel: ~256 per pattern here.
    assert result.misfit_fixed_probe > 20_000
    assert result.misfit < 600
    assert result.misfit < 0.01 * result.misfit_fixed_probe


def test_the_right_probe_stays_the_right_probe(defocused_scan) -> None:
    result = refine_probe(defocused_scan, 30, batch_size=16)
    assert _overlap(result.probe[0], defocused_scan.probe[0]) > 0.99
    assert result.misfit <= result.misfit_fixed_probe


def test_a_fully_fixed_probe_fits_the_object_only(defocused_scan) -> None:
    wrong = dataclasses.replace(
        defocused_scan, probe=zone_plate_probe(N, curvature=2.5)[np.newaxis]
    )
    fit = refine_probe(wrong, 10, batch_size=16, probe_fixed_share=1.0)
    assert fit.fixed_epochs == 10 and fit.misfit == fit.misfit_fixed_probe
    assert _overlap(fit.probe[0], wrong.probe[0]) > 1 - 1e-6  # the given probe, only rescaled
    assert fit.misfit > 20_000  # the wrong probe, kept, cannot explain the data


def test_modes_are_added_or_cut_as_asked(defocused_scan) -> None:
    two = refine_probe(defocused_scan, 5, modes=2, batch_size=64)
    assert two.probe.shape == (2, N, N)
    power = np.square(np.abs(two.probe)).sum(axis=(-2, -1))
    assert power[1] < power[0]  # the new mode starts as a weak perturbation of mode 0
    stack = dataclasses.replace(defocused_scan, probe=two.probe)
    assert refine_probe(stack, 1, modes=1).probe.shape == (1, N, N)
    assert refine_probe(stack, 1).probe.shape == (2, N, N)  # 0 keeps the data's count


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 5, "modes": 9}, "modes"),
        ({"epochs": 5, "modes": -1}, "modes"),
        ({"epochs": 5, "batch_size": 0}, "batch_size"),
        ({"epochs": 5, "learning_rate": 0.0}, "learning_rate"),
        ({"epochs": 5, "probe_fixed_share": 1.5}, "probe_fixed_share"),
    ],
)
def test_bad_settings_name_the_field(defocused_scan, kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        refine_probe(defocused_scan, **kwargs)


def test_a_stray_position_is_refused_before_the_canvas_is_made(defocused_scan) -> None:
    """One position at 1e6 px asked for an 8 TB object canvas (a MemoryError at best)."""
    x, y = defocused_scan.xcoords.copy(), defocused_scan.ycoords.copy()
    x[-1] = y[-1] = 1e6
    stray = dataclasses.replace(defocused_scan, xcoords=x, ycoords=y)
    with pytest.raises(ValueError, match="object pixels"):
        refine_probe(stray, 1)


def test_stop_before_the_first_batch_returns_the_given_probe(defocused_scan) -> None:
    token = CancelToken()
    token.cancel()
    result = refine_probe(defocused_scan, 10, cancel=token)
    assert result.cancelled and result.epochs == 0
    assert _overlap(result.probe[0], defocused_scan.probe[0]) > 0.9999


def test_torch_patches_equal_the_simulators_at_sub_pixel_positions() -> None:
    rng = np.random.default_rng(3)
    n, height, width = 16, 48, 52
    obj = (rng.random((height, width)) + 1j * rng.random((height, width))).astype(np.complex128)
    # fractional and whole positions, all patches inside the object (with the +1 neighbour)
    x = np.concatenate([rng.uniform(n / 2, width - n / 2 - 1, 20), [20.0, 30.0]])
    y = np.concatenate([rng.uniform(n / 2, height - n / 2 - 1, 20), [12.0, 25.0]])
    expected = extract_patches(obj, x, y, n)

    rows = sample_grid(torch.from_numpy(y), n)
    cols = sample_grid(torch.from_numpy(x), n)
    obj_t = torch.from_numpy(obj.astype(np.complex64)).requires_grad_()
    patches = bilinear_patches(obj_t, rows, cols)

    assert patches.shape == (len(x), n, n)
    np.testing.assert_allclose(patches.detach().numpy(), expected, rtol=0, atol=1e-5)
    patches.abs().square().sum().backward()  # refinement fits the object through these
    assert obj_t.grad is not None and float(obj_t.grad.abs().sum()) > 0
    # a canvas whose pixel (0, 0) sits at object position (-5, -3): the same patches
    canvas = torch.nn.functional.pad(obj_t.detach(), (5, 0, 3, 0))
    shifted = bilinear_patches(
        canvas,
        sample_grid(torch.from_numpy(y), n, origin=-3.0),
        sample_grid(torch.from_numpy(x), n, origin=-5.0),
    )
    np.testing.assert_allclose(shifted.numpy(), expected, rtol=0, atol=1e-5)


def test_training_uses_the_refined_probe(small_scan) -> None:
    payload = create_training_payload(
        tiny_overrides(epochs=1, n_groups=32, probe_refinement_epochs=5, probe_modes=2)
    )
    result = train(payload, small_scan)
    refinement = result.probe_refinement
    assert refinement is not None and refinement.epochs == 5
    assert result.model.probe.shape == (2, 32, 32)
    # the model holds the refined probe (normalised), not the data's
    assert _overlap(result.model.probe[0], refinement.probe[0]) > 0.9999
    assert payload.to_flat()["probe_refinement_epochs"] == 5


def test_training_refines_on_its_own_device(small_scan, monkeypatch) -> None:
    from ptychodus_torch_plugin.engine import training

    seen = []

    def spy(*args, **kwargs):
        seen.append(torch.device(kwargs["device"]))
        return refine_probe(*args, **kwargs)

    monkeypatch.setattr(training, "refine_probe", spy)
    payload = create_training_payload(
        tiny_overrides(epochs=1, n_groups=16, probe_refinement_epochs=2, accelerator="cpu")
    )
    train(payload, small_scan)
    assert seen == [torch.device("cpu")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_refinement_on_the_gpu_matches_the_cpu(defocused_scan) -> None:
    wrong = dataclasses.replace(
        defocused_scan, probe=zone_plate_probe(N, curvature=2.5)[np.newaxis]
    )
    cpu = refine_probe(wrong, 20, batch_size=16)
    gpu = refine_probe(wrong, 20, batch_size=16, device="cuda")
    assert gpu.probe.dtype == np.complex64 and gpu.object.dtype == np.complex64
    assert _overlap(gpu.probe[0], cpu.probe[0]) > 0.999
    assert gpu.misfit == pytest.approx(cpu.misfit, rel=0.02)


def test_probe_modes_without_refinement(small_scan) -> None:
    more = create_training_payload(tiny_overrides(epochs=1, probe_modes=2))
    with pytest.raises(ValueError, match="probe_modes = 2 .*probe_refinement_epochs"):
        train(more, small_scan)
    stack = dataclasses.replace(
        small_scan, probe=np.stack([small_scan.probe[0], 0.1 * small_scan.probe[0]])
    )
    fewer = create_training_payload(tiny_overrides(epochs=1, n_groups=16, probe_modes=1))
    result = train(fewer, stack)
    assert result.model.probe.shape == (1, 32, 32) and result.probe_refinement is None


@pytest.mark.parametrize(
    ("field", "value"), [("probe_refinement_epochs", -1), ("probe_modes", 9), ("probe_modes", 1.5)]
)
def test_training_config_validates_the_probe_fields(field, value) -> None:
    with pytest.raises(ValueError, match=f"TrainingConfig.{field}"):
        TrainingConfig(**{field: value})


def test_supervised_training_ignores_probe_refinement(small_scan, caplog) -> None:
    payload = create_training_payload(
        tiny_overrides(epochs=1, n_groups=16, mode="supervised", probe_refinement_epochs=5)
    )
    with caplog.at_level("WARNING"):
        result = train(payload, small_scan)
    assert result.probe_refinement is None
    assert "probe_refinement_epochs = 5 ignored" in caplog.text


def test_a_short_refinement_starts_with_the_probe_fixed_and_logs_that_misfit(defocused_scan):
    """int(0.2 * epochs) was 0 for 2 to 4 epochs: the probe moved against a flat object."""
    result = refine_probe(defocused_scan, 3)
    assert result.fixed_epochs == 1 and result.misfit_fixed_probe is not None
    assert refine_probe(defocused_scan, 1).fixed_epochs == 0  # one epoch: nothing to compare


def test_a_probe_that_stops_being_finite_is_refused_naming_the_setting(defocused_scan):
    with pytest.raises(ValueError, match="probe_refinement_epochs = 2: the probe refinement"):
        refine_probe(defocused_scan, 2, learning_rate=1e30)
