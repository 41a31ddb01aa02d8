"""Stand-in for a plugin library that failed to build.

It keeps the algorithm keys valid (a settings file selecting ``torchpinn_pinn`` still selects
something) and turns every piece of work into an error that says why the plugin is missing,
instead of Ptychodus's silent do-nothing reconstructor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ptychodus.api.reconstruct import (
    ReconstructInput,
    Reconstructor,
    ReconstructorLibrary,
    ReconstructOutput,
    TrainableReconstructor,
    TrainOutput,
)

from .names import (
    LIBRARY_NAME,
    LOGGER_NAME,
    MODEL_FILE_EXTENSION,
    MODEL_FILE_FILTER,
    RECONSTRUCTOR_MODES,
    TRAINING_DATA_FILE_FILTER,
)


class FailedReconstructor(TrainableReconstructor):
    def __init__(self, name: str, library: FailedLibrary) -> None:
        super().__init__()
        self._name = name
        self._library = library

    @property
    def name(self) -> str:
        return self._name

    def _error(self) -> RuntimeError:
        return RuntimeError(
            f"{self._library.name} failed to load when Ptychodus started ({self._library.reason}); "
            "see the warning at start-up, fix the installation and restart Ptychodus"
        )

    def get_progress_goal(self) -> int:
        return 0

    def reconstruct(self, parameters: ReconstructInput) -> Iterator[ReconstructOutput]:
        raise self._error()
        yield  # pragma: no cover - makes this a generator like the real one

    def is_model_loaded(self) -> bool:
        return False

    def get_model_file_filter(self) -> str:
        return MODEL_FILE_FILTER

    def load_model_from_file(self, file_path: Path) -> None:
        self._library.get_logger().error("cannot load %s: %s", file_path, self._error())

    def get_model_file_extension(self) -> str:
        return MODEL_FILE_EXTENSION

    def save_model(self, file_path: Path) -> None:
        raise self._error()

    def get_training_data_file_filter(self) -> str:
        return TRAINING_DATA_FILE_FILTER

    def export_training_data(self, file_path: Path, parameters: ReconstructInput) -> None:
        raise self._error()

    def train(self, input_path: Path, output_path: Path) -> Iterator[TrainOutput]:
        raise self._error()
        yield  # pragma: no cover


class FailedLibrary(ReconstructorLibrary):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(LOGGER_NAME if name.casefold() == LIBRARY_NAME.casefold() else name)
        self._name = name
        self.reason = reason
        names = list(RECONSTRUCTOR_MODES) if name.casefold() == LIBRARY_NAME.casefold() else []
        self._reconstructors = [FailedReconstructor(n, self) for n in names]

    @property
    def name(self) -> str:
        return self._name

    def __iter__(self) -> Iterator[Reconstructor]:
        return iter(self._reconstructors)
