"""Grouping invariants: members are the seed's nearest neighbours, offsets sum to zero."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from ptychodus_torch_plugin.engine import grouping
from ptychodus_torch_plugin.engine.grouping import group_positions


def _scan(m=200, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 100, m), rng.uniform(0, 80, m)


@pytest.mark.parametrize("gridsize, k", [(1, 4), (2, 4), (2, 7), (3, 9), (3, 12)])
def test_members_are_among_the_seeds_k_nearest(gridsize, k):
    x, y = _scan()
    groups = group_positions(x, y, gridsize, k, seed=3)
    c = gridsize * gridsize
    assert groups.indices.shape == (200, c)
    assert groups.positions.shape == (200, c, 2)
    assert groups.offsets.shape == (200, c, 2)
    assert groups.centroids.shape == (200, 2)
    np.testing.assert_array_equal(groups.indices[:, 0], groups.seeds)
    _, nearest = cKDTree(np.stack([x, y], 1)).query(np.stack([x, y], 1)[groups.seeds], k=k)
    nearest = np.asarray(nearest).reshape(len(groups.seeds), k)
    for row, members in zip(nearest, groups.indices, strict=True):
        assert set(members) <= set(row)
        assert len(set(members)) == c  # no pattern twice in a group


def test_offsets_sum_to_zero_and_follow_the_sign_convention():
    x, y = _scan()
    groups = group_positions(x, y, 2, 6)
    np.testing.assert_allclose(groups.offsets.sum(axis=1), 0, atol=1e-9)
    expected = np.stack([x, y], 1)[groups.indices] - groups.centroids[:, None, :]
    np.testing.assert_allclose(groups.offsets, expected)  # r = position - centroid


def test_k_equal_c_takes_the_nearest_c_deterministically():
    x, y = _scan()
    a = group_positions(x, y, 2, 4, seed=1)
    b = group_positions(x, y, 2, 4, seed=99)
    np.testing.assert_array_equal(a.indices, b.indices)
    _, nearest = cKDTree(np.stack([x, y], 1)).query(np.stack([x, y], 1), k=4)
    assert np.all(np.sort(a.indices, 1) == np.sort(nearest, 1))


def test_random_choice_is_seeded():
    x, y = _scan()
    a = group_positions(x, y, 2, 8, seed=5)
    b = group_positions(x, y, 2, 8, seed=5)
    c = group_positions(x, y, 2, 8, seed=6)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)


def test_n_groups_subsample_and_oversample():
    x, y = _scan(100)
    sub = group_positions(x, y, 1, 4, n_groups=30, seed=0)
    assert sub.indices.shape == (30, 1) and len(set(sub.seeds)) == 30
    over = group_positions(x, y, 2, 6, n_groups=250, seed=0)
    assert over.indices.shape == (250, 4)
    # Repeated seeds receive distinct subsets of their neighbourhood.
    keys = {(s, tuple(sorted(m))) for s, m in zip(over.seeds, over.indices, strict=True)}
    assert len(keys) == 250
    # Two whole passes, and the extra 50 groups spread over the scan, not its first 50 patterns
    counts = np.bincount(over.seeds, minlength=100)
    assert set(counts) == {2, 3} and (counts == 3).sum() == 50
    assert np.flatnonzero(counts == 3).max() > 60
    again = group_positions(x, y, 2, 6, n_groups=250, seed=0)
    assert np.array_equal(again.indices, over.indices)  # seeded
    with pytest.raises(ValueError, match="n_groups = 150 is invalid for gridsize 1"):
        group_positions(x, y, 1, 4, n_groups=150)
    with pytest.raises(ValueError, match="n_groups = 101 is invalid.*allowed <= 100"):
        group_positions(x, y, 2, 4, n_groups=101)  # K == C: one subset per neighbourhood


def test_duplicate_positions_keep_the_seed_in_its_group():
    x = np.array([0.0, 0.0, 0.0, 5.0, 9.0, 12.0])
    y = np.zeros(6)
    groups = group_positions(x, y, 2, 4)
    np.testing.assert_array_equal(groups.indices[:, 0], np.arange(6))


def test_bad_arguments():
    x, y = _scan(10)
    with pytest.raises(ValueError, match="neighbor_count = 3"):
        group_positions(x, y, 2, 3)
    with pytest.raises(ValueError, match="xcoords/ycoords"):
        group_positions(x, y[:5], 1, 4)
    with pytest.raises(ValueError, match="at least gridsize\\*\\*2 = 9"):
        group_positions(x[:5], y[:5], 3, 9)


def test_oversampled_groups_stay_distinct_on_scans_too_large_to_tabulate_at_once(monkeypatch):
    """Above m * n_subsets = 2,000,000 (210,000 positions at K = 6) the groups used to be
    random subsets, 18% of them repeats of another group of the same seed."""
    monkeypatch.setattr(grouping, "_MAX_ENUMERATED_ENTRIES", 50)  # blocks of 5 seeds here
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(10) * 5.0, np.arange(10) * 5.0)
    x, y = x.ravel() + rng.uniform(-1, 1, 100), y.ravel() + rng.uniform(-1, 1, 100)
    groups = grouping.group_positions(x, y, 2, neighbor_count=6, n_groups=1000, seed=0)
    keys = np.concatenate([groups.seeds[:, None], np.sort(groups.indices, axis=1)], axis=1)
    assert len(np.unique(keys, axis=0)) == 1000  # each seed's 10 subsets, each once
    assert np.array_equal(np.bincount(groups.seeds), np.full(100, 10))


def test_oversampling_from_large_neighbourhoods_is_distinct_without_tabulating(monkeypatch):
    """84 subsets per seed (K = 10), 3 taken: random draws, a seed's repeats redrawn. The
    per-seed permutation of the whole table took minutes for a million subsets per seed."""
    monkeypatch.setattr(grouping, "_MAX_ENUMERATED_ENTRIES", 50)

    def no_table(*args, **kwargs):
        raise AssertionError("the subset table was permuted")

    monkeypatch.setattr(grouping, "_permuted_table_columns", no_table)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 60, 100), rng.uniform(0, 60, 100)
    groups = grouping.group_positions(x, y, 2, neighbor_count=10, n_groups=300, seed=0)
    keys = np.concatenate([groups.seeds[:, None], np.sort(groups.indices, axis=1)], axis=1)
    assert len(np.unique(keys, axis=0)) == 300
    assert np.all(groups.indices[:, 0] == groups.seeds)
