"""Where trained models are written, and what happens when that place refuses them.

Why a module of its own: a training run is minutes to hours of a beamline scientist's time,
and the folder it was told to save into can turn out read-only, full or missing only at the
very end (Ptychodus's Train saves into the data folder it was given; the panel into the model
folder). Both the host's Train and the panel's Train save through :func:`save_trained_model`,
which then saves into a folder that takes it and says where, instead of discarding the run.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .names import LOGGER_NAME, MODEL_FILE_EXTENSION

if TYPE_CHECKING:
    from ..engine.model import TrainedModel

logger = logging.getLogger(f"{LOGGER_NAME}.host.saving")

#: Environment variable naming the folder where models trained from the panel are written.
MODEL_DIR_ENV = "PTYCHODUS_TORCH_MODEL_DIR"


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
    from ..engine.archive import save_archive

    try:
        return SavedModel(save_archive(model, target))
    except Exception as exc:  # read-only, full, missing, not a folder, ...
        problem = f"the model could not be saved to {target}: {_describe(exc)}"
        first_error: Exception = exc
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    name = f"unsaved-{stamp}{MODEL_FILE_EXTENSION}"
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


def keep_earlier_archive(target: Path) -> Path | None:
    """Keep the archive at ``target`` as ``wts-<its mtime>.h5.zip`` before a new one replaces it.

    Why: Ptychodus's Train always saves as ``wts.h5.zip`` in the folder it is given (the data
    folder, in the GUI); see :func:`..engine.atomic.keep_earlier_file`, which the CLI's
    ``train`` uses too.
    """
    from ..engine.atomic import keep_earlier_file

    return keep_earlier_file(target, MODEL_FILE_EXTENSION)


def check_not_replacing(chosen: Path, target: Path) -> None:
    """Refuse to replace ``target`` when it is not the name the user chose (and confirmed).

    Why: Ptychodus's save dialogs add no suffix, so Qt asks before replacing only the name as
    typed; the suffix or file name we complete it with (``run1`` -> ``run1.h5.zip``) could
    name an existing file that would be replaced without any question.
    """
    if Path(target) != Path(chosen) and Path(target).exists():
        raise FileExistsError(
            f"{target} already exists and was not replaced (the name chosen was {chosen}): "
            f"choose another name, or choose {Path(target).name} itself to replace it"
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
