"""The NPZ data contract: every bad-input case raises an error naming key, found and expected."""

import logging
import tracemalloc

import numpy as np
import pytest

from ptychodus_torch_plugin.engine.data import (
    PtychoData,
    amplitudes_from_counts,
    flagged_pixels,
    load_npz,
    save_npz,
)

M, N = 12, 16


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(5.0, size=(M, N, N)).astype(np.float64)
    return {
        "diff3d": np.sqrt(counts).astype(np.float32),
        "xcoords": rng.uniform(10, 40, M),
        "ycoords": rng.uniform(10, 40, M),
        "probeGuess": (rng.normal(size=(N, N)) + 1j * rng.normal(size=(N, N))).astype(np.complex64),
        "objectGuess": np.exp(1j * rng.normal(size=(60, 60))).astype(np.complex64),
    }


def _write(tmp_path, **arrays):
    path = tmp_path / "scan.npz"
    np.savez(path, **arrays)
    return path


def test_round_trip_is_exact(tmp_path):
    arrays = _arrays()
    data = load_npz(_write(tmp_path, **arrays))
    assert data.n_patterns == M and data.N == N
    assert data.amplitudes.dtype == np.float32 and data.probe.shape == (1, N, N)
    out = save_npz(data, tmp_path / "out" / "copy.npz")
    again = load_npz(out)
    np.testing.assert_array_equal(again.amplitudes, arrays["diff3d"])
    np.testing.assert_array_equal(again.xcoords, arrays["xcoords"])
    np.testing.assert_array_equal(again.probe[0], arrays["probeGuess"])
    np.testing.assert_array_equal(again.object_guess, arrays["objectGuess"])
    with np.load(out) as raw:
        assert str(raw["diff3d_units"]) == "amplitude"
    assert not list((tmp_path / "out").glob("*.tmp"))  # atomic write leaves no temp file
    assert again.pixel_size_m is None  # the file did not say
    sized = load_npz(_write(tmp_path, **arrays, pixel_size_m=np.array([8e-9, 9e-9])))
    assert sized.pixel_size_m == (8e-9, 9e-9)
    assert sized.subset(np.arange(3)).pixel_size_m == (8e-9, 9e-9)
    assert load_npz(save_npz(sized, tmp_path / "sized.npz")).pixel_size_m == (8e-9, 9e-9)
    with pytest.raises(ValueError, match="pixel_size_m"):
        load_npz(_write(tmp_path, **arrays, pixel_size_m=np.array([-1.0, 1e-9])))


def test_counts_are_converted_in_float64_without_overflow():
    counts = np.array([[[65535, 0], [4, 9]]], dtype=np.uint16)
    amplitudes = amplitudes_from_counts(counts)
    assert amplitudes.dtype == np.float32
    np.testing.assert_allclose(amplitudes[0], [[np.sqrt(65535.0), 0], [2, 3]], rtol=1e-7)
    counts[0, 0, 0] = 65534  # 65535 is a detector's flag value (the tests below)
    data = PtychoData.from_counts(counts, [0.0], [0.0], np.ones((2, 2), np.complex64))
    assert data.bad_pixels is None
    np.testing.assert_allclose(data.counts()[0, 0, 0], 65534.0, rtol=1e-6)


