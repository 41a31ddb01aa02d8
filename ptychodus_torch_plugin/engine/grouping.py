"""Grouping scan positions into sets of C = gridsize**2 neighbouring patterns.

Why: with gridsize g > 1 the network sees C overlapping patterns at once and the forward model
enforces that their object patches agree where they overlap. Groups are built per seed pattern
from its K nearest neighbours (seed included) with a KD-tree, fully vectorised, so 100,000
positions group in well under a second.

Our binding choices (shared/design/PTYCHOPINN.md section 3):
- K == C: the seed and its C-1 nearest neighbours, nearest first (deterministic).
- K > C: the seed plus C-1 of its other K-1 neighbours, chosen at random with ``seed``. The seed
  is always a member so every pattern is used when every pattern seeds a group.
- n_groups = 0 means one group per pattern; fewer takes a seeded random subset of seeds; more
  (oversampling, g > 1 only) draws distinct subsets of each neighbourhood and is refused when
  the neighbourhoods cannot supply that many distinct subsets.
- Offsets: r_c = position_c - centroid (x right, y down), the one sign convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

_MAX_ENUMERATED_ENTRIES = 2_000_000  # seeds x subsets kept in memory for oversampling


@dataclass(frozen=True, eq=False)
class Groups:
    """G groups of C patterns each."""

    seeds: np.ndarray  # (G,) index of each group's seed pattern
    indices: np.ndarray  # (G, C) pattern indices, seed first
    positions: np.ndarray  # (G, C, 2) absolute (x, y) positions, object pixels
    centroids: np.ndarray  # (G, 2) mean position of each group
    offsets: np.ndarray  # (G, C, 2) positions - centroids

    @property
    def n_groups(self) -> int:
        return int(self.indices.shape[0])

    @property
    def channels(self) -> int:
        return int(self.indices.shape[1])

    def take(self, rows: slice | np.ndarray) -> Groups:
        """A subset of groups (for chunked inference and train/validation splits)."""
        return Groups(
            seeds=self.seeds[rows],
            indices=self.indices[rows],
            positions=self.positions[rows],
            centroids=self.centroids[rows],
            offsets=self.offsets[rows],
        )


def _neighbourhoods(positions: np.ndarray, k: int) -> np.ndarray:
    """(M, k) indices of each point's k nearest points, with the point itself in column 0."""
    m = positions.shape[0]
    _, nbrs = cKDTree(positions).query(positions, k=k)
    nbrs = np.asarray(nbrs, dtype=np.int64).reshape(m, k)
    own = np.arange(m)
    # Duplicate positions can make the query list a twin before the point itself: put the
    # point itself first, swapping it with whatever sat in column 0 (or replacing the farthest).
    misplaced = np.flatnonzero(nbrs[:, 0] != own)
    if misplaced.size:
        rows = nbrs[misplaced]
        hit = rows == own[misplaced, None]
        col = np.where(hit.any(axis=1), hit.argmax(axis=1), k - 1)
        rows[np.arange(len(misplaced)), col] = rows[:, 0]
        rows[:, 0] = own[misplaced]
        nbrs[misplaced] = rows
    return nbrs


