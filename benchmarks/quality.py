"""Reconstruction quality benchmark (not a test): SSIM / PSNR / FRC50 against ground truth.

Cases: the real Run1084 object and probe at their 1,087 real scan positions, simulated by our
simulator at 1e6 and 1e4 photons, gridsize 1 and 2, trained on this machine within a time
budget; the real measured Siemens star (516 frames, N = 128, no ground truth), trained after
the engine's probe refinement (the file's probe does not fit this measurement; 50 epochs,
3 modes, inside the budget), whose amplitude and phase images are saved under docs/images/;
and a simulated copy of that star (same probe, positions and counts; the iterative reference
of ``iterative_reference.py`` as its object), scored against that object.

Run:  .venv/bin/python benchmarks/quality.py [--cases run1084-g2-1e6,...] [--budget-minutes 15]
Skips cleanly (exit 0) when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import _checkout  # noqa: F401  (this checkout's code, not the venv's copy)
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ptychodus_torch_plugin.engine.archive import save_archive
from ptychodus_torch_plugin.engine.config import OPTIMIZERS
from ptychodus_torch_plugin.engine.images import save_object_images
from ptychodus_torch_plugin.engine.inference import CanvasGeometry, reconstruct, stitch_patches
from ptychodus_torch_plugin.engine.metrics import QualityMetrics, evaluate, scanned_region
from ptychodus_torch_plugin.engine.module import cosine_decay
from ptychodus_torch_plugin.engine.payload import create_training_payload
from ptychodus_torch_plugin.engine.simulate import extract_patches, simulate_from_object_npz
from ptychodus_torch_plugin.engine.training import CancelToken, TrainingResult, train

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
RUN1084 = SHARED_DATA / "run1084_object_probe.npz"
SIEMENS = SHARED_DATA / "siemens_star_experimental.npz"
#: Epochs of the iterative yardstick of the measured star (``run_siemens``; its incoherent
#: modes are ``iterative_reference.REFINED_MODES``).
SIEMENS_REFERENCE_EPOCHS = 50
ALL_CASES = (
    "run1084-g2-1e6",
    "run1084-g1-1e6",
    "run1084-g2-1e4",
    "run1084-g1-1e4",
    "siemens-g1",
    "siemens-sim-g1",
)


def _native_bf16_precision() -> str:
    """bf16-mixed where bfloat16 is computed in hardware, else 32-true.

    On this project's CI machine (AMX) a training step of the benchmark network is ~1.6x
    faster in bf16-mixed at equal quality per epoch (docs/performance.md); a CPU without
    bfloat16 units would emulate it and run slower, so there it stays float32.
    """
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "32-true"
    return "bf16-mixed" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "32-true"


class _Budget:
    """Observer that cancels training once the wall-clock budget is spent."""

    def __init__(self, seconds: float, token: CancelToken) -> None:
        self.deadline = time.perf_counter() + seconds
        self.token = token

    def on_batch_end(self, epoch: int, batch: int, batches: int, loss: float) -> None:
        if time.perf_counter() > self.deadline:
            self.token.cancel()

    def on_epoch_end(self, record) -> None:  # noqa: ANN001 - EpochRecord
        val = "-" if record.val_loss is None else f"{record.val_loss:.2f}"
        print(
            f"    epoch {record.epoch:3d}  train {record.train_loss:10.2f}  val {val:>10}  "
            f"lr {record.learning_rate:.2e}  {record.seconds:5.1f} s",
            flush=True,
        )


def _payload(data, overrides: dict):  # noqa: ANN001, ANN202
    return create_training_payload(
        {
            "N": data.N,
            "accelerator": "auto",
            "logger": "none",
            "enable_progress_bar": False,
            **overrides,
        }
    )


class _TimeCosine(Callback):
    """The engine's cosine schedule (10% linear warm-up, decay to 5%) keyed on wall time.

    Why: the benchmark's limit is minutes, not epochs. An epoch-keyed schedule sized in
    advance either stops before its small learning rates (72 of 90 epochs on a slow day) or
    ends early and leaves minutes unused (93 epochs in 12.3 of 15 minutes with bf16), since
    this machine's speed varies by up to 40%. Setting the rate before every batch from the
    elapsed fraction of the budget spends the whole schedule inside it. The budget runs from
    construction; what is left of it when the first epoch starts (after probe refinement,
    when asked for) is what the schedule spans.
    """

    def __init__(self, seconds: float, peak: float) -> None:
        self.deadline = time.perf_counter() + seconds
        self.seconds = seconds
        self.peak = peak
        self.start = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.start = time.perf_counter()
        self.seconds = max(self.deadline - self.start, 1e-3)
        # The first batch's rate, set now: the engine's history reads the rate at each
        # epoch's start, which for epoch 1 comes before the first batch would set it.
        self._set_rate(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._set_rate(trainer)

    def _set_rate(self, trainer) -> None:  # noqa: ANN001
        progress = min(1.0, (time.perf_counter() - self.start) / self.seconds)
        if progress < 0.1:
            factor = max(progress / 0.1, 0.01)
        else:
            factor = cosine_decay((progress - 0.1) / 0.9)
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = self.peak * factor


class _BestValidationWeights(Callback):
    """Keeps the weights of the epoch with the lowest validation NLL, and that epoch.

    Why: the benchmark hands over the last epoch's network (``final_weights = "last"``: the
    wall-time cosine ends at its lowest rate, so the last epoch is the most converged); the
    best-validation network, the engine's default choice, is scored beside it so the cost or
    gain of either choice stays measured.
    """

    def __init__(self) -> None:
        self.state: dict | None = None
        self.epoch: int | None = None
        self.value = float("inf")
        self.epochs = 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.epochs += 1
        value = trainer.callback_metrics.get("val_loss")
        if value is not None and float(value) < self.value:
            self.value, self.epoch = float(value), self.epochs
            self.state = copy.deepcopy(pl_module.autoencoder.state_dict())


class _WeightAverages(Callback):
    """Exponential moving averages of the weights (and batch-norm statistics), per batch.

    Why: averaging the last few hundred steps' weights removes some of the optimiser's noise
    that the schedule's lowest rate leaves; scored beside the handed-over network so whether
    it helps is measured, not assumed. One copy of the state and one foreach lerp per decay
    and step.
    """

    def __init__(self, decays: tuple[float, ...]) -> None:
        self.decays = decays
        self.states: dict[float, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        current = pl_module.autoencoder.state_dict()
        floats = [k for k, v in current.items() if v.is_floating_point()]
        for decay in self.decays:
            state = self.states.get(decay)
            if state is None:
                self.states[decay] = {k: v.detach().clone() for k, v in current.items()}
                continue
            torch._foreach_lerp_(
                [state[k] for k in floats], [current[k].detach() for k in floats], 1.0 - decay
            )
            for k, v in current.items():
                if not v.is_floating_point():
                    state[k].copy_(v)


def _train(data, overrides: dict, budget_s: float, ema_decays: tuple[float, ...] = ()):  # noqa: ANN001, ANN202
    """Train within ``budget_s`` seconds; ``epochs = 0``: a wall-time cosine schedule."""
    start = time.perf_counter()
    best = _BestValidationWeights()
    averages = _WeightAverages(ema_decays)
    callbacks: list[Callback] = [best, averages] if ema_decays else [best]
    if not overrides["epochs"]:
        callbacks.append(_TimeCosine(budget_s, overrides["learning_rate"]))
        overrides = {**overrides, "epochs": 100_000, "scheduler": "constant"}
    token = CancelToken()
    result = train(
        _payload(data, overrides),
        data,
        observer=_Budget(budget_s, token),
        cancel=token,
        callbacks=callbacks,
    )
    return result, time.perf_counter() - start, best, averages


def _overrides(args: argparse.Namespace, *, gridsize: int, filters: int) -> dict:
    return {
        "gridsize": gridsize,
        "n_filters_scale": filters,
        "normalization": args.normalization,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "scheduler": args.scheduler,
        "optimizer": args.optimizer,
        "loss": args.loss,
        "seed": 0,
        "precision": args.precision,
        "final_weights": args.final_weights,
        "validation_fraction": args.validation_fraction,
    }


def _rounded(quality: QualityMetrics) -> dict:
    """A quality report's scores rounded to 4 digits, as the results print them."""
    return {k: round(v, 4) for k, v in quality.to_dict().items()}


