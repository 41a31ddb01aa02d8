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

The solver: the engine's ``refine_probe`` with the probe held for every epoch, i.e.
object-only gradient descent (Adam) on the complex object pixels, the file's probe fixed
(scaled so that a unit object carries the data's mean pattern energy), patches extracted
bilinearly at the real sub-pixel positions exactly as the simulator does, the
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

import _checkout  # noqa: F401  (this checkout's code, not the venv's copy)
import numpy as np
import torch

from ptychodus_torch_plugin.engine.data import PtychoData, load_npz
from ptychodus_torch_plugin.engine.images import save_object_images
from ptychodus_torch_plugin.engine.inference import CanvasGeometry, stitch_patches
from ptychodus_torch_plugin.engine.metrics import evaluate, scanned_region
from ptychodus_torch_plugin.engine.probe_refinement import (
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

    The engine's probe refinement with the probe held at the file's for every epoch
    (``probe_fixed_share`` 1.0): Adam on the object pixels, the summed squared amplitude
    difference per pattern as the loss (Gaussian noise on amplitudes, the usual least-squares
    target of iterative solvers). Its canvas is placed into the (H, W) frame whose pixel
    (0, 0) is object position (0, 0); pixels no patch reaches stay 1.
    """
    n = data.N
    rows = sample_grid(torch.from_numpy(np.asarray(data.ycoords, np.float64)), n)[0]
    cols = sample_grid(torch.from_numpy(np.asarray(data.xcoords, np.float64)), n)[0]
    height, width = shape
    if int(rows.min()) < 0 or int(cols.min()) < 0:
        raise ValueError("fit_object: a patch starts left of or above the canvas; shift positions")
    if int(rows.max()) + 2 > height or int(cols.max()) + 2 > width:
        raise ValueError(f"fit_object: canvas {shape} too small for the positions")
    fit = refine_probe(
        data,
        epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seed=seed,
        probe_fixed_share=1.0,
    )
    frame = np.ones(shape, np.complex64)
    left, top = int(fit.origin[0]), int(fit.origin[1])  # frame pixel of the canvas's (0, 0)
    r0, c0 = max(top, 0), max(left, 0)
    r1 = min(top + fit.object.shape[0], height)
    c1 = min(left + fit.object.shape[1], width)
    frame[r0:r1, c0:c1] = fit.object[r0 - top : r1 - top, c0 - left : c1 - left]
    return frame, fit.misfit


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
    parser.add_argument(
        "--images",
        type=lambda text: None if text.strip().lower() == "none" else Path(text),
        default=REPO / "docs" / "images",
        help="where the Siemens star images go (default: docs/images, the committed figures "
        "of 100-epoch fits: give another folder, or 'none', for experiments)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"machine: torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results: list[dict] = []
    files = {"run1084": RUN1084, "siemens": SIEMENS}
    cases = args.cases.split(",")
    unknown = [case for case in cases if case not in files]
    if unknown:  # before the earlier cases run
        parser.error(f"--cases: unknown case(s) {', '.join(unknown)}; allowed: run1084, siemens")
    for case in cases:
        path = files[case]
        if not path.exists():
            print(f"SKIP: {path} not found")
            continue
        print(f"== {case}", flush=True)
        results += run_run1084(args) if case == "run1084" else run_siemens(args)
        if args.json is not None:  # after every case: a later failure keeps the finished ones
            args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
