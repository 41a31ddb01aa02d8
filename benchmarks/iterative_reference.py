"""Iterative reference reconstructions (not a test): what a per-scan solver gets from the same data.

Why this exists. The PINN numbers in docs/performance.md need two yardsticks that do not
depend on the network:

* **Run1084 (simulated)**: how close a plain iterative solver, fitting the object pixels
  directly to this very data through our own forward model, gets to the ground truth in the
  same region and metrics as ``quality.py``.
* **The measured Siemens star** (no ground truth): whether the converted file's conventions
  (position axes, pattern orientation, probe) agree with our forward model at all. The object
  is fitted once with the stored arrays and once under each plausible convention slip; the
  stored convention must fit the data best, and its image must show the star. If it does
  not, a PINN failure on this file is a data problem, not a training one. Then the stored
  reading is fitted once more with the probe refined (the engine's ``refine_probe``, 1 and 3
  incoherent modes): the drop in misfit is how much of it the stored probe causes.

The solver: object-only gradient descent (Adam) on the complex object pixels, the file's probe
fixed (scaled so that a unit object carries the data's mean pattern energy), patches
extracted bilinearly at the real sub-pixel positions exactly as the simulator does, the
engine's own far-field amplitude (``physics.predicted_amplitude``), an amplitude least-squares
loss, a cosine learning-rate decay. Deliberately simple: no probe refinement (except in the
rows that say so), no position correction, so its figures are a floor for an iterative
method, not what a full solver reaches.

    .venv/bin/python benchmarks/iterative_reference.py               # both cases
    .venv/bin/python benchmarks/iterative_reference.py --cases siemens --epochs 60

Reads ../shared/data/ and skips cleanly without it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ptychodus_torch_plugin.engine.data import PtychoData, load_npz, mean_pattern_power
from ptychodus_torch_plugin.engine.images import save_object_images
from ptychodus_torch_plugin.engine.inference import CanvasGeometry, stitch_patches
from ptychodus_torch_plugin.engine.metrics import evaluate, scanned_region
from ptychodus_torch_plugin.engine.physics import predicted_amplitude
from ptychodus_torch_plugin.engine.probe_refinement import (
    bilinear_patches,
    refine_probe,
    sample_grid,
)
from ptychodus_torch_plugin.engine.simulate import simulate_from_object_npz

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
RUN1084 = SHARED_DATA / "run1084_object_probe.npz"
SIEMENS = SHARED_DATA / "siemens_star_experimental.npz"
#: Incoherent probe modes of the refined-probe fit of the Siemens star (3: the misfit reaches
#: about the Poisson noise floor; 1 leaves ~1.6x that).
REFINED_MODES = 3


@dataclass(frozen=True)
class Convention:
    """One way of reading the file's arrays; ``stored`` reads them as they are."""

    name: str
    swap_positions: bool = False  # xcoords read as rows, ycoords as columns
    transpose_patterns: bool = False
    flip_patterns: bool = False  # both detector axes reversed
    conjugate_probe: bool = False
    transpose_probe: bool = False


CONVENTIONS = (
    Convention("stored"),
    Convention("positions swapped", swap_positions=True),
    Convention("patterns transposed", transpose_patterns=True),
    Convention("patterns flipped", flip_patterns=True),
    Convention("probe conjugated", conjugate_probe=True),
    Convention("probe transposed", transpose_probe=True),
    Convention("positions swapped, patterns transposed", True, True),
)


def read_as(data: PtychoData, convention: Convention) -> PtychoData:
    """``data`` with the convention's slips applied (the object guess is left as it is)."""
    amplitudes, probe = data.amplitudes, data.probe
    if convention.transpose_patterns:
        amplitudes = np.ascontiguousarray(np.swapaxes(amplitudes, -1, -2))
    if convention.flip_patterns:
        amplitudes = np.ascontiguousarray(amplitudes[..., ::-1, ::-1])
    if convention.conjugate_probe:
        probe = np.conj(probe)
    if convention.transpose_probe:
        probe = np.ascontiguousarray(np.swapaxes(probe, -1, -2))
    x, y = (
        (data.ycoords, data.xcoords) if convention.swap_positions else (data.xcoords, data.ycoords)
    )
    return replace(data, amplitudes=amplitudes, probe=probe, xcoords=x, ycoords=y)