def _choose_seeds(m: int, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    if n_groups == 0 or n_groups == m:
        return np.arange(m)
    if n_groups < m:
        return np.sort(rng.choice(m, size=n_groups, replace=False))
    # Whole passes over the scan, then a seeded random part of one more: the first patterns
    # of the scan (the top rows of a raster) must not be the ones that get the extra groups.
    passes, extra = divmod(n_groups, m)
    partial = np.sort(rng.choice(m, size=extra, replace=False))
    return np.concatenate([np.tile(np.arange(m), passes), partial]).astype(np.int64)


def group_positions(
    xcoords: np.ndarray,
    ycoords: np.ndarray,
    gridsize: int,
    neighbor_count: int = 4,
    n_groups: int = 0,
    seed: int = 0,
) -> Groups:
    """Group M scan positions into groups of C = gridsize**2 neighbours (see module notes)."""
    x = np.asarray(xcoords, dtype=np.float64)
    y = np.asarray(ycoords, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"xcoords/ycoords: found shapes {x.shape} and {y.shape}, expected equal (M,) arrays"
        )
    m = x.shape[0]
    c = gridsize * gridsize
    k = neighbor_count
    if gridsize < 1:
        raise ValueError(f"gridsize = {gridsize} is invalid: allowed an integer >= 1")
    if k < c:
        raise ValueError(f"neighbor_count = {k} is invalid: allowed >= gridsize**2 = {c}")
    if n_groups < 0:
        raise ValueError(f"n_groups = {n_groups} is invalid: allowed >= 0 (0 = one per pattern)")
    if m < c:
        raise ValueError(
            f"xcoords: found {m} positions, expected at least gridsize**2 = {c} to form a group:"
            " use a gridsize-1 model (it works for any scan) or a scan with more positions"
        )
    rng = np.random.default_rng(seed)
    positions = np.stack([x, y], axis=1)

    if c == 1:
        if n_groups > m:
            raise ValueError(
                f"n_groups = {n_groups} is invalid for gridsize 1: allowed <= {m} (the number "
                "of patterns); oversampling needs gridsize > 1"
            )
        seeds = _choose_seeds(m, n_groups, rng)
        indices = seeds[:, None]
    else:
        k_eff = min(k, m)
        if k_eff < c:
            raise ValueError(f"neighbor_count: only {m} positions, need {c} per group")
        nbrs = _neighbourhoods(positions, k_eff)
        n_subsets = math.comb(k_eff - 1, c - 1)
        if n_groups > m * n_subsets:
            raise ValueError(
                f"n_groups = {n_groups} is invalid: allowed <= {m * n_subsets} (each of the "
                f"{m} neighbourhoods of K = {k_eff} supplies {n_subsets} distinct groups of "
                f"{c}); raise neighbor_count to oversample more"
            )
        seeds = _choose_seeds(m, n_groups, rng)
        members = nbrs[seeds]  # (G, K), seed first
        if k_eff == c:
            indices = members
        else:
            indices = _pick_members(members, seeds, m, c, n_subsets, rng)

    group_positions_ = positions[indices]  # (G, C, 2)
    centroids = group_positions_.mean(axis=1)
    offsets = group_positions_ - centroids[:, None, :]
    return Groups(
        seeds=np.asarray(seeds, dtype=np.int64),
        indices=np.asarray(indices, dtype=np.int64),
        positions=group_positions_,
        centroids=centroids,
        offsets=offsets,
    )


def _pick_members(
    members: np.ndarray,
    seeds: np.ndarray,
    m: int,
    c: int,
    n_subsets: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Seed plus C-1 of the other K-1 neighbours; repeated seeds get distinct subsets.

    Repeats (oversampling) draw each seed's subsets without replacement. Where that table of
    subsets is small (or a seed takes many of its entries) a random permutation of it per
    seed, made for blocks of seeds so memory stays near ``_MAX_ENUMERATED_ENTRIES``; where it
    is large, random subsets with the rare repeats of a seed drawn again, since permuting a
    huge table per seed took minutes (K = 26 at gridsize 3: a million subsets per seed).
    """
    g, k = members.shape
    repetition = np.arange(g) // m  # 0 for the first pass over the seeds, 1 for the next ...
    repeats = int(repetition.max()) + 1
    if repeats == 1:
        cols = _random_columns(rng, g, k, c)
    elif m * n_subsets <= _MAX_ENUMERATED_ENTRIES or n_subsets <= max(64, 2 * repeats):
        cols = _permuted_table_columns(seeds, repetition, m, k, c, n_subsets, rng)
    else:
        cols = _distinct_random_columns(seeds, rng, g, k, c)
    cols = np.sort(cols, axis=1)  # nearest-first order within a group
    chosen = np.take_along_axis(members, cols, axis=1)
    return np.concatenate([members[:, :1], chosen], axis=1)


def _random_columns(rng: np.random.Generator, g: int, k: int, c: int) -> np.ndarray:
    """(g, c-1) random distinct columns in 1..k-1 per row."""
    return 1 + np.argsort(rng.random((g, k - 1)), axis=1)[:, : c - 1]


def _permuted_table_columns(
    seeds: np.ndarray,
    repetition: np.ndarray,
    m: int,
    k: int,
    c: int,
    n_subsets: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Repeat r of seed s takes entry r of a random permutation of all subsets, per seed."""
    import itertools

    table = np.array(list(itertools.combinations(range(1, k), c - 1)), dtype=np.int64)
    picks = np.empty(len(seeds), dtype=np.int64)
    block = max(1, _MAX_ENUMERATED_ENTRIES // n_subsets)
    for start in range(0, m, block):
        stop = min(start + block, m)
        order = np.argsort(rng.random((stop - start, n_subsets)), axis=1)
        rows = np.flatnonzero((seeds >= start) & (seeds < stop))
        picks[rows] = order[seeds[rows] - start, repetition[rows]]
    return table[picks]


def _distinct_random_columns(
    seeds: np.ndarray, rng: np.random.Generator, g: int, k: int, c: int
) -> np.ndarray:
    """Random subsets, a seed's repeated subset drawn again until each seed's are distinct.

    Used where a seed takes fewer than half its subsets, so each round redraws fewer than
    half of the repeats still colliding and the loop ends after a few rounds.
    """
    cols = np.sort(_random_columns(rng, g, k, c), axis=1)
    while True:
        keyed = np.concatenate([seeds[:, None], cols], axis=1)
        _, first = np.unique(keyed, axis=0, return_index=True)
        again = np.ones(g, dtype=bool)
        again[first] = False
        if not again.any():
            return cols
        cols[again] = np.sort(_random_columns(rng, int(again.sum()), k, c), axis=1)
