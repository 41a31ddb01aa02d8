"""The engine's command line: ``ptychodus-torch {simulate,train,infer,inspect}``.

Every setting flag defaults to ``None`` ("not given"), and the flags that were given go to the
payload factory as explicit overrides, so the factory's precedence (override > archive >
defaults) and its ``sources`` record hold for the command line exactly as for the GUI. The
documented defaults are therefore the payload defaults (see docs/cli.md).

Errors a user can fix (a missing file, an invalid setting, an archive of another backend) end
with exit status 1 and a one-line message naming the file or setting, never a traceback; bad
flags exit 2 with argparse's usage message.

Nothing heavy is imported at module level: ``build_parser`` and ``--help`` stay fast, and
matplotlib is only imported when ``infer`` writes its PNGs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import (
    ACCELERATORS,
    AMP_ACTIVATIONS,
    CHECKPOINT_MODES,
    FINAL_WEIGHTS,
    INPUT_NORMALIZATIONS,
    LOGGERS,
    LOSSES,
    MODES,
    NORMALIZATIONS,
    OPTIMIZERS,
    PATCH_WEIGHTINGS,
    PRECISIONS,
    SCHEDULERS,
    SUBPIXEL_METHODS,
    CheckpointConfig,
    DataConfig,
    ExecutionConfig,
    GridConfig,
    InferenceConfig,
    ModelConfig,
    TrainingConfig,
)

PROG = "ptychodus-torch"
DEFAULT_TRAIN_OUTPUT = "training_outputs"
DEFAULT_INFER_OUTPUT = "inference_outputs"
DEFAULT_SIMULATE_OUTPUT = "simulated.npz"
_PACKAGE_LOGGER = "ptychodus_torch_plugin"
logger = logging.getLogger(__name__)
#: ``train`` wrote an archive, but training diverged and stopped early: the archive holds the
#: weights of the epochs that finished (history.json's ``diverged`` says where).
DIVERGED_EXIT_STATUS = 3
# Defaults shown in --help come from the configs themselves, so they cannot drift.
_G, _D, _T, _E = GridConfig(), DataConfig(), TrainingConfig(), ExecutionConfig()
_M = ModelConfig()
_C, _I = CheckpointConfig(), InferenceConfig()


class CLIError(Exception):
    """A user-fixable problem: printed as one line, exit status 1."""


# ----------------------------------------------------------------------------- parser
def _devices(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid devices value {text!r}: allowed 'auto' or a positive integer"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid devices value {text!r}: must be >= 1")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a PtychoPINN model on an NPZ and write wts.h5.zip",
        description="Train a PtychoPINN model. Unset flags take the payload defaults "
        "(docs/cli.md); N is taken from the data's pattern size.",
    )
    p.add_argument("--train_data_file", required=True, metavar="NPZ", help="training data")
    p.add_argument(
        "--test_data_file",
        metavar="NPZ",
        help="validation data (default: the seeded --validation-fraction of the scan, a "
        "compact patch of positions at gridsize > 1)",
    )
    p.add_argument(
        "--output_dir",
        default=DEFAULT_TRAIN_OUTPUT,
        metavar="DIR",
        help=f"where wts.h5.zip, checkpoints and metrics go (default: {DEFAULT_TRAIN_OUTPUT})",
    )
    p.add_argument(
        "--max_epochs", type=_positive_int, help=f"training epochs (default: {_T.epochs})"
    )
    p.add_argument(
        "--n_groups",
        type=_nonnegative_int,
        help="number of groups to train on (default: 0 = one per scan position)",
    )
    p.add_argument(
        "--n_images", type=_nonnegative_int, help=argparse.SUPPRESS, dest="n_images"
    )  # deprecated alias of --n_groups
    p.add_argument(
        "--gridsize",
        type=_positive_int,
        help=f"patterns per group side, C = gridsize**2 (default: {_G.gridsize})",
    )
    p.add_argument(
        "--neighbor_count",
        type=_positive_int,
        help=f"K nearest neighbours a group is drawn from (default: {_G.neighbor_count})",
    )
    p.add_argument(
        "--batch_size", type=_positive_int, help=f"groups per batch (default: {_T.batch_size})"
    )
    p.add_argument(
        "--nphotons",
        type=float,
        help="mean counts per pattern for the Poisson loss (default, or 0: measured from the data)",
    )
    p.add_argument("--seed", type=_nonnegative_int, help=f"random seed (default: {_D.seed})")
    _add_accelerator(p)
    p.add_argument(
        "--device", help=argparse.SUPPRESS, dest="device"
    )  # deprecated alias of --accelerator
    p.add_argument(
        "--devices", type=_devices, help=f"devices per node: 'auto' or N (default: {_E.devices})"
    )
    p.add_argument("--num_nodes", type=_positive_int, help=f"nodes (default: {_E.num_nodes})")
    p.add_argument("--strategy", help=f"Lightning strategy (default: {_E.strategy})")
    p.add_argument(
        "--precision", choices=PRECISIONS, help=f"numeric precision (default: {_E.precision})"
    )
    p.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="deterministic algorithms (default: off; 'warn' mode on CUDA)",
    )
    p.add_argument(
        "--num-workers",
        dest="num_workers",
        type=_nonnegative_int,
        help=f"DataLoader worker processes (default: {_E.num_workers})",
    )
    p.add_argument(
        "--learning-rate",
        dest="learning_rate",
        type=float,
        help=f"learning rate (default: {_E.learning_rate:g})",
    )
    p.add_argument(
        "--scheduler", choices=SCHEDULERS, help=f"learning-rate schedule (default: {_E.scheduler})"
    )
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="adam, or muon: Muon for the hidden convolutions and Adam for the rest (fewer "
        f"epochs to the same loss; docs/performance.md) (default: {_E.optimizer})",
    )
    p.add_argument(
        "--accumulate-grad-batches",
        dest="accumulate_grad_batches",
        type=_positive_int,
        help=f"batches per optimiser step (default: {_E.accumulate_grad_batches})",
    )
    p.add_argument(
        "--gradient-clip-val",
        dest="gradient_clip_val",
        type=float,
        help="gradient norm clip (default: none)",
    )
    p.add_argument(
        "--enable-checkpointing",
        dest="checkpoint_enable",
        action="store_const",
        const=True,
        default=None,
        help="write checkpoints into OUTPUT/checkpoints (the default)",
    )
    p.add_argument(
        "--disable-checkpointing",
        dest="checkpoint_enable",
        action="store_const",
        const=False,
        help="write no checkpoints",
    )
    p.add_argument(
        "--checkpoint-save-top-k",
        dest="checkpoint_save_top_k",
        type=int,
        help=f"best checkpoints kept, -1 = all (default: {_C.save_top_k})",
    )
    p.add_argument(
        "--checkpoint-monitor",
        dest="checkpoint_monitor",
        help="metric for the best model and checkpoints: val_loss or train_loss "
        f"(default: {_C.monitor})",
    )
    p.add_argument(
        "--checkpoint-mode",
        dest="checkpoint_mode",
        choices=CHECKPOINT_MODES,
        help=f"the monitored metric is better low (the only mode: every metric is a loss) "
        f"(default: {_C.mode})",
    )
    p.add_argument(
        "--final-weights",
        dest="final_weights",
        choices=FINAL_WEIGHTS,
        help="weights saved at the end: the best epoch by the monitored metric, or the last "
        "epoch's (the most converged with a decaying --scheduler such as cosine) "
        f"(default: {_T.final_weights})",
    )
    p.add_argument(
        "--probe-refinement-epochs",
        dest="probe_refinement_epochs",
        type=_nonnegative_int,
        help="epochs of a per-scan probe fit before training, for a probe that may not be "
        f"this scan's (default: {_T.probe_refinement_epochs}, the probe as given)",
    )
    p.add_argument(
        "--probe-modes",
        dest="probe_modes",
        type=_nonnegative_int,
        help="incoherent probe modes (default: 0, as many as the file's probe has; more "
        "need --probe-refinement-epochs)",
    )
    p.add_argument(
        "--n-filters-scale",
        type=_positive_int,
        help=f"network width factor, 1 to 8 (default: {_M.n_filters_scale}; the quality "
        "settings use 1)",
    )
    p.add_argument(
        "--amp-activation",
        choices=AMP_ACTIVATIONS,
        help=f"amplitude output activation (default: {_M.amp_activation})",
    )
    p.add_argument(
        "--normalization",
        choices=NORMALIZATIONS,
        help=f"batch normalisation after each hidden convolution (default: {_M.normalization})",
    )
    p.add_argument(
        "--probe-scale",
        type=float,
        help=f"probe normalisation constant, > 0 (default: {_D.probe_scale:g})",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        help="pinn: physics-informed, no ground truth needed; supervised: L1 against the NPZ's "
        f"objectGuess patches, which must be present (default: {_T.mode})",
    )
    p.add_argument("--loss", choices=LOSSES, help=f"PINN training loss (default: {_T.loss})")
    p.add_argument(
        "--validation-fraction",
        type=float,
        help="share of the scan held out for validation when no --test_data_file is given, "
        "0 to 0.5; at gridsize > 1 a compact patch of positions, grouped apart "
        f"(default: {_D.validation_fraction:g})",
    )
    p.add_argument(
        "--early-stop-patience",
        dest="early_stop_patience",
        type=_positive_int,
        help="epochs without improvement before stopping (default: no early stopping)",
    )
    p.add_argument("--logger", choices=LOGGERS, help=f"metrics logger (default: {_E.logger})")
    p.add_argument(
        "--disable_mlflow", action="store_true", help=argparse.SUPPRESS
    )  # deprecated: --logger none --quiet
    _add_quiet(p, "no progress bar or epoch lines, warnings only")
    p.set_defaults(handler=_cmd_train)


def _add_accelerator(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--accelerator", choices=ACCELERATORS, help=f"hardware (default: {_E.accelerator})"
    )


def _add_quiet(p: argparse.ArgumentParser, what: str = "no summary lines, warnings only") -> None:
    p.add_argument("--quiet", action="store_true", default=None, help=what)


def _add_infer(sub: Any) -> None:
    p = sub.add_parser(
        "infer",
        help="reconstruct a scan with a trained model archive",
        description="Reconstruct an NPZ scan with a model archive. The archive's N, gridsize "
        "and neighbor_count are used.",
    )
    p.add_argument(
        "--model_path",
        required=True,
        metavar="PATH",
        help="wts.h5.zip, or a directory holding it",
    )
    p.add_argument("--test_data", required=True, metavar="NPZ", help="scan to reconstruct")
    p.add_argument(
        "--output_dir",
        default=DEFAULT_INFER_OUTPUT,
        metavar="DIR",
        help=f"where the reconstruction goes (default: {DEFAULT_INFER_OUTPUT})",
    )
    p.add_argument(
        "--n_groups",
        type=_nonnegative_int,
        help="groups to reconstruct (default: 0 = one per scan position, all patterns)",
    )
    p.add_argument(
        "--inference-batch-size",
        dest="inference_batch_size",
        type=_positive_int,
        help=f"groups per forward pass (default: {_E.inference_batch_size})",
    )
    _add_accelerator(p)
    p.add_argument(
        "--patch-weighting",
        dest="patch_weighting",
        choices=PATCH_WEIGHTINGS,
        help=f"stitching weights: probe intensity or uniform (default: {_I.patch_weighting})",
    )
    p.add_argument(
        "--subpixel",
        dest="subpixel",
        choices=SUBPIXEL_METHODS,
        help="placing patches at fractional positions: lanczos3 resamples each patch onto the "
        "image grid (sharp), bilinear splats it over four pixels (blurs up to half a pixel) "
        f"(default: {_I.subpixel})",
    )
    p.add_argument(
        "--crop-fraction",
        dest="crop_fraction",
        type=float,
        help="side of each patch's central box that is stitched, as a fraction of N "
        f"(default: {_I.crop_fraction})",
    )
    p.add_argument(
        "--input-normalization",
        dest="input_normalization",
        choices=INPUT_NORMALIZATIONS,
        help="recompute the input scale from this scan, or use the one stored in the model "
        f"(default: {_D.input_normalization})",
    )
    p.add_argument(
        "--no-phase-alignment",
        dest="phase_alignment",
        action="store_const",
        const=False,
        help="average the patches as predicted, without aligning their phase offsets "
        "(default: aligned)",
    )
    _add_quiet(p)
    p.set_defaults(handler=_cmd_infer)


def _add_simulate(sub: Any) -> None:
    from .simulate import OBJECT_KINDS, PROBE_KINDS, SCAN_KINDS

    p = sub.add_parser(
        "simulate",
        help="write a synthetic scan (NPZ with ground truth objectGuess)",
        description="Simulate a scan with Poisson noise and write it in the NPZ contract.",
    )
    p.add_argument(
        "--output",
        default=DEFAULT_SIMULATE_OUTPUT,
        metavar="NPZ",
        help=f"file to write (default: {DEFAULT_SIMULATE_OUTPUT})",
    )
    p.add_argument("--N", type=int, choices=(32, 64, 128, 256), help="pattern size (default: 64)")
    p.add_argument("--object", choices=OBJECT_KINDS, help="object (default: random)")
    p.add_argument("--probe", choices=PROBE_KINDS, help="probe (default: disk)")
    p.add_argument("--scan", choices=SCAN_KINDS, help="scan pattern (default: raster)")
    p.add_argument(
        "--nphotons", type=float, default=1e6, help="mean counts per pattern (default: 1e6)"
    )
    p.add_argument("--step", type=float, help="scan step in pixels (default: N/4)")
    p.add_argument("--jitter", type=float, help="random position jitter in pixels (default: 0)")
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--from-object",
        dest="from_object",
        metavar="NPZ",
        help="simulate from an NPZ holding objectGuess, probeGuess, xcoords, ycoords "
        "(--N/--object/--probe/--scan/--step/--jitter then do not apply)",
    )
    _add_quiet(p)
    p.set_defaults(handler=_cmd_simulate)


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="print a model archive's manifest and config as JSON",
        description="Print a model archive's manifest and config as JSON (sha256 verified).",
    )
    p.add_argument("path", nargs="?", metavar="PATH", help="wts.h5.zip or a directory holding it")
    p.add_argument("--model_path", metavar="PATH", help="same as PATH")
    p.set_defaults(handler=_cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    """The ``ptychodus-torch`` argument parser (subcommands simulate, train, infer, inspect)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="PyTorch PtychoPINN: simulate data, train, reconstruct, inspect archives.",
        # handled before this parser (host/launcher.py: the engine never imports Ptychodus)
        epilog=f"{PROG} launch [ptychodus arguments]: start Ptychodus (GUI, or -b batch) with "
        "this plugin registered; needed where Ptychodus is an editable install.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_simulate(sub)
    _add_train(sub)
    _add_infer(sub)
    _add_inspect(sub)
    for command in sub.choices.values():  # for naming the flag behind a refused setting
        command.set_defaults(
            option_names={a.dest: a.option_strings[0] for a in command._actions if a.option_strings}
        )
    return parser