def fit_object(
    data: PtychoData,
    shape: tuple[int, int],
    epochs: int,
    learning_rate: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Object (H, W) fitted to ``data`` by gradient descent, and the last epoch's loss per pattern.

    The loss is the summed squared amplitude difference per pattern (Gaussian noise on
    amplitudes, the usual least-squares target of iterative solvers).
    """
    n = data.N
    x = torch.from_numpy(np.asarray(data.xcoords, np.float64))
    y = torch.from_numpy(np.asarray(data.ycoords, np.float64))
    rows, cols = sample_grid(y, n), sample_grid(x, n)
    height, width = shape
    if int(rows[0].min()) < 0 or int(cols[0].min()) < 0:
        raise ValueError("fit_object: a patch starts left of or above the canvas; shift positions")
    if int(rows[0].max()) + 2 > height or int(cols[0].max()) + 2 > width:
        raise ValueError(f"fit_object: canvas {shape} too small for the positions")
    measured = torch.from_numpy(data.amplitudes).float()
    probe = torch.from_numpy(data.probe).to(torch.complex64)
    # A unit object then carries the data's mean pattern energy (Parseval, orthonormal FFT).
    energy = mean_pattern_power(data.amplitudes)
    probe = probe * math.sqrt(energy / float(probe.abs().square().sum()))
    obj = torch.ones(height, width, dtype=torch.complex64, requires_grad=True)
    optimizer = torch.optim.Adam([obj], lr=learning_rate)
    steps_per_epoch = math.ceil(len(measured) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=epochs * steps_per_epoch, eta_min=learning_rate / 100
    )
    generator = torch.Generator().manual_seed(seed)
    loss_per_pattern = math.nan
    for _ in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(measured), generator=generator).split(batch_size):
            patches = bilinear_patches(
                obj, (rows[0][batch], rows[1][batch]), (cols[0][batch], cols[1][batch])
            )
            predicted = predicted_amplitude(patches[:, None], probe)[:, 0]
            loss = (predicted - measured[batch]).square().sum(dim=(-2, -1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        loss_per_pattern = total / len(measured)
    return obj.detach().numpy(), loss_per_pattern


def scanned_mask(
    data: PtychoData, shape: tuple[int, int], origin: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """The region quality.py scores: the stitcher's covered pixels, eroded by N/8.

    ``origin``: object-pixel position (x, y) of the canvas's pixel (0, 0).
    """
    height, width = shape
    positions = np.stack([data.xcoords, data.ycoords], axis=-1)
    ones = np.ones((len(positions), data.N, data.N), np.complex64)
    canvas = CanvasGeometry(origin[0], origin[1], width, height)
    weights = stitch_patches(ones, positions, data.N, data.probe[0], canvas=canvas).weights
    return scanned_region(weights, erode=data.N // 8)


def file_canvas(data: PtychoData) -> tuple[int, int]:
    """A square canvas in the file's own frame, from the origin to past the farthest patch."""
    extent = int(math.ceil(max(data.xcoords.max(), data.ycoords.max()) + data.N / 2)) + 2
    return extent, extent


def run_run1084(args: argparse.Namespace) -> list[dict]:
    results = []
    for photons in args.photons:
        data = simulate_from_object_npz(RUN1084, nphotons=photons, seed=1)
        shape = data.object_guess.shape
        start = time.perf_counter()
        obj, loss = fit_object(data, shape, args.epochs)
        seconds = time.perf_counter() - start
        quality = evaluate(obj, data.object_guess, scanned_mask(data, shape))
        name = f"run1084_{photons:.0e}".replace("+0", "")
        result = {
            "case": name,
            "epochs": args.epochs,
            "seconds": round(seconds, 1),
            "loss_per_pattern": round(loss, 1),
            **{k: round(v, 4) for k, v in quality.to_dict().items()},
        }
        print(f"  {json.dumps(result)}", flush=True)
        results.append(result)
    return results


def run_siemens(args: argparse.Namespace) -> list[dict]:
    data = load_npz(SIEMENS)
    shape = file_canvas(data)
    results = []
    for convention in CONVENTIONS:
        start = time.perf_counter()
        obj, loss = fit_object(read_as(data, convention), shape, args.epochs)
        result = {
            "case": "siemens_star",
            "convention": convention.name,
            "epochs": args.epochs,
            "seconds": round(time.perf_counter() - start, 1),
            "loss_per_pattern": round(loss, 1),
        }
        print(f"  {json.dumps(result)}", flush=True)
        results.append(result)
        if convention.name == "stored" and args.images is not None:
            mask = scanned_mask(data, shape)
            save_object_images(
                obj,
                args.images,
                mask=mask,
                prefix="siemens_star_iterative",
                title="Siemens star, iterative reference",
            )
    best = min(results, key=lambda r: r["loss_per_pattern"])
    print(f"  best-fitting convention: {best['convention']}", flush=True)
    # The stored reading with the probe fitted too (the engine's probe refinement, which the
    # PINN training uses with `probe_refinement_epochs`): how much of the misfit the probe is.
    for modes in (1, REFINED_MODES):
        start = time.perf_counter()
        refined = refine_probe(data, args.epochs, modes)
        result = {
            "case": "siemens_star",
            "convention": f"stored, probe refined ({modes} mode{'s' if modes > 1 else ''})",
            "epochs": args.epochs,
            "seconds": round(time.perf_counter() - start, 1),
            "loss_per_pattern": round(refined.misfit, 1),
            "loss_per_pattern_probe_fixed": round(refined.misfit_fixed_probe or math.nan, 1),
        }
        print(f"  {json.dumps(result)}", flush=True)
        results.append(result)
        if modes == REFINED_MODES and args.images is not None:
            mask = scanned_mask(data, refined.object.shape, refined.origin)
            save_object_images(
                refined.object,
                args.images,
                mask=mask,
                prefix="siemens_star_iterative_refined_probe",
                title="Iterative, refined probe",
            )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="run1084,siemens")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--photons", type=float, nargs="+", default=[1e6, 1e4])
    parser.add_argument("--images", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"machine: torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results: list[dict] = []
    for case in args.cases.split(","):
        path = {"run1084": RUN1084, "siemens": SIEMENS}.get(case)
        if path is None:
            parser.error(f"--cases: unknown case {case!r}; allowed: run1084, siemens")
        if not path.exists():
            print(f"SKIP: {path} not found")
            continue
        print(f"== {case}", flush=True)
        results += run_run1084(args) if case == "run1084" else run_siemens(args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
