"""Where the host writes the reconstruction: an oracle network, checked pixel by pixel.

Why: the other host tests check the returned object's shape, geometry and that it is finite,
and the end-to-end test scores a trained model by correlation, which a 1-3 pixel shift
still passes. Here the network is replaced by an oracle that returns, for each diffraction
pattern it is given, the true object patch at that pattern's probe position, cut by
Ptychodus's own patch rule (``ProbeGeometry.resolve_patch_bounds``). Stitching true patches
reproduces the object exactly, so the object Ptychodus receives must equal the ground truth
wherever the scan covers it: any shift of the input positions, of the canvas, or of how the
canvas is written into the product's object shows. The oracle is independent of the
plugin's own coordinate conversions (host/convert.py), so it checks both halves together.
"""

from __future__ import annotations

import numpy as np
import pytest
from host_helpers import settings_values

from ptychodus_torch_plugin.engine.model import TrainedModel
from ptychodus_torch_plugin.host.reconstructor import MAX_SNAPSHOTS

N = 32
#: Stitched part of each patch at the default CropFraction 0.5: patch pixels 8 .. 23
#: (the central round(N * 0.5) box, pixel N // 2 central; engine/inference.py).
CROP = slice(N // 2 - N // 4, N // 2 + N // 4)


class _Truth:
    """Each pattern's true patch (Ptychodus's cut of the ground truth at its probe position)
    and the object region its stitched (cropped) part covers, in the object's pixel frame."""

    def __init__(self, parameters, truth: np.ndarray) -> None:
        product = parameters.product
        geometry = product.object_.get_geometry()
        x = geometry.map_probe_positions_to_object_x_px(product.probe_positions)
        y = geometry.map_probe_positions_to_object_y_px(product.probe_positions)
        probe_geometry = product.probes.get_geometry()
        assert (probe_geometry.width_px, probe_geometry.height_px) == (N, N)
        self.truth = truth
        self.patches = []
        self.boxes = []
        for cx, cy in zip(x, y, strict=True):
            bounds = probe_geometry.resolve_patch_bounds(float(cx), float(cy))
            assert bounds.dx == 0 and bounds.dy == 0  # whole-pixel cuts: no interpolation
            self.patches.append(truth[bounds.y_slice, bounds.x_slice])
            rows, cols = bounds.y_slice, bounds.x_slice
            self.boxes.append(
                (
                    slice(rows.start + CROP.start, rows.start + CROP.stop),
                    slice(cols.start + CROP.start, cols.start + CROP.stop),
                )
            )
        self.patches = np.asarray(self.patches)
        amplitudes = np.sqrt(np.asarray(parameters.diffraction_patterns, dtype=np.float64))
        flat = amplitudes.reshape(len(amplitudes), -1)
        self._unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)

    def pattern_indices(self, inputs: np.ndarray) -> np.ndarray:
        """Which diffraction pattern each network input is (inputs are amplitudes times one
        normalisation factor): the pattern with the same direction."""
        flat = np.asarray(inputs, dtype=np.float64).reshape(-1, N * N)
        similarity = (flat / np.linalg.norm(flat, axis=1, keepdims=True)) @ self._unit.T
        best = similarity.argmax(axis=1)
        assert np.all(similarity.max(axis=1) > 1 - 1e-6), "an input that is no pattern"
        return best

    def covered_by(self, indices) -> np.ndarray:
        mask = np.zeros(self.truth.shape, dtype=bool)
        for i in indices:
            mask[self.boxes[i]] = True
        return mask


@pytest.fixture(scope="module")
def truth(reconstruct_input, scan_dir) -> _Truth:
    with np.load(scan_dir / "ground_truth.npz") as npz:
        obj = npz["object"]
    assert obj.shape == reconstruct_input.product.object_.get_array().shape[-2:]
    return _Truth(reconstruct_input, obj)


@pytest.fixture(scope="module")
def oracle_library(reconstruct_input, tmp_path_factory):
    """A library of its own with an (untrained) N = 32 model loaded; tests replace its
    prediction with the oracle."""
    from ptychodus.api.settings import SettingsRegistry

    from ptychodus_torch_plugin.engine.archive import save_archive
    from ptychodus_torch_plugin.engine.payload import create_training_payload
    from ptychodus_torch_plugin.host.library import TorchPINNLibrary

    probe = np.asarray(reconstruct_input.product.probes.get_array())[0].astype(np.complex64)
    config = create_training_payload({"N": N, "n_filters_scale": 1, "accelerator": "cpu"})
    model = TrainedModel.build(
        config.to_flat(), probe, input_scale=1.0, intensity_scale=1.0, nphotons=1e5
    )
    archive = save_archive(model, tmp_path_factory.mktemp("oracle") / "wts.h5.zip")
    library = TorchPINNLibrary(SettingsRegistry())
    library.model_slot.select(archive)
    library.settings.accelerator.set_value("cpu")
    return library


