"""The model slot's archive handling: Load Model's quick check and Save Model's copy.

The slot needs only a model path setting, so a stand-in replaces the Ptychodus settings: these
tests are about which archive is checked, loaded and copied, not about the settings wiring.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from host_helpers import run_python

import ptychodus_torch_plugin
from ptychodus_torch_plugin.engine.archive import (
    FORMAT_VERSION,
    MAX_TEXT_MEMBER,
    load_archive,
    save_archive,
)
from ptychodus_torch_plugin.host.model_slot import ModelSlot, check_archive


class _ModelPathSetting:
    """The one setting ModelSlot uses (``TorchPINNSettings.get/set_model_path``)."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def get_model_path(self) -> Path | None:
        return self.path

    def set_model_path(self, path: Path | None) -> None:
        self.path = path


def _tiny_model(seed: int):
    import torch

    from ptychodus_torch_plugin.engine.model import TrainedModel
    from ptychodus_torch_plugin.engine.payload import create_training_payload
    from ptychodus_torch_plugin.engine.simulate import make_probe

    torch.manual_seed(seed)
    config = create_training_payload(
        {"N": 32, "n_filters_scale": 1, "accelerator": "cpu", "logger": "none"}
    ).to_flat()
    return TrainedModel.build(
        config, make_probe("disk", 32), input_scale=1.0, intensity_scale=2.0, nphotons=1e5
    )


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A saved tiny model (module scope: tests copy it before changing anything)."""
    return save_archive(_tiny_model(0), tmp_path_factory.mktemp("slot") / "wts.h5.zip")


def _with_manifest(source: Path, target: Path, manifest_bytes: bytes) -> Path:
    """A copy of archive ``source`` whose manifest.json is ``manifest_bytes`` (deflated)."""
    with zipfile.ZipFile(source) as zin:
        members = {name: zin.read(name) for name in zin.namelist()}
    members["manifest.json"] = manifest_bytes
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for name, data in members.items():
            zout.writestr(name, data)
    return target


def _manifest(archive: Path) -> dict:
    return json.loads(zipfile.ZipFile(archive).read("manifest.json"))


def _predictions(model) -> np.ndarray:
    inputs = np.random.default_rng(1).random((2, 1, 32, 32), dtype=np.float32)
    return model.predict(inputs)


# ----------------------------------------------------------------------------- Load Model
@pytest.mark.parametrize(
    "version",
    [FORMAT_VERSION + 1, None, "1", 0],
    ids=["newer", "missing", "str", "zero"],
)
def test_load_model_refuses_a_format_the_engine_cannot_read_in_its_words(
    archive, tmp_path, version
):
    """Load Model checked the backend only: a newer archive failed at Reconstruct instead."""
    manifest = _manifest(archive)
    if version is None:
        del manifest["format_version"]
    else:
        manifest["format_version"] = version
    path = _with_manifest(archive, tmp_path / "x.h5.zip", json.dumps(manifest).encode())
    with pytest.raises(ValueError) as host:
        check_archive(path)
    with pytest.raises(ValueError) as engine:
        load_archive(path)
    assert str(host.value) == str(engine.value)
    assert str(path) in str(host.value) and "format_version" in str(host.value)
    with pytest.raises(ValueError, match="format_version"):
        ModelSlot(_ModelPathSetting()).select(path)


def test_load_model_accepts_the_current_format(archive):
    assert _manifest(archive)["format_version"] == FORMAT_VERSION
    assert check_archive(archive) == archive
    assert check_archive(archive.parent) == archive


def test_load_model_refuses_a_manifest_that_inflates_beyond_its_cap(archive, tmp_path):
    """Padding with spaces keeps it valid JSON: only the size cap can refuse it."""
    padded = json.dumps(_manifest(archive)).encode() + b" " * MAX_TEXT_MEMBER
    path = _with_manifest(archive, tmp_path / "bomb.h5.zip", padded)
    assert zipfile.ZipFile(path).getinfo("manifest.json").compress_size < MAX_TEXT_MEMBER // 100
    with pytest.raises(ValueError, match=r"member 'manifest.json' inflates to \d+ bytes") as info:
        check_archive(path)
    assert str(path) in str(info.value) and str(MAX_TEXT_MEMBER) in str(info.value)


def test_load_model_refuses_a_forged_or_repacked_manifest_as_the_loader_does(archive, tmp_path):
    """Load Model read the manifest with zipfile.read, trusting its declared size: 200 bytes
    declared, 64 MiB inflated (or a bzip2 member, inflated with no bound at all)."""
    import tracemalloc

    from archive_helpers import with_declared_size

    padded = json.dumps(_manifest(archive)).encode() + b" " * (64 << 20)
    bomb = _with_manifest(archive, tmp_path / "bomb.h5.zip", padded)
    forged = with_declared_size(bomb, tmp_path / "forged.h5.zip", "manifest.json", 200)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as host:
            check_archive(forged)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"held {peak / 2**20:.0f} MiB"
    with pytest.raises(ValueError) as engine:
        load_archive(forged)
    assert str(host.value) == str(engine.value) and str(forged) in str(host.value)
    repacked = tmp_path / "repacked.h5.zip"
    with zipfile.ZipFile(archive) as zin, zipfile.ZipFile(repacked, "w", zipfile.ZIP_BZIP2) as z:
        for name in zin.namelist():
            z.writestr(name, zin.read(name))
    with pytest.raises(ValueError, match="'manifest.json' is compressed with zip method 12"):
        check_archive(repacked)


def test_load_model_checks_without_importing_torch(archive, tmp_path):
    """check_archive runs on the Qt thread: importing torch there froze the GUI for seconds.
    Its format check comes from engine/archive.py, which must stay torch-free at import."""
    newer = _manifest(archive)
    newer["format_version"] = FORMAT_VERSION + 1
    refused = _with_manifest(archive, tmp_path / "newer.h5.zip", json.dumps(newer).encode())
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from ptychodus_torch_plugin.host.model_slot import check_archive\n"
        f"check_archive(Path({str(archive)!r}))\n"
        "try:\n"
        f"    check_archive(Path({str(refused)!r}))\n"
        "except ValueError as exc:\n"
        "    print('REFUSED', 'newer than this loader' in str(exc))\n"
        "heavy = ('torch', 'safetensors.torch', 'lightning')\n"
        "print('HEAVY', sorted(m for m in heavy if m in sys.modules))\n"
    )
    # The package under test, wherever it was imported from (checkout or installed copy).
    root = str(Path(ptychodus_torch_plugin.__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    result = run_python(code, env={"PYTHONPATH": pythonpath})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "REFUSED True" in result.stdout and "HEAVY []" in result.stdout


# ----------------------------------------------------------------------------- Save Model
@pytest.mark.parametrize("how", ["adopt", "select"])
def test_save_model_saves_the_model_in_use_after_its_file_was_replaced(archive, tmp_path, how):
    """Another run saved over the archive the model in use came from: copying that file
    would save a different model than the one Reconstruct runs."""
    slot = ModelSlot(_ModelPathSetting())
    file = tmp_path / "run" / "wts.h5.zip"
    file.parent.mkdir()
    file.write_bytes(archive.read_bytes())
    if how == "adopt":  # what training does with the model it just saved
        slot.adopt(load_archive(file), file)
    else:  # Load Model (torch is imported here, so the weights load at once)
        slot.select(file)
    in_use = slot.get()
    other = _tiny_model(1)
    save_archive(other, file)  # the other run replaces the file
    assert not np.array_equal(_predictions(other), _predictions(in_use))

    copy = slot.save_copy(tmp_path / "copy")
    assert copy == tmp_path / "copy.h5.zip"
    np.testing.assert_array_equal(_predictions(load_archive(copy)), _predictions(in_use))
    assert slot.get() is in_use  # saving changes nothing about the model in use

    # Saved onto the replaced file itself (a name the user chose and confirmed), it holds
    # the model in use again, and later copies are plain copies of it.
    assert slot.save_copy(file) == file
    np.testing.assert_array_equal(_predictions(load_archive(file)), _predictions(in_use))
    again = slot.save_copy(tmp_path / "again.h5.zip")
    assert again.read_bytes() == file.read_bytes()


def test_save_model_copies_an_unchanged_archive_byte_for_byte(archive, tmp_path):
    slot = ModelSlot(_ModelPathSetting())
    slot.select(archive)
    copy = slot.save_copy(tmp_path)
    assert copy == tmp_path / "wts.h5.zip" and copy.read_bytes() == archive.read_bytes()
