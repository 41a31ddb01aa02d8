"""The installed (non-editable) distribution: metadata, entry points, layering."""

import configparser
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import ptychodus_torch_plugin

REPO = Path(__file__).resolve().parents[1]


def test_tests_run_against_the_installed_package_not_the_checkout():
    installed = Path(ptychodus_torch_plugin.__file__).resolve()
    assert "site-packages" in installed.parts, installed
    assert REPO / "ptychodus_torch_plugin" not in installed.parents


def test_installed_entry_points_match_entry_points_txt():
    declared = configparser.ConfigParser()
    declared.optionxform = str  # keep names' case
    declared.read(REPO / "entry_points.txt")
    expected = {
        (group, name, value.strip())
        for group in declared.sections()
        for name, value in declared.items(group)
    }
    assert expected, "entry_points.txt declares nothing"
    installed = {
        (ep.group, ep.name, ep.value) for ep in distribution("ptychodus-torch-plugin").entry_points
    }
    assert expected <= installed
    assert ("console_scripts", "ptychodus-torch") in {(g, n) for g, n, _ in installed}


def test_engine_imports_neither_ptychodus_nor_qt():
    code = (
        "import importlib, pkgutil, sys\n"
        "import ptychodus_torch_plugin.engine as engine\n"
        "for info in pkgutil.iter_modules(engine.__path__):\n"
        "    importlib.import_module(f'ptychodus_torch_plugin.engine.{info.name}')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ptychodus', 'PyQt5'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
