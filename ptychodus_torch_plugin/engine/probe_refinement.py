"""Probe refinement before training: fit the probe (and incoherent modes) to the scan itself.

Why this exists. The PINN's forward model multiplies every object patch by a *fixed* probe;
if that probe is not the one that illuminated this scan (a probe from another scan, another
defocus, or a solver that stored a different plane), no network can explain the patterns and
training learns a lattice of nearly identical patches. The measured Siemens star in
``../shared/data`` is such a case: with its stored probe an object-only fit leaves 48,763 per
pattern of amplitude misfit; the same fit with the probe refined leaves 5,307, and with three
incoherent modes 3,961, about the Poisson noise floor (100 epochs each; docs/performance.md).
A PINN trained with the refined probe reconstructs the star; with the stored one it does not.

How. A short per-scan gradient descent (Adam) on the complex object pixels of a canvas that
covers the scan *and* on the probe modes, through the same bilinear sub-pixel sampling as the
simulator (``simulate.extract_patches``) and the engine's far-field amplitude
(``physics.predicted_amplitude``), with an amplitude least-squares loss that skips bad
pixels. The probe is held fixed for the first fifth of the epochs, so the object takes up
what the old probe already explains before the probe moves. Only the probe is kept: the
object is a by-product (the network reconstructs the object; this step only calibrates the
illumination it is trained with).

Limits: gradient descent from the given probe finds a nearby one. On a simulated zone-plate
probe a defocus error of 1.5 rad of quadratic phase at the aperture edge is refined to the
noise floor; one of 3 rad is not (the misfit falls 1.6x and stalls). A probe that far off
needs a better start (another solver, or a propagation search), not more epochs.

Cost on the 2-core CI CPU: 0.8 s per epoch for the 516 Siemens star patterns (N = 128), 1.5 s
with 3 modes. Training runs it on its own device (a GPU when it trains on one).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .cancel import CancelToken
from .config import MAX_PROBE_MODES, _check_int, _check_real
from .data import PtychoData
from .inference import refuse_huge_canvas
from .physics import predicted_amplitude

logger = logging.getLogger(__name__)

__all__ = ["ProbeRefinement", "bilinear_patches", "refine_probe", "sample_grid"]

#: Probe step relative to the object's, per unit of the probe's peak amplitude.
_PROBE_STEP = 0.2
#: Amplitude of the new modes' random start, relative to mode 0.
_NEW_MODE_AMPLITUDE = 0.3


@dataclass(frozen=True)
class ProbeRefinement:
    """The refined probe and how well it explains the data.

    ``misfit_per_pattern`` holds one value per finished epoch: the summed squared amplitude
    difference per pattern (the first ``fixed_epochs`` with the probe fixed at its start: the
    given modes, plus any new ones at their random start; the rest with the probe refined),
    so its drop is what refining the probe bought.
    """

    probe: np.ndarray  # (modes, N, N) complex64, scaled so a unit object carries the data's energy
    misfit_per_pattern: tuple[float, ...]
    fixed_epochs: int
    #: The object fitted alongside (H, W) complex64, and the object-pixel position (x, y) of its
    #: pixel (0, 0): a by-product, kept for diagnostics and the iterative yardstick.
    object: np.ndarray
    origin: tuple[float, float]
    cancelled: bool = False

    @property
    def epochs(self) -> int:
        return len(self.misfit_per_pattern)

    @property
    def misfit_fixed_probe(self) -> float | None:
        """Misfit at the end of the fixed-probe epochs (None when there were none)."""
        if self.fixed_epochs == 0 or self.epochs < self.fixed_epochs:
            return None
        return self.misfit_per_pattern[self.fixed_epochs - 1]

    @property
    def misfit(self) -> float:
        return self.misfit_per_pattern[-1] if self.misfit_per_pattern else math.nan

    def summary(self) -> dict[str, object]:
        """JSON-ready figures (no arrays): for training summaries and benchmark reports."""
        fixed = self.misfit_fixed_probe
        return {
            "epochs": self.epochs,
            "modes": int(self.probe.shape[0]),
            "fixed_epochs": self.fixed_epochs,
            "misfit_per_pattern_probe_fixed": None if fixed is None else round(fixed, 1),
            "misfit_per_pattern_refined": round(self.misfit, 1) if self.epochs else None,
            "cancelled": self.cancelled,
        }


def sample_grid(positions: Tensor, n: int, origin: float = 0.0) -> tuple[Tensor, Tensor]:
    """Lower sample index (M, n) and upper-neighbour weight (M, n) along one axis.

    The simulator's convention (``simulate.extract_patches``): pixel j of a patch centred at
    ``p`` samples the object at ``p - n/2 + j``, here on a canvas whose pixel 0 is at ``origin``.
    """
    coords = positions[:, None] - origin - n / 2.0 + torch.arange(n, dtype=positions.dtype)
    lower = torch.floor(coords)
    return lower.long(), (coords - lower).float()


def bilinear_patches(
    obj: Tensor, rows: tuple[Tensor, Tensor], cols: tuple[Tensor, Tensor]
) -> Tensor:
    """Bilinear patches (M, n, n) of the canvas ``obj`` from :func:`sample_grid` samples.

    Differentiable in ``obj`` (the numpy simulator is not, which is why this twin exists; a
    test pins the two to agree).
    """
    (r, wr), (c, wc) = rows, cols
    r, wr = r[:, :, None], wr[:, :, None]
    c, wc = c[:, None, :], wc[:, None, :]
    top = obj[r, c] * (1 - wc) + obj[r, c + 1] * wc
    bottom = obj[r + 1, c] * (1 - wc) + obj[r + 1, c + 1] * wc
    return top * (1 - wr) + bottom * wr


def _check(
    epochs: int, modes: int, learning_rate: float, batch_size: int, probe_fixed_share: float
) -> None:
    owner = "refine_probe"
    _check_int(owner, "epochs", epochs, 1)
    _check_int(owner, "modes", modes, 0, MAX_PROBE_MODES)
    _check_int(owner, "batch_size", batch_size, 1)
    _check_real(owner, "learning_rate", learning_rate, 0.0, exclusive_minimum=True)
    _check_real(owner, "probe_fixed_share", probe_fixed_share, 0.0, maximum=1.0)


def _starting_modes(probe: np.ndarray, modes: int, seed: int) -> np.ndarray:
    """The data's modes, truncated to ``modes`` or extended by seeded random copies of mode 0."""
    present = probe.shape[0]
    if modes == 0 or modes == present:
        return probe.copy()
    if modes < present:
        return probe[:modes].copy()
    rng = np.random.default_rng(seed)
    shape = (modes - present, *probe.shape[1:])
    noise = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    extra = probe[0] * noise * (_NEW_MODE_AMPLITUDE / math.sqrt(2.0))
    return np.concatenate([probe, extra.astype(np.complex64)])