def true_patch_ceiling(data, canvas: CanvasGeometry) -> dict:  # noqa: ANN001 - PtychoData
    """Scores of the true object patches stitched as a network's would be: the ceiling.

    Why: separates what the network gets wrong from what the rest of the pipeline costs. The
    patches are the ones the simulator diffracted (bilinear at the real sub-pixel positions,
    so a slight blur the network cannot undo), placed by the inference stitcher with its
    default probe weighting, central crop and lanczos3 resampling, scored on the same region
    as the reconstruction. A network that predicted every patch exactly would score this.
    """
    patches = extract_patches(data.object_guess, data.xcoords, data.ycoords, data.N)
    positions = np.stack([data.xcoords, data.ycoords], axis=-1)
    stitched = stitch_patches(patches, positions, data.N, probe=data.probe[0], canvas=canvas)
    mask = scanned_region(stitched.weights, erode=data.N // 8)
    return _rounded(evaluate(stitched.object, data.object_guess, mask))


def _diverged(result: TrainingResult) -> str | None:
    """Where training diverged, if it did: a diverged run must not pass for a normal one."""
    return None if result.divergence is None else str(result.divergence)


def run_run1084(gridsize: int, photons: float, args: argparse.Namespace) -> dict:
    data = simulate_from_object_npz(RUN1084, nphotons=photons, seed=1)
    height, width = data.object_guess.shape
    canvas = CanvasGeometry(0.0, 0.0, width, height)
    ceiling = true_patch_ceiling(data, canvas)
    print(f"  true patches stitched (the ceiling): {ceiling}", flush=True)
    overrides = _overrides(args, gridsize=gridsize, filters=args.filters)
    print(f"  training: {overrides}", flush=True)
    result, seconds, best, averages = _train(
        data, overrides, args.budget_minutes * 60, tuple(args.ema)
    )
    inference = reconstruct(result.model, data, canvas=canvas)
    stitched = inference.stitched
    mask = scanned_region(stitched.weights, erode=data.N // 8)
    quality = evaluate(stitched.object, data.object_guess, mask)
    # The same image with the best-fitting linear phase ramp also removed (the issue's
    # "optional phase ramp" alignment): reported beside, never instead of, the plain scores.
    ramp = evaluate(stitched.object, data.object_guess, mask, remove_phase_ramp=True)
    # And the same network stitched without phase alignment (what it adds, measured).
    unaligned_payload = result.model.inference_payload({"phase_alignment": False})
    unaligned = reconstruct(result.model, data, unaligned_payload, canvas=canvas).stitched.object
    plain = evaluate(unaligned, data.object_guess, mask)

    # The weight averages (--ema) and the best-validation network too, when it is not the
    # one handed over; the handed-over weights are restored afterwards.
    handed_over = copy.deepcopy(result.model.autoencoder.state_dict())

    def score_weights(state: dict) -> dict:
        result.model.autoencoder.load_state_dict(state)
        image = reconstruct(result.model, data, canvas=canvas).stitched.object
        return _rounded(evaluate(image, data.object_guess, mask))

    averaged = {str(decay): score_weights(state) for decay, state in averages.states.items()}
    other = None
    if best.state is not None and best.epoch != result.best_epoch:
        other = {"epoch": best.epoch, **score_weights(best.state)}
    result.model.autoencoder.load_state_dict(handed_over)
    name = f"run1084_g{gridsize}_{photons:.0e}".replace("+0", "")
    if args.save_dir is not None:  # keep the reconstruction and the model for later re-scoring
        args.save_dir.mkdir(parents=True, exist_ok=True)
        np.savez(args.save_dir / f"{name}.npz", object=stitched.object, weights=stitched.weights)
        save_archive(result.model, args.save_dir / f"{name}.zip")
    if args.images is not None:
        save_object_images(
            stitched.object, args.images, mask=mask, prefix=name, title=f"Run1084 g={gridsize}"
        )
    return {
        "case": name,
        "optimizer": args.optimizer,
        "epochs": len(result.history),
        "diverged": _diverged(result),
        "final_weights": args.final_weights,
        "epoch_handed_over": result.best_epoch,
        "train_seconds": round(seconds, 1),
        **_rounded(quality),
        "best_validation_network": other,
        "weight_averages": averaged,
        "with_phase_ramp_removed": _rounded(ramp),
        "without_phase_alignment": _rounded(plain),
        "true_patches_stitched": ceiling,
        "inference_seconds": {k: round(v, 3) for k, v in inference.timings.items()},
    }


def run_siemens(args: argparse.Namespace) -> dict:
    """The PINN on the measured star, scored against a per-scan iterative reconstruction.

    The star has no ground truth. The yardstick is the engine's probe refinement run on its
    own, outside the budget (object and 3 probe modes fitted to these patterns, 50 epochs,
    misfit about the Poisson noise floor): its object is what the data say, so the PINN image's
    agreement with it (SSIM after the usual alignment) tells a lattice from a star in numbers.
    """
    from iterative_reference import REFINED_MODES

    from ptychodus_torch_plugin.engine.data import load_npz
    from ptychodus_torch_plugin.engine.probe_refinement import refine_probe

    data = load_npz(SIEMENS)
    start = time.perf_counter()
    reference = refine_probe(data, SIEMENS_REFERENCE_EPOCHS, REFINED_MODES)
    print(
        f"  iterative reference (outside the budget, {time.perf_counter() - start:.0f} s): "
        f"{reference.summary()}",
        flush=True,
    )
    overrides = {
        **_overrides(args, gridsize=1, filters=1),
        "probe_refinement_epochs": args.siemens_probe_refinement,
        "probe_modes": args.siemens_probe_modes,
    }
    print(f"  training: {overrides}", flush=True)
    result, seconds, _, _ = _train(data, overrides, args.budget_minutes * 60)
    refinement = result.probe_refinement
    height, width = reference.object.shape
    canvas = CanvasGeometry(reference.origin[0], reference.origin[1], width, height)
    stitched = reconstruct(result.model, data, canvas=canvas).stitched
    mask = scanned_region(stitched.weights, erode=data.N // 8)
    paths = []
    if args.images is not None:
        paths = save_object_images(
            stitched.object, args.images, mask=mask, prefix="siemens_star", title="Siemens star"
        )
    agreement = evaluate(stitched.object, reference.object, mask)
    ramp = evaluate(stitched.object, reference.object, mask, remove_phase_ramp=True)
    return {
        "case": "siemens_star_experimental",
        "optimizer": args.optimizer,
        "epochs": len(result.history),
        "diverged": _diverged(result),
        "train_seconds": round(seconds, 1),
        "probe_refinement": None if refinement is None else refinement.summary(),
        "final_train_nll": round(result.history[-1].train_loss, 1) if result.history else None,
        "agreement_with_iterative_reference": _rounded(agreement),
        "agreement_with_phase_ramp_removed": _rounded(ramp),
        "images": [str(p) for p in paths],
    }


def run_siemens_simulated(args: argparse.Namespace) -> dict:
    """The PINN on a simulated copy of the measured star, scored against the object it came from.

    Why: the measured star has no ground truth, so a failure there cannot tell a data problem
    from a training one. This copy has the same probe, positions and mean counts, and as its
    object the iterative reference fitted to the measured data (``iterative_reference.py``):
    if the PINN reconstructs this copy but not the measurement, the measured data hold
    something our forward model with the stored probe does not explain.
    """
    from iterative_reference import file_canvas, fit_object, scanned_mask

    from ptychodus_torch_plugin.engine.data import load_npz, mean_pattern_power
    from ptychodus_torch_plugin.engine.simulate import simulate_from_object

    measured = load_npz(SIEMENS)
    shape = file_canvas(measured)
    reference, _ = fit_object(measured, shape, epochs=100)
    data = simulate_from_object(
        reference,
        measured.probe[0],
        measured.xcoords,
        measured.ycoords,
        nphotons=mean_pattern_power(measured.amplitudes),  # counts: amplitudes are sqrt(counts)
        seed=1,
    )
    overrides = _overrides(args, gridsize=1, filters=1)
    print(f"  training: {overrides}", flush=True)
    result, seconds, _, _ = _train(data, overrides, args.budget_minutes * 60)
    height, width = shape
    image = reconstruct(result.model, data, canvas=CanvasGeometry(0.0, 0.0, width, height))
    image = image.stitched.object
    mask = scanned_mask(measured, shape)
    if args.images is not None:
        save_object_images(
            image,
            args.images,
            mask=mask,
            prefix="siemens_star_simulated",
            title="Simulated Siemens star",
        )
    ramp = evaluate(image, reference, mask, remove_phase_ramp=True)
    return {
        "case": "siemens_star_simulated_g1",
        "optimizer": args.optimizer,
        "epochs": len(result.history),
        "diverged": _diverged(result),
        "train_seconds": round(seconds, 1),
        **_rounded(evaluate(image, reference, mask)),
        "with_phase_ramp_removed": _rounded(ramp),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(ALL_CASES))
    parser.add_argument("--budget-minutes", type=float, default=15.0)
    # Defaults: the settings of the latest figures in docs/performance.md (the optimiser
    # became muon in the sixteenth session; earlier figures are adam's). --epochs 0 trains until
    # the budget ends with a cosine schedule keyed on wall time (_TimeCosine), so the decay
    # finishes inside the budget whatever the machine's speed today.
    parser.add_argument(
        "--epochs", type=int, default=0, help="0: until the budget ends, wall-time cosine"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        help="32-true, bf16-mixed, 16-mixed, or auto: bf16-mixed where the CPU computes "
        "bfloat16 natively (AMX / AVX512-BF16) or on a GPU, 32-true otherwise",
    )
    parser.add_argument("--filters", type=int, default=1)
    parser.add_argument("--normalization", default="batch", help="none or batch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--scheduler", default="cosine")
    parser.add_argument(
        "--optimizer",
        default="muon",
        choices=OPTIMIZERS,
        help="muon (default since the sixteenth session: Muon for the hidden convolutions, "
        "Adam for the rest) or adam (every earlier figure in docs/performance.md)",
    )
    parser.add_argument(
        "--loss",
        default="poisson",
        choices=("poisson", "mae"),
        help="training loss: Poisson NLL on intensities (default) or MAE on amplitudes",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.0,
        help="held-out share of the scan (default 0: every pattern trained, as for the best "
        "image of the scan itself; the engine's default is 0.05, a compact patch at "
        "gridsize > 1, whose part of the image is then made from unseen patterns)",
    )
    parser.add_argument(
        "--final-weights",
        default="last",
        choices=("best", "last"),
        help="network scored: the last epoch's (default; the schedule ends at its lowest "
        "rate) or the best by validation NLL (needs --validation-fraction > 0; then the last "
        "epoch's is not scored). With a validation fraction > 0 the best-validation network "
        "is also scored beside the last epoch's",
    )
    parser.add_argument(
        "--ema",
        type=float,
        nargs="*",
        default=[],
        help="also score exponential moving averages of the weights with these decays per step",
    )
    parser.add_argument(
        "--siemens-probe-refinement",
        type=int,
        default=50,
        help="siemens-g1: epochs of probe refinement before training, inside the budget "
        "(0: train with the file's probe, which does not fit this measurement)",
    )
    parser.add_argument(
        "--siemens-probe-modes",
        type=int,
        default=3,
        help="siemens-g1: incoherent probe modes to refine (0: the file's count, 1)",
    )
    parser.add_argument(
        "--images",
        type=_images_folder,
        default=REPO / "docs" / "images",
        help="where the images go (default: docs/images, the committed figures: give another "
        "folder, or 'none', for experiments)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--save-dir", type=Path, default=None, help="keep reconstructions and models here"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    args = parser.parse_args()
    if args.final_weights == "best" and args.validation_fraction == 0:
        parser.error(
            "--final-weights best needs a validation loss: give --validation-fraction > 0 "
            "(e.g. 0.05, the engine's default)"
        )
    if args.precision == "auto":
        args.precision = _native_bf16_precision()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not RUN1084.exists():
        print(f"SKIP: {RUN1084} not found (benchmarks need ../shared/data)")
        return 0
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}, "
        f"precision {args.precision}, optimizer {args.optimizer}"
    )
    cases = args.cases.split(",")
    unknown = [case for case in cases if not _known_case(case)]
    if unknown:  # before hours of training on the cases before a typo
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(ALL_CASES)}")
    results = []
    for case in cases:
        print(f"== {case}", flush=True)
        if case.startswith("run1084"):
            _, grid, photons = case.split("-")
            results.append(run_run1084(int(grid[1:]), float(photons), args))
        elif case == "siemens-g1":
            if not SIEMENS.exists():
                print(f"SKIP: {SIEMENS} not found")
                continue
            results.append(run_siemens(args))
        elif case == "siemens-sim-g1":
            if not SIEMENS.exists():
                print(f"SKIP: {SIEMENS} not found")
                continue
            results.append(run_siemens_simulated(args))
        print("  " + json.dumps(results[-1]), flush=True)
        if args.json:  # after every case: a later failure keeps the finished ones
            args.json.write_text(json.dumps(results, indent=2))
    return 0


def _images_folder(text: str) -> Path | None:
    return None if text.strip().lower() == "none" else Path(text)


def _known_case(case: str) -> bool:
    if case in ("siemens-g1", "siemens-sim-g1"):
        return True
    parts = case.split("-")
    if len(parts) != 3 or parts[0] != "run1084" or not parts[1].startswith("g"):
        return False
    try:
        return int(parts[1][1:]) >= 1 and float(parts[2]) > 0
    except ValueError:
        return False


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
