"""Every TorchPINN setting reaches its own engine field, and only it, through the host.

Why: the other settings tests build payloads from the default settings only, and every
default is also the engine's default, so a setting wired to the wrong field (the training
NGroups used for inference, NeighborCount swapped with NFiltersScale), or not passed at all,
would leave every test green. Here each setting is set to a value that is not its default,
the reconstructors run as Ptychodus runs them, and the payload they hand the engine
(``engine.training.train`` / ``engine.inference.reconstruct_iter``, both replaced by spies)
is compared with the one the defaults give: exactly the expected fields must change, to
exactly the value set.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from host_helpers import settings_values
from ptychodus.api.parameters import ParameterBase

from ptychodus_torch_plugin.host.settings import TorchPINNSettings

N = 32

#: setting attribute -> (a value that is not its default, the training payload fields it
#: must change, the inference payload fields it must change). Fields are those of the
#: payloads' ``to_flat()``; an empty dict: the setting must not change that payload (the
#: model geometry is the archive's at inference).
WIRING: dict[str, tuple[object, dict, dict]] = {
    # Model
    "gridsize": (2, {"gridsize": 2}, {}),
    "neighbor_count": (7, {"neighbor_count": 7}, {}),
    "n_filters_scale": (3, {"n_filters_scale": 3}, {}),
    "amp_activation": ("silu", {"amp_activation": "silu"}, {}),
    "normalization": ("batch", {"normalization": "batch"}, {}),
    "probe_scale": (1.2345678901234567, {"probe_scale": 1.2345678901234567}, {}),
    # Training
    "epochs": (7, {"epochs": 7}, {}),
    "batch_size": (5, {"batch_size": 5}, {}),
    "learning_rate": (1.2345678901234567e-4, {"learning_rate": 1.2345678901234567e-4}, {}),
    "scheduler": ("cosine", {"scheduler": "cosine"}, {}),
    "optimizer": ("muon", {"optimizer": "muon"}, {}),
    "final_weights": ("last", {"final_weights": "last"}, {}),
    "seed": (123, {"seed": 123}, {}),
    "n_groups": (11, {"n_groups": 11}, {}),
    "nphotons": (1.2345678901234567e6, {"nphotons": 1.2345678901234567e6}, {}),
    "loss": ("mae", {"loss": "mae"}, {}),
    "validation_fraction": (0.123456789, {"validation_fraction": 0.123456789}, {}),
    "probe_refinement_epochs": (3, {"probe_refinement_epochs": 3}, {}),
    "probe_modes": (2, {"probe_modes": 2}, {}),
    # Inference
    "patch_weighting": ("uniform", {}, {"patch_weighting": "uniform"}),
    "subpixel": ("bilinear", {}, {"subpixel": "bilinear"}),
    "inference_batch_size": (9, {"inference_batch_size": 9}, {"inference_batch_size": 9}),
    "chunk_size": (17, {}, {"chunk_size": 17}),
    "crop_fraction": (0.3333333333333333, {}, {"crop_fraction": 0.3333333333333333}),
    "inference_n_groups": (13, {}, {"n_groups": 13}),
    "input_normalization": ("stored", {}, {"input_normalization": "stored"}),
    "phase_alignment": (False, {}, {"phase_alignment": False}),
    # Execution
    "accelerator": ("cpu", {"accelerator": "cpu"}, {"accelerator": "cpu"}),
    "precision": ("bf16-mixed", {"precision": "bf16-mixed"}, {"precision": "bf16-mixed"}),
    "deterministic": (True, {"deterministic": True}, {"deterministic": True}),
}
#: Settings with no engine field of their own to change: ModelPath names the archive, and
#: Devices can only be "auto" or 1 inside Ptychodus, which both mean 1 (anything else is
#: refused: test_registration.py).
NOT_ENGINE_FIELDS = {"model_path", "devices"}


def _attributes(settings: TorchPINNSettings) -> dict[str, ParameterBase]:
    return {name: v for name, v in vars(settings).items() if isinstance(v, ParameterBase)}


@pytest.fixture(scope="module")
def wired(reconstruct_input, tmp_path_factory):
    """A library of its own with an untrained N = 32 model loaded (inference needs one)."""
    from ptychodus.api.settings import SettingsRegistry

    from ptychodus_torch_plugin.engine.archive import save_archive
    from ptychodus_torch_plugin.engine.model import TrainedModel
    from ptychodus_torch_plugin.engine.payload import create_training_payload
    from ptychodus_torch_plugin.host.library import TorchPINNLibrary

    probe = np.asarray(reconstruct_input.product.probes.get_array())[0].astype(np.complex64)
    config = create_training_payload({"N": N, "n_filters_scale": 1, "accelerator": "cpu"})
    model = TrainedModel.build(
        config.to_flat(), probe, input_scale=1.0, intensity_scale=1.0, nphotons=1e5
    )
    archive = save_archive(model, tmp_path_factory.mktemp("wiring") / "wts.h5.zip")
    registry = SettingsRegistry()
    library = TorchPINNLibrary(registry)
    library.model_slot.select(archive)
    return SimpleNamespace(library=library, registry=registry, archive=archive)


@pytest.fixture
def spies(monkeypatch):
    """Replace the engine's training and inference entry points with spies that record the
    payload the host hands them (and do no work)."""
    from ptychodus_torch_plugin.engine import inference, training

    seen: dict[str, list] = {"training": [], "inference": []}

    def train(payload, data, **kwargs):
        seen["training"].append(payload)
        return SimpleNamespace(history=[])  # nothing finished: the host saves nothing

    def reconstruct_iter(model, data, payload=None, canvas=None, should_stop=None):
        seen["inference"].append(payload)
        yield from ()

    monkeypatch.setattr(training, "train", train)
    monkeypatch.setattr(inference, "reconstruct_iter", reconstruct_iter)
    return seen


@pytest.fixture
def payloads(spies, scan_dir, reconstruct_input, tmp_path):
    """``payloads(library, reconstructor)``: the (training, inference) payloads the host
    builds from ``library``'s current settings, through Ptychodus's Train and Reconstruct."""
    runs = itertools.count()

    def build(library, reconstructor="PINN"):
        spies["training"].clear()
        spies["inference"].clear()
        chosen = library.reconstructor(reconstructor)
        assert list(chosen.train(scan_dir, tmp_path / f"out{next(runs)}")) == []
        assert list(chosen.reconstruct(reconstruct_input)) == []
        (training,) = spies["training"]
        (inference,) = spies["inference"]
        return training, inference

    return build


def _changes(payload, baseline) -> dict:
    now, before = payload.to_flat(), baseline.to_flat()
    assert now.keys() == before.keys()
    return {key: now[key] for key in now if now[key] != before[key]}


def test_every_setting_is_checked(wired):
    assert set(_attributes(wired.library.settings)) == set(WIRING) | NOT_ENGINE_FIELDS


@pytest.mark.parametrize("name", sorted(WIRING))
def test_each_setting_reaches_its_own_engine_field(wired, payloads, name):
    value, training_fields, inference_fields = WIRING[name]
    library = wired.library
    assert getattr(library.settings, name).get_value() != value  # not the default
    baseline = payloads(library)
    with settings_values(library, **{name: value}):
        training, inference = payloads(library)
    assert _changes(training, baseline[0]) == training_fields
    assert _changes(inference, baseline[1]) == inference_fields
    # The fields the engine reads (to_flat() shows one "n_groups" for inference's two).
    if name == "inference_n_groups":
        assert (inference.inference.n_groups, inference.data.n_groups) == (value, value)
        assert training.data.n_groups == baseline[0].data.n_groups == 0
    if name == "n_groups":
        assert training.data.n_groups == value and inference.inference.n_groups == 0


def test_the_supervised_reconstructor_trains_in_supervised_mode(wired, payloads):
    pinn = payloads(wired.library, "PINN")
    supervised = payloads(wired.library, "Supervised")
    assert pinn[0].training.mode == "pinn"
    assert _changes(supervised[0], pinn[0]) == {"mode": "supervised"}
    assert _changes(supervised[1], pinn[1]) == {}
    assert pinn[0].grid.N == N  # the data's patch size


def test_all_settings_at_once_survive_a_save_and_reopen(wired, payloads, tmp_path):
    """Every setting at its non-default value at once: the same payloads before and after
    Ptychodus's Save Settings / Open Settings, and each setting reads back exactly."""
    from ptychodus.api.settings import SettingsRegistry

    from ptychodus_torch_plugin.host.library import TorchPINNLibrary

    library = wired.library
    values = {name: value for name, (value, _, _) in WIRING.items()}
    file = tmp_path / "settings.ini"
    with settings_values(library, **values):
        before = payloads(library)
        wired.registry.save_settings(file)
    for index, payload in enumerate(before):  # 0: training, 1: inference
        expected = {}
        for fields in WIRING.values():
            expected.update(fields[1 + index])
        flat = payload.to_flat()
        assert {key: flat[key] for key in expected} == expected

    registry = SettingsRegistry()
    reopened = TorchPINNLibrary(registry)
    registry.open_settings(file)
    for name, parameter in _attributes(reopened.settings).items():
        original = getattr(library.settings, name)
        expected = values.get(name, original.get_value())
        assert parameter.get_value() == expected, name
    assert reopened.settings.get_model_path() == wired.archive.resolve()
    after = payloads(reopened)
    assert after[0].to_flat() == before[0].to_flat()
    assert after[1].to_flat() == before[1].to_flat()
