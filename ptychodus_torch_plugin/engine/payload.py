"""Payload factory: every engine config built from one flat source of settings.

The CLI flags, the Ptychodus settings and a model archive all speak the same flat vocabulary
(``gridsize``, ``epochs``, ``learning_rate`` ...). ``create_training_payload`` and
``create_inference_payload`` turn such a mapping into frozen configs that share one
``GridConfig``, so channel counts cannot disagree between data, model and physics.

Precedence, highest first: explicit override > model archive (inference only) > execution
config > defaults. ``Payload.sources`` records, per flat field name, which of these set it, so a
user (or a test) can see why a value is what it is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from .config import (
    LOGGER_PACKAGES,
    CheckpointConfig,
    DataConfig,
    ExecutionConfig,
    GridConfig,
    InferenceConfig,
    ModelConfig,
    TrainingConfig,
)

logger = logging.getLogger(__name__)

SOURCE_OVERRIDE = "override"
SOURCE_ARCHIVE = "archive"
SOURCE_EXECUTION = "execution"
SOURCE_DEFAULT = "default"

#: Flat names for the checkpoint sub-config (CLI flags and settings use these).
_CHECKPOINT_KEYS = {
    "checkpoint_enable": "enable",
    "checkpoint_save_top_k": "save_top_k",
    "checkpoint_monitor": "monitor",
    "checkpoint_mode": "mode",
}


def _field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.name != "grid"]


_GRID_KEYS = _field_names(GridConfig)
_EXECUTION_KEYS = [k for k in _field_names(ExecutionConfig) if k != "checkpointing"]


@dataclass(frozen=True)
class TrainingPayload:
    """Everything a training run needs, consistent by construction."""

    grid: GridConfig
    data: DataConfig
    model: ModelConfig
    training: TrainingConfig
    execution: ExecutionConfig
    sources: Mapping[str, str]

    def to_flat(self) -> dict[str, Any]:
        """The flat settings vocabulary, e.g. for the model archive's config.json."""
        return _flatten(self.grid, self.data, self.model, self.training, self.execution)


@dataclass(frozen=True)
class InferencePayload:
    """Everything inference needs, consistent by construction."""

    grid: GridConfig
    data: DataConfig
    model: ModelConfig
    inference: InferenceConfig
    execution: ExecutionConfig
    sources: Mapping[str, str]

    def to_flat(self) -> dict[str, Any]:
        return _flatten(self.grid, self.data, self.model, self.inference, self.execution)


def _flatten(*configs: Any) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for config in configs:
        for f in fields(config):
            value = getattr(config, f.name)
            if f.name == "grid":
                continue
            if isinstance(value, CheckpointConfig):
                for flat_key, attr in _CHECKPOINT_KEYS.items():
                    flat[flat_key] = getattr(value, attr)
            elif isinstance(value, GridConfig):
                continue
            else:
                flat[f.name] = value
    grid = configs[0]
    for key in _GRID_KEYS:
        flat[key] = getattr(grid, key)
    return flat


class _Resolver:
    """Resolves one flat field by precedence and records where its value came from."""

    def __init__(
        self,
        overrides: Mapping[str, Any],
        archived: Mapping[str, Any],
        execution: ExecutionConfig | None,
    ) -> None:
        self._overrides = {k: v for k, v in overrides.items() if v is not None}
        self._archived = {k: v for k, v in archived.items() if v is not None}
        self._execution = execution
        self.sources: dict[str, str] = {}
        self._used: set[str] = set()

    def take(self, key: str, default: Any, *, from_execution: Any = dataclasses.MISSING) -> Any:
        self._used.add(key)
        if key in self._overrides:
            self.sources[key] = SOURCE_OVERRIDE
            return self._overrides[key]
        if key in self._archived:
            self.sources[key] = SOURCE_ARCHIVE
            return self._archived[key]
        if from_execution is not dataclasses.MISSING:
            self.sources[key] = SOURCE_EXECUTION
            return from_execution
        self.sources[key] = SOURCE_DEFAULT
        return default

    def build(self, cls: type, grid: GridConfig | None = None) -> Any:
        defaults = cls() if grid is None else cls(grid=grid)
        kwargs = {name: self.take(name, getattr(defaults, name)) for name in _field_names(cls)}
        return cls(**kwargs) if grid is None else cls(grid=grid, **kwargs)

    def build_execution(self) -> ExecutionConfig:
        given = self._execution
        defaults = ExecutionConfig()
        kwargs: dict[str, Any] = {}
        for name in _EXECUTION_KEYS:
            from_exec = getattr(given, name) if given is not None else dataclasses.MISSING
            kwargs[name] = self.take(name, getattr(defaults, name), from_execution=from_exec)
        checkpoint_given = given.checkpointing if given is not None else None
        checkpoint_kwargs = {}
        for flat_key, attr in _CHECKPOINT_KEYS.items():
            from_exec = (
                getattr(checkpoint_given, attr)
                if checkpoint_given is not None
                else dataclasses.MISSING
            )
            checkpoint_kwargs[attr] = self.take(
                flat_key, getattr(defaults.checkpointing, attr), from_execution=from_exec
            )
        return ExecutionConfig(checkpointing=CheckpointConfig(**checkpoint_kwargs), **kwargs)

    def reject_unknown(self, what: str) -> None:
        unknown = sorted(set(self._overrides) - self._used)
        if unknown:
            raise ValueError(
                f"unknown {what} setting(s) {unknown}: allowed names are {sorted(self._used)}"
            )


