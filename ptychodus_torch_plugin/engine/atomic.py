"""Atomic file writes: a temp file in the target directory, renamed into place on success.

Why: a cancelled or crashed run must never leave a half-written archive or NPZ that a later
load would mistake for a good one. ``os.replace`` within one directory is atomic on POSIX and
Windows. A new file gets the permissions a plain ``open()`` would have given it (0666 minus
the umask), not mkstemp's private 0600, so colleagues sharing a beamline account group can
read the models and images; a file that is replaced keeps its permission bits and, where the
OS allows, its group, as a plain ``open()`` rewriting it would (a private model stays private,
a project group's stays the group's).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_write_path(
    path: str | os.PathLike[str], *, permissions_from: str | os.PathLike[str] | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    The file gets the permission bits and group of ``permissions_from`` when given, else of
    the file it replaces, else the umask's default (see the module docstring for why).
    """
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
        _set_permissions(tmp, Path(permissions_from) if permissions_from else target)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _set_permissions(tmp: Path, model: Path) -> None:
    """Give ``tmp`` the permission bits (and group) of ``model``, or the umask's for a new file.

    Only the rwx bits are copied (no setuid, setgid or sticky bit: a write by its owner
    clears those on a plain rewrite too). The group is copied where the OS lets the owner
    change it; where it does not (not a member of the group) the file keeps its own group.
    """
    try:
        existing = os.stat(model)
    except FileNotFoundError:
        os.chmod(tmp, 0o666 & ~_current_umask())
        return
    if hasattr(os, "chown") and existing.st_gid != os.stat(tmp).st_gid:
        with contextlib.suppress(OSError):  # chown first: it may clear mode bits
            os.chown(tmp, -1, existing.st_gid)
    os.chmod(tmp, stat.S_IMODE(existing.st_mode) & 0o777)


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
    file replaces it atomically. Returns where it was kept, or None when there was none or it
    could not be kept; then nothing is left under the dated name (the copy is atomic) and the
    log says that the new file replaces it. A caller that must never replace an earlier file
    asks :func:`path_for_new_file` where to write instead.
    """
    target = Path(target)
    try:
        return _keep_aside(target, extension, what)
    except OSError as exc:
        logger.warning(
            "%s holds an earlier %s that could not be kept (%s): the new one replaces it",
            target,
            what,
            exc.strerror or exc,
        )
        return None


def path_for_new_file(target: str | os.PathLike[str], extension: str, what: str = "model") -> Path:
    """Where to write a new file meant for ``target`` so that an earlier one is never lost.

    The earlier file at ``target`` is kept as :func:`keep_earlier_file` does, and ``target``
    is returned. When it cannot be kept (hard links refused and the copy failed: a full disk,
    or a colleague's file this user may not read), it stays where it is, untouched, and the
    new file goes to a dated name beside it (``<name>-<now><extension>``, as it would be kept
    later), which is returned; the log names both. Why not replace it then: the documentation
    promises that an earlier model is never replaced, and replacing a file that could not be
    copied destroys the only copy.
    """
    target = Path(target)
    try:
        _keep_aside(target, extension, what)
    except OSError as exc:
        instead = _dated_name(target, extension, _dt.datetime.now())
        logger.warning(
            "%s holds an earlier %s that could not be kept aside (%s): it stays as it is, "
            "and the new %s is written as %s instead",
            target,
            what,
            exc.strerror or exc,
            what,
            instead.name,
        )
        return instead
    return target


def _dated_name(target: Path, extension: str, when: _dt.datetime) -> Path:
    """``<name>-<when><extension>`` beside ``target``, numbered so as to name no existing file."""
    base = target.name.removesuffix(extension)
    stamp = when.strftime("%Y%m%d-%H%M%S")
    aside = target.with_name(f"{base}-{stamp}{extension}")
    number = 1
    while aside.exists():
        number += 1
        aside = target.with_name(f"{base}-{stamp}-{number}{extension}")
    return aside


def _keep_aside(target: Path, extension: str, what: str) -> Path | None:
    """Hard-link (or atomically copy) ``target`` to its dated name; None when there is none.

    Raises OSError when it cannot be kept; no partial copy is then left behind.
    """
    if not target.is_file():
        return None
    mtime = _dt.datetime.fromtimestamp(target.stat().st_mtime)
    aside = _dated_name(target, extension, mtime)
    try:
        os.link(target, aside)
    except OSError:  # a file system without hard links, or a link the OS refuses
        with atomic_write_path(aside, permissions_from=target) as tmp:
            shutil.copy2(target, tmp)
    logger.warning("%s held an earlier %s: kept as %s", target, what, aside.name)
    return aside
