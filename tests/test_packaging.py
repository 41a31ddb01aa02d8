"""The installed (non-editable) distribution: metadata, entry points, layering."""

import configparser
import os
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest

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


def test_a_relative_ptt_venv_is_made_absolute_before_the_scripts_change_directory(tmp_path):
    """demo.sh and test.sh cd elsewhere before using it: PTT_VENV=venv-cpu named nothing."""
    script = REPO / "scripts" / "venv_path.sh"
    shown = subprocess.run(
        ["bash", "-c", f'ROOT=/nowhere; source "{script}"; echo "$VENV"'],
        cwd=tmp_path,
        env={**os.environ, "PTT_VENV": "venv-cpu"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert shown == str(tmp_path / "venv-cpu")


@pytest.mark.parametrize("beside_simulated_input", [False, True])
def test_the_demo_never_deletes_folders_it_did_not_write(tmp_path, beside_simulated_input):
    """`bash scripts/demo.sh ~/beamtime` used to rm -rf its in/, train/ and reconstruct/; and
    an in/ground_truth.npz (which `host.demo simulate in` writes) vouched for all three."""
    sub = "train" if beside_simulated_input else "in"
    if beside_simulated_input:
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "ground_truth.npz").write_bytes(b"simulated")
    precious = tmp_path / sub / "wts.h5.zip"
    precious.parent.mkdir()
    precious.write_bytes(b"measured data")
    venv = Path(sys.executable).parent.parent  # the environment running the tests
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh"), str(tmp_path)],
        env={**os.environ, "PTT_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"holds {sub}/, which holds no mark of this demo" in done.stderr
    assert precious.read_bytes() == b"measured data"
    assert not list(tmp_path.rglob(".torchpinn-demo"))  # refused before marking anything


def test_the_distribution_carries_its_license():
    """The BSD-3 notice shipped in neither the sdist nor the wheel; the license table form is
    deprecated (setuptools stops building it after 2027-02-18)."""
    dist = distribution("ptychodus-torch-plugin")
    assert dist.metadata["License-Expression"] == "BSD-3-Clause"
    (license_file,) = [f for f in dist.files if f.name == "LICENSE"]
    assert "BSD 3-Clause License" in license_file.read_text()