def _require_logger_backend(execution: ExecutionConfig) -> None:
    package = LOGGER_PACKAGES.get(execution.logger)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(
            f"ExecutionConfig.logger = {execution.logger!r} needs the '{package}' package, "
            f"which is not installed: run `pip install {package}`, or choose logger 'csv' "
            "(the default) or 'none'"
        )


def create_training_payload(
    overrides: Mapping[str, Any] | None = None,
    *,
    execution: ExecutionConfig | None = None,
    check_environment: bool = True,
) -> TrainingPayload:
    """Build every training config from one flat mapping (``None`` values count as unset).

    ``check_environment=False`` skips what only matters for training *here* (the logging
    backend's package): a model archive rebuilds its network from its stored training
    config, and a model trained with TensorBoard logging must still load where TensorBoard
    is not installed.
    """
    resolver = _Resolver(overrides or {}, {}, execution)
    grid = resolver.build(GridConfig)
    data = resolver.build(DataConfig, grid)
    model = resolver.build(ModelConfig, grid)
    training = resolver.build(TrainingConfig, grid)
    exec_config = resolver.build_execution()
    resolver.reject_unknown("training")
    if check_environment:
        _require_logger_backend(exec_config)
    return TrainingPayload(
        grid=grid,
        data=data,
        model=model,
        training=training,
        execution=exec_config,
        sources=MappingProxyType(dict(resolver.sources)),
    )


def create_inference_payload(
    overrides: Mapping[str, Any] | None = None,
    *,
    execution: ExecutionConfig | None = None,
    archived: Mapping[str, Any] | None = None,
) -> InferencePayload:
    """Build every inference config; ``archived`` is the flat config stored in a model archive.

    The archive's model geometry (N, gridsize, neighbor_count, network shape) is used unless
    explicitly overridden; an override that changes the network's shape cannot load the
    archived weights, so it is logged as a warning here and fails loudly when weights load.
    """
    overrides = dict(overrides or {})
    archived = dict(archived or {})
    model_keys = set(_field_names(ModelConfig)) | {"N", "gridsize"}
    for key in sorted(model_keys & overrides.keys() & archived.keys()):
        if overrides[key] is not None and overrides[key] != archived[key]:
            logger.warning(
                "%s = %r overrides the archived model's %s = %r: the archived weights were "
                "trained for %r and will not fit this network",
                key,
                overrides[key],
                key,
                archived[key],
                archived[key],
            )
    # Only fields that exist at inference time are taken from the archive.
    relevant = set(_GRID_KEYS) | set(_field_names(DataConfig)) | set(_field_names(ModelConfig))
    relevant -= {"n_groups", "seed", "validation_fraction"}
    resolver = _Resolver(overrides, {k: v for k, v in archived.items() if k in relevant}, execution)
    grid = resolver.build(GridConfig)
    data = resolver.build(DataConfig, grid)
    model = resolver.build(ModelConfig, grid)
    inference = resolver.build(InferenceConfig, grid)
    exec_config = resolver.build_execution()
    resolver.reject_unknown("inference")
    return InferencePayload(
        grid=grid,
        data=data,
        model=model,
        inference=inference,
        execution=exec_config,
        sources=MappingProxyType(dict(resolver.sources)),
    )
