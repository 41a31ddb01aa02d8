"""The data contract's guesses about a file: stack order, detector flags, centring, units, mask.

Each guess read real-looking data wrongly without an error; these tests pin the fixes.
"""

import logging
from pathlib import Path

import numpy as np
import pytest

from ptychodus_torch_plugin.engine.data import (
    PtychoData,
    _whole_numbers,
    flagged_pixels,
    load_npz,
    warn_if_not_centred,
    warn_if_probe_not_centred,
    with_flagged_pixels,
)
from ptychodus_torch_plugin.engine.simulate import (
    disk_probe,
    gaussian_probe,
    zone_plate_probe,
)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _centred_counts(m, n, seed=0):
    """(m, n, n) far-field-like counts: a bright centre at (n/2, n/2) on a dim background.

    The dose and the sample's transmission vary from pattern to pattern, as in a real scan.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] - n // 2
    rate = 2.0 + 2000.0 * np.exp(-(xx**2 + yy**2) / (2 * (n / 10) ** 2))
    return rng.poisson(rate * rng.uniform(0.7, 1.3, (m, 1, 1))).astype(np.float64)


def _npz(tmp_path, diff3d, m, name="scan.npz", **extra):
    """An NPZ of ``diff3d`` for ``m`` positions and a centred probe (``extra`` overrides)."""
    rng = np.random.default_rng(1)
    arrays = {
        "diff3d": diff3d,
        "xcoords": rng.uniform(10, 40, m),
        "ycoords": rng.uniform(10, 40, m),
        "probeGuess": gaussian_probe(diff3d.shape[1]),
        **extra,
    }
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------ (N, N, N) stacks
def test_a_cube_stack_is_read_in_the_order_its_patterns_peak_in(tmp_path, caplog):
    """32 patterns of 32 x 32 stored (N, N, M) (MATLAB order) were read as (M, N, N)."""
    n = 32
    amplitudes = np.sqrt(_centred_counts(n, n)).astype(np.float32)  # (M, N, N) with M = N
    matlab = np.moveaxis(amplitudes, 0, 2)
    with caplog.at_level(logging.WARNING):
        as_given = load_npz(_npz(tmp_path, amplitudes, n, diff3d_units="amplitude"))
    assert "transposing" not in caplog.text and "may be an (M, N, N)" not in caplog.text
    np.testing.assert_array_equal(as_given.amplitudes, amplitudes)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data = load_npz(_npz(tmp_path, matlab, n, diff3d_units="amplitude"))
    assert "an (N, N, M) stack: transposing to (M, N, N) (M = N" in caplog.text
    np.testing.assert_array_equal(data.amplitudes, amplitudes)
    # In memory, as amplitudes and as counts (whose flag check reads the same order).
    args = (np.zeros(n), np.zeros(n), gaussian_probe(n))
    np.testing.assert_array_equal(PtychoData.from_amplitudes(matlab, *args).amplitudes, amplitudes)
    counts = np.rint(np.square(np.moveaxis(amplitudes, 0, 2).astype(np.float64))).astype(np.uint16)
    counts[3, 5, 7] = 65535  # pixel (3, 5) of pattern 7
    data = PtychoData.from_counts(counts, *args)
    assert data.bad_pixels[3, 5] and int(data.bad_pixels.sum()) == 1
    np.testing.assert_allclose(data.amplitudes[:, 0, 0], amplitudes[:, 0, 0], rtol=1e-3)


def test_a_caller_that_holds_m_n_n_counts_says_so_and_nothing_is_guessed(caplog):
    """``from_counts`` always guessed an (N, N, N) stack's order; passing ``patterns_first``
    raised a TypeError (it was passed on twice)."""
    n = 32
    counts = _centred_counts(n, n)
    args = (np.zeros(n), np.zeros(n), gaussian_probe(n))
    matlab = np.ascontiguousarray(np.moveaxis(counts, 0, 2))
    with caplog.at_level(logging.WARNING):
        guessed = PtychoData.from_counts(matlab, *args)
    assert "transposing to (M, N, N)" in caplog.text
    np.testing.assert_allclose(guessed.amplitudes, np.sqrt(counts), rtol=1e-6)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        told = PtychoData.from_counts(matlab, *args, patterns_first=True)
    assert "transposing" not in caplog.text and "may be an (M, N, N)" not in caplog.text
    np.testing.assert_allclose(told.amplitudes, np.sqrt(matlab), rtol=1e-6)


def test_dark_frames_at_a_scans_ends_do_not_turn_its_stack_around(tmp_path, caplog):
    """A closed shutter in the first and last 8 of 64 frames: the pattern axis then dipped at
    its ends like a detector axis, and an (M, N, N) stack was read as (N, N, M)."""
    n = 64
    amplitudes = np.sqrt(_centred_counts(n, n)).astype(np.float32)
    amplitudes[:8] = amplitudes[-8:] = 0.0
    for stack in (amplitudes, np.moveaxis(amplitudes, 0, 2)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            data = load_npz(_npz(tmp_path, stack, n, diff3d_units="amplitude"))
        np.testing.assert_array_equal(data.amplitudes, amplitudes)
        assert "may be an (M, N, N)" not in caplog.text


def test_a_cube_stack_of_unshifted_patterns_is_ordered_and_still_reported(tmp_path, caplog):
    """Zero frequency in the corners: the order is still told, and the centring warning kept."""
    n = 32
    shifted = np.fft.ifftshift(np.sqrt(_centred_counts(n, n)).astype(np.float32), axes=(1, 2))
    for stack in (shifted, np.moveaxis(shifted, 0, 2)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            data = load_npz(_npz(tmp_path, stack, n, diff3d_units="amplitude"))
        np.testing.assert_array_equal(data.amplitudes, shifted)
        assert "brightest in their corners" in caplog.text
        assert "may be an (M, N, N)" not in caplog.text


def test_a_simulated_cube_stack_is_read_silently(small_scan, caplog):
    """The simulator's own patterns (N = 32, the first 32 of a raster scan)."""
    part = small_scan.subset(np.arange(32))
    with caplog.at_level(logging.WARNING):
        data = PtychoData.from_amplitudes(part.amplitudes, part.xcoords, part.ycoords, part.probe)
    assert not caplog.text
    np.testing.assert_array_equal(data.amplitudes, part.amplitudes)


