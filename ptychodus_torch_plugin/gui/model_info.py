"""What the panel's model status line says about an archive.

Reading ``manifest.json`` and ``config.json`` takes milliseconds and does not import torch
(``engine.archive.read_summary_documents``), so the status line can be refreshed on the GUI
thread whenever the ``ModelPath`` setting changes. The members are read with the loader's own
size caps and checks: a forged or repacked archive is refused without inflating it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.archive import read_summary_documents
from ..host.names import ARCHIVE_NAME


@dataclass(frozen=True)
class ArchiveSummary:
    path: Path
    backend: str
    N: int | None  # noqa: N815 - the patch size
    gridsize: int | None
    epochs_trained: int
    training_device: str
    mode: str
    created: str
    history: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        parts = [
            f"N={self.N}" if self.N is not None else "N=?",
            f"gridsize {self.gridsize}" if self.gridsize is not None else "gridsize ?",
            f"{self.epochs_trained} epoch{'s' if self.epochs_trained != 1 else ''} trained",
            f"backend {self.backend}",
            f"trained on {self.training_device}",
        ]
        return " · ".join(parts)


def read_archive_summary(path: Path) -> ArchiveSummary:
    """Summary of the archive at ``path`` (a file, or a folder holding wts.h5.zip)."""
    file = Path(path)
    if file.is_dir():
        file = file / ARCHIVE_NAME
    manifest, document = read_summary_documents(file)
    config = document.get("config") if isinstance(document.get("config"), dict) else {}
    raw_history = document.get("history")
    history = [
        record
        for record in (_record(h) for h in (raw_history if isinstance(raw_history, list) else []))
        if record is not None
    ]

    def _int(value: Any) -> int | None:
        try:
            return int(value)
        except (TypeError, ValueError):
            return None

    return ArchiveSummary(
        path=file,
        backend=str(manifest.get("backend", document.get("backend", "unknown"))),
        N=_int(config.get("N")),
        gridsize=_int(config.get("gridsize")),
        epochs_trained=len(history),
        training_device=str(document.get("training_device", "unknown")),
        mode=str(config.get("mode", "")),
        created=str(manifest.get("created", "")),
        history=history,
    )


def _record(entry: Any) -> dict[str, Any] | None:
    """One epoch of an archive's history as plain numbers, or None when it is not one.

    Why: the file is data from outside; the loss plot and the status line run in Qt slots,
    where an exception would end Ptychodus, so a record that is not (epoch, numbers) is
    skipped here rather than refused there.
    """
    if not isinstance(entry, dict):
        return None
    try:
        epoch = int(entry["epoch"])
        train_loss = float(entry["train_loss"])
        val = entry.get("val_loss")
        val_loss = None if val is None else float(val)
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}