_SETTING = re.compile(r"^(\w+)Config\.(\w+) = ")


def _naming_the_flag(message: str, option_names: dict[str, str]) -> str:
    """A refused setting's message with the flag the user typed for it.

    Why: the engine names its fields (``DataConfig.validation_fraction = 0.9 is invalid``); a
    beamline user typed ``--validation-fraction 0.9`` and should not have to translate back.
    """
    match = _SETTING.match(message)
    if match is None:
        return message
    owner, field = match.groups()
    dest = f"checkpoint_{field}" if owner == "Checkpoint" else field
    # A flag named unlike its field (--max_epochs sets epochs): look the flag up by field.
    dest = next((d for d, f in _TRAIN_FLAGS.items() if f == dest and d != dest), dest)
    flags = [option_names[dest]] if dest in option_names else []
    if field == "neighbor_count" and "gridsize" in message and "gridsize" in option_names:
        flags.insert(0, option_names["gridsize"])  # the pair is refused, not one of them
    return message if not flags else f"{' / '.join(flags)}: {message}"


def _version() -> str:
    from .. import __version__

    return str(__version__)


# ----------------------------------------------------------------------------- helpers
def _deprecated(message: str) -> None:
    """A deprecation: a DeprecationWarning for code, and a visible line for people."""
    warnings.warn(message, DeprecationWarning, stacklevel=3)
    print(f"warning: {message}", file=sys.stderr)


