"""Atomic writes: all or nothing, with the permissions a plain open() would give."""

import os
import stat

import pytest

from ptychodus_torch_plugin.engine.atomic import atomic_write_path


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