def test_counts_are_converted_chunk_by_chunk_in_bounded_memory():
    """A whole-scan float64 temporary would be 4x a uint16 scan on top of the result."""
    import tracemalloc

    counts = np.random.default_rng(0).integers(0, 60000, (2000, 64, 64), dtype=np.uint16)
    tracemalloc.start()
    try:
        amplitudes = amplitudes_from_counts(counts, chunk=100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(amplitudes, np.sqrt(counts.astype(np.float64)).astype(np.float32))
    assert peak < amplitudes.nbytes + 3 * 100 * 64 * 64 * 8, (peak, amplitudes.nbytes)
    negative = counts.astype(np.int32)
    negative[1500, 3, 3] = -7  # in a later chunk: the message still names the minimum
    with pytest.raises(ValueError, match="counts: found minimum -7"):
        amplitudes_from_counts(negative, chunk=100)


def test_counts_conversion_masks_then_checks_and_clips_on_request(caplog):
    counts = np.full((3, 4, 4), 9.0)
    counts[0, 1, 1] = np.nan  # in a bad pixel: zeroed like any bad value
    counts[2, 0, 3] = -4.0  # background-subtracted
    bad = np.zeros((4, 4), bool)
    bad[1, 1] = True
    with pytest.raises(ValueError, match="counts: found minimum -4"):
        amplitudes_from_counts(counts, chunk=2, bad_pixels=bad)
    with caplog.at_level("WARNING"):
        amplitudes = amplitudes_from_counts(counts, chunk=2, bad_pixels=bad, clip_negative=True)
    assert "1 negative intensities (min -4) clipped to 0" in caplog.text
    assert np.all(amplitudes[:, 1, 1] == 0) and amplitudes[2, 0, 3] == 0
    assert amplitudes[1, 2, 2] == 3.0
    with pytest.raises(ValueError, match=r"counts: found 1 NaN/inf value\(s\) in good detector"):
        amplitudes_from_counts(counts, clip_negative=True)  # the NaN in a good pixel


def test_units_from_explicit_key_and_from_integer_dtype(tmp_path, caplog):
    arrays = _arrays()
    counts = np.rint(np.square(arrays["diff3d"].astype(np.float64)))
    explicit = load_npz(_write(tmp_path, **{**arrays, "diff3d": counts, "diff3d_units": "counts"}))
    np.testing.assert_allclose(explicit.amplitudes, arrays["diff3d"], rtol=1e-6)
    with caplog.at_level(logging.WARNING):
        integer = load_npz(_write(tmp_path, **{**arrays, "diff3d": counts.astype(np.uint16)}))
    assert "detector counts" in caplog.text
    np.testing.assert_allclose(integer.amplitudes, arrays["diff3d"], rtol=1e-6)
    with pytest.raises(ValueError, match="diff3d_units: found 'photons'"):
        load_npz(_write(tmp_path, **{**arrays, "diff3d_units": "photons"}))


def test_legacy_key_and_nnm_stack_are_accepted(tmp_path, caplog):
    arrays = _arrays()
    legacy = {k: v for k, v in arrays.items() if k != "diff3d"}
    legacy["diffraction"] = np.moveaxis(arrays["diff3d"], 0, 2)  # (N, N, M)
    with caplog.at_level(logging.WARNING):
        data = load_npz(_write(tmp_path, **legacy))
    assert "transposing" in caplog.text
    np.testing.assert_array_equal(data.amplitudes, arrays["diff3d"])


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_npz(missing)


def test_not_an_npz(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="garbage.npz: not an NPZ file") as info:
        load_npz(path)
    assert "pickle" not in str(info.value)  # numpy's advice to load it unsafely is not ours


def test_a_corrupt_npz_member_is_a_value_error_naming_the_file(tmp_path):
    """A flipped bit inside diff3d.npy: zipfile's CRC error, now one ValueError with the path."""
    path = _write(tmp_path, **_arrays())
    raw = bytearray(path.read_bytes())
    start = raw.index(b"diff3d.npy") + 400  # inside the stored (uncompressed) member data
    raw[start] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"scan.npz: not a readable NPZ file \(BadZipFile"):
        load_npz(path)