@pytest.fixture
def predicted(truth, monkeypatch) -> list[int]:
    """Replaces every model's prediction with the true patches; returns the pattern indexes
    predicted so far, in order."""
    seen: list[int] = []

    def oracle(self, inputs, batch_size=16):
        indices = truth.pattern_indices(np.asarray(inputs))
        seen.extend(int(i) for i in indices)
        return truth.patches[indices].reshape(np.shape(inputs)).astype(np.complex64)

    monkeypatch.setattr(TrainedModel, "predict", oracle)
    return seen


def _reconstruct(library, parameters) -> list:
    return list(library.reconstructor("PINN").reconstruct(parameters))


def _object(output) -> np.ndarray:
    array = output.product.object_.get_array()
    assert array.shape[0] == 1
    return array[0]


@pytest.mark.parametrize(
    "settings",
    [
        {"phase_alignment": False},
        {"phase_alignment": False, "patch_weighting": "uniform", "subpixel": "bilinear"},
    ],
    ids=["probe-weighted-lanczos", "uniform-bilinear"],
)
def test_true_patches_give_back_the_true_object_where_the_scan_lies(
    oracle_library, reconstruct_input, truth, predicted, settings
):
    template = np.asarray(reconstruct_input.product.object_.get_array())[0]
    with settings_values(oracle_library, **settings):
        outputs = _reconstruct(oracle_library, reconstruct_input)
    assert [o.progress for o in outputs] == [1]  # 100 patterns: one chunk of 256
    assert sorted(predicted) == list(range(len(truth.patches)))  # each pattern once
    result = _object(outputs[-1])
    covered = result != template
    np.testing.assert_allclose(result[covered], truth.truth[covered], rtol=0, atol=1e-5)
    union = truth.covered_by(range(len(truth.patches)))
    if settings.get("patch_weighting") == "uniform":
        np.testing.assert_array_equal(covered, union)  # exactly the stitched boxes
    else:  # the probe's dark corners add no weight where no other patch covers them
        assert not np.any(covered & ~union)
        assert covered.sum() >= 0.95 * union.sum()
    np.testing.assert_array_equal(result[~covered], template[~covered])


def test_with_phase_alignment_the_amplitude_is_exact_and_the_phase_nearly(
    oracle_library, reconstruct_input, truth, predicted
):
    """The default settings. Alignment turns each patch by a phase found on a binned canvas,
    which leaves true patches turned by a few milliradians (measured: 0.008 rad at most), so
    the phase is compared to 0.02 rad; amplitudes are untouched by it and must be exact."""
    template = np.asarray(reconstruct_input.product.object_.get_array())[0]
    result = _object(_reconstruct(oracle_library, reconstruct_input)[-1])
    covered = result != template
    expected = truth.truth[covered]
    np.testing.assert_allclose(np.abs(result[covered]), np.abs(expected), rtol=0, atol=1e-4)
    assert np.abs(np.angle(result[covered] / expected)).max() < 0.02
    union = truth.covered_by(range(len(truth.patches)))
    assert not np.any(covered & ~union) and covered.sum() >= 0.95 * union.sum()


@pytest.mark.parametrize(
    "stop_after, progress",
    [(1, [1]), (2, [2]), (3, [2, 3])],
    ids=["after-an-unshown-chunk", "after-a-shown-chunk", "shown-then-unshown"],
)
def test_a_stopped_run_hands_over_the_image_of_every_chunk_it_ran(
    oracle_library, reconstruct_input, truth, predicted, monkeypatch, stop_after, progress
):
    """100 patterns in chunks of 5: 20 chunks, of which only every second one's image is
    handed over (MAX_SNAPSHOTS). Stopped after a chunk whose image was not handed over, the
    run still ends with that image (and with each image once, none twice)."""
    assert MAX_SNAPSHOTS == 10  # the chunks shown below follow from it
    reconstructor = oracle_library.reconstructor("PINN")
    monkeypatch.setattr(
        oracle_library, "is_stopping", lambda: len(reconstructor.chunks_run) >= stop_after
    )
    template = np.asarray(reconstruct_input.product.object_.get_array())[0]
    with settings_values(oracle_library, chunk_size=5, patch_weighting="uniform"):
        outputs = list(reconstructor.reconstruct(reconstruct_input))
    assert reconstructor.chunks_run == list(range(stop_after))
    assert [o.progress for o in outputs] == progress
    assert len(predicted) == 5 * stop_after
    result = _object(outputs[-1])
    covered = truth.covered_by(predicted)  # exactly the patterns predicted so far
    np.testing.assert_allclose(result[covered], truth.truth[covered], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(result[~covered], template[~covered])
