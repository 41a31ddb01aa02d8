"""Tests of the reconstruction-quality metrics (alignment, SSIM/PSNR, FRC)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ptychodus_torch_plugin.engine import simulate as sim
from ptychodus_torch_plugin.engine.metrics import (
    QualityMetrics,
    align,
    evaluate,
    frc,
    frc_threshold,
    register_shift,
    scanned_region,
)


def _reference(shape=(96, 96), seed=2) -> np.ndarray:
    return sim.random_object(shape, seed=seed, smoothness=3.0).astype(np.complex128)


def _shift(image: np.ndarray, shift) -> np.ndarray:
    kw = {"order": 3, "mode": "nearest"}
    return ndimage.shift(image.real, shift, **kw) + 1j * ndimage.shift(image.imag, shift, **kw)


def test_identical_images_score_perfectly():
    ref = _reference()
    mask = np.ones(ref.shape, bool)
    metrics = evaluate(ref, ref, mask)
    assert isinstance(metrics, QualityMetrics)
    assert metrics.amplitude_ssim == pytest.approx(1.0, abs=1e-6)
    assert metrics.phase_ssim == pytest.approx(1.0, abs=1e-6)
    assert metrics.amplitude_psnr > 100 and metrics.phase_psnr > 100
    assert metrics.frc50 == 0.5
    assert set(metrics.to_dict()) == {
        "amplitude_ssim",
        "phase_ssim",
        "amplitude_psnr",
        "phase_psnr",
        "frc50",
    }


def test_shift_and_global_scale_are_aligned_back():
    ref = _reference()
    factor = 0.7 * np.exp(0.4j)
    moved = factor * _shift(ref, (1.5, -2.25))
    interior = (slice(12, -12), slice(12, -12))
    before = np.abs(moved - ref)[interior].max()
    aligned = align(moved, ref)
    after = np.abs(aligned - ref)[interior].max()
    assert before > 0.2
    assert after < 0.02, after
    # Without registration only the global factor is fixed: the shift remains.
    unregistered = align(moved, ref, register=False)
    assert np.abs(unregistered - ref)[interior].max() > 10 * after
    metrics = evaluate(moved, ref, np.pad(np.ones((72, 72), bool), 12))
    assert metrics.amplitude_ssim > 0.97 and metrics.phase_ssim > 0.97


def test_a_phase_object_is_registered_on_its_complex_image():
    """A pure-phase object (amplitude flat but for complex64 rounding) and a weak absorber.

    Registered on the amplitude, the correlation locked onto rounding noise: a perfect
    reconstruction shifted by (1.5, -1) px was moved by (-5.7, -12.9) and scored 0.03 in phase.
    """
    shape = (96, 96)
    mask = np.pad(np.ones((72, 72), bool), 12)
    phase_only = sim.random_object(shape, seed=2, smoothness=3.0, amplitude_range=(1.0, 1.0))
    assert 0 < np.abs(phase_only).std() < 1e-6  # complex64: flat but for rounding
    moved = 0.8 * np.exp(0.3j) * _shift(phase_only.astype(np.complex128), (1.5, -1.0))
    np.testing.assert_allclose(register_shift(moved, phase_only, mask), [-1.5, 1.0], atol=0.01)
    metrics = evaluate(moved, phase_only, mask)
    assert metrics.phase_ssim > 0.999 and metrics.amplitude_psnr > 60
    weak = sim.random_object(shape, seed=2, smoothness=3.0, amplitude_range=(0.995, 1.0))
    noise = 1 + 0.01 * np.random.default_rng(0).standard_normal(shape)
    moved = _shift(weak.astype(np.complex128), (1.5, -1.0)) * noise
    np.testing.assert_allclose(register_shift(moved, weak, mask), [-1.5, 1.0], atol=0.01)
    # A linear phase ramp in the reconstruction (the alignment removes it only afterwards)
    # is not mistaken for a shift either: 0.1 px off at 0.06 rad/px with a plain complex
    # correlation.
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    ramped = moved * np.exp(1j * (0.06 * xx + 0.03 * yy))
    np.testing.assert_allclose(register_shift(ramped, weak, mask), [-1.5, 1.0], atol=0.01)
    # Amplitude noise on an unshifted phase object is not mistaken for a shift.
    noisy = phase_only * noise
    np.testing.assert_allclose(register_shift(noisy, phase_only, mask), [0, 0], atol=0.01)


def test_a_flat_reference_amplitude_is_scored_against_a_sensible_range():
    """A 1% amplitude error on a phase object: ~40 dB against the fallback range of 1.

    The reference's rounding-level span (~1e-7) used to be the data range: -267 dB.
    """
    phase_only = sim.random_object((64, 64), seed=4, smoothness=3.0, amplitude_range=(1, 1))
    noise = 1 + 0.01 * np.random.default_rng(1).standard_normal(phase_only.shape)
    metrics = evaluate(phase_only * noise, phase_only, register=False)
    assert 35 < metrics.amplitude_psnr < 45
    assert 0.8 < metrics.amplitude_ssim < 1.0
    assert metrics.phase_ssim > 0.999


def test_flat_object_scores_lower_than_noisy_copy():
    ref = _reference()
    rng = np.random.default_rng(0)
    noisy = ref + 0.03 * (rng.standard_normal(ref.shape) + 1j * rng.standard_normal(ref.shape))
    flat = np.full(ref.shape, np.abs(ref).mean(), dtype=np.complex128)
    mask = np.ones(ref.shape, bool)
    good = evaluate(noisy, ref, mask)
    bad = evaluate(flat, ref, mask)
    assert good.amplitude_ssim > bad.amplitude_ssim + 0.3
    assert good.phase_ssim > bad.phase_ssim + 0.3
    assert good.amplitude_psnr > bad.amplitude_psnr
    assert good.frc50 > bad.frc50


def test_phase_ramp_removal():
    ref = _reference()
    yy, xx = np.mgrid[0 : ref.shape[0], 0 : ref.shape[1]]
    ramp = 0.12 * xx - 0.08 * yy + 0.5  # spans ~19 rad: the difference wraps many times
    rec = ref * np.exp(1j * ramp)
    mask = np.zeros(ref.shape, bool)
    mask[10:-10, 10:-10] = True
    kept = align(rec, ref, mask, register=False)
    removed = align(rec, ref, mask, register=False, remove_phase_ramp=True)
    assert np.abs(kept - ref)[mask].max() > 0.5
    np.testing.assert_allclose(removed[mask], ref[mask], atol=1e-4)
    metrics = evaluate(rec, ref, mask, remove_phase_ramp=True)
    assert metrics.phase_ssim > 0.999


def test_scanned_region_and_erosion():
    weights = np.zeros((40, 40))
    weights[5:35, 8:30] = 1.0
    weights[20, 20] = 3.0
    region = scanned_region(weights)
    assert region.sum() == 30 * 22
    eroded = scanned_region(weights, erode=2)
    assert eroded.sum() == 26 * 18 and not (eroded & ~region).any()
    assert not scanned_region(np.zeros((5, 5))).any()


def test_erosion_is_by_distance_in_every_direction():
    """A round scan eroded by 8 px is the disc 8 px smaller, not a diamond-cornered one."""
    yy, xx = np.mgrid[0:80, 0:80]
    radius = np.hypot(yy - 40, xx - 40)
    eroded = scanned_region((radius <= 30).astype(float), erode=8)
    assert radius[eroded].max() <= 22.5  # on the diagonals too
    assert not ((radius <= 21) & ~eroded).any()
    assert eroded.sum() == pytest.approx(np.pi * 22**2, rel=0.05)
    # The array's edge counts as outside: a region touching it is eroded there too.
    assert scanned_region(np.ones((20, 20)), erode=3).sum() == 14 * 14


def test_frc_curve_and_threshold():
    ref = _reference((64, 64))
    freqs, curve = frc(ref, ref)
    assert freqs[0] == pytest.approx(1 / 64) and freqs[-1] == pytest.approx(0.5)
    np.testing.assert_allclose(curve, 1.0, atol=1e-9)
    assert frc_threshold(freqs, curve) == 0.5
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((64, 64)) + 1j * rng.standard_normal((64, 64))
    _, noise_curve = frc(ref, noise)
    assert frc_threshold(freqs, noise_curve) < 0.1
    # Interpolated crossing between the last ring above and the first below 0.5.
    f = np.array([0.1, 0.2, 0.3, 0.4])
    c = np.array([0.9, 0.7, 0.3, 0.1])
    assert frc_threshold(f, c) == pytest.approx(0.25)
    assert frc_threshold(f, c, threshold=0.95) == pytest.approx(0.1)


def test_mask_excludes_outside_pixels():
    ref = _reference((64, 64))
    rec = ref.copy()
    rec[:8] = 0  # garbage outside the region
    mask = np.zeros(ref.shape, bool)
    mask[12:56, 10:54] = True
    metrics = evaluate(rec, ref, mask, register=False)
    assert metrics.amplitude_ssim == pytest.approx(1.0, abs=1e-6)
    assert metrics.frc50 == 0.5


def test_amplitude_scores_do_not_count_a_phase_error():
    """An exact amplitude with a smooth phase error: the amplitude is still perfect."""
    ref = _reference()
    yy, xx = np.mgrid[0 : ref.shape[0], 0 : ref.shape[1]]
    error = 0.7 * np.sin(xx / 9.0) * np.cos(yy / 13.0)  # up to 0.7 rad, rms 0.35
    rec = ref * np.exp(1j * error)
    metrics = evaluate(rec, ref, np.ones(ref.shape, bool), register=False)
    assert metrics.amplitude_ssim == pytest.approx(1.0, abs=1e-6)
    assert metrics.amplitude_psnr > 100
    assert metrics.phase_ssim < 0.95  # the error is scored where it is: in the phase
    scaled = evaluate(0.3 * rec, ref, np.ones(ref.shape, bool), register=False)
    assert scaled.amplitude_ssim == pytest.approx(1.0, abs=1e-6)  # scale still aligned


def test_the_region_edge_is_scored_with_the_reconstruction_around_it():
    """SSIM windows at the region's edge see the reconstruction, not the reference pasted in."""
    ref = _reference((64, 64))
    mask = np.zeros(ref.shape, bool)
    mask[12:56, 10:54] = True
    rec = ref.copy()
    rec[9:12] = 0  # just outside the region, inside the 7 x 7 windows of its first rows
    metrics = evaluate(rec, ref, mask, register=False)
    assert metrics.amplitude_ssim < 0.99
    rec = ref.copy()
    rec[:6] = 0  # beyond every window: not scored
    assert evaluate(rec, ref, mask, register=False).amplitude_ssim == pytest.approx(1, abs=1e-6)