def test_an_object_array_is_named_by_its_key(tmp_path):
    arrays = _arrays()
    arrays["objectGuess"] = np.array([None, "x"], dtype=object)
    path = _write(tmp_path, **arrays)
    with pytest.raises(ValueError, match=r"scan.npz: key 'objectGuess' cannot be read"):
        load_npz(path)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.pop("diff3d"), "missing key 'diff3d'"),
        (lambda a: a.pop("probeGuess"), "missing key 'probeGuess'"),
        (lambda a: a.pop("xcoords"), "missing key 'xcoords'"),
        (lambda a: a.update(diff3d=a["diff3d"] * (1 + 1j)), "diff3d: found complex values"),
        (lambda a: a["diff3d"].__setitem__((0, 0, 0), np.nan), "diff3d: found 1 NaN/inf"),
        (lambda a: a["diff3d"].__setitem__((0, 0, 0), -1.0), "diff3d: found minimum -1"),
        (lambda a: a.update(diff3d=a["diff3d"][:, :, :-2]), r"diff3d: found shape \(12, 16, 14\)"),
        (lambda a: a.update(diff3d=a["diff3d"][:-1]), "diff3d: found 11 patterns"),
        (lambda a: a.update(ycoords=a["ycoords"][:-1]), r"ycoords: found shape \(11,\)"),
        (
            lambda a: a.update(probeGuess=a["probeGuess"][:8, :8]),
            r"probeGuess: found shape \(8, 8\), expected \(16, 16\)",
        ),
        (lambda a: a.update(diff3d=a["diff3d"][0]), r"diff3d: found shape \(16, 16\)"),
        (lambda a: a["xcoords"].__setitem__(0, np.inf), "xcoords: found 1 NaN/inf"),
        (lambda a: a.update(objectGuess=np.ones(5)), r"objectGuess: found shape \(5,\)"),
    ],
)
def test_bad_input_names_key_found_and_expected(tmp_path, change, match):
    arrays = _arrays()
    change(arrays)
    with pytest.raises(ValueError, match=match) as info:
        load_npz(_write(tmp_path, **arrays))
    assert "expected" in str(info.value) or "missing key" in str(info.value)
    assert str(info.value).startswith(f"{tmp_path / 'scan.npz'}: ")  # training or test file?


def _with_bad_pixel(arrays, diff3d, value, units=None):
    bad = np.zeros((N, N), bool)
    bad[3, 4] = True
    diff3d = diff3d.copy()
    diff3d[:, 3, 4] = value
    extra = {} if units is None else {"diff3d_units": units}
    return {**arrays, "diff3d": diff3d, "bad_pixels": bad, **extra}


@pytest.mark.parametrize(
    "dtype, value, units",
    [
        (np.float64, np.nan, "counts"),  # a dead pixel written as NaN
        (np.int32, -1, None),  # a gap marker in signed integer counts
        (np.float32, np.nan, "amplitude"),
        (np.float32, -1.0, "amplitude"),
    ],
)
def test_bad_pixels_may_hold_anything(tmp_path, dtype, value, units):
    """What the mask marks is not checked: the GUI (host/convert.py) reads such scans too."""
    arrays = _arrays()
    counts = np.rint(np.square(arrays["diff3d"].astype(np.float64)))
    stored = arrays["diff3d"] if units == "amplitude" else counts
    data = load_npz(_write(tmp_path, **_with_bad_pixel(arrays, stored.astype(dtype), value, units)))
    assert data.bad_pixels[3, 4] and data.bad_pixels.sum() == 1
    assert np.all(data.amplitudes[:, 3, 4] == 0)
    good = np.ones((N, N), bool)
    good[3, 4] = False
    np.testing.assert_allclose(data.amplitudes[:, good], arrays["diff3d"][:, good], rtol=1e-6)


def test_nan_in_a_good_pixel_says_to_mark_it_bad(tmp_path):
    arrays = _arrays()
    counts = np.square(arrays["diff3d"].astype(np.float64))
    counts[2, 5, 5] = np.nan
    path = _write(tmp_path, **{**arrays, "diff3d": counts, "diff3d_units": "counts"})
    with pytest.raises(ValueError, match=r"scan.npz: counts: found 1 NaN/inf .* mark those"):
        load_npz(path)


def test_negative_counts_are_clipped_with_a_warning(tmp_path, caplog):
    """Background-subtracted counts: clipped to 0, as Ptychodus's own data are in the GUI."""
    arrays = _arrays()
    counts = np.square(arrays["diff3d"].astype(np.float64))
    counts[1, 2, 2] = -3.5
    path = _write(tmp_path, **{**arrays, "diff3d": counts, "diff3d_units": "counts"})
    with caplog.at_level(logging.WARNING):
        data = load_npz(path)
    assert "1 negative intensities (min -3.5) clipped to 0" in caplog.text
    assert data.amplitudes[1, 2, 2] == 0
    np.testing.assert_allclose(data.amplitudes[0], arrays["diff3d"][0], rtol=1e-6)


def test_units_stored_as_bytes_are_read(tmp_path):
    """h5py and MATLAB pipelines write byte strings."""
    arrays = _arrays()
    counts = np.square(arrays["diff3d"].astype(np.float64)) + 0.25  # not whole numbers
    path = _write(tmp_path, **{**arrays, "diff3d": counts, "diff3d_units": np.bytes_(b"counts")})
    np.testing.assert_allclose(load_npz(path).counts(), counts, rtol=1e-6)


