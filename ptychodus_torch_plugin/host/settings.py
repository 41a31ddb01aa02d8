"""Ptychodus settings of the TorchPINN library, and their one way into the engine.

Four INI sections with the ``TorchPINN`` prefix (no clash with the built-in groups). The
settings never build engine configs themselves: :meth:`TorchPINNSettings.training_overrides`
and :meth:`TorchPINNSettings.inference_overrides` produce the flat vocabulary that
``engine.payload.create_training_payload`` / ``create_inference_payload`` validate, so channel
counts and every other derived value have one source of truth.

Choice-valued settings are strings (case-insensitive); the allowed values come from
``engine.config`` (a dependency-free module) and are listed in :data:`CHOICES` for the GUI.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ptychodus.api.observer import Observable, Observer
from ptychodus.api.parameters import IntegerParameter, ParameterBase, RealParameter
from ptychodus.api.settings import SettingsRegistry

from ..engine import config as engine_config
from .names import LOGGER_NAME, SETTINGS_PREFIX

logger = logging.getLogger(f"{LOGGER_NAME}.host.settings")

#: Largest integer a Ptychodus (Qt) spin box can hold; every integer setting has a maximum
#: within it (Ptychodus clamps on read), else a large value in a settings file overflows the
#: panel's spin box, which aborts Ptychodus when Open Settings... loads it.
SPIN_BOX_MAX = 2**31 - 1

MODEL_GROUP = f"{SETTINGS_PREFIX}Model"
TRAINING_GROUP = f"{SETTINGS_PREFIX}Training"
INFERENCE_GROUP = f"{SETTINGS_PREFIX}Inference"
EXECUTION_GROUP = f"{SETTINGS_PREFIX}Execution"
GROUPS = (MODEL_GROUP, TRAINING_GROUP, INFERENCE_GROUP, EXECUTION_GROUP)

#: Allowed values of the string settings (setting name -> choices), for combo boxes.
CHOICES: dict[str, tuple[str, ...]] = {
    "AmpActivation": engine_config.AMP_ACTIVATIONS,
    "Normalization": engine_config.NORMALIZATIONS,
    "Loss": engine_config.LOSSES,
    "Scheduler": engine_config.SCHEDULERS,
    "Optimizer": engine_config.OPTIMIZERS,
    "FinalWeights": engine_config.FINAL_WEIGHTS,
    "PatchWeighting": engine_config.PATCH_WEIGHTINGS,
    "Subpixel": engine_config.SUBPIXEL_METHODS,
    "InputNormalization": engine_config.INPUT_NORMALIZATIONS,
    "Accelerator": engine_config.ACCELERATORS,
    "Precision": engine_config.PRECISIONS,
}

_UNSET_PATHS = ("", ".")


def _out_of_range(group_name: str, name: str, parameter: Any) -> str | None:
    """What is wrong with a number setting stored outside its range (or NaN), else None.

    The value as written (Ptychodus clamps on read, silently), the range, what the panel
    shows instead, and how to store a valid value: picking the shown one changes nothing.
    """
    if not isinstance(parameter, RealParameter | IntegerParameter):
        return None
    raw = ParameterBase.get_value(parameter)  # as written, before the clamp
    low, high = parameter.get_minimum(), parameter.get_maximum()
    if not (
        math.isnan(raw) or (low is not None and raw < low) or (high is not None and raw > high)
    ):
        return None
    low_text = "-inf" if low is None else low
    high_text = "inf" if high is None else high
    return (
        f"{group_name}.{name} = {raw} is invalid: allowed {low_text} .. {high_text}. The panel "
        f"shows {parameter.get_value()} but stores {raw}: pick another value there (to store "
        "the shown one, change it away and back), or correct the settings file"
    )


def _choice(value: str) -> str:
    return value.strip().casefold()


def _devices(value: str) -> int:
    """One device inside Ptychodus: ``auto`` means 1, more is refused with what to do instead.

    Why: Lightning trains on several devices (or on every GPU, for ``auto``) by re-launching
    the running program once per extra device; inside Ptychodus that program is the GUI or
    the whole ``ptychodus -b`` job, which would then run twice (seen: every log line and the
    archive written by two processes). The command line trains on several devices safely.
    """
    text = value.strip().casefold()
    if text in ("", "auto", "1"):
        return 1
    raise ValueError(
        f"{EXECUTION_GROUP}.Devices = {value!r} is invalid inside Ptychodus: allowed 'auto' "
        "or 1 (training on several devices re-launches the whole program). Train on several "
        "GPUs with `ptychodus-torch train --devices N ...` and load the archive with Load Model"
    )


class TorchPINNSettings(Observable, Observer):
    """All TorchPINN parameters, created in ``registry`` (group names must be unique)."""

    def __init__(self, registry: SettingsRegistry) -> None:
        super().__init__()
        model = registry.create_group(MODEL_GROUP)
        training = registry.create_group(TRAINING_GROUP)
        inference = registry.create_group(INFERENCE_GROUP)
        execution = registry.create_group(EXECUTION_GROUP)
        self._groups = (model, training, inference, execution)
        self._warned: set[object] = set()  # problems already logged, each once
        for group in self._groups:
            group.add_observer(self)

        # Model geometry and network (N comes from the data; the archive fixes it for inference)
        self.gridsize = model.create_integer_parameter("Gridsize", 1, minimum=1, maximum=4)
        self.neighbor_count = model.create_integer_parameter(
            "NeighborCount", 4, minimum=1, maximum=64
        )
        self.n_filters_scale = model.create_integer_parameter(
            "NFiltersScale", 2, minimum=1, maximum=8
        )
        self.amp_activation = model.create_string_parameter("AmpActivation", "sigmoid")
        self.normalization = model.create_string_parameter("Normalization", "none")
        self.probe_scale = model.create_real_parameter("ProbeScale", 4.0, minimum=1e-6)
        #: The model archive used for inference: remembered with the settings, set by Load
        #: Model and by training, and used by batch mode when IN/model.h5.zip is absent.
        self.model_path = model.create_path_parameter("ModelPath", Path())

        # Training
        self.epochs = training.create_integer_parameter("Epochs", 50, minimum=1, maximum=100_000)
        self.batch_size = training.create_integer_parameter(
            "BatchSize", 16, minimum=1, maximum=65_536
        )
        self.learning_rate = training.create_real_parameter(
            "LearningRate", 1e-3, minimum=1e-12, maximum=10.0
        )
        self.scheduler = training.create_string_parameter("Scheduler", "constant")
        self.optimizer = training.create_string_parameter("Optimizer", "adam")
        self.final_weights = training.create_string_parameter("FinalWeights", "best")
        # Not engine_config.MAX_SEED (2**32 - 1): Ptychodus edits integers in Qt spin boxes,
        # which hold signed 32-bit values, and a larger bound stops the panel from building.
        self.seed = training.create_integer_parameter("Seed", 0, minimum=0, maximum=SPIN_BOX_MAX)
        self.n_groups = training.create_integer_parameter(
            "NGroups", 0, minimum=0, maximum=SPIN_BOX_MAX
        )
        self.nphotons = training.create_real_parameter("NPhotons", 0.0, minimum=0.0)
        self.loss = training.create_string_parameter("Loss", "poisson")
        self.validation_fraction = training.create_real_parameter(
            "ValidationFraction", 0.05, minimum=0.0, maximum=0.5
        )
        # Probe refinement before training (0: train with the probe Ptychodus hands over).
        self.probe_refinement_epochs = training.create_integer_parameter(
            "ProbeRefinementEpochs",
            0,
            minimum=0,
            maximum=engine_config.MAX_PROBE_REFINEMENT_EPOCHS,
        )
        self.probe_modes = training.create_integer_parameter(
            "ProbeModes", 0, minimum=0, maximum=engine_config.MAX_PROBE_MODES
        )

        # Inference
        self.patch_weighting = inference.create_string_parameter("PatchWeighting", "probe")
        self.subpixel = inference.create_string_parameter("Subpixel", "lanczos3")
        self.inference_batch_size = inference.create_integer_parameter(
            "InferenceBatchSize", 16, minimum=1, maximum=65_536
        )
        self.chunk_size = inference.create_integer_parameter(
            "ChunkSize", 256, minimum=1, maximum=SPIN_BOX_MAX
        )
        self.crop_fraction = inference.create_real_parameter(
            "CropFraction", 0.5, minimum=0.01, maximum=1.0
        )
        self.inference_n_groups = inference.create_integer_parameter(
            "NGroups", 0, minimum=0, maximum=SPIN_BOX_MAX
        )
        self.input_normalization = inference.create_string_parameter(
            "InputNormalization", "recompute"
        )
        self.phase_alignment = inference.create_boolean_parameter("PhaseAlignment", True)

        # Execution (Lightning)
        self.accelerator = execution.create_string_parameter("Accelerator", "auto")
        self.devices = execution.create_string_parameter("Devices", "auto")
        self.precision = execution.create_string_parameter("Precision", "32-true")
        self.deterministic = execution.create_boolean_parameter("Deterministic", False)

    def _update(self, observable: Observable) -> None:
        if observable in self._groups:
            self._normalise_choices()
            self._warn_out_of_range()
            self.notify_observers()

    def _normalise_choices(self) -> None:
        """Store every choice in its canonical spelling; warn once about one that is none.

        Why: settings files may spell choices in any case (``Scheduler = Cosine``), which the
        engine accepts, but the panel's drop-downs list the canonical spelling and would
        silently show another item than the one that trains. A value that is no choice at
        all is left as it is (training will refuse it, naming the allowed values) and logged
        now, so the Ptychodus log explains the panel before a run fails.
        """
        for group_name, group in zip(GROUPS, self._groups, strict=True):
            for name, parameter in group.parameters().items():
                choices = CHOICES.get(name)
                if choices is None:
                    continue
                value = parameter.get_value()
                canonical = _choice(value)
                if canonical in choices:
                    if canonical != value:
                        parameter.set_value(canonical)
                elif (group_name, name, value) not in self._warned:
                    self._warned.add((group_name, name, value))
                    logger.warning(
                        "%s.%s = %r is not a choice: allowed %s; training and inference "
                        "refuse it until it is changed (panel or settings file)",
                        group_name,
                        name,
                        value,
                        ", ".join(choices),
                    )

    def _warn_out_of_range(self) -> None:
        """Log, once each, a number setting outside its range as soon as it is read or set.

        Why: the panel's spin box shows the nearest allowed value while the file's value
        stays stored (and is refused by training, :meth:`_check_numbers`); picking the shown
        value changes nothing. The log explains the panel before a run fails.
        """
        for group_name, group in zip(GROUPS, self._groups, strict=True):
            for name, parameter in group.parameters().items():
                problem = _out_of_range(group_name, name, parameter)
                if problem is not None and problem not in self._warned:
                    self._warned.add(problem)
                    logger.warning("%s; training and inference refuse it until then", problem)

    # ------------------------------------------------------------------ model path
    def get_model_path(self) -> Path | None:
        """The remembered model archive (file or directory), or None when unset."""
        value = self.model_path.get_value()
        return None if str(value) in _UNSET_PATHS else value

    def set_model_path(self, path: Path | None) -> None:
        """Store ``path``; observers hear of it even when it is the path stored already.

        Why: Ptychodus's Train always saves ``<folder>/wts.h5.zip``, so a second run into the
        same folder stores the same path for a new model, and Ptychodus's parameter notifies
        only on a change: the panel went on describing the first model.
        """
        value = Path() if path is None else Path(path)
        if self.model_path.get_value() == value:
            self.model_path.notify_observers()
        else:
            self.model_path.set_value(value)

    # ------------------------------------------------------------------ engine payloads
    def _execution_overrides(self) -> dict[str, Any]:
        return {
            "accelerator": _choice(self.accelerator.get_value()),
            "precision": _choice(self.precision.get_value()),
            "deterministic": self.deterministic.get_value(),
            # Ptychodus shows progress and losses itself: no terminal bar, no log files.
            "enable_progress_bar": False,
            "logger": "none",
        }

    def _check_numbers(self, *group_names: str) -> None:
        """Refuse a number setting of ``group_names`` outside its range (or NaN), naming it.

        Why: Ptychodus clamps on read, silently: ``NFiltersScale = 20`` trained with 8,
        ``Epochs = 0`` with 1, and ``max(minimum, nan)`` turned ``LearningRate = nan`` into
        1e-12. The value as written (before the clamp) is checked here, as the command line
        checks its flags, so a settings file never trains something other than it says.
        """
        checked = set(group_names)
        for group_name, group in zip(GROUPS, self._groups, strict=True):
            if group_name not in checked:  # e.g. a training typo must not block Infer
                continue
            for name, parameter in group.parameters().items():
                problem = _out_of_range(group_name, name, parameter)
                if problem is not None:
                    raise ValueError(problem)

    def training_overrides(self, mode: str, N: int) -> dict[str, Any]:  # noqa: N803
        """Flat overrides for ``create_training_payload`` (``N`` is the data's patch size)."""
        self._check_numbers(MODEL_GROUP, TRAINING_GROUP, INFERENCE_GROUP, EXECUTION_GROUP)
        nphotons = self.nphotons.get_value()
        values: dict[str, Any] = {
            "N": int(N),
            "gridsize": self.gridsize.get_value(),
            "neighbor_count": self.neighbor_count.get_value(),
            "n_filters_scale": self.n_filters_scale.get_value(),
            "amp_activation": _choice(self.amp_activation.get_value()),
            "normalization": _choice(self.normalization.get_value()),
            "probe_scale": self.probe_scale.get_value(),
            "mode": mode,
            "loss": _choice(self.loss.get_value()),
            "epochs": self.epochs.get_value(),
            "batch_size": self.batch_size.get_value(),
            "learning_rate": self.learning_rate.get_value(),
            "scheduler": _choice(self.scheduler.get_value()),
            "optimizer": _choice(self.optimizer.get_value()),
            "final_weights": _choice(self.final_weights.get_value()),
            "seed": self.seed.get_value(),
            "n_groups": self.n_groups.get_value(),
            "nphotons": nphotons if nphotons > 0 else None,  # 0: measured from the data
            "validation_fraction": self.validation_fraction.get_value(),
            "probe_refinement_epochs": self.probe_refinement_epochs.get_value(),
            "probe_modes": self.probe_modes.get_value(),
            "inference_batch_size": self.inference_batch_size.get_value(),
            "checkpoint_enable": False,
        }
        values.update(self._execution_overrides())
        values["devices"] = _devices(self.devices.get_value())  # training only: see _devices
        return values

    def inference_overrides(self) -> dict[str, Any]:
        """Flat overrides for ``create_inference_payload``.

        Model geometry (N, gridsize, network shape, probe scale) is left to the archive: a
        trained network only fits the shape it was trained with.
        """
        self._check_numbers(INFERENCE_GROUP, EXECUTION_GROUP)
        values: dict[str, Any] = {
            "patch_weighting": _choice(self.patch_weighting.get_value()),
            "subpixel": _choice(self.subpixel.get_value()),
            "inference_batch_size": self.inference_batch_size.get_value(),
            "chunk_size": self.chunk_size.get_value(),
            "crop_fraction": self.crop_fraction.get_value(),
            "n_groups": self.inference_n_groups.get_value(),
            "input_normalization": _choice(self.input_normalization.get_value()),
            "phase_alignment": self.phase_alignment.get_value(),
        }
        values.update(self._execution_overrides())
        return values
