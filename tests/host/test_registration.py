"""Registration in the real Ptychodus host: keys, settings groups, INI round trip, bootstrap
idempotency, version checks, lazy heavy imports, and a broken plugin never stopping the host."""

from __future__ import annotations

import importlib.metadata
import textwrap
from pathlib import Path

import ptychodus
import pytest
from host_helpers import run_python

from ptychodus_torch_plugin.host import registration
from ptychodus_torch_plugin.host.names import ENTRY_POINT_GROUP, LIBRARY_NAME
from ptychodus_torch_plugin.host.settings import GROUPS

KEYS = ["torchpinn_pinn", "torchpinn_supervised"]


def test_model_core_lists_our_two_algorithm_keys(model_core):
    keys = list(model_core.processing_core.algorithm_parameter.available_reconstructors())
    assert [k for k in keys if k.startswith("torchpinn")] == KEYS


def test_library_name_is_a_valid_unique_key_part(model_core):
    assert "_" not in LIBRARY_NAME
    builtin = {"pty-chi", "ptychonn", "ptychopinn", "ptychopinn-torch", "ptychofm"}
    assert LIBRARY_NAME.casefold() not in builtin
    keys = list(model_core.processing_core.algorithm_parameter.available_reconstructors())
    assert len(keys) == len(set(keys))


def test_our_settings_groups_appear(model_core):
    groups = set(model_core.settings_registry)
    assert set(GROUPS) <= groups
    assert all(g.startswith("TorchPINN") for g in GROUPS)
    model_group = model_core.settings_registry["TorchPINNModel"]
    assert "ModelPath" in model_group.parameters()


def test_settings_ini_selecting_pinn_round_trips(tmp_path):
    from ptychodus.model import ModelCore

    ini = tmp_path / "in.ini"
    ini.write_text(
        textwrap.dedent(
            """
            [Processing]
            Algorithm = TorchPINN_PINN
            [TorchPINNTraining]
            Epochs = 7
            LearningRate = 0.002
            Scheduler = cosine
            ProbeRefinementEpochs = 40
            ProbeModes = 3
            [TorchPINNModel]
            Gridsize = 2
            ModelPath = /data/models/wts.h5.zip
            [TorchPINNExecution]
            Devices = 2
            """
        )
    )
    core = ModelCore(ini)
    parameter = core.processing_core.algorithm_parameter
    assert parameter.get_value() == "torchpinn_pinn"
    assert parameter.get_current_reconstructor().name == "PINN"
    saved = tmp_path / "saved.ini"
    core.settings_registry.save_settings(saved)
    text = saved.read_text()
    assert "Algorithm = torchpinn_pinn" in text
    for line in (
        "Epochs = 7",
        "LearningRate = 0.002",
        "Scheduler = cosine",
        "Gridsize = 2",
        "ModelPath = /data/models/wts.h5.zip",
        "Devices = 2",
        "ProbeRefinementEpochs = 40",
        "ProbeModes = 3",
    ):
        assert line in text
    again = ModelCore(saved)
    library = registration.registered_libraries(again.processing_core.algorithm_parameter)[0]
    settings = library.library.settings
    assert again.processing_core.algorithm_parameter.get_value() == "torchpinn_pinn"
    assert settings.epochs.get_value() == 7
    assert settings.get_model_path() == Path("/data/models/wts.h5.zip")
    # Several devices would make Lightning re-launch Ptychodus itself: refused, saying why.
    with pytest.raises(ValueError, match=r"Devices = '2' is invalid inside Ptychodus.*--devices"):
        settings.training_overrides("pinn", 32)
    assert "devices" not in settings.inference_overrides()  # inference never needed them
    settings.devices.set_value("auto")
    overrides = settings.training_overrides("pinn", 32)
    assert overrides["gridsize"] == 2 and overrides["devices"] == 1
    assert overrides["scheduler"] == "cosine"
    assert (overrides["probe_refinement_epochs"], overrides["probe_modes"]) == (40, 3)


def test_settings_reach_the_engine_only_through_the_payload_factory(library):
    from ptychodus_torch_plugin.engine.payload import (
        create_inference_payload,
        create_training_payload,
    )

    payload = create_training_payload(library.settings.training_overrides("pinn", 64))
    assert payload.grid.N == 64
    assert payload.grid.neighbor_count == 4  # the documented default
    assert payload.model.in_channels == payload.grid.gridsize**2
    inference = create_inference_payload(library.settings.inference_overrides())
    assert inference.inference.patch_weighting == "probe"
    assert inference.inference.subpixel == "lanczos3"


