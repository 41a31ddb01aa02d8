"""The train/validation split: held-out patterns are never inside a training group."""

import logging

import numpy as np
import pytest
from engine_helpers import tiny_overrides

from ptychodus_torch_plugin.engine.payload import create_training_payload
from ptychodus_torch_plugin.engine.prepare import (
    prepare_scan,
    split_for_validation,
    split_rows,
)
from ptychodus_torch_plugin.engine.training import train


def _split(data, **overrides):
    payload = create_training_payload(tiny_overrides(**overrides))
    scan = prepare_scan(data, payload.grid, payload.data)
    return scan, *split_for_validation(scan, data, payload.grid, payload.data)


@pytest.mark.parametrize("gridsize, neighbor_count", [(2, 4), (2, 7), (3, 9)])
def test_at_gridsize_above_one_no_pattern_is_in_both_sets(small_scan, gridsize, neighbor_count):
    _, scan, train_rows, val_rows = _split(
        small_scan, gridsize=gridsize, neighbor_count=neighbor_count
    )
    m = len(small_scan.xcoords)
    train_patterns = set(scan.groups.indices[train_rows].ravel().tolist())
    val_patterns = set(scan.groups.indices[val_rows].ravel().tolist())
    assert train_patterns and val_patterns
    assert not train_patterns & val_patterns
    assert train_patterns | val_patterns == set(range(m))  # nothing is left out
    # 5% of the 169 positions, at least neighbor_count of them; each one seeds its own group.
    held_out = np.sort(scan.groups.seeds[val_rows])
    assert len(held_out) == max(round(0.05 * m), neighbor_count) == len(val_rows)
    assert len(train_rows) == m - len(held_out)
    # A compact patch: the positions nearest to one of them.
    x, y = small_scan.xcoords, small_scan.ycoords
    nearest = [np.argsort(np.hypot(x - x[c], y - y[c]), kind="stable") for c in held_out]
    assert any(np.array_equal(np.sort(n[: len(held_out)]), held_out) for n in nearest)
    # Offsets are relative to each group's own centroid, so a group's members are neighbours.
    offsets = scan.groups.offsets
    assert np.allclose(offsets.mean(axis=1), 0.0, atol=1e-9)
    positions = np.stack([x, y], axis=1)[scan.groups.indices]
    assert np.allclose(positions, scan.groups.positions)


def test_the_group_split_before_leaked_what_this_one_holds_out(small_scan):
    """Why the split changed: random validation groups share most patterns with training."""
    scan, _, _, _ = _split(small_scan, gridsize=2)
    train_rows, val_rows = split_rows(scan.n_groups, 0.05, 0)
    train_patterns = set(scan.groups.indices[train_rows].ravel().tolist())
    val_members = scan.groups.indices[val_rows].ravel()
    assert np.isin(val_members, list(train_patterns)).mean() > 0.8


def test_the_split_is_seeded(small_scan):
    held_out = []
    for seed in (0, 0, 1):
        _, scan, _, val_rows = _split(small_scan, gridsize=2, seed=seed)
        held_out.append(sorted(scan.groups.seeds[val_rows].tolist()))
    assert held_out[0] == held_out[1] != held_out[2]


def test_gridsize_one_keeps_the_random_group_split(small_scan):
    scan, split_scan, train_rows, val_rows = _split(small_scan, gridsize=1)
    assert split_scan is scan
    expected = split_rows(scan.n_groups, 0.05, 0)
    assert np.array_equal(train_rows, expected[0]) and np.array_equal(val_rows, expected[1])


@pytest.mark.parametrize("n_groups, neighbor_count", [(100, 4), (300, 7)])
def test_a_requested_group_count_is_shared_between_the_sets(small_scan, n_groups, neighbor_count):
    _, scan, train_rows, val_rows = _split(
        small_scan, gridsize=2, n_groups=n_groups, neighbor_count=neighbor_count
    )
    assert len(train_rows) + len(val_rows) == n_groups
    assert len(val_rows) == round(n_groups * 8 / 169)
    assert not set(scan.groups.indices[train_rows].ravel()) & set(
        scan.groups.indices[val_rows].ravel()
    )


def test_a_single_requested_group_is_not_split(small_scan):
    _, scan, train_rows, val_rows = _split(small_scan, gridsize=2, n_groups=1)
    assert scan.n_groups == 1 and len(train_rows) == 1 and len(val_rows) == 0


def test_no_validation_fraction_means_no_validation_set(small_scan):
    _, _, train_rows, val_rows = _split(small_scan, gridsize=2, validation_fraction=0.0)
    assert len(val_rows) == 0 and len(train_rows) == len(small_scan.xcoords)


