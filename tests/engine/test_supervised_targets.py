"""Supervised mode: the loss it minimises and the targets it is given.

Why: the other supervised tests only check that training runs and that the loss is positive,
which any L1 loss is for any output. A target cut at the wrong place (or flipped), validation
scored against the training scan's object, or a loss without its phase term would all train
something without a word. These tests pin what the network is asked to learn.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from engine_helpers import tiny_overrides

from ptychodus_torch_plugin.engine.module import SupervisedModule
from ptychodus_torch_plugin.engine.payload import create_training_payload
from ptychodus_torch_plugin.engine.simulate import disk_probe, random_object, simulate_from_object
from ptychodus_torch_plugin.engine.training import train

N = 32


# ----------------------------------------------------------------------------- the loss


class _FixedGenerator(torch.nn.Module):
    """Stands in for the generator: returns the amplitude and phase it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.amplitude = torch.zeros(0)
        self.phase = torch.zeros(0)

    def amplitude_phase(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert inputs.shape[:2] == self.amplitude.shape[:2]
        return self.amplitude, self.phase


class _Autoencoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generator = _FixedGenerator()


def _module() -> tuple[SupervisedModule, _FixedGenerator]:
    autoencoder = _Autoencoder()
    module = SupervisedModule(
        autoencoder, learning_rate=1e-3, scheduler="constant", max_epochs=1, optimizer="adam"
    )
    return module, autoencoder.generator


def _target(rng: np.random.Generator, shape=(3, 4, N, N)) -> np.ndarray:
    """Random complex patches, phases over the whole circle (many within 0.1 rad of +-pi)."""
    amplitude = rng.uniform(0.2, 1.0, shape)
    phase = rng.uniform(-math.pi, math.pi, shape)
    return (amplitude * np.exp(1j * phase)).astype(np.complex64)


def _loss_for(amplitude: np.ndarray, phase: np.ndarray, target: np.ndarray) -> float:
    module, generator = _module()
    generator.amplitude = torch.as_tensor(amplitude, dtype=torch.float32)
    generator.phase = torch.as_tensor(phase, dtype=torch.float32)
    batch = {
        "inputs": torch.zeros(target.shape, dtype=torch.float32),
        "offsets": torch.zeros((target.shape[0], target.shape[1], 2)),
        "targets": torch.from_numpy(target),
    }
    loss = module._loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    return float(loss)


def _expected_loss(amplitude: np.ndarray, phase: np.ndarray, target: np.ndarray) -> float:
    """The documented loss in numpy: mean |amplitude error| + mean |phase error wrapped to
    (-pi, pi]| (the shortest way round the circle)."""
    amplitude_error = np.abs(amplitude - np.abs(target)).mean()
    wrapped = np.angle(np.exp(1j * (phase.astype(np.float64) - np.angle(target))))
    return float(amplitude_error + np.abs(wrapped).mean())


def test_the_supervised_loss_is_zero_for_the_target_itself():
    target = _target(np.random.default_rng(0))
    loss = _loss_for(np.abs(target), np.angle(target), target)
    assert loss == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "amplitude_error, phase_error",
    [(0.1, 0.0), (0.0, 0.3), (-0.05, -0.2), (0.0, 2 * math.pi - 0.1)],
    ids=["amplitude", "phase", "both", "phase-just-under-2pi"],
)
def test_the_supervised_loss_is_the_mean_amplitude_and_wrapped_phase_error(
    amplitude_error, phase_error
):
    """Each term counts with its own size; a phase error of 2*pi - 0.1 is 0.1 the short way."""
    target = _target(np.random.default_rng(1))
    amplitude = np.abs(target) + amplitude_error
    phase = np.angle(target) + phase_error
    loss = _loss_for(amplitude, phase, target)
    expected = _expected_loss(amplitude, phase, target)
    size = abs(amplitude_error) + min(abs(phase_error), 2 * math.pi - abs(phase_error))
    assert expected == pytest.approx(size, rel=1e-3)  # the reference is what it claims
    assert loss == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_the_supervised_phase_term_wraps_round_the_circle():
    """Phases are angles: +-2*pi costs nothing, and pi - 0.05 against -pi + 0.05 is 0.1 apart
    (the network's phase head spans (-pi, pi), the target's too, so this pair is common)."""
    target = _target(np.random.default_rng(2))
    amplitude, phase = np.abs(target), np.angle(target)
    for offset in (2 * math.pi, -2 * math.pi):
        assert _loss_for(amplitude, phase + offset, target) == pytest.approx(0.0, abs=1e-5)
    near = np.full(target.shape, math.pi - 0.05)
    across = (np.abs(target) * np.exp(1j * (-math.pi + 0.05))).astype(np.complex64)
    assert _loss_for(np.abs(across), near, across) == pytest.approx(0.1, abs=1e-5)