def test_fractional_data_without_units_are_read_as_amplitudes_and_say_so(tmp_path, caplog):
    arrays = _arrays()
    with caplog.at_level(logging.WARNING):
        data = load_npz(_write(tmp_path, **arrays))
    assert "reading it as amplitudes" in caplog.text and "diff3d_units='counts'" in caplog.text
    np.testing.assert_array_equal(data.amplitudes, arrays["diff3d"])


def test_in_memory_counts_mask_before_checking_in_either_stack_order():
    arrays = _arrays()
    counts = np.square(arrays["diff3d"].astype(np.float64))
    counts[:, 3, 4] = np.nan
    bad = np.zeros((N, N), bool)
    bad[3, 4] = True
    args = (arrays["xcoords"], arrays["ycoords"], arrays["probeGuess"])
    for stack in (counts, np.moveaxis(counts, 0, 2)):  # (M, N, N) and (N, N, M)
        data = PtychoData.from_counts(stack, *args, bad_pixels=bad)
        assert np.all(data.amplitudes[:, 3, 4] == 0)
        np.testing.assert_allclose(data.amplitudes[:, 0, 0], arrays["diff3d"][:, 0, 0], rtol=1e-6)
    with pytest.raises(ValueError, match="counts: found 12 NaN/inf"):
        PtychoData.from_counts(counts, *args)  # without the mask the NaN are in good pixels


def test_subset_and_multimode_probe():
    arrays = _arrays()
    modes = np.stack([arrays["probeGuess"], 0.5 * arrays["probeGuess"]])
    data = PtychoData.from_amplitudes(arrays["diff3d"], arrays["xcoords"], arrays["ycoords"], modes)
    assert data.probe.shape == (2, N, N)
    np.testing.assert_array_equal(data.probe_mode0, arrays["probeGuess"])
    part = data.subset(np.array([1, 3]))
    assert part.n_patterns == 2 and part.xcoords[1] == arrays["xcoords"][3]
    assert part.positions.shape == (2, 2)


def test_float_whole_numbers_without_units_are_counts(tmp_path, caplog):
    """Ptychodus's training export keeps float counts and names no units."""
    arrays = _arrays()
    counts = np.rint(np.square(arrays["diff3d"].astype(np.float64)))
    with caplog.at_level(logging.WARNING):
        data = load_npz(_write(tmp_path, **{**arrays, "diff3d": counts}))
    assert "whole numbers" in caplog.text
    np.testing.assert_allclose(data.amplitudes, np.sqrt(counts), rtol=1e-6)
    # Real amplitudes (square roots) are read as amplitudes, untouched.
    assert np.array_equal(load_npz(_write(tmp_path, **arrays)).amplitudes, arrays["diff3d"])


def test_float_counts_with_inpainted_bad_pixels_are_still_counts(tmp_path):
    """Ptychodus's export fills bad pixels with non-integer inpainted values (bad_pixels
    lists them); they used to make the counts read as amplitudes (off by a square root)."""
    arrays = _arrays()
    counts = np.rint(np.square(arrays["diff3d"].astype(np.float64)))
    bad = np.zeros(counts.shape[-2:], bool)
    bad[3, 4] = bad[7, 1] = True
    counts[:, bad] = 2.37  # inpainted
    data = load_npz(_write(tmp_path, **{**arrays, "diff3d": counts, "bad_pixels": bad}))
    good = ~bad
    np.testing.assert_allclose(data.amplitudes[:, good], np.sqrt(counts[:, good]), rtol=1e-6)