def test_a_cube_stack_without_a_clear_peak_is_read_patterns_first_with_a_warning(tmp_path, caplog):
    n = 16
    flat = np.random.default_rng(0).uniform(1, 2, (n, n, n)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        data = load_npz(_npz(tmp_path, flat, n, diff3d_units="amplitude"))
    np.testing.assert_array_equal(data.amplitudes, flat)
    assert "diff3d has shape (16, 16, 16)" in caplog.text
    assert "may be an (M, N, N) or an (N, N, M) stack" in caplog.text
    assert "reading it as (M, N, N)" in caplog.text and "numpy.moveaxis(array, 2, 0)" in caplog.text


# ------------------------------------------------------------------ signed detector flags
def test_negative_flags_in_signed_counts_join_the_bad_pixel_mask(tmp_path, caplog):
    """Pilatus and Eiger write gaps as -1 and dead pixels as -2 in int32; clipped to 0, they
    were measured zeros in the loss."""
    m, n = 12, 16
    counts = _centred_counts(m, n).astype(np.int32)
    flagged = counts.copy()
    flagged[:, :, 5] = -1  # a gap column, in every frame
    flagged[:, 7, 9] = -2  # a dead pixel
    flagged[4, 3, 3] = -3  # negative in one pattern only (background subtraction): clipped
    flagged[:, 0, 1] = -1 - np.arange(m) % 3  # over-subtracted: negative everywhere, varying
    with caplog.at_level(logging.WARNING):
        data = load_npz(_npz(tmp_path, flagged, m))
    assert (
        f"diff3d: {n + 1} detector pixel(s) hold the same negative value in every pattern"
        in caplog.text
    )
    assert "signed int32 counts" in caplog.text and "list them in bad_pixels" in caplog.text
    assert f"{m + 1} negative intensities (min -3) clipped to 0" in caplog.text
    expected = np.zeros((n, n), bool)
    expected[:, 5] = expected[7, 9] = True
    np.testing.assert_array_equal(data.bad_pixels, expected)
    assert data.amplitudes[4, 3, 3] == 0 and np.all(data.amplitudes[:, 0, 1] == 0)
    assert not data.bad_pixels[0, 1]  # a measured zero, not a flag
    # The photon count (the loss's dose) is as if the mask had listed them.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        listed = load_npz(_npz(tmp_path, flagged, m, name="listed.npz", bad_pixels=expected))
    assert "negative value in every pattern" not in caplog.text
    assert data.mean_photons() == pytest.approx(listed.mean_photons(), rel=1e-12)

    # In memory (no clipping asked): the flags are masked, a stray negative is still refused.
    args = (np.zeros(m), np.zeros(m), gaussian_probe(n))
    flagged[4, 3, 3] = 9
    flagged[:, 0, 1] = 5
    np.testing.assert_array_equal(PtychoData.from_counts(flagged, *args).bad_pixels, expected)
    flagged[4, 3, 3] = -3
    with pytest.raises(ValueError, match="counts: found minimum -3"):
        PtychoData.from_counts(flagged, *args)


def test_both_kinds_of_flag_in_signed_counts_and_the_hosts_path(caplog):
    """``with_flagged_pixels`` as ``host/convert.py`` calls it (no m, its own advice)."""
    counts = np.full((5, 8, 8), 7, dtype=np.int32)
    counts[:, 2, :] = -1  # a gap row
    counts[3, 6, 6] = np.iinfo(np.int32).max  # an overflow in one pattern
    with caplog.at_level(logging.WARNING):
        mask = with_flagged_pixels(
            counts, None, source="diffraction patterns", advice="mark them in Ptychodus"
        )
    assert (
        "diffraction patterns: 8 detector pixel(s) hold the same negative value in every pattern"
        in caplog.text
    )
    assert "1 detector pixel(s) hold 2147483647, the largest int32 value" in caplog.text
    assert caplog.text.count("mark them in Ptychodus") == 2
    expected = np.zeros((8, 8), bool)
    expected[2] = expected[6, 6] = True
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(flagged_pixels(counts), expected)
    # Unsigned and floating-point counts carry no negative flag.
    assert flagged_pixels(np.clip(counts, 0, 100).astype(np.uint16)) is None
    assert flagged_pixels(counts.astype(np.float64)) is None
    # One pattern cannot tell a constant flag from a dip: its negatives are not flags.
    assert flagged_pixels(counts[:1]) is None


# ------------------------------------------------------------------ centring checks
def test_a_masked_beamstop_does_not_look_like_unshifted_patterns(tmp_path, caplog):
    """Masked (zeroed) pixels were averaged in: a beamstop over the centre made centred data
    "brightest in their corners", with advice (fftshift) that would have broken them."""
    m, n = 12, 32
    counts = _centred_counts(m, n)
    beamstop = np.zeros((n, n), bool)
    beamstop[n // 2 - n // 8 : n // 2 + n // 8, n // 2 - n // 8 : n // 2 + n // 8] = True
    counts[:, beamstop] = np.nan  # not measured behind the beamstop
    with caplog.at_level(logging.WARNING):
        data = load_npz(_npz(tmp_path, counts, m, diff3d_units="counts", bad_pixels=beamstop))
    assert "brightest in their corners" not in caplog.text
    assert np.all(data.amplitudes[:, beamstop] == 0)
    # Partly masked: the central box's good pixels tell, either way round.
    small = np.zeros((n, n), bool)
    small[n // 2 - 3 : n // 2 + 3, n // 2 - 3 : n // 2 + 3] = True
    amplitudes = np.sqrt(_centred_counts(m, n))
    assert not warn_if_not_centred(amplitudes, bad_pixels=small)
    assert warn_if_not_centred(np.fft.ifftshift(amplitudes, axes=(1, 2)), bad_pixels=small)


def test_a_probe_stored_fftshifted_is_reported(tmp_path, caplog, small_scan):
    """Its beam split over the four corners trained on without a word to a wrong image."""
    m, n = 12, 32
    rng = np.random.default_rng(3)
    centred = [
        gaussian_probe(n),
        disk_probe(n),
        zone_plate_probe(n),
        zone_plate_probe(n, central_stop=0.5),
        disk_probe(n, radius=0.45 * n),  # a beam filling most of the array
        np.ones((n, n), np.complex64),
        rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n)),
        small_scan.probe,  # the simulator's
    ]
    for probe in centred:
        assert not warn_if_probe_not_centred(probe)
    shifted = np.fft.fftshift(zone_plate_probe(n))
    counts = _centred_counts(m, n)
    with caplog.at_level(logging.WARNING):
        data = load_npz(_npz(tmp_path, counts, m, diff3d_units="counts", probeGuess=shifted))
    assert "probeGuess: the probe (mode 0) is brightest in its corners" in caplog.text
    assert "numpy.fft.fftshift" in caplog.text
    np.testing.assert_array_equal(data.probe[0], shifted)  # a warning, not a refusal
    assert warn_if_probe_not_centred(np.stack([shifted, gaussian_probe(n)]))  # mode 0 decides
    assert not warn_if_probe_not_centred(np.stack([gaussian_probe(n), shifted]))


@pytest.mark.parametrize("name", ["run1084_object_probe.npz", "siemens_star_experimental.npz"])
def test_the_real_probes_are_not_reported(name):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    with np.load(path) as npz:
        probe = npz["probeGuess"]
    assert not warn_if_probe_not_centred(probe)
    assert warn_if_probe_not_centred(np.fft.fftshift(probe, axes=(-2, -1)))


# ------------------------------------------------------------------ units and mask shape
def test_leading_dark_frames_do_not_flip_the_units_guess(tmp_path, caplog):
    """The guess read the first 245 patterns of 64 x 64 only: dark frames there made float
    counts "fractional values ... read as amplitudes"."""
    m, n = 300, 64
    counts = _centred_counts(m, n).astype(np.float32)
    counts[:250] = 0.0  # the beam not yet on
    with caplog.at_level(logging.WARNING):
        data = load_npz(_npz(tmp_path, counts, m))
    assert "holds only whole numbers" in caplog.text and "fractional" not in caplog.text
    np.testing.assert_allclose(data.counts(), counts, rtol=1e-6)


def test_the_units_guess_looks_further_while_it_sees_only_dark_frames(tmp_path, caplog):
    values = np.zeros((100, 8, 8))  # sample_size 640: 10 patterns a look
    spread = np.unique(np.linspace(0, 99, 10).round().astype(int))
    others = np.setdiff1d(np.arange(100), spread)
    values[others[-1]] = 4.0  # in the very last look
    assert _whole_numbers(values, sample_size=640) is True
    values[others[-1]] = 0.5
    assert _whole_numbers(values, sample_size=640) is False
    values[others[-1]] = 1.0
    assert _whole_numbers(values, sample_size=640) is None  # 0 and 1 only: undecided
    with caplog.at_level(logging.WARNING):
        data = load_npz(_npz(tmp_path, values, 100))
    assert "holds no fractional value and none above 1 in its good pixels" in caplog.text
    assert "holds fractional values" not in caplog.text
    np.testing.assert_array_equal(data.amplitudes, values)  # 0 and 1: the same either way


def test_a_bad_pixel_mask_of_the_wrong_shape_is_named(tmp_path):
    """A per-frame mask masked nothing; the error then blamed NaN in "good detector pixels"."""
    m, n = 12, 16
    counts = _centred_counts(m, n)
    counts[:, 3, 4] = np.nan
    per_frame = np.zeros((m, n, n), bool)
    per_frame[:, 3, 4] = True
    match = (
        r"bad_pixels: found shape \(12, 16, 16\), expected \(16, 16\), one mask for every "
        r"pattern .* mask\.any\(axis=0\)"
    )
    for units, stored in (("counts", counts), ("amplitude", np.sqrt(counts))):
        path = _npz(tmp_path, stored, m, diff3d_units=units, bad_pixels=per_frame)
        with pytest.raises(ValueError, match="scan.npz: " + match):
            load_npz(path)
    args = (np.zeros(m), np.zeros(m), gaussian_probe(n))
    with pytest.raises(ValueError, match=match):
        PtychoData.from_counts(counts, *args, bad_pixels=per_frame)
    with pytest.raises(ValueError, match=match):
        PtychoData.from_amplitudes(np.ones((m, n, n)), *args, bad_pixels=per_frame)
    one = PtychoData.from_counts(counts, *args, bad_pixels=per_frame.any(axis=0))
    assert np.all(one.amplitudes[:, 3, 4] == 0)
