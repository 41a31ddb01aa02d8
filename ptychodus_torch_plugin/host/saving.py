"""Where trained models are written, and what happens when that place refuses them.

Why a module of its own: a training run is minutes to hours of a beamline scientist's time,
and the folder it was told to save into can turn out read-only, full or missing only at the
very end (Ptychodus's Train saves into the data folder it was given; the panel into the model
folder). Both the host's Train and the panel's Train save through :func:`save_trained_model`
(``engine/saving.py``, which ``ptychodus-torch train`` uses too), which then saves into a
folder that takes it and says where, instead of discarding the run.
"""

from __future__ import annotations

from pathlib import Path

# The fallback save lives in the engine (``ptychodus-torch train`` uses it too); the host's
# Train and the panel's use it from here.
from ..engine.saving import (  # noqa: F401 - re-exported
    MODEL_DIR_ENV,
    SavedModel,
    default_model_directory,
    fallback_directories,
    save_trained_model,
)
from .names import MODEL_FILE_EXTENSION


def keep_earlier_archive(target: Path) -> Path:
    """Keep the archive at ``target`` as ``wts-<its mtime>.h5.zip``; return where to save.

    Why: Ptychodus's Train always saves as ``wts.h5.zip`` in the folder it is given (the data
    folder, in the GUI). Returns ``target``, or, when the earlier archive could not be kept
    (a full disk, a colleague's unreadable file), a dated name beside it, so the earlier one
    is never replaced (:func:`..engine.atomic.path_for_new_file`, which the CLI's ``train``
    uses too).
    """
    from ..engine.atomic import path_for_new_file

    return path_for_new_file(target, MODEL_FILE_EXTENSION)


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
