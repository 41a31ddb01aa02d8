"""The settings files we ship in resources/settings, read the way Ptychodus reads them.

Why: Ptychodus only logs a warning for a key it does not know and leaves that setting at its
default, so a misspelled or renamed key in a shipped file silently changes what a user runs;
and the files that claim to hold the defaults drift when a default changes (the inference
batch size did). These tests load each file into a real ``SettingsRegistry``.
"""

from __future__ import annotations

import configparser
import logging
import re
from pathlib import Path

import pytest
from ptychodus.api.settings import SettingsRegistry

from ptychodus_torch_plugin.engine.payload import (
    create_inference_payload,
    create_training_payload,
)
from ptychodus_torch_plugin.host.demo import main as demo_main
from ptychodus_torch_plugin.host.demo import resolve_settings
from ptychodus_torch_plugin.host.settings import GROUPS, TorchPINNSettings
from ptychodus_torch_plugin.host.shipped_settings import settings_folder, shipped_settings_file

SETTINGS_DIR = Path(__file__).resolve().parents[2] / "resources" / "settings"
SETTINGS_FILES = sorted(SETTINGS_DIR.glob("*.ini"))
#: Files that list every TorchPINN setting at its default (per reconstructor).
DEFAULTS_FILES = {"torchpinn-pinn.ini": "pinn", "torchpinn-supervised.ini": "supervised"}