def _output_folder(path: str, flag: str) -> Path:
    """The output folder, checked up front: a wrong path fails before the work, not after.

    Why: ``train`` writes nothing until its archive after the last epoch (with
    ``--logger none --disable-checkpointing``), so a read-only folder used to end hours of
    training with an error and no model. Nothing is created here: a run refused later for
    another reason leaves no empty folder behind.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"{flag} {folder}: exists and is not a folder; give a folder path")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif existing == folder:
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            problem = exc.strerror or str(exc)
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"cannot create folders in {existing}"
    if problem is not None:
        raise CLIError(
            f"{flag} {folder}: cannot write there ({problem}); give a folder you can write to"
        )
    return folder


def _output_file(path: str, flag: str) -> Path:
    """An output file path that is not an existing folder (checked before the work)."""
    file = Path(path)
    if file.is_dir():
        raise CLIError(f"{flag} {file}: is a folder; give a file name, e.g. {file / 'scan.npz'}")
    return file


def _require_file(path: str | None, what: str) -> Path:
    if path is None:
        raise CLIError(f"{what}: no file given")
    file = Path(path)
    if file.is_dir():
        raise CLIError(f"{what} {file}: is a folder; give the .npz file")
    if not file.is_file():
        raise FileNotFoundError(f"{what} not found: {file}")
    return file


def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text)


@contextlib.contextmanager
def _console_logging(quiet: bool) -> Iterator[None]:
    """Show the engine's log records on stderr for one command; quiet: warnings only."""
    package = logging.getLogger(_PACKAGE_LOGGER)
    lightning = logging.getLogger("lightning.pytorch")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    level = logging.WARNING if quiet else logging.INFO
    handler.setLevel(level)
    old = (package.level, lightning.level)
    package.addHandler(handler)
    if package.level == logging.NOTSET or package.level > level:
        package.setLevel(level)
    if quiet:
        lightning.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            if quiet:  # Lightning's advice and its own deprecations are noise to a CLI user
                warnings.filterwarnings("ignore", module=r"lightning(\.|$)")
                with contextlib.suppress(ImportError):
                    from lightning.fabric.utilities.warnings import PossibleUserWarning

                    warnings.simplefilter("ignore", PossibleUserWarning)
            yield
    finally:
        package.removeHandler(handler)
        package.setLevel(old[0])
        lightning.setLevel(old[1])


