"""A scan made ready for the network: normalised inputs, groups, scales, probe, mask.

Training and inference both go through ``prepare_scan`` so the three scales of
PTYCHOPINN.md section 2 are computed in one place and never mixed:
input normalisation ``a`` (network input = a * amplitude), the physics scale ``s`` (used only
by the Poisson loss), and the probe normalisation (applied by ``physics.normalize_probe``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import DataConfig, GridConfig
from .data import PtychoData
from .grouping import Groups, group_positions
from .physics import input_normalization_factor, intensity_scale, normalize_probe

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class PreparedScan:
    """Network-ready arrays for one scan (all per-pattern arrays indexed like the scan)."""

    inputs: np.ndarray  # (M, N, N) float32 normalised amplitudes X = a * x, bad pixels zero
    groups: Groups
    input_scale: float  # a
    intensity_scale: float  # s: (s * X)^2 are counts
    nphotons: float  # mean counts per pattern the loss assumes
    probe: np.ndarray  # (modes, N, N) complex64, normalised once
    bad_pixels: np.ndarray | None  # (N, N) bool, True = excluded from the loss

    @property
    def n_groups(self) -> int:
        return self.groups.n_groups

    def group_inputs(self, rows: slice | np.ndarray) -> np.ndarray:
        """(G, C, N, N) network inputs of the groups at ``rows``."""
        return self.inputs[self.groups.indices[rows]]


def prepare_scan(
    data: PtychoData,
    grid: GridConfig,
    data_config: DataConfig,
    *,
    n_groups: int | None = None,
    input_scale: float | None = None,
    with_physics: bool = True,
    role: str = "training",
) -> PreparedScan:
    """Normalise and group a scan for a network of geometry ``grid``.

    ``with_physics=False`` (inference): the scan's probe and photon count enter only the loss,
    so they are not prepared (``probe`` is the scan's as given, ``nphotons`` and
    ``intensity_scale`` are NaN); a scan with a zero or odd probe, which inference never uses,
    is then reconstructed instead of refused.

    ``input_scale``: reuse a stored normalisation (``input_normalization = "stored"``) instead
    of recomputing it from this scan (the default, since dose varies between scans).

    With physics (training) at gridsize > 1, groups with a member more than N px from their
    centre are left out, with a warning naming ``role`` (what the groups were for).
    """
    if data.N != grid.N:
        raise ValueError(
            f"diff3d: found patterns of size {data.N}, expected N = {grid.N} (the model's patch "
            "size); crop or bin the detector data, or train a model for this size"
        )
    _refuse_collapsed_positions(data)
    # One new array of the scan's size (the inputs), however the scan arrives: each step
    # below used to make a float32 copy and then another (2-3x the scan at the peak).
    amplitudes = data.amplitudes
    masked = data.bad_pixels is not None and data.bad_pixels.any()
    if masked:
        amplitudes = np.where(data.bad_pixels[None], np.float32(0.0), amplitudes)
        amplitudes = amplitudes.astype(np.float32, copy=False)
    if input_scale is None or data_config.input_normalization == "recompute":
        input_scale = input_normalization_factor(amplitudes)
    if masked:  # the masked copy is ours: scale it in place
        inputs = np.multiply(amplitudes, np.float32(input_scale), out=amplitudes)
    else:
        inputs = np.multiply(amplitudes, np.float32(input_scale), dtype=np.float32)
    if with_physics:
        # On the kept pixels (mean_photons): the loss compares (s * X)^2 with the counts there.
        nphotons = data_config.nphotons if data_config.nphotons is not None else data.mean_photons()
        if not nphotons > 0:
            raise ValueError("diff3d: the patterns hold no counts; nothing to reconstruct")
        probe = prepared_probe(data.probe, data_config.probe_scale)
        scale = intensity_scale(inputs, nphotons)
    else:
        nphotons, probe, scale = math.nan, data.probe, math.nan
    groups = group_positions(
        data.xcoords,
        data.ycoords,
        grid.gridsize,
        grid.neighbor_count,
        n_groups=data_config.n_groups if n_groups is None else n_groups,
        seed=data_config.seed,
    )
    if with_physics and groups.channels > 1:
        groups = _without_scattered_groups(groups, grid.N, role=role)
    return PreparedScan(
        inputs=inputs,
        groups=groups,
        input_scale=float(input_scale),
        intensity_scale=scale,
        nphotons=float(nphotons),
        probe=probe.astype(np.complex64),
        bad_pixels=None if data.bad_pixels is None else data.bad_pixels.copy(),
    )


def prepared_probe(probe: np.ndarray, probe_scale: float) -> np.ndarray:
    """The probe as the physics uses it: normalised (``physics.normalize_probe``), complex64.

    Training calls it again for a probe refined after the scan was prepared.
    """
    tensor = torch.from_numpy(np.asarray(probe))
    return normalize_probe(tensor, probe_scale).numpy().astype(np.complex64)


def _scattered(groups: Groups, n: int) -> np.ndarray:
    """(G,) bool: the group has a member more than ``n`` px (per axis) from its centre."""
    return np.abs(groups.offsets).max(axis=(1, 2)) > n


def _refuse_collapsed_positions(data: PtychoData) -> None:
    """Refuse a scan whose positions all lie within one pixel (positions in metres or nm
    divided the wrong way): every patch would be stacked on one spot, without an error."""
    if data.n_patterns < 2:
        return
    span = max(float(np.ptp(data.xcoords)), float(np.ptp(data.ycoords)))
    if span < 1.0:
        raise ValueError(
            f"xcoords/ycoords: the {data.n_patterns} positions span {span:.3g} object pixels, "
            "expected a scan spanning at least one pixel; positions must be in object pixels "
            "(a scan in metres spans about 1e-6): divide them by the object's pixel size"
        )


def _without_scattered_groups(
    groups: Groups, n: int, quiet: bool = False, role: str = "training"
) -> Groups:
    """Training groups whose members lie within ``n`` pixels of their centroid (per axis);
    ``quiet``: without the warning (the scan's stray positions have been reported already).

    Why: a member farther off shares no object with the others, so the overlap merge cannot
    constrain it, and the merge canvas of its whole batch grows to reach it (a stray position
    3,000 px away asked for 8.5 GB per batch). Such groups come from isolated positions.
    """
    scattered = _scattered(groups, n)
    if not scattered.any():
        return groups
    if scattered.all():
        least = float(np.abs(groups.offsets).max(axis=(1, 2)).min())
        raise ValueError(
            f"xcoords/ycoords: every group has a member more than N = {n} px from the group's "
            f"centre (the least {least:.0f} px), so its patches barely overlap; use gridsize 1 "
            "for so sparse a scan"
        )
    if quiet:
        return groups.take(~scattered)
    seeds = groups.positions[scattered, 0]
    logger.warning(
        "%d of %d groups left out of %s: each has a member more than N = %d px from the "
        "group's centre (isolated positions; groups seeded at (x, y) = %s); check the scan for "
        "stray positions",
        int(scattered.sum()),
        groups.n_groups,
        role,
        n,
        ", ".join(f"({x:.0f}, {y:.0f})" for x, y in seeds[:3]),
    )
    return groups.take(~scattered)


class GroupDataset(Dataset):
    """Groups of a prepared scan as tensors: inputs (C,N,N), offsets (C,2) [, targets].

    ``targets`` (supervised mode): complex object patches (M, N, N) at each pattern's position,
    gathered per group like the inputs.
    """

    def __init__(
        self,
        scan: PreparedScan,
        rows: np.ndarray | None = None,
        targets: np.ndarray | None = None,
    ) -> None:
        self._rows = np.arange(scan.n_groups) if rows is None else np.asarray(rows)
        indices = scan.groups.indices[self._rows]
        self._inputs = torch.from_numpy(scan.inputs)
        self._indices = torch.from_numpy(indices)
        self._offsets = torch.from_numpy(scan.groups.offsets[self._rows].astype(np.float32))
        self._targets = None if targets is None else torch.from_numpy(targets)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        members = self._indices[item]
        sample = {"inputs": self._inputs[members], "offsets": self._offsets[item]}
        if self._targets is not None:
            sample["targets"] = self._targets[members]
        return sample


def split_rows(n_groups: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of group rows (at least one validation group)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    n_val = max(1, int(round(fraction * n_groups))) if n_groups > 1 and fraction > 0 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def split_for_validation(
    scan: PreparedScan, data: PtychoData, grid: GridConfig, data_config: DataConfig
) -> tuple[PreparedScan, np.ndarray, np.ndarray]:
    """Hold out ``validation_fraction`` of the scan for validation: (scan, train rows, val rows).

    At gridsize 1 a group is one pattern, so a seeded random split of the groups is already
    disjoint. At gridsize > 1 it is not: neighbouring groups share patterns, and a random 5%
    of the groups has ~98% of its patterns in training groups (Run1084, gridsize 2), so its
    loss tracks the training loss and early stopping or the best-validation weights learn
    nothing about generalisation. There the held-out part is a compact patch of the scan
    (the positions nearest to a seeded random one, ``validation_fraction`` of them but at
    least ``neighbor_count``), and each part is grouped on its own, so no pattern is in both.
    The returned scan carries the training groups first, then the validation groups.
    When the scan is too small to leave ``neighbor_count`` positions on each side, or
    ``n_groups`` is 1, there is no validation set (the caller warns and monitors the training
    loss).
    """
    fraction, seed = data_config.validation_fraction, data_config.seed
    if grid.gridsize == 1 or fraction <= 0:
        train_rows, val_rows = split_rows(scan.n_groups, fraction, seed)
        return scan, train_rows, val_rows
    no_validation = scan, np.arange(scan.n_groups), np.zeros(0, dtype=np.int64)
    x = np.asarray(data.xcoords, dtype=np.float64)
    y = np.asarray(data.ycoords, dtype=np.float64)
    m, k = x.shape[0], grid.neighbor_count
    n_val = max(int(round(fraction * m)), k)
    if m - n_val < k:
        return no_validation
    rng = np.random.default_rng(seed)
    centre = int(rng.integers(m))
    distance = np.hypot(x - x[centre], y - y[centre])
    held_out = np.sort(np.argsort(distance, kind="stable")[:n_val])
    kept = np.setdiff1d(np.arange(m), held_out)
    requested = data_config.n_groups
    val_groups = 0 if requested == 0 else max(1, int(round(requested * n_val / m)))
    train_groups = 0 if requested == 0 else requested - val_groups
    if requested and train_groups < 1:  # n_groups = 1: nothing to spare for validation
        return no_validation
    parts = [
        _group_subset(x, y, kept, grid, train_groups, seed),
        _group_subset(x, y, held_out, grid, val_groups, seed),
    ]
    # As in prepare_scan (which has said where the stray positions are): no group whose
    # members lie too far apart to overlap, in either part.
    parts[0] = _without_scattered_groups(parts[0], grid.N, quiet=True)
    close = ~_scattered(parts[1], grid.N)
    if not close.any():  # held out around a stray position: validate on nothing
        return no_validation
    parts[1] = parts[1].take(close)
    groups = Groups(
        **{
            field.name: np.concatenate([getattr(part, field.name) for part in parts])
            for field in fields(Groups)
        }
    )
    n_train = parts[0].n_groups
    rows = np.arange(groups.n_groups)
    return replace(scan, groups=groups), rows[:n_train], rows[n_train:]


def _group_subset(
    x: np.ndarray, y: np.ndarray, subset: np.ndarray, grid: GridConfig, n_groups: int, seed: int
) -> Groups:
    """Groups formed among the positions ``subset`` only, indexed like the whole scan."""
    groups = group_positions(
        x[subset], y[subset], grid.gridsize, grid.neighbor_count, n_groups=n_groups, seed=seed
    )
    return replace(groups, seeds=subset[groups.seeds], indices=subset[groups.indices])