def test_a_scan_too_small_to_hold_out_trains_on_all_and_says_so(small_scan, caplog):
    few = small_scan.subset(np.arange(7))
    _, _, train_rows, val_rows = _split(few, gridsize=2)
    assert len(val_rows) == 0 and len(train_rows) == 7
    payload = create_training_payload(tiny_overrides(gridsize=2, epochs=1))
    with caplog.at_level(logging.WARNING):
        result = train(payload, few)
    assert "no validation data" in caplog.text and "neighbor_count = 4" in caplog.text
    assert result.history[-1].val_loss is None


def test_asking_for_no_validation_trains_without_a_warning(small_scan, caplog):
    """validation_fraction = 0 is a choice (the quality settings make it), not a problem."""
    payload = create_training_payload(tiny_overrides(gridsize=2, epochs=1, validation_fraction=0.0))
    with caplog.at_level(logging.INFO):
        result = train(payload, small_scan)
    assert "validation_fraction = 0: no validation data" in caplog.text
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and "valid" in r.getMessage()
    ]
    assert result.history[-1].val_loss is None


@pytest.mark.parametrize("masked", [False, True])
def test_preparing_a_scan_makes_one_copy_of_its_patterns(masked):
    """The inputs are the one new array of the scan's size: the masking and scaling steps
    used to copy twice more (a peak of 2-3x the scan; 6-10 GB for 50,000 patterns of 128^2)."""
    import tracemalloc

    from ptychodus_torch_plugin.engine.data import PtychoData

    rng = np.random.default_rng(0)
    m, n = 16000, 32  # 66 MB; the power sums' float64 chunks of 1,024 patterns add 0.26x
    amplitudes = rng.random((m, n, n), dtype=np.float32)
    side = np.arange(127) * 4.0 + 40
    x, y = (v.ravel()[:m] for v in np.meshgrid(side, side))
    bad = np.zeros((n, n), bool)
    bad[3, 5] = masked
    data = PtychoData.from_amplitudes(
        amplitudes, x, y, np.ones((n, n), np.complex64), bad_pixels=bad if masked else None
    )
    payload = create_training_payload(tiny_overrides(N=n, gridsize=1))
    tracemalloc.start()
    try:
        scan = prepare_scan(data, payload.grid, payload.data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * amplitudes.nbytes, peak / amplitudes.nbytes
    expected = data.amplitudes * np.float32(scan.input_scale)
    if masked:
        expected[:, 3, 5] = 0
    np.testing.assert_allclose(scan.inputs, expected, rtol=1e-6)
    assert scan.inputs.dtype == np.float32


def test_positions_in_metres_are_refused(small_scan):
    """A scan whose positions span less than a pixel (metres, or nm divided the wrong way)
    stitched every patch onto one spot without a word."""
    import dataclasses

    metres = dataclasses.replace(
        small_scan, xcoords=small_scan.xcoords * 1e-8, ycoords=small_scan.ycoords * 1e-8
    )
    payload = create_training_payload(tiny_overrides())
    with pytest.raises(ValueError, match="xcoords/ycoords.*object pixels"):
        prepare_scan(metres, payload.grid, payload.data)
    with pytest.raises(ValueError, match="xcoords/ycoords"):
        prepare_scan(metres, payload.grid, payload.data, with_physics=False)


def test_a_stray_position_leaves_only_its_groups_out_of_training(small_scan, caplog):
    """A group reaching a stray position shares no object with it and made every batch's
    merge canvas reach out to it (GBs per batch); it is left out, and the log says where."""
    import dataclasses

    x, y = small_scan.xcoords.copy(), small_scan.ycoords.copy()
    x[7], y[7] = 5000.0, 4000.0
    stray = dataclasses.replace(small_scan, xcoords=x, ycoords=y)
    payload = create_training_payload(tiny_overrides(gridsize=2))
    whole = prepare_scan(small_scan, payload.grid, payload.data)
    with caplog.at_level(logging.WARNING):
        scan = prepare_scan(stray, payload.grid, payload.data)
    assert "1 of" in caplog.text and "left out of training" in caplog.text
    assert "(5000, 4000)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_scan(stray, payload.grid, payload.data, role="validation (the test data)")
    assert "left out of validation (the test data)" in caplog.text
    assert scan.n_groups == whole.n_groups - 1
    assert 7 not in scan.groups.seeds
    assert np.abs(scan.groups.offsets).max() <= payload.grid.N
    # The validation split regroups each part: no scattered group there either.
    payload = create_training_payload(tiny_overrides(gridsize=2, validation_fraction=0.1))
    scan = prepare_scan(stray, payload.grid, payload.data)
    split, train_rows, val_rows = split_for_validation(scan, stray, payload.grid, payload.data)
    assert len(train_rows) and len(val_rows)
    assert np.abs(split.groups.offsets).max() <= payload.grid.N
    # Inference keeps every group (each patch is stitched at its own position, no merge).
    kept = prepare_scan(stray, payload.grid, payload.data, with_physics=False)
    assert kept.n_groups == whole.n_groups