def test_ptychodus_export_with_fractional_counts_is_read_as_counts(tmp_path):
    """Ptychodus's training export (its exact keys) holds intensities; a corrected detector
    gives fractional counts, which the whole-number guess alone read as amplitudes."""
    arrays = _arrays()
    counts = np.square(arrays["diff3d"].astype(np.float64)) * 1.37  # gain-corrected
    export = {
        **arrays,
        "diff3d": counts,
        "xcoords_start": arrays["xcoords"],
        "ycoords_start": arrays["ycoords"],
        "bad_pixels": np.zeros(counts.shape[-2:], bool),
        "scan_index": np.zeros(M, int),
    }
    data = load_npz(_write(tmp_path, **export))
    np.testing.assert_allclose(data.amplitudes, np.sqrt(counts), rtol=1e-6)
    # One key fewer is not Ptychodus's export: fractional values stay amplitudes.
    del export["scan_index"]
    np.testing.assert_allclose(load_npz(_write(tmp_path, **export)).amplitudes, counts, rtol=1e-6)


def test_whole_number_check_samples_patterns_across_the_scan():
    """The units guess looks at about a million values, spread over the scan; it must not
    copy the whole scan. It looked at the first 1e6 / 4096 = 245 patterns only, so fractional
    values after them, or dark frames filling them, decided it wrongly."""
    from ptychodus_torch_plugin.engine.data import _whole_numbers

    values = np.ones((1000, 64, 64), np.float32) * 3.0
    values[900:] = 0.5  # amplitudes beyond the first 245 patterns
    bad = np.zeros((64, 64), bool)
    bad[0, 0] = True
    tracemalloc.start()
    try:
        assert _whole_numbers(values, bad, sample_size=1_000_000) is False
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < values.nbytes  # a masked copy of the whole scan alone is ~values.nbytes
    values[900:] = 3.0
    values[:400] = 0.0  # dark frames first (the beam not yet on): still counts
    assert _whole_numbers(values, bad, sample_size=1_000_000) is True


def test_mean_pattern_power_in_chunks_equals_the_whole_float64_sum():
    from ptychodus_torch_plugin.engine.data import mean_pattern_power

    rng = np.random.default_rng(4)
    amplitudes = (rng.random((37, 16, 16)) * 300).astype(np.float32)  # large counts
    direct = np.square(amplitudes.astype(np.float64)).sum(axis=(1, 2)).mean()
    assert mean_pattern_power(amplitudes, chunk=5) == pytest.approx(direct, rel=1e-12)
    data = PtychoData.from_amplitudes(amplitudes, np.zeros(37), np.zeros(37), np.ones((16, 16)))
    assert data.mean_photons() == pytest.approx(direct, rel=1e-12)
    with pytest.raises(ValueError, match="found shape"):
        mean_pattern_power(np.ones(5))
    bad = np.zeros((16, 16), bool)
    bad[2, 3] = True  # excluded from the loss, so from the dose too
    masked = PtychoData.from_amplitudes(
        amplitudes, np.zeros(37), np.zeros(37), np.ones((16, 16)), bad_pixels=bad
    )
    kept = np.square(np.where(bad, 0.0, amplitudes.astype(np.float64))).sum(axis=(1, 2)).mean()
    assert masked.mean_photons() == pytest.approx(kept, rel=1e-12)


def test_detector_flag_values_in_npz_counts_join_the_bad_pixel_mask(tmp_path, caplog):
    """An Eiger writes gap and dead pixels as 0xFFFFFFFF; a 16-bit detector as 65535."""
    arrays = _arrays()
    counts = np.rint(np.square(arrays.pop("diff3d"))).astype(np.uint16)
    given = np.zeros((N, N), bool)
    given[0, 0] = True
    flagged = counts.copy()
    flagged[:, :, 5] = 65535  # a dead column
    flagged[2, 7, 9] = 65535  # one overflow in one pattern
    flagged[:, 0, 0] = 65535  # already in the mask: not counted again
    with caplog.at_level(logging.WARNING):
        data = load_npz(_write(tmp_path, diff3d=flagged, bad_pixels=given, **arrays))
    assert f"{N + 1} detector pixel(s) hold 65535, the largest uint16 value" in caplog.text
    expected = given.copy()
    expected[:, 5] = expected[7, 9] = True
    np.testing.assert_array_equal(data.bad_pixels, expected)
    # The photon count (the loss's dose) ignores them, as if the mask had listed them.
    listed = load_npz(_write(tmp_path, diff3d=counts, bad_pixels=expected, **arrays))
    assert data.mean_photons() == pytest.approx(listed.mean_photons(), rel=1e-12)
    assert data.mean_photons() < 10 * N * N  # 65535 in a column would be ~1e6 per pattern

    clean = load_npz(_write(tmp_path, diff3d=counts, **arrays))
    assert clean.bad_pixels is None  # no flag values: nothing added
    wide = flagged.astype(np.uint32)  # 65535 is an ordinary count in 32 bits
    assert load_npz(_write(tmp_path, diff3d=wide, bad_pixels=given, **arrays)).bad_pixels.sum() == 1


