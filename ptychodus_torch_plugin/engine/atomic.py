"""Atomic file writes: a temp file in the target directory, renamed into place on success.

Why: a cancelled or crashed run must never leave a half-written archive or NPZ that a later
load would mistake for a good one. ``os.replace`` within one directory is atomic on POSIX and
Windows. The finished file gets the permissions a plain ``open()`` would have given it
(0666 minus the umask), not mkstemp's private 0600, so colleagues sharing a beamline account
group can read the models and images.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds."""
    target = Path(path)
    if target.is_symlink():  # replace the file the link points to, and keep the link
        target = Path(os.path.realpath(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:  # name the file the user asked for, not our hidden temp file
        raise type(exc)(exc.errno, exc.strerror, str(target)) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _flush_to_disk(tmp)  # while still ours to write: Windows fsyncs writable handles only
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _flush_to_disk(path: Path) -> None:
    """fsync ``path`` before it is renamed into place.

    Why: without it a power cut soon after the rename can leave the new name pointing at an
    empty file on some file systems (ext4 with delayed allocation), which is exactly the half
    archive the rename exists to prevent.
    """
    with open(path, "r+b") as handle:  # Windows' FlushFileBuffers refuses read-only handles
        os.fsync(handle.fileno())


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux).

    ``os.umask`` can only be read by setting it, which races with other threads creating
    files (the GUI worker and Ptychodus's task thread); /proc avoids that.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def keep_earlier_file(
    target: str | os.PathLike[str], extension: str, what: str = "model"
) -> Path | None:
    """Keep the file at ``target`` under a dated name beside it, before a new one replaces it.

    Why: trained models are saved under fixed names (``wts.h5.zip`` in the folder given, by
    Ptychodus's Train and by ``ptychodus-torch train``), so a second run in the same folder
    (other settings, the other reconstructor) replaced the first model without a word. The
    earlier file is hard-linked (copied where links are refused) as
    ``<name>-<its modification time><extension>``, so ``target`` stays valid until the new
    file replaces it atomically. Returns where it was kept, or None when there was none (or it
    could not be kept: then it is replaced, and the log says so).
    """
    target = Path(target)
    if not target.is_file():
        return None
    base = target.name.removesuffix(extension)
    stamp = _dt.datetime.fromtimestamp(target.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
    aside = target.with_name(f"{base}-{stamp}{extension}")
    number = 1
    while aside.exists():
        number += 1
        aside = target.with_name(f"{base}-{stamp}-{number}{extension}")
    try:
        try:
            os.link(target, aside)
        except OSError:  # a file system without hard links
            shutil.copy2(target, aside)
    except OSError as exc:
        logger.warning(
            "%s holds an earlier %s that could not be kept (%s): the new one replaces it",
            target,
            what,
            exc.strerror or exc,
        )
        return None
    logger.warning("%s held an earlier %s: kept as %s", target, what, aside.name)
    return aside