# ----------------------------------------------------------------------------- the targets


def _integer_scan(shape: int, seed: int):
    """A scan at whole-pixel positions (engine convention: patch pixel j of a pattern at x
    samples object coordinate x - N/2 + j), so a patch is a plain slice of the object."""
    obj = random_object((shape, shape), seed=seed, smoothness=3.0)
    obj = obj * np.float32(1.7)  # the peak is not 1: the documented scaling shows
    positions = np.arange(N // 2, shape - N // 2 + 1, 4, dtype=np.float64)
    x, y = (a.ravel() for a in np.meshgrid(positions, positions))
    return simulate_from_object(obj, disk_probe(N), x, y, nphotons=1e5, seed=seed + 1)


def _patch(obj: np.ndarray, x: float, y: float) -> np.ndarray:
    """The object's N x N slice at an integer position, in plain numpy."""
    c, r = int(x), int(y)
    assert (c, r) == (x, y)
    return obj[r - N // 2 : r + N // 2, c - N // 2 : c + N // 2]


def _pattern_index(amplitudes: np.ndarray, pattern: np.ndarray) -> int:
    """Which scan pattern a network input is (inputs are the amplitudes times one factor)."""
    flat = amplitudes.reshape(len(amplitudes), -1).astype(np.float64)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    given = pattern.reshape(-1).astype(np.float64)
    similarity = flat @ (given / np.linalg.norm(given))
    best = int(np.argmax(similarity))
    assert similarity[best] > 1 - 1e-6, "an input that is no pattern of the scan"
    return best


@pytest.mark.parametrize("validation", ["test-scan", "held-out-part"])
def test_supervised_targets_are_the_object_patches_at_each_inputs_position(monkeypatch, validation):
    """Every channel of every training and validation group is scored against the object
    patch at its own pattern's position (objectGuess / its peak amplitude, as training
    documents); validation groups from a separate test scan against that scan's object."""
    scan = _integer_scan(64, seed=0)  # 81 patterns
    test_scan = _integer_scan(48, seed=10) if validation == "test-scan" else None  # 25
    seen: list[tuple[bool, np.ndarray, np.ndarray]] = []
    real_loss = SupervisedModule._loss

    def recording_loss(self, batch, validation=False):
        seen.append((validation, batch["inputs"].numpy().copy(), batch["targets"].numpy().copy()))
        return real_loss(self, batch, validation)

    monkeypatch.setattr(SupervisedModule, "_loss", recording_loss)
    overrides = tiny_overrides(epochs=1, mode="supervised", gridsize=2, n_groups=12)
    train(create_training_payload(overrides), scan, test_data=test_scan)

    checked = {False: 0, True: 0}
    for is_validation, inputs, targets in seen:
        data = test_scan if is_validation and test_scan is not None else scan
        peak = np.abs(data.object_guess).max()
        assert inputs.shape[1] == targets.shape[1] == 4  # gridsize 2: four channels
        for group_inputs, group_targets in zip(inputs, targets, strict=True):
            for pattern, target in zip(group_inputs, group_targets, strict=True):
                i = _pattern_index(data.amplitudes, pattern)
                expected = _patch(data.object_guess, data.xcoords[i], data.ycoords[i]) / peak
                np.testing.assert_allclose(target, expected, rtol=0, atol=1e-6)
                checked[is_validation] += 1
    # Every group was seen: the training groups (12, or 11 beside 1 held out), and every
    # group of the test scan (25) or the held-out one.
    n_validation = 25 if test_scan is not None else 1
    assert checked[False] >= (12 - (test_scan is None)) * 4
    assert checked[True] >= n_validation * 4