def _check_hardware(check: Any, accelerator: str) -> None:
    """Requested hardware that is missing is a user error (exit 1), not a traceback."""
    try:
        check(accelerator)
    except RuntimeError as exc:
        raise CLIError(str(exc)) from exc


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    from .atomic import atomic_write_path

    with atomic_write_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def _atomic_save_npz(path: Path, **arrays: Any) -> None:
    from .atomic import atomic_write_path

    with atomic_write_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def _atomic_save_json(path: Path, value: Any) -> None:
    from .atomic import atomic_write_path

    with atomic_write_path(path) as tmp:
        text = json.dumps(_json_safe(value), indent=2, sort_keys=True, default=str)
        tmp.write_text(text + "\n")


# ----------------------------------------------------------------------------- train
_TRAIN_FLAGS = {
    # flag dest -> payload field
    "max_epochs": "epochs",
    "n_groups": "n_groups",
    "gridsize": "gridsize",
    "neighbor_count": "neighbor_count",
    "batch_size": "batch_size",
    "nphotons": "nphotons",
    "seed": "seed",
    "accelerator": "accelerator",
    "devices": "devices",
    "num_nodes": "num_nodes",
    "strategy": "strategy",
    "precision": "precision",
    "deterministic": "deterministic",
    "num_workers": "num_workers",
    "learning_rate": "learning_rate",
    "scheduler": "scheduler",
    "optimizer": "optimizer",
    "accumulate_grad_batches": "accumulate_grad_batches",
    "gradient_clip_val": "gradient_clip_val",
    "checkpoint_enable": "checkpoint_enable",
    "checkpoint_save_top_k": "checkpoint_save_top_k",
    "checkpoint_monitor": "checkpoint_monitor",
    "checkpoint_mode": "checkpoint_mode",
    "early_stop_patience": "early_stop_patience",
    "final_weights": "final_weights",
    "n_filters_scale": "n_filters_scale",
    "amp_activation": "amp_activation",
    "normalization": "normalization",
    "probe_scale": "probe_scale",
    "mode": "mode",
    "loss": "loss",
    "validation_fraction": "validation_fraction",
    "probe_refinement_epochs": "probe_refinement_epochs",
    "probe_modes": "probe_modes",
    "logger": "logger",
}


