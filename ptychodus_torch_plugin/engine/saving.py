"""Where trained models are written, and what happens when that place refuses them.

Why a module of its own: a training run is minutes to hours of a beamline scientist's time,
and the folder it was told to save into can turn out read-only, full or missing only at the
very end. Ptychodus's Train, the panel's Train and ``ptychodus-torch train`` all save through
:func:`save_trained_model`, which then saves into a folder that takes the model and says
where, instead of discarding the run.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import TrainedModel

logger = logging.getLogger(__name__)

#: Environment variable naming the folder where models trained from the panel are written.
MODEL_DIR_ENV = "PTYCHODUS_TORCH_MODEL_DIR"
#: The model archive's file name ending (``wts.h5.zip``, ``run1.h5.zip``).
ARCHIVE_EXTENSION = ".h5.zip"


def default_model_directory() -> Path:
    """``$PTYCHODUS_TORCH_MODEL_DIR``, else ``$XDG_DATA_HOME/ptychodus-torch-plugin/models``."""
    override = os.environ.get(MODEL_DIR_ENV)
    if override:
        return Path(override).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "ptychodus-torch-plugin" / "models"


def fallback_directories() -> list[Path]:
    """Folders tried, in order, when the intended one refuses a trained model."""
    return [default_model_directory(), Path(tempfile.gettempdir()) / "ptychodus-torch-plugin"]


@dataclass(frozen=True)
class SavedModel:
    """Where a trained model went; ``problem`` says why it is not where it was meant to be."""

    file: Path
    problem: str | None = None


def save_trained_model(model: TrainedModel, target: Path) -> SavedModel:
    """Save ``model`` at ``target`` (file or folder); if that fails, into a fallback folder.

    The fallback file gets a time-stamped name (never overwriting another model). Raises
    ``OSError`` naming the target and every folder tried only when none takes the model.
    """
    from .archive import save_archive

    try:
        return SavedModel(save_archive(model, target))
    except Exception as exc:  # read-only, full, missing, not a folder, ...
        problem = f"the model could not be saved to {target}: {describe_error(exc)}"
        first_error: Exception = exc
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    name = f"unsaved-{stamp}{ARCHIVE_EXTENSION}"
    tried = []
    refused = Path(target).absolute().parent
    for folder in fallback_directories():
        candidate = folder / name
        if folder.absolute() == refused:  # the folder that just refused it
            continue
        tried.append(str(folder))
        try:
            file = save_archive(model, candidate)
        except Exception as exc:  # try the next folder
            logger.debug("fallback folder %s refused the model: %s", folder, exc)
            continue
        return SavedModel(file, f"{problem}; saved to {file} instead")
    raise OSError(
        f"{problem}; no fallback folder took it either ({', '.join(tried)}): free space or "
        "make the output folder writable, then train again"
    ) from first_error


def describe_error(exc: BaseException) -> str:
    """An OS error's plain reason ("No space left on device"), else the exception's text."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
