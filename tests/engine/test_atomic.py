"""Atomic writes: all or nothing, with the permissions a plain open() would give."""

import os
import stat

import pytest

from ptychodus_torch_plugin.engine.atomic import atomic_write_path


def test_file_appears_only_on_success_with_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "model.h5.zip"
    old = os.umask(0o022)
    try:
        with atomic_write_path(target) as tmp:
            tmp.write_bytes(b"complete")
            assert not target.exists()  # nothing visible while writing
    finally:
        os.umask(old)
    assert target.read_bytes() == b"complete"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # readable by group and others
    assert [p.name for p in target.parent.iterdir()] == ["model.h5.zip"]


def test_failure_leaves_neither_file_nor_temp(tmp_path):
    target = tmp_path / "out.npz"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