def test_frc_of_an_exact_round_reconstruction_is_perfect():
    """The corners of a round scan's bounding square were never scanned: FRC leaves them out."""
    ref = _reference((128, 128))
    yy, xx = np.mgrid[0:128, 0:128]
    scanned = np.hypot(yy - 64, xx - 64) <= 60
    rec = np.where(scanned, ref, 0)  # what a stitcher returns: zero where nothing was placed
    metrics = evaluate(rec, ref, scanned_region(scanned.astype(float), erode=8), register=False)
    assert metrics.frc50 == 0.5
    assert metrics.amplitude_ssim == pytest.approx(1.0, abs=1e-6)
    noisy = rec + 0.5 * np.where(scanned, np.random.default_rng(1).standard_normal(rec.shape), 0)
    worse = evaluate(noisy, ref, scanned_region(scanned.astype(float), erode=8), register=False)
    assert worse.frc50 < 0.5


def test_erosion_in_bands_equals_the_whole_array_transform():
    """Large canvases are eroded a band of rows at a time (bounded memory), exactly."""
    from ptychodus_torch_plugin.engine.metrics import _eroded

    rng = np.random.default_rng(4)
    region = ndimage.gaussian_filter(rng.standard_normal((90, 70)), 4) > -0.05
    whole = _eroded(region, 5.5, band_pixels=10**9)
    for band_pixels in (72, 72 * 7, 72 * 40):  # 1, 7 and 40 rows per band
        np.testing.assert_array_equal(_eroded(region, 5.5, band_pixels=band_pixels), whole)
    assert 0 < whole.sum() < region.sum()