def _parsed(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return parser


def _loaded(path: Path | None) -> tuple[SettingsRegistry, TorchPINNSettings]:
    """Our settings in a fresh registry, with ``path`` opened into it (None: the defaults)."""
    registry = SettingsRegistry()
    settings = TorchPINNSettings(registry)
    if path is not None:
        registry.open_settings(path)
    return registry, settings


def test_the_shipped_settings_files_are_all_checked():
    names = {path.name for path in SETTINGS_FILES}
    assert set(DEFAULTS_FILES) | {"torchpinn-quality.ini", "torchpinn-tiny.ini"} <= names


@pytest.mark.parametrize("path", SETTINGS_FILES, ids=lambda path: path.name)
def test_every_key_names_a_known_setting(path):
    parser = _parsed(path)
    registry, _ = _loaded(None)
    ours = [section for section in parser.sections() if section.startswith("TorchPINN")]
    assert ours, f"{path.name} sets no TorchPINN section"
    for section in ours:
        assert section in GROUPS, f"{path.name}: unknown section [{section}]"
        known = {name.lower() for name in registry[section].parameters()}
        unknown = sorted(set(parser[section]) - known)
        assert not unknown, f"{path.name} [{section}]: unknown keys {unknown}"
    assert parser["Processing"]["Algorithm"].casefold().startswith("torchpinn_")


@pytest.mark.parametrize("path", SETTINGS_FILES, ids=lambda path: path.name)
def test_every_value_is_accepted_by_the_engine(path):
    _, settings = _loaded(path)
    mode = "supervised" if "supervised" in path.name else "pinn"
    training = create_training_payload(settings.training_overrides(mode, 64))
    inference = create_inference_payload(settings.inference_overrides())
    assert training.model.grid.N == 64
    assert inference.inference.chunk_size >= 1


@pytest.mark.parametrize("name", sorted(DEFAULTS_FILES))
def test_the_defaults_files_hold_every_default(name):
    path = SETTINGS_DIR / name
    parser = _parsed(path)
    defaults, _ = _loaded(None)
    loaded, _ = _loaded(path)
    for group in GROUPS:
        for key, parameter in defaults[group].parameters().items():
            if key == "ModelPath":  # left out on purpose: opening the file keeps your model
                assert not parser.has_option(group, key), f"{name}: names a ModelPath"
                continue
            assert parser.has_option(group, key), f"{name}: [{group}] {key} is missing"
            value = loaded[group].parameters()[key].get_value()
            assert value == parameter.get_value(), (
                f"{name}: [{group}] {key} = {value!r}, but the default is {parameter.get_value()!r}"
            )
    algorithm = parser["Processing"]["Algorithm"].casefold()
    assert algorithm == f"torchpinn_{DEFAULTS_FILES[name]}"


def test_the_quality_file_sets_what_the_benchmark_scored():
    """The settings behind docs/performance.md's best Run1084 scores (benchmarks/quality.py)."""
    _, settings = _loaded(SETTINGS_DIR / "torchpinn-quality.ini")
    values = settings.training_overrides("pinn", 64)
    expected = {
        "gridsize": 2,
        "n_filters_scale": 1,
        "normalization": "batch",
        "batch_size": 16,
        "learning_rate": 5e-3,
        "scheduler": "cosine",
        "optimizer": "muon",
        "final_weights": "last",
        "validation_fraction": 0.0,
    }
    assert {key: values[key] for key in expected} == expected


@pytest.mark.parametrize(
    "section, line, message",
    [
        (
            "TorchPINNModel",
            "NFiltersScale = 20",
            r"NFiltersScale = 20 is invalid: allowed 1 \.\. 8",
        ),
        ("TorchPINNModel", "Gridsize = 9", r"Gridsize = 9 is invalid: allowed 1 \.\. 4"),
        ("TorchPINNTraining", "Epochs = 0", r"Epochs = 0 is invalid: allowed 1 \.\. 100000"),
        ("TorchPINNTraining", "ValidationFraction = 0.9", r"ValidationFraction = 0.9 is invalid"),
    ],
)
def test_a_number_outside_its_range_is_refused_not_clamped(
    tmp_path, caplog, section, line, message
):
    """Ptychodus clamps on read without a word: NFiltersScale = 20 trained with 8."""
    path = tmp_path / "range.ini"
    path.write_text(f"[{section}]\n{line}\n")
    with caplog.at_level(logging.WARNING, logger="ptychodus_torch_plugin"):
        _, settings = _loaded(path)
    # said when the file is read, with what the panel shows instead, not only when a run fails
    warned = [r.getMessage() for r in caplog.records if re.search(message, r.getMessage())]
    assert len(warned) == 1 and "The panel shows" in warned[0], caplog.text
    with pytest.raises(ValueError, match=message) as refused:
        settings.training_overrides("pinn", 32)
    assert "change it away and back" in str(refused.value)
    assert settings.inference_overrides()["chunk_size"] > 0  # a training value never blocks Infer


def test_a_real_setting_that_is_not_a_number_is_refused_by_name(tmp_path):
    """Ptychodus clamps NaN to the minimum on read (LearningRate = nan trained at 1e-12)."""
    path = tmp_path / "nan.ini"
    path.write_text("[TorchPINNTraining]\nLearningRate = nan\n")
    _, settings = _loaded(path)
    with pytest.raises(
        ValueError, match=r"TorchPINNTraining\.LearningRate = nan is invalid: allowed"
    ):
        settings.training_overrides("pinn", 32)
    inference_path = tmp_path / "nan-crop.ini"
    inference_path.write_text("[TorchPINNInference]\nCropFraction = NaN\n")
    _, settings = _loaded(inference_path)
    with pytest.raises(ValueError, match=r"TorchPINNInference\.CropFraction = nan"):
        settings.inference_overrides()
    _, settings = _loaded(None)
    assert settings.training_overrides("pinn", 32)["learning_rate"] > 0


# ----------------------------------------------------------------------------- installed copies
def test_the_ready_made_files_are_installed_with_the_package():
    """pip users have no resources/ folder: the files ship as package data.

    Meaningful against the installed package (scripts/test.sh); run from a checkout on
    PYTHONPATH it compares resources/settings with itself.
    """
    import ptychodus_torch_plugin

    package = Path(ptychodus_torch_plugin.__file__).resolve().parent
    folder = settings_folder()
    if package.parent != SETTINGS_DIR.parents[1]:  # the installed package (scripts/test.sh)
        assert folder == package / "settings"
    installed = {path.name: path.read_bytes() for path in folder.glob("*.ini")}
    assert installed == {path.name: path.read_bytes() for path in SETTINGS_FILES}


def test_a_ready_made_file_is_found_by_name_and_a_local_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_settings("torchpinn-tiny.ini") == settings_folder() / "torchpinn-tiny.ini"
    assert shipped_settings_file("torchpinn-tiny") == settings_folder() / "torchpinn-tiny.ini"
    (tmp_path / "torchpinn-tiny.ini").write_text("[TorchPINNTraining]\nEpochs = 3\n")
    assert resolve_settings("torchpinn-tiny.ini") == Path("torchpinn-tiny.ini")
    assert resolve_settings("torchpinn-tiny") == Path("torchpinn-tiny.ini")  # the local copy
    with pytest.raises(FileNotFoundError, match="they are: torchpinn-demo.ini, torchpinn-pinn"):
        resolve_settings("torchpinn-fast.ini")
    with pytest.raises(FileNotFoundError, match="settings file not found: sub/x.ini$"):
        resolve_settings("sub/x.ini")
    with pytest.raises(FileNotFoundError, match="no ready-made settings file"):
        shipped_settings_file("../settings/torchpinn-tiny.ini")


def test_the_settings_command_lists_and_copies_without_overwriting(tmp_path, capsys):
    assert demo_main(["settings"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [Path(line).name for line in listed] == [path.name for path in SETTINGS_FILES]
    target = tmp_path / "my-settings"
    assert demo_main(["settings", "--copy", str(target)]) == 0
    assert sorted(path.name for path in target.iterdir()) == [p.name for p in SETTINGS_FILES]
    capsys.readouterr()
    edited = target / "torchpinn-quality.ini"
    edited.write_text("[TorchPINNTraining]\nEpochs = 90\n")
    (target / "torchpinn-tiny.ini").unlink()
    assert demo_main(["settings", "--copy", str(target)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"wrote {target / 'torchpinn-tiny.ini'}",
        f"kept {len(SETTINGS_FILES) - 1} file(s) already in {target}",
    ]
    assert edited.read_text() == "[TorchPINNTraining]\nEpochs = 90\n"  # the edit survives
    assert (target / "torchpinn-tiny.ini").read_bytes() == (
        SETTINGS_DIR / "torchpinn-tiny.ini"
    ).read_bytes()