def test_detector_flag_values_in_memory_counts_join_the_mask():
    counts = np.full((3, 4, 4), 7, dtype=np.uint32)
    counts[1, 2, 3] = np.iinfo(np.uint32).max
    data = PtychoData.from_counts(counts, np.zeros(3), np.zeros(3), np.ones((4, 4), np.complex64))
    assert data.bad_pixels[2, 3] and int(data.bad_pixels.sum()) == 1
    assert flagged_pixels(counts.astype(np.float64)) is None  # floats carry no flag value
    # An (N, N, M) stack, which the loaders transpose, is checked in that layout too.
    stack = np.full((4, 4, 5), 7, dtype=np.uint16)
    stack[1, 2, 3] = 65535  # pixel (1, 2) of pattern 3
    data = PtychoData.from_counts(stack, np.zeros(5), np.zeros(5), np.ones((4, 4), np.complex64))
    assert data.bad_pixels[1, 2] and int(data.bad_pixels.sum()) == 1


def test_patterns_with_the_zero_frequency_in_the_corner_are_reported(tmp_path, caplog):
    """An unshifted FFT's patterns trained on without a word to a wrong image."""
    from ptychodus_torch_plugin.engine.simulate import simulate_dataset

    scan = simulate_dataset(N=32, nphotons=1e5, seed=0)
    centred = save_npz(scan, tmp_path / "centred.npz")
    with caplog.at_level(logging.WARNING):
        load_npz(centred)
    assert "brightest in their corners" not in caplog.text
    arrays = dict(np.load(centred))
    arrays["diff3d"] = np.fft.ifftshift(arrays["diff3d"], axes=(-2, -1))
    with caplog.at_level(logging.WARNING):
        load_npz(_write(tmp_path, **arrays))
    assert "brightest in their corners" in caplog.text and "fftshift" in caplog.text


def test_probes_and_objects_of_no_numbers_or_no_modes_are_named(tmp_path):
    arrays = _arrays()
    with pytest.raises(ValueError, match=r"probeGuess: found shape \(0, 16, 16\)"):
        load_npz(_write(tmp_path, **{**arrays, "probeGuess": np.zeros((0, N, N), np.complex64)}))
    with pytest.raises(ValueError, match="probeGuess: found dtype <U"):
        load_npz(_write(tmp_path, **{**arrays, "probeGuess": np.full((N, N), "a")}))
    with pytest.raises(ValueError, match="objectGuess: found dtype <U"):
        load_npz(_write(tmp_path, **{**arrays, "objectGuess": np.full((9, 9), "a")}))
    units = np.array(["counts", "counts"])
    with pytest.raises(ValueError, match=r"diff3d_units: found an array of shape \(2,\)"):
        load_npz(_write(tmp_path, **{**arrays, "diff3d_units": units}))


def test_the_centring_check_reads_the_patterns_in_blocks():
    """It made two float64 copies of 512 patterns: 512 MB per load at N = 256."""
    from ptychodus_torch_plugin.engine.data import warn_if_not_centred

    patterns = np.ones((512, 128, 128), np.float32)  # 32 MB
    tracemalloc.start()
    try:
        assert not warn_if_not_centred(patterns)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < patterns.nbytes / 2, peak  # was 8x: two float64 copies


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_a_file_of_no_patterns_is_refused_without_a_units_guess(tmp_path, caplog, dtype):
    """It used to warn "dark patterns?" (float) or "reading it as detector counts" (integer)
    about the units before the shape error."""
    arrays = {**_arrays(), "diff3d": np.zeros((0, N, N), dtype)}
    arrays["xcoords"] = arrays["ycoords"] = np.zeros(0)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="diff3d"):
        load_npz(_write(tmp_path, **arrays))
    assert "dark patterns" not in caplog.text and "diff3d_units" not in caplog.text
