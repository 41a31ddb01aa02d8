"""Atomic writes: all or nothing, with the permissions a plain open() would give."""

import errno
import os
import shutil
import stat

import pytest

from ptychodus_torch_plugin.engine.atomic import (
    atomic_write_path,
    keep_earlier_file,
    path_for_new_file,
)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_file_appears_only_on_success_with_umask_permissions(tmp_path, umask, mode):
    target = tmp_path / "sub" / "model.h5.zip"
    old = os.umask(umask)
    try:
        with atomic_write_path(target) as tmp:
            tmp.write_bytes(b"complete")
            assert not target.exists()  # nothing visible while writing
    finally:
        os.umask(old)
    assert target.read_bytes() == b"complete"
    assert stat.S_IMODE(target.stat().st_mode) == mode  # as a plain open() would give
    assert [p.name for p in target.parent.iterdir()] == ["model.h5.zip"]


def test_failure_leaves_neither_file_nor_temp(tmp_path):
    target = tmp_path / "out.npz"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_symlinked_target_is_written_through_and_stays_a_link(tmp_path):
    """A model path that is a link (a shared 'current model' name): the link is kept."""
    real = tmp_path / "models" / "run7.h5.zip"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "current.h5.zip"
    link.symlink_to(real)
    with atomic_write_path(link) as tmp:
        tmp.write_bytes(b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    assert sorted(p.name for p in real.parent.iterdir()) == ["run7.h5.zip"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664])
def test_a_replaced_file_keeps_its_permissions(tmp_path, mode):
    """As a plain open() rewriting it would: a private model must not become world-readable."""
    target = tmp_path / "wts.h5.zip"
    target.write_bytes(b"old")
    os.chmod(target, mode)
    old = os.umask(0o022)
    try:
        with atomic_write_path(target) as tmp:
            tmp.write_bytes(b"new")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == mode


def _another_group(path):
    """A group the file can be given (root: any), or None."""
    current = path.stat().st_gid
    for gid in [*os.getgroups(), 1, 100]:
        if gid == current:
            continue
        try:
            os.chown(path, -1, gid)
        except OSError:
            continue
        os.chown(path, -1, current)
        return gid
    return None


@pytest.mark.skipif(not hasattr(os, "chown"), reason="no groups on this OS")
def test_a_replaced_file_keeps_its_group(tmp_path):
    target = tmp_path / "shared.npz"
    target.write_bytes(b"old")
    gid = _another_group(target)
    if gid is None:
        pytest.skip("this user belongs to one group only")
    os.chown(target, -1, gid)
    with atomic_write_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.stat().st_gid == gid


def _refuse_links_and_fill_the_disk(monkeypatch):
    """Hard links refused (FAT, SMB) and the copy stops with a full disk after 300 bytes."""

    def no_link(src, dst, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(dst))

    def partial_copy(src, dst, *args, **kwargs):
        with open(src, "rb") as source, open(dst, "wb") as out:
            out.write(source.read(300))
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(shutil, "copy2", partial_copy)


def test_an_earlier_file_that_cannot_be_kept_leaves_no_partial_copy(tmp_path, monkeypatch, caplog):
    """A truncated wts-<date>.h5.zip looked like a kept model and failed to load later."""
    target = tmp_path / "wts.h5.zip"
    target.write_bytes(b"m" * 1000)
    _refuse_links_and_fill_the_disk(monkeypatch)
    with caplog.at_level("WARNING"):
        assert keep_earlier_file(target, ".h5.zip") is None
    assert [p.name for p in tmp_path.iterdir()] == ["wts.h5.zip"]
    assert target.read_bytes() == b"m" * 1000
    assert "could not be kept (No space left on device)" in caplog.text


def test_a_new_file_never_replaces_an_earlier_one_that_cannot_be_kept(tmp_path, monkeypatch):
    target = tmp_path / "wts.h5.zip"
    target.write_bytes(b"m" * 1000)
    _refuse_links_and_fill_the_disk(monkeypatch)
    instead = path_for_new_file(target, ".h5.zip")
    assert instead.parent == tmp_path and instead.name.startswith("wts-")
    assert instead.name.endswith(".h5.zip") and not instead.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["wts.h5.zip"]
    assert target.read_bytes() == b"m" * 1000


def test_a_new_file_goes_to_the_fixed_name_once_the_earlier_one_is_kept(tmp_path, monkeypatch):
    """Without hard links the copy keeps the earlier file's bytes, time and permissions."""
    target = tmp_path / "wts.h5.zip"
    target.write_bytes(b"m" * 1000)
    os.chmod(target, 0o600)
    os.utime(target, (1_700_000_000, 1_700_000_000))
    assert path_for_new_file(tmp_path / "absent.h5.zip", ".h5.zip") == tmp_path / "absent.h5.zip"

    def no_link(src, dst, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(dst))

    monkeypatch.setattr(os, "link", no_link)
    assert path_for_new_file(target, ".h5.zip") == target
    (kept,) = [p for p in tmp_path.iterdir() if p != target]
    assert kept.name.startswith("wts-2023") and kept.name.endswith(".h5.zip")
    assert kept.read_bytes() == b"m" * 1000 and kept.stat().st_mtime == 1_700_000_000
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