def test_bootstrap_is_idempotent():
    import ptychodus.model.core as model_core

    before = model_core.ProcessingCore
    assert registration.bootstrap() and registration.bootstrap()
    assert model_core.ProcessingCore is before
    assert getattr(before, "_ptychodus_torch_plugin_wrapped", False)


def test_host_version_is_checked():
    assert ptychodus.__version__.startswith("1.7.")
    registration.check_host_version("1.7.3")
    with pytest.raises(RuntimeError, match="not supported"):
        registration.check_host_version("1.8.0")


def test_entry_point_and_autoload_module_are_installed():
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert names["TorchPINN"] == "ptychodus_torch_plugin.host.plugin:PLUGIN"
    plugins = Path(ptychodus.__file__).parent / "plugins"
    assert (plugins / "ptychodus_torch_plugin_autoload.py").is_file()
    assert not (plugins / "__init__.py").exists()


def test_import_ptychodus_model_imports_neither_torch_nor_lightning_nor_qt():
    code = (
        "import sys\n"
        "import ptychodus.model\n"
        "from ptychodus.model import ModelCore\n"
        "core = ModelCore()\n"
        "keys = list(core.processing_core.algorithm_parameter.available_reconstructors())\n"
        "assert 'torchpinn_pinn' in keys, keys\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'PyQt5') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HEAVY []" in result.stdout


def test_broken_plugin_import_leaves_ptychodus_working(tmp_path):
    """Our package raising at import: ModelCore still starts; selecting us logs an ERROR."""
    shadow = tmp_path / "shadow" / "ptychodus_torch_plugin"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise RuntimeError('simulated broken install')\n")
    ini = tmp_path / "select.ini"
    ini.write_text("[Processing]\nAlgorithm = TorchPINN_PINN\n")
    code = (
        "from pathlib import Path\n"
        "from ptychodus.model import ModelCore\n"
        f"core = ModelCore(Path({str(ini)!r}))\n"
        "keys = list(core.processing_core.algorithm_parameter.available_reconstructors())\n"
        "print('KEYS', [k for k in keys if k.startswith('torchpinn')])\n"
    )
    result = run_python(code, env={"PYTHONPATH": str(shadow.parent)})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "KEYS []" in result.stdout
    assert "simulated broken install" in output  # one clear warning
    assert "ERROR" in output and "selects torchpinn_pinn" in output


def test_wrong_host_version_leaves_ptychodus_untouched_and_explains():
    code = (
        "import ptychodus\n"
        "ptychodus.__version__ = '9.0.0'\n"
        "from ptychodus.model import ModelCore\n"
        "core = ModelCore()\n"
        "keys = list(core.processing_core.algorithm_parameter.available_reconstructors())\n"
        "print('KEYS', [k for k in keys if k.startswith('torchpinn')])\n"
    )
    result = run_python(code)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "KEYS []" in result.stdout
    assert "Ptychodus 9.0.0 is not supported" in output


def test_loading_plugins_does_not_import_the_model_core_but_patches_it_when_imported():
    """Ptychodus's file tools load plugins and never build a ModelCore: importing
    ptychodus.model.core (pydantic_ai, openai) for them cost about 2 s per start."""
    code = (
        "import sys\n"
        "from ptychodus.api.plugins import PluginRegistry\n"
        "PluginRegistry.load_plugins()\n"
        "print('CORE', 'ptychodus.model.core' in sys.modules, 'openai' in sys.modules)\n"
        "import ptychodus.model.core as mc\n"
        "print('WRAPPED', getattr(mc.ProcessingCore, '_ptychodus_torch_plugin_wrapped', False))\n"
        "core = mc.ModelCore()\n"
        "keys = list(core.processing_core.algorithm_parameter.available_reconstructors())\n"
        "print('KEYS', [k for k in keys if k.startswith('torchpinn')])\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CORE False False" in result.stdout
    assert "WRAPPED True" in result.stdout
    assert "KEYS ['torchpinn_pinn', 'torchpinn_supervised']" in result.stdout, result.stdout


def test_a_library_that_fails_to_build_leaves_a_stand_in_and_says_so(tmp_path):
    """The stand-in keeps torchpinn_pinn selected; the ERROR used to say Ptychodus 'keeps
    torchpinn_pinn, and ptychodus -b runs that instead', as if something else would run."""
    settings = tmp_path / "settings.ini"
    settings.write_text("[Processing]\nAlgorithm = torchpinn_pinn\n")
    code = (
        "import logging\n"
        "from pathlib import Path\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "import ptychodus_torch_plugin.host.library as L\n"
        "def boom(self, *a, **k):\n"
        "    raise RuntimeError('simulated library failure')\n"
        "L.TorchPINNLibrary.__init__ = boom\n"
        "from ptychodus.model import ModelCore\n"
        f"core = ModelCore(Path({str(settings)!r}))\n"
        "p = core.processing_core.algorithm_parameter\n"
        "print('SELECTED', p.get_value())\n"
    )
    result = run_python(code)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SELECTED torchpinn_pinn" in result.stdout
    assert "simulated library failure" in output
    assert "as a stand-in that stops every reconstruction and training" in output
    assert "runs that instead" not in output


def test_missing_torch_still_registers_and_says_how_to_install(scan_dir):
    code = (
        "import importlib.abc, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):  # as if torch were not installed\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(\"No module named 'torch'\")\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from ptychodus.model import ModelCore\n"
        "from ptychodus_torch_plugin.host.registration import registered_libraries\n"
        "core = ModelCore()\n"
        "lib = registered_libraries(core.processing_core.algorithm_parameter)[0].library\n"
        "try:\n"
        f"    next(lib.reconstructor('PINN').train({str(scan_dir)!r}, '/tmp/unused'))\n"
        "except RuntimeError as exc:\n"
        "    print('MESSAGE', exc)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MESSAGE PyTorch backend selected" in result.stdout
    assert 'pip install "torch>=2.2"' in result.stdout


def test_gui_builds_offscreen_with_our_reconstructors_and_controller_patched_lazily():
    code = (
        "import sys\n"
        "from ptychodus.model import ModelCore\n"
        "core = ModelCore()\n"
        "assert 'PyQt5' not in sys.modules\n"
        "from PyQt5.QtWidgets import QApplication\n"
        "app = QApplication([])\n"
        "from ptychodus.view import ViewCore\n"
        "from ptychodus.controller import ControllerCore\n"
        "import ptychodus.controller.core as cc\n"
        "assert getattr(cc.ProcessingController, '_ptychodus_torch_plugin_wrapped', False)\n"
        "view = ViewCore(is_developer_mode_enabled=False)\n"
        "ctrl = ControllerCore(core, view, is_developer_mode_enabled=False)\n"
        "keys = list(core.processing_core.algorithm_parameter.available_reconstructors())\n"
        "stack = ctrl._processing_controller._stacked_widget\n"
        "print('STACK', stack.count() == len(keys))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STACK True" in result.stdout


def test_every_package_is_listed_in_pyproject():
    import tomllib

    repo = Path(__file__).resolve().parents[2]
    listed = set(
        tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(repo).parts)
        for p in (repo / "ptychodus_torch_plugin").rglob("__init__.py")
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
    assert not (repo / "ptychodus_torch_plugin" / "host" / "autoload" / "__init__.py").exists()


def test_registered_library_finds_ours_and_names_a_missing_one(model_core, library):
    parameter = model_core.processing_core.algorithm_parameter
    assert registration.registered_library(parameter) is library
    with pytest.raises(LookupError, match="NoSuchLibrary: found 0 registered libraries"):
        registration.registered_library(parameter, "NoSuchLibrary")


def test_a_model_path_change_reaches_ptychodus_infer_button(model_core, library, tmp_path):
    """Open Settings with another ModelPath (same algorithm) left Infer as it was: Ptychodus
    reads is_model_loaded only when its algorithm parameter notifies."""
    from ptychodus.api.observer import Observer

    parameter = model_core.processing_core.algorithm_parameter

    class Count(Observer):
        calls = 0

        def _update(self, observable):
            Count.calls += 1

    counter = Count()
    parameter.add_observer(counter)
    before = library.settings.get_model_path()
    try:
        library.settings.set_model_path(tmp_path / "other.h5.zip")
        assert Count.calls == 1
        # The same path again: a new model may be behind it (Ptychodus's Train saves every
        # run as <folder>/wts.h5.zip), so Infer re-reads is_model_loaded too.
        library.settings.set_model_path(tmp_path / "other.h5.zip")
        assert Count.calls == 2
    finally:
        parameter.remove_observer(counter)
        library.settings.set_model_path(before)


def test_choices_in_any_case_are_stored_canonically_and_unknown_ones_are_logged(tmp_path, caplog):
    """The panel's drop-downs list canonical spellings; a file may use any case."""
    from ptychodus.model import ModelCore

    ini = tmp_path / "in.ini"
    ini.write_text(
        textwrap.dedent(
            """
            [TorchPINNModel]
            Normalization = Batch
            AmpActivation = relu
            [TorchPINNTraining]
            Scheduler = Cosine
            [TorchPINNExecution]
            Accelerator = CPU
            """
        )
    )
    with caplog.at_level("WARNING"):
        core = ModelCore(ini)
    library = registration.registered_libraries(core.processing_core.algorithm_parameter)[0]
    settings = library.library.settings
    values = (settings.normalization, settings.scheduler, settings.accelerator)
    assert [p.get_value() for p in values] == ["batch", "cosine", "cpu"]
    assert settings.amp_activation.get_value() == "relu"  # not a choice: left, and said
    warnings = [r.getMessage() for r in caplog.records if "is not a choice" in r.getMessage()]
    assert warnings == [
        "TorchPINNModel.AmpActivation = 'relu' is not a choice: allowed sigmoid, silu; "
        "training and inference refuse it until it is changed (panel or settings file)"
    ]


@pytest.mark.parametrize("algorithm", ["TorchPINN", "TorchPINN_PINNs", "torchpinn_"])
def test_a_key_naming_our_library_but_no_reconstructor_is_an_error(
    model_core, tmp_path, caplog, algorithm
):
    """Ptychodus would select a do-nothing reconstructor and batch mode would exit 0."""
    parameter = model_core.processing_core.algorithm_parameter
    before = parameter.get_value()
    ini = tmp_path / "settings.ini"
    ini.write_text(f"[Processing]\nAlgorithm = {algorithm}\n")
    with caplog.at_level("ERROR"):
        model_core.settings_registry.open_settings(ini)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    kept = parameter.get_value()  # Ptychodus keeps what it had; the error names it
    assert kept == before
    assert any(
        f"Algorithm = {algorithm.casefold()}" in m
        and "TorchPINN_PINN, TorchPINN_Supervised" in m
        and f"Ptychodus keeps {kept}" in m
        for m in errors
    ), errors
    caplog.clear()
    ini.write_text("[Processing]\nAlgorithm = TorchPINN_PINN\n")  # a right key: no error
    with caplog.at_level("ERROR"):
        model_core.settings_registry.open_settings(ini)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    parameter.set_value(before)


def test_demo_simulate_with_a_missing_settings_file_writes_nothing(tmp_path, capsys):
    """A typo in --settings used to leave a scan without settings.ini (which then ran nothing)."""
    from ptychodus_torch_plugin.host.demo import main

    target = tmp_path / "IN"
    assert main(["simulate", str(target), "--settings", str(tmp_path / "typo.ini")]) == 1
    assert "settings file not found" in capsys.readouterr().err
    assert not target.exists()


def test_our_settings_without_an_algorithm_say_what_runs_instead(tmp_path):
    """TorchPINN sections but no [Processing] Algorithm: Ptychodus runs whatever it had (a
    fresh Ptychodus here: once a TorchPINN key is selected it cannot go back to none_none)."""
    ini = tmp_path / "settings.ini"
    ini.write_text("[TorchPINNTraining]\nEpochs = 50\n")
    code = (
        "from pathlib import Path\n"
        "from ptychodus.model import ModelCore\n"
        f"core = ModelCore(Path({str(ini)!r}))\n"
        "print('ALGORITHM', core.processing_core.algorithm_parameter.get_value())\n"
    )
    result = run_python(code)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ALGORITHM none_none" in result.stdout
    assert "holds TorchPINN settings but sets no [Processing] Algorithm" in output
    assert "keeps none_none, which reconstructs and trains nothing" in output
    assert "Algorithm = TorchPINN_PINN to use them" in output
    ini.write_text("[Processing]\nAlgorithm = TorchPINN_PINN\n[TorchPINNTraining]\nEpochs = 50\n")
    result = run_python(code)
    assert "ALGORITHM torchpinn_pinn" in result.stdout
    assert "sets no [Processing] Algorithm" not in result.stdout + result.stderr