def refine_probe(
    data: PtychoData,
    epochs: int,
    modes: int = 0,
    *,
    learning_rate: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    probe_fixed_share: float = 0.2,
    cancel: CancelToken | None = None,
    device: str | torch.device = "cpu",
) -> ProbeRefinement:
    """Fit the probe of ``data`` (``modes`` incoherent modes; 0 keeps the data's count).

    ``probe_fixed_share``: the share of the epochs with the probe held at its start, so the
    object takes up what that probe already explains first; 1.0 fits the object only (the
    iterative yardstick's fixed-probe fits). ``cancel`` is checked every batch; a cancelled
    refinement returns the probe as it stands. ``device``: where the fit runs (training passes
    its own, so a GPU run refines on the GPU); the batch order is drawn on the CPU, so the
    same seed visits the patterns in the same order everywhere.
    """
    _check(epochs, modes, learning_rate, batch_size, probe_fixed_share)
    device = torch.device(device)
    n = data.N
    x = torch.from_numpy(np.asarray(data.xcoords, np.float64))
    y = torch.from_numpy(np.asarray(data.ycoords, np.float64))
    # A canvas covering every patch with its +1 bilinear neighbour, whatever the coordinates.
    origin_x = math.floor(float(x.min()) - n / 2) - 1
    origin_y = math.floor(float(y.min()) - n / 2) - 1
    width = math.ceil(float(x.max()) + n / 2 - origin_x) + 2
    height = math.ceil(float(y.max()) + n / 2 - origin_y) + 2
    refuse_huge_canvas(np.stack([x.numpy(), y.numpy()], axis=-1), width, height)
    rows = tuple(t.to(device) for t in sample_grid(y, n, origin_y))
    cols = tuple(t.to(device) for t in sample_grid(x, n, origin_x))

    measured = torch.from_numpy(data.amplitudes).to(device)
    keep = None
    if data.bad_pixels is not None and data.bad_pixels.any():
        keep = torch.from_numpy(~data.bad_pixels).float().to(device)
    start = _starting_modes(np.asarray(data.probe, np.complex64), modes, seed)
    # Scaled so that a unit object carries the data's mean pattern energy (orthonormal FFT).
    power = float(np.square(np.abs(start)).sum())
    if not power > 0:
        raise ValueError("probeGuess: the probe is zero everywhere; nothing to refine")
    start = start * math.sqrt(data.mean_photons() / power)
    probe = torch.from_numpy(start.astype(np.complex64)).to(device).requires_grad_(True)
    obj = torch.ones(height, width, dtype=torch.complex64, device=device, requires_grad=True)
    probe_rate = learning_rate * _PROBE_STEP * float(probe.detach().abs().max())
    optimizer = torch.optim.Adam(
        [{"params": [obj], "lr": learning_rate}, {"params": [probe], "lr": probe_rate}]
    )
    steps_per_epoch = math.ceil(data.n_patterns / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=epochs * steps_per_epoch, eta_min=learning_rate / 100
    )
    # At least one epoch with the probe fixed once there are two: the object gets a start
    # before the probe moves, and the log has the fixed-probe misfit to compare with.
    fixed_epochs = int(epochs * probe_fixed_share)
    if epochs >= 2 and probe_fixed_share > 0:
        fixed_epochs = max(1, fixed_epochs)
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    cancelled = False
    for epoch in range(epochs):
        total = torch.zeros((), dtype=torch.float64, device=device)  # no sync per batch
        order = torch.randperm(data.n_patterns, generator=generator).to(device)
        for batch in order.split(batch_size):
            if cancel is not None and cancel.cancelled:
                cancelled = True
                break
            patches = bilinear_patches(
                obj, (rows[0][batch], rows[1][batch]), (cols[0][batch], cols[1][batch])
            )
            illumination = probe if epoch >= fixed_epochs else probe.detach()
            predicted = predicted_amplitude(patches[:, None], illumination)[:, 0]
            residual = (predicted - measured[batch]).square()
            if keep is not None:
                residual = residual * keep
            loss = residual.sum(dim=(-2, -1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach() * len(batch)
        if cancelled:
            break
        history.append(float(total) / data.n_patterns)
    refined = probe.detach().cpu().numpy().astype(np.complex64)
    if not np.all(np.isfinite(refined)):
        raise ValueError(
            f"probe_refinement_epochs = {epochs}: the probe refinement diverged (the probe is "
            "no longer finite); train without it (0), or start from a better probe "
            "(Ptychodus's Probe view)"
        )
    result = ProbeRefinement(
        probe=refined,
        misfit_per_pattern=tuple(history),
        fixed_epochs=fixed_epochs,
        object=obj.detach().cpu().numpy(),
        origin=(float(origin_x), float(origin_y)),
        cancelled=cancelled,
    )
    logger.info(
        "probe refinement: %d mode(s), %d epoch(s)%s; amplitude misfit per pattern %s after %d "
        "epoch(s) with the probe fixed at its start, %.6g refined",
        result.probe.shape[0],
        result.epochs,
        " (cancelled)" if cancelled else "",
        "-" if result.misfit_fixed_probe is None else f"{result.misfit_fixed_probe:.6g}",
        fixed_epochs,
        result.misfit,
    )
    return result