def _accelerator_from_device(device: str) -> str:
    name = device.strip().lower().split(":", 1)[0]
    if name not in ACCELERATORS:
        raise CLIError(
            f"--device {device!r} is invalid: allowed {', '.join(ACCELERATORS)} "
            "(and --device is deprecated: use --accelerator)"
        )
    return name


def _apply_deprecated_train_flags(args: argparse.Namespace) -> None:
    """Map --n_images, --device and --disable_mlflow onto their replacements (never over an
    explicit new-style flag)."""
    if args.n_images is not None:
        if args.n_groups is None:
            _deprecated("--n_images is deprecated: use --n_groups (taking --n_images as it)")
            args.n_groups = args.n_images
        else:
            _deprecated("--n_images is deprecated and ignored: --n_groups is given")
    if args.device is not None:
        accelerator = _accelerator_from_device(args.device)
        if args.accelerator is None:
            _deprecated(f"--device is deprecated: use --accelerator (taking {accelerator!r})")
            args.accelerator = accelerator
        else:
            _deprecated(
                f"--device is deprecated and ignored: --accelerator {args.accelerator!r} is given"
            )
    if args.disable_mlflow:
        _deprecated("--disable_mlflow is deprecated: it means --logger none --quiet")
        if args.logger is None:
            args.logger = "none"
        args.quiet = True


def training_overrides(args: argparse.Namespace, N: int) -> dict[str, Any]:  # noqa: N803
    """The payload overrides for parsed ``train`` flags (unset flags are left out)."""
    overrides: dict[str, Any] = {"N": N}
    for dest, key in _TRAIN_FLAGS.items():
        value = getattr(args, dest)
        if dest == "nphotons" and value == 0:
            value = None  # 0 means measured, as NPhotons = 0 in the settings files
        if value is not None:
            overrides[key] = value
    if args.quiet:
        overrides["enable_progress_bar"] = False
    return overrides


@contextlib.contextmanager
def _ctrl_c_stops_training(token: Any) -> Iterator[None]:
    """The first Ctrl-C stops training after its current batch; a second one aborts.

    Why: Lightning answers a KeyboardInterrupt with ``sys.exit(1)``, so Ctrl-C used to throw
    away every finished epoch. Now the run ends as a stopped one (the model so far is saved,
    exit status 130), as ``ptychodus -b train`` does.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    owner = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a DataLoader worker inherited the handler: not its call
            return
        if token.cancelled:
            raise KeyboardInterrupt
        token.cancel()
        print(
            f"{PROG} train: stopping after this batch and saving the model so far; press "
            "Ctrl-C again to abort without saving",
            file=sys.stderr,
            flush=True,
        )

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _kept_copies(output_dir: Path) -> set[Path]:
    """The dated copies of earlier models and histories in ``output_dir``."""
    return set(output_dir.glob("wts-*.h5.zip")) | set(output_dir.glob("history-*.json"))


class _TrainPrinter:
    """One line per epoch when there is no progress bar and the run is not quiet."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def on_epoch_end(self, record: Any) -> None:
        if self.enabled:
            val = "-" if record.val_loss is None else f"{record.val_loss:.5g}"
            print(
                f"epoch {record.epoch}: train_loss {record.train_loss:.5g}, val_loss {val}, "
                f"lr {record.learning_rate:.3g}, {record.seconds:.1f} s",
                flush=True,
            )


