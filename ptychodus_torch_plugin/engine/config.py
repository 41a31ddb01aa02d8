"""Frozen, validated configuration dataclasses for the engine.

Why one ``GridConfig`` shared by every other config: the channel count C = gridsize**2 is the
quantity the reference implementation got wrong (a hard-coded 4 in one place, 1 in another).
Here N, gridsize and neighbor_count live in exactly one object and every config derives its
channel counts from it, so no two fields can disagree.

Every ``__post_init__`` validates its fields and raises ``ValueError`` naming the field, the
value found and the allowed range, so a bad setting fails where it is made, not deep in a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_BACKEND = "pytorch"
KNOWN_BACKENDS = ("pytorch", "tensorflow")

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
SCHEDULERS = ("constant", "exponential", "cosine", "plateau")
#: "muon": Muon for the hidden convolutions, Adam for the rest (``optimizers.py``).
OPTIMIZERS = ("adam", "muon")
LOGGERS = ("csv", "tensorboard", "mlflow", "none")
#: Only "min": every metric that can be monitored (CHECKPOINT_MONITORS) is a loss, and "max"
#: handed back the worst epoch, kept the worst checkpoints and stopped once the loss stopped
#: rising (while the plateau scheduler, hard-wired to "min", disagreed).
CHECKPOINT_MODES = ("min",)
NORMALIZATIONS = ("none", "batch")
AMP_ACTIVATIONS = ("sigmoid", "silu")
LOSSES = ("poisson", "mae")
MODES = ("pinn", "supervised")
#: Which weights training returns: the best by the monitored metric, or the last epoch's.
FINAL_WEIGHTS = ("best", "last")
PATCH_WEIGHTINGS = ("probe", "uniform")
#: How a patch at a fractional position meets the integer canvas (see ``inference.py``).
SUBPIXEL_METHODS = ("lanczos3", "bilinear")
INPUT_NORMALIZATIONS = ("recompute", "stored")
PATCH_SIZES = (32, 64, 128, 256)
#: Most incoherent probe modes probe refinement fits.
MAX_PROBE_MODES = 8
#: Most probe refinement epochs (a typo guard: 100 already reach the noise floor on real data).
MAX_PROBE_REFINEMENT_EPOCHS = 10_000

#: Largest seed (numpy's and Lightning's seeding take 32-bit unsigned integers).
MAX_SEED = 2**32 - 1
#: The metrics training logs, which checkpointing and early stopping can monitor.
CHECKPOINT_MONITORS = ("val_loss", "train_loss")

#: Optional logging backends and the package each one needs.
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def _fail(owner: str, name: str, value: Any, allowed: str) -> None:
    if type(value).__module__ == "numpy":  # np.int64(64) is refused where 64 is allowed: say why
        allowed += " (as a plain Python value: pass value.item(), not a numpy value)"
    raise ValueError(f"{owner}.{name} = {value!r} is invalid: allowed {allowed}")


def _check_choice(owner: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        _fail(owner, name, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_int(
    owner: str, name: str, value: Any, minimum: int | None = None, maximum: int | None = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(owner, name, value, f"an integer{_range_text(minimum, maximum)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        _fail(owner, name, value, f"an integer{_range_text(minimum, maximum)}")


def _check_real(
    owner: str,
    name: str,
    value: Any,
    minimum: float | None = None,
    exclusive_minimum: bool = False,
    maximum: float | None = None,
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and not math.isfinite(value):  # NaN or infinite: no setting means either
        ok = False
    if ok and minimum is not None:
        ok = value > minimum if exclusive_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        low = (
            "" if minimum is None else (f" > {minimum}" if exclusive_minimum else f" >= {minimum}")
        )
        high = "" if maximum is None else f" <= {maximum}"
        _fail(owner, name, value, f"a finite number{low}{high}")


def _range_text(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def check_backend(owner: str, backend: str) -> None:
    """Backend selection: this package implements the PyTorch backend only."""
    if backend == "tensorflow":
        raise ValueError(
            f"{owner}.backend = 'tensorflow' is not available here: ptychodus-torch-plugin "
            "provides the PyTorch backend only. Use backend='pytorch', or the TensorFlow "
            "PtychoPINN package for TensorFlow models."
        )
    if backend not in KNOWN_BACKENDS:
        _fail(owner, "backend", backend, "'pytorch' (the backend this package provides)")


@dataclass(frozen=True)
class GridConfig:
    """Patch geometry shared by data, model and physics: the one home of N and gridsize."""

    N: int = 64
    gridsize: int = 1
    neighbor_count: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.N, bool) or not isinstance(self.N, int):
            _fail("GridConfig", "N", self.N, "one of " + ", ".join(map(str, PATCH_SIZES)))
        if self.N not in PATCH_SIZES:  # N is the patterns' size: say what to do about it
            raise ValueError(
                f"GridConfig.N = {self.N} is invalid: allowed one of "
                f"{', '.join(map(str, PATCH_SIZES))} (N is the diffraction patterns' size, "
                f"{self.N} x {self.N} px: crop or bin the patterns to one of these, e.g. in "
                "Ptychodus's diffraction settings)"
            )
        _check_int("GridConfig", "gridsize", self.gridsize, 1, 4)
        _check_int("GridConfig", "neighbor_count", self.neighbor_count, 1, 64)
        if self.neighbor_count < self.channels:
            raise ValueError(
                f"GridConfig.neighbor_count = {self.neighbor_count} is invalid: allowed "
                f">= gridsize**2 = {self.channels} (each group takes {self.channels} patterns "
                f"from the seed's {self.neighbor_count} nearest neighbours)"
            )

    @property
    def channels(self) -> int:
        """C = gridsize**2: patterns per group, network input and output channels."""
        return self.gridsize * self.gridsize


@dataclass(frozen=True)
class DataConfig:
    """How measured data become training/inference groups and how they are normalised."""

    grid: GridConfig = field(default_factory=GridConfig)
    n_groups: int = 0  # 0: one group per scan position
    seed: int = 0
    nphotons: float | None = None  # None: measured from the data (mean counts per pattern)
    probe_scale: float = 4.0
    input_normalization: str = "recompute"
    validation_fraction: float = 0.05

    def __post_init__(self) -> None:
        _check_int("DataConfig", "n_groups", self.n_groups, 0)
        _check_int("DataConfig", "seed", self.seed, 0, MAX_SEED)
        if self.nphotons is not None:
            _check_real("DataConfig", "nphotons", self.nphotons, 0.0, exclusive_minimum=True)
        _check_real("DataConfig", "probe_scale", self.probe_scale, 0.0, exclusive_minimum=True)
        _check_choice(
            "DataConfig", "input_normalization", self.input_normalization, INPUT_NORMALIZATIONS
        )
        _check_real("DataConfig", "validation_fraction", self.validation_fraction, 0.0, False, 0.5)

    @property
    def channels(self) -> int:
        return self.grid.channels


@dataclass(frozen=True)
class ModelConfig:
    """Generator network shape. Channel counts are derived, never stored."""

    grid: GridConfig = field(default_factory=GridConfig)
    architecture: str = "cnn"
    n_filters_scale: int = 2
    amp_activation: str = "sigmoid"
    normalization: str = "none"
    probe_big: bool = True
    object_big: bool = True

    def __post_init__(self) -> None:
        _check_choice("ModelConfig", "architecture", self.architecture, ("cnn",))
        _check_int("ModelConfig", "n_filters_scale", self.n_filters_scale, 1, 8)
        _check_choice("ModelConfig", "amp_activation", self.amp_activation, AMP_ACTIVATIONS)
        _check_choice("ModelConfig", "normalization", self.normalization, NORMALIZATIONS)
        for name in ("probe_big", "object_big"):
            if not isinstance(getattr(self, name), bool):
                _fail("ModelConfig", name, getattr(self, name), "True or False")

    @property
    def in_channels(self) -> int:
        return self.grid.channels

    @property
    def out_channels(self) -> int:
        return self.grid.channels


@dataclass(frozen=True)
class TrainingConfig:
    """What is optimised and for how long (how it is executed lives in ExecutionConfig)."""

    grid: GridConfig = field(default_factory=GridConfig)
    mode: str = "pinn"
    loss: str = "poisson"
    epochs: int = 50
    batch_size: int = 16
    # best: the epoch with the best monitored metric (safe with a constant rate);
    # last: the last finished epoch (with a decaying schedule the most converged one)
    final_weights: str = "best"
    # Probe refinement before training (``probe_refinement.py``): 0 trains with the probe as
    # given; n > 0 first fits the probe to the scan for n epochs of a per-scan solver. Worth it
    # whenever the probe may not be this scan's (another scan, another defocus).
    probe_refinement_epochs: int = 0
    # Incoherent probe modes the model uses: 0 keeps the data's; fewer takes the first ones;
    # more needs probe refinement, which fits the new ones.
    probe_modes: int = 0
    backend: str = SUPPORTED_BACKEND

    def __post_init__(self) -> None:
        _check_choice("TrainingConfig", "mode", self.mode, MODES)
        _check_int(
            "TrainingConfig",
            "probe_refinement_epochs",
            self.probe_refinement_epochs,
            0,
            MAX_PROBE_REFINEMENT_EPOCHS,
        )
        _check_int("TrainingConfig", "probe_modes", self.probe_modes, 0, MAX_PROBE_MODES)
        _check_choice("TrainingConfig", "final_weights", self.final_weights, FINAL_WEIGHTS)
        _check_choice("TrainingConfig", "loss", self.loss, LOSSES)
        _check_int("TrainingConfig", "epochs", self.epochs, 1, 100_000)
        _check_int("TrainingConfig", "batch_size", self.batch_size, 1, 65_536)
        check_backend("TrainingConfig", self.backend)

    @property
    def forward_channels(self) -> int:
        """Channels the differentiable forward model carries (= gridsize**2)."""
        return self.grid.channels

    @property
    def refines_probe(self) -> bool:
        """Whether training fits the probe first: asked for, and a physics model to fit it in
        (supervised training has none and ignores ``probe_refinement_epochs``)."""
        return self.probe_refinement_epochs > 0 and self.mode != "supervised"


@dataclass(frozen=True)
class InferenceConfig:
    """Prediction and stitching."""

    grid: GridConfig = field(default_factory=GridConfig)
    n_groups: int = 0  # 0: every pattern is a seed
    patch_weighting: str = "probe"
    # lanczos3: resample each patch onto the canvas grid, place at whole pixels (sharp);
    # bilinear: splat over four canvas pixels (the design note's method, blurs up to 1/2 px)
    subpixel: str = "lanczos3"
    crop_fraction: float = 0.5  # stitch the central N*crop_fraction of each patch
    chunk_size: int = 256  # groups per streamed chunk
    phase_alignment: bool = True  # align patch phase offsets before averaging (final image)
    backend: str = SUPPORTED_BACKEND

    def __post_init__(self) -> None:
        _check_int("InferenceConfig", "n_groups", self.n_groups, 0)
        _check_choice("InferenceConfig", "patch_weighting", self.patch_weighting, PATCH_WEIGHTINGS)
        _check_choice("InferenceConfig", "subpixel", self.subpixel, SUBPIXEL_METHODS)
        _check_real("InferenceConfig", "crop_fraction", self.crop_fraction, 0.0, True, 1.0)
        _check_int("InferenceConfig", "chunk_size", self.chunk_size, 1)
        if not isinstance(self.phase_alignment, bool):
            _fail("InferenceConfig", "phase_alignment", self.phase_alignment, "True or False")
        check_backend("InferenceConfig", self.backend)

    @property
    def channels(self) -> int:
        return self.grid.channels


@dataclass(frozen=True)
class CheckpointConfig:
    enable: bool = True
    save_top_k: int = 1
    monitor: str = "val_loss"
    mode: str = "min"

    def __post_init__(self) -> None:
        if not isinstance(self.enable, bool):
            _fail("CheckpointConfig", "enable", self.enable, "True or False")
        _check_int("CheckpointConfig", "save_top_k", self.save_top_k, -1)
        _check_choice("CheckpointConfig", "monitor", self.monitor, CHECKPOINT_MONITORS)
        _check_choice("CheckpointConfig", "mode", self.mode, CHECKPOINT_MODES)


@dataclass(frozen=True)
class ExecutionConfig:
    """Where and how Lightning runs: hardware, precision, optimiser schedule, logging."""

    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    deterministic: bool = False
    num_workers: int = 0
    learning_rate: float = 1e-3
    scheduler: str = "constant"
    optimizer: str = "adam"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stop_patience: int | None = None  # None: no early stopping
    logger: str = "csv"
    enable_progress_bar: bool = True
    # 16: the fastest float32 predict on the 2-core CI CPU (N=64: 77-79% of the matmul
    # roofline at 16, 63-70% at 64, whose activations no longer fit the caches;
    # benchmarks/speed.py). A GPU may prefer more; memory grows with it.
    inference_batch_size: int = 16

    def __post_init__(self) -> None:
        owner = "ExecutionConfig"
        _check_choice(owner, "accelerator", self.accelerator, ACCELERATORS)
        if self.devices != "auto":
            _check_int(owner, "devices", self.devices, 1)
        _check_int(owner, "num_nodes", self.num_nodes, 1)
        if not isinstance(self.strategy, str) or not self.strategy:
            _fail(owner, "strategy", self.strategy, "a Lightning strategy name such as 'auto'")
        _check_choice(owner, "precision", self.precision, PRECISIONS)
        if not isinstance(self.deterministic, bool):
            _fail(owner, "deterministic", self.deterministic, "True or False")
        _check_int(owner, "num_workers", self.num_workers, 0)
        _check_real(owner, "learning_rate", self.learning_rate, 0.0, exclusive_minimum=True)
        _check_choice(owner, "scheduler", self.scheduler, SCHEDULERS)
        _check_choice(owner, "optimizer", self.optimizer, OPTIMIZERS)
        _check_int(owner, "accumulate_grad_batches", self.accumulate_grad_batches, 1)
        if self.gradient_clip_val is not None:
            _check_real(owner, "gradient_clip_val", self.gradient_clip_val, 0.0, True)
        if not isinstance(self.checkpointing, CheckpointConfig):
            _fail(owner, "checkpointing", self.checkpointing, "a CheckpointConfig")
        if self.early_stop_patience is not None:
            _check_int(owner, "early_stop_patience", self.early_stop_patience, 1)
        _check_choice(owner, "logger", self.logger, LOGGERS)
        if not isinstance(self.enable_progress_bar, bool):
            _fail(owner, "enable_progress_bar", self.enable_progress_bar, "True or False")
        _check_int(owner, "inference_batch_size", self.inference_batch_size, 1)
