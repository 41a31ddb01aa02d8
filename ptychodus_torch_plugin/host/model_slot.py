"""The library's current model: a remembered archive path and, once needed, the loaded model.

``load_model_from_file`` runs on the Qt thread, so it must be quick: it checks the archive
without importing torch (a readable zip holding a PyTorch manifest of a format this plugin
reads: ``engine/archive.py`` is torch-free at import for this) and remembers the path.
The weights are loaded on the worker thread when inference first needs them (or at once when
torch is already imported, which makes loading cheap). The path lives in the ``ModelPath``
setting, so it is saved with the settings and reused after a restart and by batch mode.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .names import ARCHIVE_NAME, LOGGER_NAME, MODEL_FILE_EXTENSION
from .settings import TorchPINNSettings

if TYPE_CHECKING:
    from ..engine.model import TrainedModel

logger = logging.getLogger(f"{LOGGER_NAME}.host.model")


def resolve_archive(path: Path) -> Path:
    """The archive file for ``path``: the file itself or ``path/wts.h5.zip`` for a folder."""
    path = Path(path)
    if path.is_dir():
        candidate = path / ARCHIVE_NAME
        if not candidate.is_file():
            raise FileNotFoundError(
                f"model archive not found: the folder {path} holds no {ARCHIVE_NAME}"
            )
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"model archive not found: {path}")
    return path


def check_archive(path: Path) -> Path:
    """Quick check that ``path`` is a PyTorch model archive this plugin reads; returns the file.

    Reads the manifest with the loader's own reader (``engine.archive.read_manifest``, which
    imports no torch: Load Model runs this on the Qt thread), so its size caps, its refusals of
    encrypted, repacked or foreign zips and its format check are the loader's, in the same
    words: Load Model refuses what Reconstruct would refuse later. The weights are not read.
    """
    from ..engine.archive import check_format_version, read_manifest

    file = resolve_archive(path)
    manifest = read_manifest(file)
    backend = manifest.get("backend", "tensorflow")
    if backend != "pytorch":
        raise ValueError(
            f"{file}: the archive was written by the {backend} backend; this plugin loads "
            "PyTorch archives only (train a model with TorchPINN, or use the PtychoPINN "
            "library for TensorFlow models)"
        )
    check_format_version(file, manifest)
    return file


def _fingerprint(file: Path) -> tuple[int, int, int] | None:
    """Inode, size and mtime (ns) of ``file``, or None when it cannot be read.

    Why: ``save_copy`` copies the archive the model in use came from, and must notice when
    another run has replaced that file since (an atomic save gives a new inode, a copy in
    place a new mtime) instead of copying a different model.
    """
    try:
        status = Path(file).stat()
    except OSError:
        return None
    return (status.st_ino, status.st_size, status.st_mtime_ns)


class ModelSlot:
    """The model both reconstructors of the library use (thread-safe)."""

    def __init__(self, settings: TorchPINNSettings) -> None:
        self._settings = settings
        self._lock = threading.RLock()
        self._model: TrainedModel | None = None
        self._model_file: Path | None = None  # the archive self._model was loaded from
        # _fingerprint(_model_file) when self._model came from it: a change means the file
        # no longer holds the model in use.
        self._model_fingerprint: tuple[int, int, int] | None = None
        # ModelPath before adopt(): still means "the adopted model" until the host thread
        # has stored the new archive's path (training runs on the worker thread); only while
        # _awaiting_path, so an unset ModelPath (a settings file with none) means no model.
        self._superseded_path: Path | None = None
        self._awaiting_path = False

    @property
    def path(self) -> Path | None:
        return self._settings.get_model_path()

    def is_loaded(self) -> bool:
        """The model ``ModelPath`` means is in memory, or its archive exists (loads when
        needed): what the panel and Ptychodus's Infer button show must be what Infer runs."""
        path = self.path
        with self._lock:
            if self._holds_current(path):
                return True
        if path is None:
            return False
        file = path / ARCHIVE_NAME if path.is_dir() else path
        return file.is_file()

    def select(self, path: Path) -> Path:
        """Check and remember an archive; load it now when torch is already imported."""
        file = check_archive(Path(path)).resolve()
        model = None
        fingerprint = _fingerprint(file)  # before reading: a later change then shows
        if "torch" in sys.modules:  # loading is cheap now: verify the weights at once
            from ..engine.archive import load_archive

            model = load_archive(file)
        with self._lock:
            self._model, self._model_file = model, (file if model is not None else None)
            self._model_fingerprint = fingerprint if model is not None else None
            self._superseded_path, self._awaiting_path = None, False
        self._settings.set_model_path(file)
        logger.info("model archive selected: %s", file)
        return file

    def adopt(self, model: TrainedModel, file: Path) -> None:
        """Use ``model``, just saved at ``file`` (after training); no reload needed."""
        with self._lock:
            self._model = model
            self._model_file = Path(file).resolve()
            self._model_fingerprint = _fingerprint(self._model_file)
            self._superseded_path, self._awaiting_path = self.path, True

    def clear(self) -> None:
        """Forget the model: nothing in memory and no remembered archive (Infer disables)."""
        with self._lock:
            self._model = None
            self._model_file = None
            self._model_fingerprint = None
            self._superseded_path, self._awaiting_path = None, False
        self._settings.set_model_path(None)

    def remember_path(self, file: Path) -> None:
        """Store the adopted model's archive as ``ModelPath`` (on the host thread).

        From here on the old path means the old archive again: a settings file that names it
        later must load that model, not keep the adopted one.
        """
        self._settings.set_model_path(Path(file).resolve())
        with self._lock:
            self._superseded_path, self._awaiting_path = None, False

    def get(self) -> TrainedModel:
        """The model, loading the remembered archive on first use."""
        path = self.path
        with self._lock:
            if self._holds_current(path):
                return self._model
            if path is None:
                raise RuntimeError(
                    "No TorchPINN model is loaded. Train one (Train button, or "
                    "`ptychodus -b train -i IN -o OUT`), or load a model archive "
                    f"(*{MODEL_FILE_EXTENSION}) with Load Model..., or put model"
                    f"{MODEL_FILE_EXTENSION} into the batch input folder."
                )
            from ..engine.archive import load_archive

            file = resolve_archive(path)
            fingerprint = _fingerprint(file)  # before reading: a later change then shows
            model = load_archive(file)  # its errors name the file; the caller logs them
            self._model, self._model_file = model, file.resolve()
            self._model_fingerprint = fingerprint
            self._superseded_path, self._awaiting_path = None, False
            logger.info(
                "model loaded from %s (N=%d, gridsize=%d, %d epochs trained on %s)",
                file,
                model.N,
                model.gridsize,
                model.epochs_trained,
                model.training_device,
            )
            return model

    def _holds_current(self, path: Path | None) -> bool:
        """The model in memory is the one ``ModelPath`` (``path``) means (hold the lock)."""
        if self._model is None:
            return False
        if self._awaiting_path and path == self._superseded_path:
            return True
        return path is not None and (self._model_file is None or self._same(path, self._model_file))

    @staticmethod
    def _same(path: Path, file: Path) -> bool:
        candidate = path / ARCHIVE_NAME if path.is_dir() else path
        try:
            return candidate.resolve() == file
        except OSError:
            return False

    def save_copy(self, destination: Path) -> Path:
        """Save the model in use to ``destination`` (a file, or a folder gets wts.h5.zip).

        Copies the archive the model came from; when that file has changed since the model
        was loaded or adopted (another run saved over it), the model in memory is saved
        instead (atomically, by the engine's writer), so the copy is always the model in use.
        A name completed here (a folder's ``wts.h5.zip``, an added ``.h5.zip``) never replaces
        an existing file: ``FileExistsError`` says so (``saving.check_not_replacing``).
        """
        import shutil

        from ..engine.atomic import atomic_write_path

        path = self.path
        source: Path | None = None
        in_use: TrainedModel | None = None  # set when the file no longer holds it
        with self._lock:
            # Right after training, ModelPath still names the previous archive until the host
            # thread stores the new one: the adopted model's own file is the current one.
            if self._holds_current(path) and self._model_file is not None:
                source = self._model_file
                fingerprint = self._model_fingerprint
                if fingerprint is None or _fingerprint(source) != fingerprint:
                    in_use = self._model
        if source is None and path is not None:
            source = resolve_archive(path)
        if source is None:
            raise RuntimeError("No TorchPINN model to save: train or load one first.")
        from .saving import check_not_replacing

        target = Path(destination)
        if target.is_dir():
            target = target / ARCHIVE_NAME
        elif not target.name.lower().endswith(MODEL_FILE_EXTENSION):
            # "run1.zip" or "run1.h5" become run1.h5.zip: Load Model's dialog lists *.h5.zip only
            stem = target.name
            for partial in (".zip", ".h5"):
                if stem.lower().endswith(partial):
                    stem = stem[: -len(partial)]
            target = target.with_name(stem + MODEL_FILE_EXTENSION)
        if in_use is None and target.exists() and target.resolve() == source.resolve():
            return target
        check_not_replacing(Path(destination), target)
        if in_use is not None:
            from ..engine.archive import save_archive

            logger.warning(
                "%s has changed since the model in use was loaded from it (another run saved "
                "over it?): saving the model in use to %s instead of copying that file",
                source,
                target,
            )
            save_archive(in_use, target)  # atomic, like the copy
            if target.resolve() == source.resolve():  # the file holds the model in use again
                with self._lock:
                    if self._model is in_use:
                        self._model_fingerprint = _fingerprint(source)
            logger.info("model in use saved to %s", target)
            return target
        with atomic_write_path(target) as tmp:
            shutil.copyfile(source, tmp)
        logger.info("model archive copied to %s", target)
        return target