def _cmd_train(args: argparse.Namespace) -> int:
    _apply_deprecated_train_flags(args)
    train_file = _require_file(args.train_data_file, "training data file")
    test_file = (
        None
        if args.test_data_file is None
        else _require_file(args.test_data_file, "test data file")
    )
    output_dir = _output_folder(args.output_dir, "--output_dir")

    from .archive import ARCHIVE_NAME
    from .atomic import path_for_new_file
    from .cancel import CancelToken
    from .data import load_npz
    from .devices import resolve_accelerator
    from .payload import create_training_payload
    from .saving import save_trained_model
    from .training import TrainingDivergedError, train

    with _console_logging(bool(args.quiet)):
        data = load_npz(train_file)
        test_data = None if test_file is None else load_npz(test_file)
        if test_data is not None and test_data.N != data.N:  # before any probe refinement
            raise CLIError(
                f"{test_file}: patterns of size {test_data.N}, but {train_file} has "
                f"{data.N}: the test scan must have the training scan's pattern size"
            )
        payload = create_training_payload(training_overrides(args, data.N))
        _check_hardware(resolve_accelerator, payload.execution.accelerator)
        _say(
            args,
            f"training on {train_file} ({data.n_patterns} patterns, N = {data.N}, gridsize "
            f"{payload.grid.gridsize}, {payload.training.epochs} epoch(s)) -> {output_dir}",
        )
        tic = time.perf_counter()
        token = CancelToken()
        try:
            with _ctrl_c_stops_training(token):
                result = train(
                    payload,
                    data,
                    test_data=test_data,
                    output_dir=output_dir,
                    observer=_TrainPrinter(
                        not args.quiet and not payload.execution.enable_progress_bar
                    ),
                    cancel=token,
                )
        except TrainingDivergedError as exc:  # no model to write: one line, exit 1
            raise CLIError(str(exc)) from exc
        except SystemExit:
            # A second Ctrl-C inside Lightning's fit: Lightning answers it with sys.exit(1);
            # the user interrupted, so say so and exit 130.
            if token.cancelled:
                raise KeyboardInterrupt from None
            raise
        elapsed = time.perf_counter() - tic
        if result.cancelled and not result.history:
            print(
                f"{PROG} train: stopped before the first epoch ended: no model was written",
                file=sys.stderr,
            )
            return 130
        # An earlier model (and history) is kept aside, or, when it cannot be, left as it is
        # and the new one written under a dated name beside it.
        kept_before = _kept_copies(output_dir)
        archive_file = path_for_new_file(output_dir / ARCHIVE_NAME, ".h5.zip")
        history_file = path_for_new_file(output_dir / "history.json", ".json", "training history")
        # The folder was writable at the start; a full disk or a lost mount now must not
        # discard the run: the model then goes to the model folder (or the temp folder).
        saved = save_trained_model(result.model, archive_file)
        archive = saved.file
        if saved.problem is not None:
            print(f"{PROG} train: {saved.problem}", file=sys.stderr, flush=True)
            history_file = archive.with_name(archive.name[: -len(".h5.zip")] + ".history.json")
            # Nothing replaced the earlier files there: their dated copies are not needed.
            for copy in _kept_copies(output_dir) - kept_before:
                copy.unlink(missing_ok=True)
        summary = {
            "backend": result.backend,
            "archive": str(archive),
            "epochs_trained": len(result.history),
            "best_epoch": result.best_epoch,
            "cancelled": result.cancelled,
            "diverged": None
            if result.divergence is None
            else dict(dataclasses.asdict(result.divergence), message=str(result.divergence)),
            "seconds": elapsed,
            "training_device": result.model.training_device,
            "input_scale": result.model.input_scale,
            "intensity_scale": result.model.intensity_scale,
            "nphotons": result.model.nphotons,
            "checkpoints": [str(p) for p in result.checkpoint_paths],
            "probe_refinement": None
            if result.probe_refinement is None
            else result.probe_refinement.summary(),
            "sources": dict(payload.sources),
            "history": [record.to_dict() for record in result.history],
        }
        try:
            _atomic_save_json(history_file, summary)
        except OSError as exc:  # the model is saved: say what is missing, do not fail the run
            print(
                f"{PROG} train: the training history could not be written to {history_file} "
                f"({exc.strerror or exc}); the model is saved",
                file=sys.stderr,
                flush=True,
            )
    refinement = result.probe_refinement
    if refinement is not None and refinement.epochs:
        fixed = refinement.misfit_fixed_probe
        _say(
            args,
            f"probe refinement ({refinement.probe.shape[0]} mode(s), {refinement.epochs} "
            f"epochs): amplitude misfit per pattern {'-' if fixed is None else f'{fixed:.5g}'} "
            f"after {refinement.fixed_epochs} with the starting probe, {refinement.misfit:.5g} "
            "refined",
        )
    last = result.history[-1] if result.history else None
    if last is not None:
        val = "-" if last.val_loss is None else f"{last.val_loss:.5g}"
        _say(args, f"final epoch {last.epoch}: train_loss {last.train_loss:.5g}, val_loss {val}")
    _say(args, f"wrote {archive} ({elapsed:.1f} s of training)")
    if result.divergence is not None:  # the engine has logged it; the status tells a script
        return DIVERGED_EXIT_STATUS
    return 130 if result.cancelled else 0


