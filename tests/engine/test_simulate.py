"""Tests of the synthetic-data simulator (physics, conventions, scans, noise, I/O)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from ptychodus_torch_plugin.engine import simulate as sim
from ptychodus_torch_plugin.engine.data import PtychoData, load_npz, save_npz

RUN1084 = Path(__file__).resolve().parents[3] / "shared" / "data" / "run1084_object_probe.npz"


def _obj(shape=(48, 56), seed=1) -> np.ndarray:
    return sim.random_object(shape, seed=seed, smoothness=2.0)


# ------------------------------------------------------------------ objects and probes
def test_random_object_ranges_and_dtype():
    obj = sim.random_object((40, 50), seed=3, amplitude_range=(0.2, 0.9), phase_range=(-2, 1))
    assert obj.shape == (40, 50) and obj.dtype == np.complex64
    amp, phase = np.abs(obj), np.angle(obj)
    assert amp.min() == pytest.approx(0.2, abs=1e-5) and amp.max() == pytest.approx(0.9, abs=1e-5)
    assert phase.min() == pytest.approx(-2, abs=1e-5) and phase.max() == pytest.approx(1, abs=1e-5)
    np.testing.assert_array_equal(
        obj, sim.random_object((40, 50), seed=3, amplitude_range=(0.2, 0.9), phase_range=(-2, 1))
    )


def test_siemens_star_and_object_from_image():
    star = sim.siemens_star((64, 64), spokes=12)
    assert star.dtype == np.complex64
    assert np.abs(star).min() >= 0.3 - 1e-6 and np.abs(star).max() <= 1.0 + 1e-6
    image = np.arange(12.0).reshape(3, 4)
    obj = sim.object_from_image(image, amplitude_range=(0.5, 1.0), phase_max=2.0)
    assert np.abs(obj[0, 0]) == pytest.approx(0.5) and np.abs(obj[-1, -1]) == pytest.approx(1.0)
    assert np.angle(obj[-1, -1]) == pytest.approx(2.0, abs=1e-6)
    complex_in = np.exp(1j * image)
    np.testing.assert_array_equal(
        sim.object_from_image(complex_in), complex_in.astype(np.complex64)
    )
    with pytest.raises(ValueError, match="2-D"):
        sim.object_from_image(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("kind", ["disk", "gaussian", "zoneplate"])
def test_probes_are_centred(kind):
    n = 32
    probe = sim.make_probe(kind, n)
    assert probe.shape == (n, n) and probe.dtype == np.complex64
    intensity = np.abs(probe) ** 2
    yy, xx = np.mgrid[0:n, 0:n]
    centre = (np.sum(yy * intensity) / intensity.sum(), np.sum(xx * intensity) / intensity.sum())
    np.testing.assert_allclose(centre, (n // 2, n // 2), atol=0.05)


def test_zone_plate_has_curved_phase():
    probe = sim.zone_plate_probe(64, curvature=3.0, blur=0.0)
    assert np.angle(probe[32, 32]) == pytest.approx(0.0, abs=1e-6)
    assert np.angle(probe[32, 32 + 8]) == pytest.approx(3.0 * (8 / 16) ** 2, abs=1e-5)


@pytest.mark.parametrize(
    ("factory", "allowed"),
    [(sim.make_probe, "disk"), (sim.make_scan, "raster"), (sim.make_object, "random")],
)
def test_bad_kind_raises(factory, allowed):
    with pytest.raises(ValueError, match=rf"kind.*'bogus'.*{allowed}"):
        factory("bogus", 32)


# ------------------------------------------------------------------ scans
def test_raster_and_snake_order():
    x, y = sim.raster_scan(3, 2, 5.0, origin=(10, 20))
    np.testing.assert_array_equal(x, [10, 15, 20, 10, 15, 20])
    np.testing.assert_array_equal(y, [20, 20, 20, 25, 25, 25])
    xs, ys = sim.snake_scan(3, 2, 5.0, origin=(10, 20))
    np.testing.assert_array_equal(xs, [10, 15, 20, 20, 15, 10])
    np.testing.assert_array_equal(ys, y)


def test_fermat_count_and_spacing():
    x, y = sim.fermat_scan(400, 2.0, centre=(50, 60))
    assert len(x) == 400 and x[0] == 50 and y[0] == 60
    r = np.hypot(x - 50, y - 60)
    np.testing.assert_allclose(r, 2.0 * np.sqrt(np.arange(400)))
    nearest, _ = cKDTree(np.c_[x, y]).query(np.c_[x, y], k=2)
    spacing = nearest[:, 1]
    assert spacing.min() >= 2.0 - 1e-9  # never closer than one step
    assert 1.5 * 2.0 < np.median(spacing) < 2.0 * 2.0  # about 1.7 steps


@pytest.mark.parametrize("kind", ["raster", "snake", "fermat"])
def test_scan_for_object_inside_bounds(kind):
    shape, n = (90, 110), 32
    x, y = sim.scan_for_object(shape, n, 6.0, kind=kind, jitter=1.5, seed=2)
    assert len(x) >= 10
    assert x.min() >= n / 2 and x.max() <= shape[1] - n / 2
    assert y.min() >= n / 2 and y.max() <= shape[0] - n / 2
    sim.extract_patches(np.ones(shape, np.complex64), x, y, n)  # no ValueError
    with pytest.raises(ValueError, match="too small"):
        sim.scan_for_object((20, 20), n, 4.0, kind=kind)


@pytest.mark.parametrize(
    "step, jitter, message",
    [
        (float("nan"), 0.0, "step = nan is invalid"),
        (0.0, 0.0, "step = 0.0 is invalid"),
        (4.0, -5.0, "jitter = -5.0 is invalid"),  # was: 'xcoords[0] ... outside the object'
        (4.0, float("nan"), "jitter = nan is invalid"),
    ],
)
def test_bad_scan_settings_are_named(step, jitter, message):
    with pytest.raises(ValueError, match=message):
        sim.scan_for_object((90, 110), 32, step, kind="raster", jitter=jitter)


@pytest.mark.parametrize("kind", ["raster", "fermat"])
def test_a_step_too_small_to_simulate_is_refused_before_any_work(kind):
    """--step 0.25 (read as "N/4") asked for 591,361 patterns, ~10 GB, without a word."""
    with pytest.raises(ValueError, match=r"step = 0.2 gives .* patterns.*at most 200,000"):
        sim.scan_for_object((256, 256), 64, 0.2, kind=kind)
    assert len(sim.scan_for_object((256, 256), 64, 1.0, kind=kind)[0]) <= 200_000


@pytest.mark.parametrize("nphotons", [float("nan"), float("inf"), 0.0])
def test_a_photon_count_that_is_no_count_is_named(nphotons):
    with pytest.raises(ValueError, match=f"nphotons = {nphotons} is invalid"):
        sim.photon_scale(np.ones((2, 4, 4)), nphotons)


# ------------------------------------------------------------------ patches
def test_extract_patches_integer_positions_equal_slices():
    obj, n = _obj(), 16
    x = np.array([8, 20, 40, 8])  # 40 = W - N/2 is the last allowed
    y = np.array([8, 13, 32, 32])
    patches = sim.extract_patches(obj, x, y, n)
    assert patches.shape == (4, n, n) and patches.dtype == np.complex64
    for i in range(4):
        sl = obj[y[i] - n // 2 : y[i] + n // 2, x[i] - n // 2 : x[i] + n // 2]
        np.testing.assert_array_equal(patches[i], sl)


def test_extract_patches_half_pixel_is_neighbour_average():
    obj, n = _obj().astype(np.complex128), 16
    half_x = sim.extract_patches(obj, [20.5], [13], n)[0]
    expect_x = 0.5 * (obj[5:21, 12:28] + obj[5:21, 13:29])
    np.testing.assert_allclose(half_x, expect_x, atol=1e-6)
    both = sim.extract_patches(obj, [20.5], [13.5], n)[0]
    expect = 0.25 * (obj[5:21, 12:28] + obj[5:21, 13:29] + obj[6:22, 12:28] + obj[6:22, 13:29])
    np.testing.assert_allclose(both, expect, atol=1e-6)
    quarter = sim.extract_patches(obj, [20.25], [13], n)[0]
    np.testing.assert_allclose(
        quarter, 0.75 * obj[5:21, 12:28] + 0.25 * obj[5:21, 13:29], atol=1e-6
    )


def test_extract_patches_outside_raises_with_index_and_range():
    obj = _obj()  # (48, 56)
    with pytest.raises(ValueError, match=r"xcoords\[2\].*allowed xcoords in \[8, 48\]"):
        sim.extract_patches(obj, [10, 20, 48.5], [10, 10, 10], 16)
    with pytest.raises(ValueError, match=r"ycoords\[0\].*\[8, 40\]"):
        sim.extract_patches(obj, [10], [7.9], 16)


# ------------------------------------------------------------------ diffraction and noise
def test_far_field_parseval_and_centred_dc():
    obj, n = _obj(), 16
    probe = sim.zone_plate_probe(n)
    patches = sim.extract_patches(obj, [10.3, 30, 41.7], [12, 20.6, 30], n)
    amp = sim.far_field_amplitude(patches, probe)
    assert amp.shape == (3, n, n)
    far = np.sum(amp.astype(np.float64) ** 2, axis=(1, 2))
    near = np.sum(np.abs(probe.astype(np.complex128) * patches) ** 2, axis=(1, 2))
    np.testing.assert_allclose(far, near, rtol=1e-6)
    flat = sim.far_field_amplitude(np.ones((1, n, n), np.complex64), np.ones((n, n)))
    assert flat[0, n // 2, n // 2] == pytest.approx(n) and np.sum(flat[0] > 1e-9) == 1


def test_multimode_probe_sums_intensities():
    patches = sim.extract_patches(_obj(), [20, 30], [20, 25], 16)
    modes = np.stack([sim.disk_probe(16), 0.5 * sim.zone_plate_probe(16)])
    amp = sim.far_field_amplitude(patches, modes)
    single = [sim.far_field_amplitude(patches, m) for m in modes]
    np.testing.assert_allclose(amp**2, single[0] ** 2 + single[1] ** 2, rtol=1e-10, atol=1e-12)


def test_poisson_noise_mean_photons():
    n, nphotons = 32, 1e5
    obj = sim.random_object((160, 160), seed=4)
    x, y = sim.scan_for_object(obj.shape, n, 8.0)  # 15 x 15 = 225 patterns
    clean = sim.far_field_amplitude(sim.extract_patches(obj, x, y, n), sim.disk_probe(n))
    noisy, scale = sim.add_poisson_noise(clean, nphotons, seed=5)
    assert len(x) >= 200 and noisy.dtype == np.float32
    expected = scale * np.sum(clean**2, axis=(1, 2))
    assert expected.mean() == pytest.approx(nphotons, rel=1e-9)  # exact in expectation
    counts = noisy.astype(np.float64) ** 2
    assert counts.sum(axis=(1, 2)).mean() == pytest.approx(nphotons, rel=0.01)
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)  # integer counts
    again, _ = sim.add_poisson_noise(clean, nphotons, seed=5)
    np.testing.assert_array_equal(noisy, again)


# ------------------------------------------------------------------ datasets
def test_simulate_from_object_roundtrip(tmp_path):
    obj, n = _obj((64, 64)), 16
    probe = sim.gaussian_probe(n)
    x, y = sim.scan_for_object(obj.shape, n, 6.0, jitter=0.5, seed=1)
    data = sim.simulate_from_object(obj, probe, x, y, nphotons=1e4, seed=3)
    assert isinstance(data, PtychoData) and data.N == n and data.n_patterns == len(x)
    np.testing.assert_array_equal(data.object_guess, obj)
    np.testing.assert_array_equal(data.probe_mode0, probe)
    back = load_npz(save_npz(data, tmp_path / "sim.npz"))
    for field in ("amplitudes", "xcoords", "ycoords", "probe", "object_guess"):
        np.testing.assert_array_equal(getattr(back, field), getattr(data, field))
        assert getattr(back, field).dtype == getattr(data, field).dtype


def test_simulate_from_object_noise_modes_and_pad():
    obj, n = _obj((40, 40)), 16
    probe = sim.disk_probe(n)
    x, y = np.array([8.0, 20.0, 32.0]), np.array([8.0, 20.0, 32.0])
    raw = sim.simulate_from_object(obj, probe, x, y, nphotons=None)
    ref = sim.far_field_amplitude(sim.extract_patches(obj, x, y, n), probe)
    np.testing.assert_allclose(raw.amplitudes, ref, rtol=1e-6)
    clean = sim.simulate_from_object(obj, probe, x, y, nphotons=5e3, noise=False)
    assert clean.mean_photons() == pytest.approx(5e3, rel=1e-5)
    outside = (x - 3, y + 2)  # patch 0 leaves by 3 columns, patch 2 by 2 rows
    with pytest.raises(ValueError, match=r"xcoords\[0\]"):
        sim.simulate_from_object(obj, probe, *outside, nphotons=None)
    padded = sim.simulate_from_object(obj, probe, *outside, nphotons=None, pad="auto")
    assert padded.object_guess.shape == (46, 46)
    np.testing.assert_array_equal(padded.xcoords, outside[0] + 3)
    np.testing.assert_array_equal(padded.object_guess[3:-3, 3:-3], obj)


def test_simulate_dataset_and_to_npz(tmp_path):
    kw = dict(object_kind="siemens", probe_kind="zoneplate", N=16, scan_kind="fermat", seed=2)
    data = sim.simulate_dataset(nphotons=1e4, jitter=0.5, **kw)
    assert data.object_guess.shape == (64, 64) and data.n_patterns > 10
    assert data.mean_photons() == pytest.approx(1e4, rel=0.05)
    path = sim.simulate_to_npz(tmp_path / "d.npz", nphotons=1e4, jitter=0.5, **kw)
    np.testing.assert_array_equal(load_npz(path).amplitudes, data.amplitudes)


def test_run1084_object_probe():
    if not RUN1084.is_file():
        pytest.skip(f"{RUN1084} not available")
    with np.load(RUN1084) as npz:
        obj, probe = npz["objectGuess"], npz["probeGuess"]
        x_all, y_all = npz["xcoords"], npz["ycoords"]
    assert obj.shape == (227, 226) and probe.shape == (64, 64)
    (x0, x1), (y0, y1) = sim.position_range(obj.shape, 64)
    assert x0 <= x_all.min() and x_all.max() <= x1  # every patch of the file fits: no pad
    assert y0 <= y_all.min() and y_all.max() <= y1
    x, y = x_all[::8], y_all[::8]
    data = sim.simulate_from_object(obj, probe, x, y, nphotons=1e6, seed=0, pad="auto")
    assert data.n_patterns == len(x) and data.N == 64
    assert data.object_guess.shape == obj.shape  # "auto" needed no padding
    assert data.mean_photons() == pytest.approx(1e6, rel=0.01)
    clean = sim.simulate_from_object(obj, probe, x, y, nphotons=None)
    near = np.abs(probe * sim.extract_patches(obj, x, y, 64)) ** 2
    np.testing.assert_allclose(
        np.sum(clean.amplitudes.astype(np.float64) ** 2, axis=(1, 2)),
        near.sum(axis=(1, 2)),
        rtol=1e-5,
    )


def test_a_position_a_rounding_error_inside_the_edge_samples_the_edge():
    """x = N/2 - 1e-10 (scan_for_object makes such values) read column 1 for column 0."""
    obj = np.tile(np.arange(16, dtype=np.complex64), (16, 1))
    patch = sim.extract_patches(obj, np.array([8 - 1e-10]), np.array([8.0]), 4)
    np.testing.assert_allclose(patch[0, 0].real, [6, 7, 8, 9], atol=1e-6)
    edge = sim.extract_patches(obj, np.array([2 - 1e-10]), np.array([8.0]), 4)
    np.testing.assert_allclose(edge[0, 0].real, [0, 1, 2, 3], atol=1e-6)


@pytest.mark.parametrize(
    ("x", "pad", "message"),
    [
        ([], 0, "non-empty"),
        ([np.nan, 40.0], 0, r"xcoords\[0\] = nan"),
        ([40.0, 41.0], 2.7, "pad = 2.7 is invalid"),
    ],
)
def test_simulate_from_object_names_bad_positions_and_pads(x, pad, message):
    x = np.asarray(x, dtype=np.float64)
    obj = np.ones((80, 80), np.complex64)
    probe = sim.make_probe("disk", 32)
    with pytest.raises(ValueError, match=message):
        sim.simulate_from_object(obj, probe, x, np.full(x.shape, 40.0), pad=pad)


def test_an_object_file_that_is_no_npz_is_named_as_such(tmp_path):
    text = tmp_path / "object.npz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match="not an NPZ file"):
        sim.simulate_from_object_npz(text)
    with pytest.raises(FileNotFoundError, match="object file not found"):
        sim.simulate_from_object_npz(tmp_path / "missing.npz")