# ----------------------------------------------------------------------------- infer
def _save_images(output_dir: Path, obj: np.ndarray, covered: np.ndarray) -> list[Path]:
    """``amplitude.png`` and ``phase.png`` (uncovered pixels blank)."""
    from .images import save_object_images

    return save_object_images(obj, output_dir, mask=covered, prefix="", title="reconstruction")


def _quality(result: Any, reference: np.ndarray, N: int) -> dict[str, Any]:  # noqa: N803
    from .metrics import evaluate, scanned_region

    stitched = result.stitched
    erode = max(1, N // 8)
    mask = scanned_region(stitched.weights, erode=erode)
    report: dict[str, Any] = {
        "reference": "objectGuess",
        "region": f"scanned region eroded by {erode} px",
        "region_pixels": int(mask.sum()),
    }
    if not mask.any():
        report["error"] = "the scanned region is empty after erosion; no metrics"
        return report
    metrics = evaluate(stitched.object, reference, mask)
    report.update(metrics.to_dict())
    return report


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _object_canvas(data: Any) -> Any:
    """The canvas ``infer`` stitches into: ``objectGuess``'s pixel frame, when it holds the scan.

    Why: the image is scored against ``objectGuess``, so it must share its frame; but a
    placeholder or a crop from elsewhere would drop every patch outside it without a word
    (an all-zero image, exit 0). Positions outside the object are counted and reported;
    when none lies inside, the canvas covers the scan instead and nothing is scored.
    Returns None for that canvas (``reconstruct`` builds it) and without ``objectGuess``.
    """
    from .inference import CanvasGeometry

    if data.object_guess is None:
        return None
    height, width = data.object_guess.shape
    outside = data.outside(width, height)
    if outside.all():
        logger.warning(
            "none of the %d scan positions lies inside objectGuess (%d x %d pixels): it does "
            "not hold this scan, so the image covers the scan instead and is not scored",
            outside.size,
            width,
            height,
        )
        return None
    if outside.any():
        logger.warning(
            "%d of %d scan positions lie outside objectGuess (%d x %d pixels): their part of "
            "the image is cut off and not scored; remove objectGuess from the file to see "
            "the whole scan",
            int(outside.sum()),
            outside.size,
            width,
            height,
        )
    return CanvasGeometry(0.0, 0.0, int(width), int(height))


def _cmd_infer(args: argparse.Namespace) -> int:
    from .archive import load_archive
    from .data import load_npz
    from .devices import select_device
    from .inference import reconstruct

    data_file = _require_file(args.test_data, "test data file")
    output_dir = _output_folder(args.output_dir, "--output_dir")
    with _console_logging(bool(args.quiet)):
        model = load_archive(args.model_path)
        data = load_npz(data_file)
        overrides = {
            "n_groups": args.n_groups,
            "inference_batch_size": args.inference_batch_size,
            "accelerator": args.accelerator,
            "patch_weighting": args.patch_weighting,
            "subpixel": args.subpixel,
            "crop_fraction": args.crop_fraction,
            "input_normalization": args.input_normalization,
            "phase_alignment": args.phase_alignment,
        }
        if data.N != model.N:
            raise CLIError(
                f"{data_file}: patterns of size {data.N}, but the model {args.model_path} was "
                f"trained at N = {model.N}; crop or bin the detector data, or train a model "
                "for this size"
            )
        payload = model.inference_payload(overrides)
        _check_hardware(select_device, payload.execution.accelerator)
        canvas = _object_canvas(data)
        scored = canvas is not None
        _say(
            args,
            f"reconstructing {data_file} ({data.n_patterns} patterns) with "
            f"{args.model_path} (N = {model.N}, gridsize {model.gridsize}, "
            f"neighbor_count {payload.grid.neighbor_count})",
        )
        tic = time.perf_counter()
        result = reconstruct(model, data, payload, canvas)
        elapsed = time.perf_counter() - tic
        stitched = result.stitched
        obj = stitched.object.astype(np.complex64)
        output_dir.mkdir(parents=True, exist_ok=True)
        _atomic_save_npy(output_dir / "object.npy", obj)
        _atomic_save_npz(
            output_dir / "reconstruction.npz",
            object=obj,
            weights=stitched.weights,
            origin_x=np.float64(stitched.canvas.origin_x),
            origin_y=np.float64(stitched.canvas.origin_y),
            backend=np.asarray(result.backend),
            n_groups=np.int64(result.n_groups),
        )
        written = [output_dir / "object.npy", output_dir / "reconstruction.npz"]
        written += _save_images(output_dir, obj, stitched.weights > 0)
        if scored:
            report = _quality(result, data.object_guess, model.N)
            report.update(
                {
                    "backend": result.backend,
                    "n_groups": result.n_groups,
                    "seconds": elapsed,
                    "timings": dict(result.timings),
                }
            )
            _atomic_save_json(output_dir / "metrics.json", report)
            written.append(output_dir / "metrics.json")
            if "amplitude_ssim" in report:
                _say(
                    args,
                    f"amplitude SSIM {report['amplitude_ssim']:.3f}, phase SSIM "
                    f"{report['phase_ssim']:.3f}, amplitude PSNR "
                    f"{report['amplitude_psnr']:.2f} dB, FRC50 {report['frc50']:.3f}",
                )
            else:
                _say(args, f"no quality metrics: {report['error']}")
        elif (output_dir / "metrics.json").is_file():  # an earlier run's, scoring another image
            (output_dir / "metrics.json").unlink()
            _say(args, f"removed an earlier run's metrics.json from {output_dir} (not scored)")
    _say(
        args,
        f"{result.n_groups} groups reconstructed in {elapsed:.2f} s ({result.backend}); wrote "
        + ", ".join(p.name for p in written)
        + f" to {output_dir}",
    )
    return 0


# ----------------------------------------------------------------------------- simulate
def _cmd_simulate(args: argparse.Namespace) -> int:
    from .data import save_npz
    from .simulate import simulate_dataset, simulate_from_object_npz

    output = _output_file(args.output, "--output")
    with _console_logging(bool(args.quiet)):
        if args.from_object is not None:
            source = _require_file(args.from_object, "object file")
            ignored = [
                f"--{name}"
                for name in ("N", "object", "probe", "scan", "step", "jitter")
                if getattr(args, name) is not None
            ]
            if ignored:
                print(
                    f"warning: {', '.join(ignored)} do(es) not apply with --from-object "
                    "(the file gives object, probe and positions)",
                    file=sys.stderr,
                )
            data = simulate_from_object_npz(
                source, nphotons=args.nphotons, seed=args.seed, pad="auto"
            )
        else:
            kwargs: dict[str, Any] = {"nphotons": args.nphotons, "seed": args.seed}
            for name, key in (
                ("N", "N"),
                ("object", "object_kind"),
                ("probe", "probe_kind"),
                ("scan", "scan_kind"),
                ("step", "step"),
                ("jitter", "jitter"),
            ):
                if getattr(args, name) is not None:
                    kwargs[key] = getattr(args, name)
            data = simulate_dataset(**kwargs)
        save_npz(data, output)
    shape = "none" if data.object_guess is None else "x".join(map(str, data.object_guess.shape))
    _say(
        args,
        f"wrote {output}: {data.n_patterns} patterns of {data.N}x{data.N}, object {shape}, "
        f"{data.mean_photons():.3g} mean counts per pattern",
    )
    return 0


# ----------------------------------------------------------------------------- inspect
def _cmd_inspect(args: argparse.Namespace) -> int:
    from .archive import inspect_archive

    if args.path is not None and args.model_path is not None and args.path != args.model_path:
        raise CLIError("give the archive either as PATH or as --model_path, not both")
    path = args.path if args.path is not None else args.model_path
    if path is None:
        raise CLIError("inspect: no archive given (PATH or --model_path)")
    info = inspect_archive(path)
    print(json.dumps(info, indent=2, sort_keys=False, default=str))
    return 0


# ----------------------------------------------------------------------------- main
#: Top-level modules of the training/inference backend: missing, they get install advice.
_BACKEND_MODULES = frozenset({"torch", "lightning", "pytorch_lightning", "lightning_fabric"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits 2 on bad flags)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.handler(args))
    except FileNotFoundError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, CLIError) as exc:
        message = _naming_the_flag(str(exc), getattr(args, "option_names", {}))
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `ptychodus-torch inspect X | head`
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:  # permissions, a full disk, a folder where a file should go
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _BACKEND_MODULES:
            raise
        print(
            f"{PROG} {args.command}: error: {exc}: the PyTorch backend is not installed; "
            f'install it into this environment: pip install "torch>=2.2" "lightning>=2.4"',
            file=sys.stderr,
        )
        return 1
    except MemoryError as exc:
        return _out_of_memory(args.command, exc)
    except Exception as exc:
        # Torch's allocators raise torch.OutOfMemoryError (a RuntimeError, not a MemoryError)
        # and Lightning refuses hardware settings (devices the node does not have, ...) with
        # no ValueError; both named by class so that the CLI imports neither to start.
        names = {c.__name__ for c in type(exc).__mro__}
        if "OutOfMemoryError" in names:
            return _out_of_memory(args.command, exc)
        if "MisconfigurationException" not in names:
            raise
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _out_of_memory(command: str, exc: BaseException) -> int:
    """One line naming the command's own knob, instead of a traceback ending in OOM."""
    smaller = {
        "train": "a smaller --batch_size, ",
        "infer": "a smaller --inference-batch-size, ",
    }
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(
        f"{PROG} {command}: error: out of memory ({detail}); use "
        f"{smaller.get(command, '')}fewer patterns, or a machine with more memory",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
