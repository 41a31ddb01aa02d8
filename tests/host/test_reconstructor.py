"""The TorchPINN reconstructors driven directly, as Ptychodus's worker thread drives them."""

from __future__ import annotations

import json
import logging
import math
import pickle
import zipfile

import numpy as np
import pytest
import torch
from host_helpers import TINY, settings_values
from ptychodus.api.object import Object
from ptychodus.api.probe import ProbeSequence
from ptychodus.api.product import Product
from ptychodus.api.reconstruct import ReconstructInput

from ptychodus_torch_plugin.engine.data import PTYCHODUS_PIXEL_OFFSET, load_npz, save_npz
from ptychodus_torch_plugin.host.convert import (
    ENGINE_MINUS_HOST_PX,
    reconstruct_input_to_data,
)
from ptychodus_torch_plugin.host.names import MODEL_FILE_EXTENSION, MODEL_FILE_FILTER


def _with_object(parameters: ReconstructInput, obj: Object) -> ReconstructInput:
    p = parameters.product
    product = Product(p.metadata, p.probe_positions, p.probes, obj, p.losses)
    return ReconstructInput(parameters.diffraction_patterns, parameters.bad_pixels, product)


def _with_ground_truth(parameters: ReconstructInput, scan_dir) -> ReconstructInput:
    """The scan with its simulated object: supervised training's target (the product.h5 of a
    batch folder holds Ptychodus's uniform initial guess, which supervised training refuses)."""
    with np.load(scan_dir / "ground_truth.npz") as npz:
        truth = npz["object"]
    template = parameters.product.object_
    return _with_object(
        parameters, Object(truth, template.get_pixel_geometry(), template.get_center())
    )


def test_model_file_names(library):
    reconstructor = library.reconstructor("PINN")
    assert reconstructor.get_model_file_filter() == MODEL_FILE_FILTER
    assert reconstructor.get_model_file_extension() == MODEL_FILE_EXTENSION == ".h5.zip"


def test_counts_become_amplitudes_in_float64_and_bad_pixels_are_masked(reconstruct_input):
    patterns = np.asarray(reconstruct_input.diffraction_patterns)
    counts = np.clip(patterns, 0, 65535).astype(np.uint16)
    counts = np.minimum(counts, 65534)  # 65535 is a detector's flag (next test)
    counts[:, 0, 0] = 65534  # squaring/rooting uint16 naively would overflow or truncate
    bad = np.zeros(counts.shape[1:], bool)
    bad[3, 4] = True  # not zeroed by the host (batch mode never zeroes)
    given = ReconstructInput(counts, bad, reconstruct_input.product)
    data = reconstruct_input_to_data(given)
    assert data.amplitudes.dtype == np.float32
    assert np.allclose(data.amplitudes[:, 0, 0], math.sqrt(65534.0), rtol=1e-6)
    assert np.all(data.amplitudes[:, 3, 4] == 0) and data.bad_pixels[3, 4]
    expected = np.sqrt(counts[:, 10, 10].astype(np.float64))
    assert np.allclose(data.amplitudes[:, 10, 10], expected, rtol=1e-6)
    geometry = reconstruct_input.product.object_.get_geometry()
    x = geometry.map_probe_positions_to_object_x_px(reconstruct_input.product.probe_positions)
    assert np.allclose(data.xcoords, x + ENGINE_MINUS_HOST_PX)
    pixel = reconstruct_input.product.object_.get_pixel_geometry()
    assert data.pixel_size_m == (pixel.width_m, pixel.height_m)  # what a model records


@pytest.mark.parametrize("n", [8, 9])
def test_the_engine_cuts_the_patch_ptychodus_cuts_at_the_same_position(n):
    """Ptychodus's own patch rule (ProbeGeometry.resolve_patch_bounds, pixel i centred at i)
    against the engine's extraction at the host position + ENGINE_MINUS_HOST_PX."""
    from ptychodus.api.probe import ProbeGeometry

    from ptychodus_torch_plugin.engine.simulate import extract_patches

    rng = np.random.default_rng(0)
    obj = rng.random((40, 40)) + 1j * rng.random((40, 40))
    geometry = ProbeGeometry(width_px=n, height_px=n, pixel_width_m=1.0, pixel_height_m=1.0)
    compared = 0
    for cx, cy in [(15.0, 17.0), (15.5, 17.5), (20.0, 12.5)]:
        bounds = geometry.resolve_patch_bounds(cx, cy)
        if bounds.dx or bounds.dy:  # Ptychodus would Fourier-shift: not a whole-pixel cut
            continue
        compared += 1
        host = obj[bounds.y_slice, bounds.x_slice]
        x, y = cx + ENGINE_MINUS_HOST_PX, cy + ENGINE_MINUS_HOST_PX
        engine = extract_patches(obj, np.array([x]), np.array([y]), n)[0]
        np.testing.assert_allclose(engine, host, atol=1e-6)
    assert compared >= 1


def test_a_bad_pixel_mask_of_another_shape_is_refused_not_ignored(reconstruct_input):
    """Ignored with a warning, it masked nothing: the values it hid then wrecked training."""
    patterns = np.asarray(reconstruct_input.diffraction_patterns)
    n = patterns.shape[1]
    wrong = np.zeros((n + 2, n + 2), dtype=bool)
    with pytest.raises(
        ValueError,
        match=rf"bad_pixels: .*shape \({n + 2}, {n + 2}\).*stale: reset the bad-pixel mask",
    ):
        reconstruct_input_to_data(ReconstructInput(patterns, wrong, reconstruct_input.product))
    right = np.zeros((n, n), dtype=bool)
    right[3, 4] = True
    data = reconstruct_input_to_data(ReconstructInput(patterns, right, reconstruct_input.product))
    assert data.bad_pixels[3, 4] and int(data.bad_pixels.sum()) == 1


def test_detector_flag_values_join_the_mask_with_a_warning(reconstruct_input, caplog):
    """An Eiger writes gap and dead pixels as 0xFFFFFFFF: unmasked, they swamp the scan."""
    counts = np.rint(np.asarray(reconstruct_input.diffraction_patterns)).astype(np.uint32)
    clean = reconstruct_input_to_data(ReconstructInput(counts, None, reconstruct_input.product))
    flagged = counts.copy()
    flagged[:, :, 5] = np.iinfo(np.uint32).max  # a dead column
    flagged[2, 7, 9] = np.iinfo(np.uint32).max  # one overflow in one pattern
    with caplog.at_level(logging.WARNING):
        data = reconstruct_input_to_data(ReconstructInput(flagged, None, reconstruct_input.product))
    n = counts.shape[1]
    assert f"{n + 1} detector pixel(s) hold 4294967295" in caplog.text
    assert "bad-pixel mask to silence this" in caplog.text
    assert "either sets them to 0" in caplog.text  # not the advice: zeros count as measured
    assert data.bad_pixels[:, 5].all() and data.bad_pixels[7, 9]
    assert int(data.bad_pixels.sum()) == n + 1
    assert np.all(data.amplitudes[:, :, 5] == 0) and np.all(data.amplitudes[:, 7, 9] == 0)
    keep = ~data.bad_pixels
    assert np.array_equal(data.amplitudes[:, keep], clean.amplitudes[:, keep])


def test_nan_counts_are_refused_in_good_pixels_and_zeroed_in_bad_ones(reconstruct_input):
    patterns = np.asarray(reconstruct_input.diffraction_patterns, dtype=np.float32).copy()
    patterns[1, 2, 3] = np.nan
    product = reconstruct_input.product
    with pytest.raises(ValueError, match=r"counts: found 1 NaN/inf value\(s\) in good detector"):
        reconstruct_input_to_data(ReconstructInput(patterns, None, product))
    bad = np.zeros(patterns.shape[1:], bool)
    bad[2, 3] = True
    data = reconstruct_input_to_data(ReconstructInput(patterns, bad, product))
    assert np.all(data.amplitudes[:, 2, 3] == 0) and np.isfinite(data.amplitudes).all()


def test_a_probe_with_opr_modes_is_used_through_its_first_and_the_log_says_so(
    reconstruct_input, caplog
):
    p = reconstruct_input.product
    given = np.asarray(p.probes.get_array())  # (1, modes, N, N)
    opr = np.concatenate([given, 0.5 * given], axis=0)
    weights = np.ones((len(p.probe_positions), 2))
    probes = ProbeSequence(opr, weights, p.probes.get_pixel_geometry())
    product = Product(p.metadata, p.probe_positions, probes, p.object_, p.losses)
    with caplog.at_level(logging.WARNING):
        data = reconstruct_input_to_data(
            ReconstructInput(reconstruct_input.diffraction_patterns, None, product)
        )
    assert "2 orthogonal probe relaxation (OPR) modes" in caplog.text
    np.testing.assert_allclose(data.probe, given[0].astype(np.complex64))


def test_patterns_and_probe_of_different_sizes_are_refused_naming_both(reconstruct_input):
    patterns = np.asarray(reconstruct_input.diffraction_patterns)
    n = patterns.shape[1]
    cropped = ReconstructInput(patterns[:, : n // 2, : n // 2], None, reconstruct_input.product)
    with pytest.raises(
        ValueError, match=rf"probe is {n} x {n} px \(1 mode\(s\)\) but the diffraction patterns"
    ):
        reconstruct_input_to_data(cropped)


def test_reconstruct_without_a_model_says_how_to_get_one(library, reconstruct_input):
    from ptychodus.api.settings import SettingsRegistry

    from ptychodus_torch_plugin.host.library import TorchPINNLibrary

    fresh = TorchPINNLibrary(SettingsRegistry())
    reconstructor = fresh.reconstructor("PINN")
    assert not reconstructor.is_model_loaded()
    with pytest.raises(RuntimeError, match="No TorchPINN model is loaded.*Train.*Load Model"):
        next(reconstructor.reconstruct(reconstruct_input))


def test_errors_reach_the_library_logger_that_ptychodus_shows(
    library, reconstruct_input, tmp_path, caplog
):
    """Ptychodus's log pane follows our logger; its task manager only prints tracebacks."""
    from ptychodus.api.settings import SettingsRegistry

    from ptychodus_torch_plugin.host.library import TorchPINNLibrary
    from ptychodus_torch_plugin.host.names import LOGGER_NAME

    fresh = TorchPINNLibrary(SettingsRegistry())
    with caplog.at_level(logging.ERROR, logger=LOGGER_NAME):
        with pytest.raises(RuntimeError):
            next(fresh.reconstructor("PINN").reconstruct(reconstruct_input))
        with pytest.raises(FileNotFoundError):
            next(library.reconstructor("PINN").train(tmp_path, tmp_path))  # no data there
    errors = [r for r in caplog.records if r.name.startswith(LOGGER_NAME)]
    assert [r.levelno for r in errors] == [logging.ERROR, logging.ERROR]
    assert "PINN inference failed: No TorchPINN model is loaded" in errors[0].getMessage()
    assert "PINN training failed: " in errors[1].getMessage()
    assert str(tmp_path) in errors[1].getMessage()


def test_reconstruct_streams_one_output_per_chunk_in_the_input_frame(
    library, reconstruct_input, trained_archive
):
    reconstructor = library.reconstructor("PINN")
    reconstructor.load_model_from_file(trained_archive.parent)  # a folder holding wts.h5.zip
    assert reconstructor.is_model_loaded()
    with settings_values(library, chunk_size=30):  # 100 patterns -> 4 chunks
        outputs = []
        generator = reconstructor.reconstruct(reconstruct_input)
        for output in generator:
            outputs.append(output)
            assert reconstructor.get_progress_goal() == 4
    assert [o.progress for o in outputs] == [1, 2, 3, 4]
    template = reconstruct_input.product.object_
    for output in outputs:
        obj = output.product.object_
        assert obj.get_array().shape == template.get_array().shape
        assert obj.get_pixel_geometry() == template.get_pixel_geometry()
        assert obj.get_center() == template.get_center()
        assert np.all(np.isfinite(obj.get_array()))
    losses = outputs[-1].product.losses
    assert [loss.epoch for loss in losses] == [1] and losses[0].value > 0
    # Trained without probe refinement: the product's own probe comes back untouched.
    assert all(o.product.probes is reconstruct_input.product.probes for o in outputs)
    # Chunks fill the image in: more pixels differ from the initial guess each time.
    changed = [np.count_nonzero(o.product.object_.get_array() != 1) for o in outputs]
    assert changed == sorted(changed) and changed[0] < changed[-1]


def test_a_long_run_hands_over_at_most_ten_images(library, reconstruct_input, trained_archive):
    """Batch mode saves each as OUT/product.NNNNNN.h5, the whole object uncompressed: one per
    chunk wrote 79 copies for 20,000 patterns. Every chunk still runs, and the last is there."""
    reconstructor = library.reconstructor("PINN")
    reconstructor.load_model_from_file(trained_archive)
    with settings_values(library, chunk_size=5):  # 100 patterns -> 20 chunks
        outputs = list(reconstructor.reconstruct(reconstruct_input))
    assert reconstructor.chunks_run == list(range(20))
    assert [o.progress for o in outputs] == list(range(2, 21, 2))


def test_stopping_after_the_first_output_runs_no_further_chunk(
    library, reconstruct_input, trained_archive
):
    reconstructor = library.reconstructor("PINN")
    reconstructor.load_model_from_file(trained_archive)
    with settings_values(library, chunk_size=30):
        generator = reconstructor.reconstruct(reconstruct_input)
        first = next(generator)
        generator.close()  # what Ptychodus does after Stop
    assert first.progress == 1
    assert reconstructor.chunks_run == [0]


def test_host_stop_request_ends_the_stream_after_the_current_chunk(
    library, reconstruct_input, trained_archive, monkeypatch
):
    """Ptychodus's Stop sets its task monitor; the reconstructor polls it between chunks."""
    reconstructor = library.reconstructor("PINN")
    reconstructor.load_model_from_file(trained_archive)
    monkeypatch.setattr(library, "is_stopping", lambda: bool(reconstructor.chunks_run))
    with settings_values(library, chunk_size=30):
        outputs = list(reconstructor.reconstruct(reconstruct_input))  # drained, not closed
    assert reconstructor.chunks_run == [0]
    assert len(outputs) <= 1


def test_multilayer_input_object_keeps_its_layers(library, reconstruct_input, trained_archive):
    template = reconstruct_input.product.object_
    # Layers that are not 1 anywhere, so a layer left as it was would show.
    layers = np.stack([template.get_array()[0] * k for k in (1.0, 0.5j, 0.25)])
    layers = layers.astype(np.complex64)
    obj = Object(layers, template.get_pixel_geometry(), template.get_center(), [1e-6, 2e-6])
    reconstructor = library.reconstructor("PINN")
    reconstructor.load_model_from_file(trained_archive)
    outputs = list(reconstructor.reconstruct(_with_object(reconstruct_input, obj)))
    result = outputs[-1].product.object_
    assert result.get_array().shape == layers.shape
    assert result.get_array().dtype == np.complex64  # the input's type, not twice its memory
    assert list(result.layer_spacing_m) == [1e-6, 2e-6]
    array = result.get_array()
    covered = ~np.isclose(array[1], layers[1])
    assert covered.mean() > 0.3  # the scan covers much of the object
    assert np.all(array[1:, covered] == 1)  # the other layers are 1 where covered ...
    assert np.array_equal(array[1:, ~covered], layers[1:, ~covered])  # ... kept elsewhere
    flattened = result.get_layers_flattened()
    assert np.allclose(flattened[covered], array[0][covered])  # the image is their product


def test_corrupt_archive_gives_a_clear_error(library, tmp_path, caplog):
    corrupt = tmp_path / "model.h5.zip"
    corrupt.write_bytes(b"PK\x03\x04 this is not a complete zip file")
    reconstructor = library.reconstructor("PINN")
    with caplog.at_level(logging.ERROR, logger="ptychodus_torch_plugin"):
        with pytest.raises(ValueError, match="not a valid or complete model archive"):
            reconstructor.load_model_from_file(corrupt)
    assert any("cannot load model archive" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("manifest", ["manifest.json", "manifest.dill"])
def test_tensorflow_archive_is_refused_naming_its_backend(library, tmp_path, manifest):
    """Both layouts of the TensorFlow PtychoPINN archive: a JSON manifest without a backend,
    and the older pickled manifest.dill only."""
    archive = tmp_path / "wts.h5.zip"
    content = {"models": ["autoencoder", "diffraction_to_obj"], "version": "1.0"}
    with zipfile.ZipFile(archive, "w") as zf:
        if manifest == "manifest.json":
            zf.writestr(manifest, json.dumps(content))
        else:
            zf.writestr(manifest, pickle.dumps(content, protocol=2))
        zf.writestr("autoencoder/model.keras", b"PK-keras-bytes")
    reconstructor = library.reconstructor("PINN")
    with pytest.raises(ValueError, match="written by the tensorflow backend; .* PyTorch archives"):
        reconstructor.load_model_from_file(archive)


def test_encrypted_and_foreign_zips_are_refused_saying_what_they_are(
    library, trained_archive, tmp_path
):
    """zipfile's RuntimeError for an encrypted member used to escape the check as a traceback,
    and any zip with a manifest.json was called a TensorFlow model."""
    from archive_helpers import encrypted_copy

    encrypted = encrypted_copy(trained_archive, tmp_path / "encrypted.h5.zip")
    reconstructor = library.reconstructor("PINN")
    with pytest.raises(
        ValueError, match="is encrypted; model archives are never password-protected"
    ):
        reconstructor.load_model_from_file(encrypted)
    foreign = tmp_path / "extension.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"manifest_version": 3, "name": "an add-on"}))
    with pytest.raises(ValueError, match="not a PtychoPINN model archive"):
        reconstructor.load_model_from_file(foreign)


def test_save_model_copies_the_archive(library, trained_archive, tmp_path):
    reconstructor = library.reconstructor("PINN")
    reconstructor.load_model_from_file(trained_archive)
    target = tmp_path / "copy.h5.zip"
    reconstructor.save_model(target)
    assert target.read_bytes() == trained_archive.read_bytes()
    target.write_bytes(b"an earlier model")
    reconstructor.save_model(target)  # the name as chosen (the dialog asked): replaced
    assert target.read_bytes() == trained_archive.read_bytes()


@pytest.mark.parametrize("chosen", ["run1", "folder"])
def test_a_name_we_complete_never_replaces_an_existing_file(
    library, trained_archive, reconstruct_input, tmp_path, chosen
):
    """Ptychodus's save dialogs add no suffix: Qt asked about 'run1', not 'run1.h5.zip'."""
    reconstructor = library.reconstructor("PINN")
    reconstructor.load_model_from_file(trained_archive)
    if chosen == "folder":
        (tmp_path / "folder").mkdir()
        existing = tmp_path / "folder" / "wts.h5.zip"
    else:
        existing = tmp_path / "run1.h5.zip"
    existing.write_bytes(b"a good model")
    with pytest.raises(FileExistsError, match=f"{existing.name} already exists and was not"):
        reconstructor.save_model(tmp_path / chosen)
    assert existing.read_bytes() == b"a good model"
    if chosen == "run1":
        (tmp_path / "run1.npz").write_bytes(b"exported before")
        with pytest.raises(FileExistsError, match="run1.npz already exists"):
            reconstructor.export_training_data(tmp_path / "run1", reconstruct_input)
        assert (tmp_path / "run1.npz").read_bytes() == b"exported before"


def test_export_training_data_writes_the_npz_contract(library, reconstruct_input, tmp_path):
    reconstructor = library.reconstructor("PINN")
    target = tmp_path / "train_data.npz"
    reconstructor.export_training_data(target, reconstruct_input)
    with np.load(target) as npz:
        assert str(npz["diff3d_units"]) == "amplitude"
        assert npz["diff3d"].dtype == np.float32
        assert npz["diff3d"].shape == np.shape(reconstruct_input.diffraction_patterns)
        assert npz["objectGuess"].ndim == 2
    loaded = load_npz(target)
    expected = np.sqrt(np.asarray(reconstruct_input.diffraction_patterns, np.float64))
    assert np.allclose(loaded.amplitudes, expected, rtol=1e-6)


def test_ptychodus_own_training_export_is_read_as_counts(reconstruct_input, tmp_path):
    from ptychodus.api.io import save_ptychopinn_training_data

    target = tmp_path / "ptychodus_export.npz"
    save_ptychopinn_training_data(target, reconstruct_input)
    data = load_npz(target)
    expected = np.sqrt(np.asarray(reconstruct_input.diffraction_patterns, np.float64))
    assert np.allclose(data.amplitudes, expected, rtol=1e-6)
    # Its positions are Ptychodus pixel coordinates: read in the engine's, as the host's are
    # (supervised targets were cut half a pixel away from the patterns).
    direct = reconstruct_input_to_data(reconstruct_input)
    np.testing.assert_allclose(data.xcoords, direct.xcoords, atol=1e-9)
    np.testing.assert_allclose(data.ycoords, direct.ycoords, atol=1e-9)
    assert PTYCHODUS_PIXEL_OFFSET == ENGINE_MINUS_HOST_PX
    # Our own export is in the engine's positions already: read as written.
    ours = tmp_path / "ours.npz"
    save_npz(direct, ours)
    np.testing.assert_array_equal(load_npz(ours).xcoords, direct.xcoords)


def test_train_from_npz_yields_epochs_and_a_stop_keeps_the_best_model(
    library, reconstruct_input, scan_dir, tmp_path, caplog
):
    reconstructor = library.reconstructor("Supervised")
    truth_input = _with_ground_truth(reconstruct_input, scan_dir)
    reconstructor.export_training_data(tmp_path / "train_data.npz", truth_input)
    (tmp_path / "wts.h5.zip").write_bytes(b"an earlier run's model")
    with settings_values(library, **dict(TINY, epochs=5)):
        generator = reconstructor.train(tmp_path, tmp_path)  # the GUI passes one folder twice
        with caplog.at_level(logging.WARNING, logger="ptychodus_torch_plugin"):
            first = next(generator)
            assert reconstructor.get_progress_goal() == 5
            generator.close()  # Stop
    assert first.progress == 1 and first.training_loss[0].value > 0
    archive = tmp_path / "wts.h5.zip"
    assert archive.is_file()
    assert not list(tmp_path.glob(".wts.h5.zip.*"))  # atomic: no temp file left behind
    assert reconstructor.is_model_loaded()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "training stopped after" in messages and "kept the best epoch's weights" in messages
    model = library.model_slot.get()
    assert model.epochs_trained >= 1
    # the earlier run's model is kept beside it, not replaced without a word
    (kept,) = tmp_path.glob("wts-*.h5.zip")
    assert kept.read_bytes() == b"an earlier run's model"
    assert f"held an earlier model: kept as {kept.name}" in messages


def test_ptychodus_shutting_down_stops_its_own_training_and_keeps_the_model(
    library, reconstruct_input, scan_dir, tmp_path, caplog, monkeypatch
):
    """Closing the window (or Ctrl-C in batch mode) stops Ptychodus's task manager, which then
    waits for its worker: our training must end within a batch, not after every epoch."""
    from ptychodus.model.task_manager import TaskManager

    manager = TaskManager()
    manager.start()
    monkeypatch.setattr(library, "_task_manager", manager)
    reconstructor = library.reconstructor("Supervised")
    truth_input = _with_ground_truth(reconstruct_input, scan_dir)
    reconstructor.export_training_data(tmp_path / "train_data.npz", truth_input)
    try:
        with settings_values(library, **dict(TINY, epochs=50)):
            generator = reconstructor.train(tmp_path, tmp_path)
            with caplog.at_level(logging.WARNING, logger="ptychodus_torch_plugin"):
                next(generator)
                assert not library.is_stopping()
                manager.stop(await_finish=False)  # what ModelCore.__exit__ does
                rest = list(generator)  # ends by itself, as Ptychodus's worker loop needs
    finally:
        manager.stop(await_finish=False)
    assert len(rest) < 10, len(rest)
    assert (tmp_path / "wts.h5.zip").is_file()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "training stopped after" in messages


def test_training_with_probe_refinement_settings_keeps_the_refined_modes(
    library, reconstruct_input, tmp_path, caplog
):
    from ptychodus_torch_plugin.host.convert import probe_modes

    assert probe_modes(reconstruct_input.product).shape[0] == 1
    reconstructor = library.reconstructor("PINN")
    reconstructor.export_training_data(tmp_path / "train_data.npz", reconstruct_input)
    settings = dict(TINY, probe_refinement_epochs=5, probe_modes=2)
    with settings_values(library, **settings), caplog.at_level(logging.INFO):
        outputs = list(reconstructor.train(tmp_path, tmp_path))
    assert len(outputs) == 1
    n = np.shape(reconstruct_input.diffraction_patterns)[-1]
    model = library.model_slot.get()
    assert model.probe.shape == (2, n, n) and model.probe_refined
    assert "probe refinement: 2 mode(s), 5 epoch(s)" in caplog.text

    # Reconstructing with it hands the refined probe back, at the input probe's power, so the
    # product's object and probe belong together (what Ptychodus's Probe view then shows).
    given = reconstruct_input.product.probes
    with caplog.at_level(logging.INFO):
        product = list(reconstructor.reconstruct(reconstruct_input))[-1].product
    returned = np.asarray(product.probes.get_array())
    assert returned.shape == (1, 2, n, n) and returned.dtype == given.dtype
    assert product.probes.get_pixel_geometry() == given.get_pixel_geometry()
    power = np.sum(np.abs(returned) ** 2)
    assert power == pytest.approx(np.sum(np.abs(given.get_array()) ** 2), rel=1e-5)
    ratio = returned[0] / model.probe
    strong = np.abs(model.probe) > 0.1 * np.abs(model.probe).max()
    assert np.allclose(ratio[strong], ratio[strong].mean(), rtol=1e-4)  # one real factor
    assert abs(ratio[strong].mean().imag) < 1e-6 * abs(ratio[strong].mean())
    assert "returning the model's refined probe (2 mode(s))" in caplog.text

    # Reconstruct again on the product the first run wrote back (it holds the refined probe):
    # still the training scan, so the refined probe, and no "not the training scan" warning.
    rerun = ReconstructInput(
        reconstruct_input.diffraction_patterns, reconstruct_input.bad_pixels, product
    )
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = list(reconstructor.reconstruct(rerun))[-1].product
    np.testing.assert_allclose(np.asarray(again.probes.get_array()), returned, rtol=1e-5)
    assert "keeps its own probe" not in caplog.text

    # Another scan (here: another defocus of the probe) keeps its own probe: the refined one
    # belongs to the training scan, whose starting probe the archive records.
    assert model.starting_probe is not None and model.starting_probe.shape == (1, n, n)
    yy, xx = np.mgrid[0:n, 0:n] - n / 2
    other_probe = np.asarray(given.get_array()) * np.exp(1j * 0.02 * (xx**2 + yy**2))
    p = reconstruct_input.product
    other = Product(
        p.metadata,
        p.probe_positions,
        ProbeSequence(other_probe, None, given.get_pixel_geometry()),
        p.object_,
        p.losses,
    )
    other_input = ReconstructInput(
        reconstruct_input.diffraction_patterns, reconstruct_input.bad_pixels, other
    )
    caplog.clear()
    with caplog.at_level(logging.INFO):
        product = list(reconstructor.reconstruct(other_input))[-1].product
    assert product.probes is other.probes
    assert "the product keeps its own probe" in caplog.text


def test_refined_probe_is_not_forced_onto_a_product_with_opr_weights(
    reconstruct_input, trained_archive
):
    import dataclasses

    from ptychodus.api.probe import ProbeSequence

    from ptychodus_torch_plugin.engine.archive import load_archive
    from ptychodus_torch_plugin.host.convert import result_probes

    plain = load_archive(trained_archive)
    model = dataclasses.replace(plain, config={**plain.config, "probe_refinement_epochs": 3})
    assert model.probe_refined and not plain.probe_refined
    given = reconstruct_input.product.probes
    assert result_probes(reconstruct_input.product, model) is not given  # the refined one
    stack = np.stack([given.get_array()[0]] * 2)  # two OPR (coherent) modes
    opr = ProbeSequence(stack, np.ones((5, 2)), given.get_pixel_geometry())
    p = reconstruct_input.product
    product = Product(p.metadata, p.probe_positions, opr, p.object_, p.losses)
    assert result_probes(product, model) is opr


def test_model_path_set_back_to_an_older_archive_loads_that_archive(trained_archive, tmp_path):
    """Train A, train B, then a settings file names A again: A must be used, not B."""
    import dataclasses

    from ptychodus.api.settings import SettingsRegistry

    from ptychodus_torch_plugin.engine.archive import load_archive, save_archive
    from ptychodus_torch_plugin.host.library import TorchPINNLibrary

    library = TorchPINNLibrary(SettingsRegistry())
    slot = library.model_slot
    a = slot.select(trained_archive)
    model_a = slot.get()
    model_b = dataclasses.replace(load_archive(a), history=model_a.history * 2)
    b = save_archive(model_b, tmp_path / "B")
    slot.adopt(model_b, b)  # what training does on its worker thread...
    assert slot.get() is model_b  # (ModelPath still names A until the host thread stores B)
    # Save model as... in that window copies B (the model in use), not A
    copy = slot.save_copy(tmp_path / "copy")
    assert copy.read_bytes() == b.read_bytes() != a.read_bytes()
    # Names that stop short of .h5.zip are completed (Load Model lists *.h5.zip only).
    assert copy.name == "copy.h5.zip"
    assert slot.save_copy(tmp_path / "run1.zip").name == "run1.h5.zip"
    assert slot.save_copy(tmp_path / "run2.h5").name == "run2.h5.zip"
    assert slot.save_copy(tmp_path / "run3.H5.ZIP").name == "run3.H5.ZIP"
    library.publish_model(b)  # ...and then on the host thread
    assert slot.get() is model_b and library.settings.get_model_path() == b.resolve()

    library.settings.set_model_path(a)  # e.g. Open Settings with a file naming A
    assert slot.get().epochs_trained == model_a.epochs_trained == 1


def test_an_empty_object_is_refused_and_a_too_small_one_is_reported(
    library, reconstruct_input, trained_archive, caplog
):
    template = reconstruct_input.product.object_
    reconstructor = library.reconstructor("PINN")
    reconstructor.load_model_from_file(trained_archive)
    empty = Object(
        np.zeros((1, 0, 0), complex), template.get_pixel_geometry(), template.get_center(), []
    )
    with pytest.raises(ValueError, match=r"object is empty \(0 x 0 pixels\).*Object view"):
        list(reconstructor.reconstruct(_with_object(reconstruct_input, empty)))

    corner = template.get_array()[:, :20, :20]  # the scan reaches far beyond 20 x 20 pixels
    small = Object(corner, template.get_pixel_geometry(), template.get_center(), [])
    with caplog.at_level(logging.WARNING):
        outputs = list(reconstructor.reconstruct(_with_object(reconstruct_input, small)))
    assert outputs[-1].product.object_.get_array().shape[-2:] == (20, 20)
    assert "scan positions lie outside the product's object (20 x 20 pixels)" in caplog.text


def test_a_diverged_run_keeps_its_finished_epochs_and_says_to_lower_the_rate(
    library, scan_dir, tmp_path, monkeypatch, caplog
):
    from training_helpers import make_training_diverge

    make_training_diverge(monkeypatch, epoch=2, batch=1)  # NaN in the second epoch
    reconstructor = library.reconstructor("PINN")
    with settings_values(library, **dict(TINY, epochs=3)), caplog.at_level(logging.WARNING):
        outputs = list(reconstructor.train(scan_dir, tmp_path))
    assert [o.progress for o in outputs] == [1]
    model = library.model_slot.get()
    assert model.epochs_trained == 1 and (tmp_path / "wts.h5.zip").is_file()
    assert all(torch.isfinite(w).all() for w in model.generator.state_dict().values())
    message = caplog.text
    assert "training diverged after 1 of 3 epochs" in message
    assert "epoch 2, batch 1" in message and "lower the learning rate" in message


def test_a_trained_model_the_output_folder_refuses_is_saved_elsewhere_not_lost(
    library, scan_dir, tmp_path, monkeypatch, caplog
):
    """Train into a folder that cannot be written (here: a path under a file) at the end.

    The epochs used to be thrown away with an error naming our hidden temp file; now the
    model goes to the model folder, is loaded, and the log says where and why.
    """
    models = tmp_path / "models"
    monkeypatch.setenv("PTYCHODUS_TORCH_MODEL_DIR", str(models))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    reconstructor = library.reconstructor("PINN")
    with settings_values(library, **TINY), caplog.at_level(logging.ERROR):
        outputs = list(reconstructor.train(scan_dir, blocker / "out"))
    assert [o.progress for o in outputs] == [1]
    saved = list(models.glob(f"unsaved-*{MODEL_FILE_EXTENSION}"))
    assert len(saved) == 1
    assert library.model_slot.get().epochs_trained == 1
    message = caplog.text
    assert f"could not be saved to {blocker / 'out'}" in message and str(saved[0]) in message
    assert ".tmp" not in message


def test_when_no_folder_takes_the_model_the_error_names_them_all(
    trained_archive, tmp_path, monkeypatch
):
    from ptychodus_torch_plugin.engine import saving as engine_saving
    from ptychodus_torch_plugin.engine.archive import load_archive
    from ptychodus_torch_plugin.host import saving

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(
        engine_saving, "fallback_directories", lambda: [blocker / "a", blocker / "b"]
    )
    model = load_archive(trained_archive)
    with pytest.raises(OSError, match=r"could not be saved to .*no fallback folder took it"):
        saving.save_trained_model(model, blocker / "out" / "wts.h5.zip")
    good = saving.save_trained_model(model, tmp_path / "ok" / "wts.h5.zip")
    assert good.problem is None and good.file.is_file()


def test_an_object_on_another_pixel_grid_than_the_probe_is_refused(reconstruct_input):
    """Patches are the probe's pixels: an object of other pixels would be cut at the wrong
    scale and reconstruct wrong without a word."""
    from ptychodus.api.geometry import PixelGeometry

    from ptychodus_torch_plugin.host.convert import reconstruct_input_to_data

    template = reconstruct_input.product.object_
    pixel = template.get_pixel_geometry()
    coarse = PixelGeometry(width_m=2 * pixel.width_m, height_m=2 * pixel.height_m)
    other = Object(template.get_array(), coarse, template.get_center(), [])
    with pytest.raises(ValueError, match=r"object's pixel width .* differs from the probe's"):
        reconstruct_input_to_data(_with_object(reconstruct_input, other))
    assert reconstruct_input_to_data(reconstruct_input).n_patterns > 0  # same grid: fine


def test_a_near_field_product_is_refused(reconstruct_input):
    """The forward model is Fraunhofer only: near-field data would give a wrong image."""
    import dataclasses

    from ptychodus_torch_plugin.host.convert import reconstruct_input_to_data

    p = reconstruct_input.product
    near = dataclasses.replace(p.metadata, far_field=False)
    product = Product(near, p.probe_positions, p.probes, p.object_, p.losses)
    parameters = ReconstructInput(
        reconstruct_input.diffraction_patterns, reconstruct_input.bad_pixels, product
    )
    with pytest.raises(ValueError, match="near field .* far-field \\(Fraunhofer\\) only"):
        reconstruct_input_to_data(parameters)


def test_ptychodus_load_model_during_a_training_is_refused(library, trained_archive):
    """The panel refused its own Load during a run; Ptychodus's menu action was let through,
    and the run's model then replaced the one the user chose without a word."""
    reconstructor = library.reconstructor("PINN")
    with library.training_run("the panel's run, in this test"):
        with pytest.raises(RuntimeError, match=r"training is running \(the panel's run"):
            reconstructor.load_model_from_file(trained_archive)
    reconstructor.load_model_from_file(trained_archive)  # after it: loads
    assert reconstructor.is_model_loaded()


def test_storing_the_same_model_path_again_tells_its_observers(library, trained_archive):
    """Ptychodus's Train saves every run as <folder>/wts.h5.zip: the same path for a new model.
    Ptychodus's parameter notifies only on a change, so the panel kept describing the old one."""
    from ptychodus.api.observer import Observer

    class Counter(Observer):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def _update(self, observable):
            self.calls += 1

    settings = library.settings
    before = settings.get_model_path()
    counter = Counter()
    settings.model_path.add_observer(counter)
    try:
        settings.set_model_path(trained_archive)
        first = counter.calls
        settings.set_model_path(trained_archive)  # the same path, a new model behind it
        assert counter.calls == first + 1
    finally:
        settings.model_path.remove_observer(counter)
        settings.set_model_path(before)


def test_a_settings_file_without_a_model_means_no_model_and_the_presets_keep_yours(
    trained_archive, tmp_path
):
    """A settings file whose ModelPath is unset ('.') used to leave the old model live: the
    panel said "No model loaded" while Infer ran it, and a saved settings file forgot it. The
    shipped presets no longer name a ModelPath, so opening one keeps the model you have."""
    from ptychodus.api.settings import SettingsRegistry

    from ptychodus_torch_plugin.host.library import TorchPINNLibrary
    from ptychodus_torch_plugin.host.shipped_settings import settings_folder

    registry = SettingsRegistry()
    library = TorchPINNLibrary(registry)
    slot = library.model_slot
    slot.select(trained_archive)
    slot.get()
    for preset in sorted(settings_folder().glob("torchpinn-*.ini")):
        registry.open_settings(preset)
        assert library.settings.get_model_path() is not None, preset.name
        assert slot.is_loaded(), preset.name
    unset = tmp_path / "unset.ini"
    unset.write_text("[TorchPINNModel]\nModelPath = .\n")
    registry.open_settings(unset)
    assert library.settings.get_model_path() is None
    assert not slot.is_loaded()
    with pytest.raises(RuntimeError, match="No TorchPINN model is loaded"):
        slot.get()


def test_training_data_is_found_in_the_documented_order(tmp_path, caplog):
    """train_data.npz (+ test_data.npz as validation), else the only or newest *.npz; a folder
    holding only test_data.npz has no training data."""
    import os

    from ptychodus_torch_plugin.engine.simulate import simulate_dataset
    from ptychodus_torch_plugin.host.convert import find_training_data

    def scan(seed, folder, name):
        folder.mkdir(exist_ok=True)
        return save_npz(simulate_dataset(N=32, nphotons=1e4, seed=seed), folder / name)

    pair = tmp_path / "pair"
    scan(0, pair, "train_data.npz")
    scan(1, pair, "test_data.npz")
    scan(2, pair, "other.npz")
    data, test, description = find_training_data(pair)
    assert data.xcoords.tolist() == load_npz(pair / "train_data.npz").xcoords.tolist()
    assert test is not None
    np.testing.assert_array_equal(test.amplitudes, load_npz(pair / "test_data.npz").amplitudes)
    assert "(validation: " in description and "test_data.npz" in description

    several = tmp_path / "several"
    old = scan(3, several, "b_old.npz")
    new = scan(4, several, "a_new.npz")
    os.utime(old, (1_000_000_000, 1_000_000_000))
    with caplog.at_level(logging.WARNING):
        data, test, description = find_training_data(several)
    assert test is None and description == str(new)
    np.testing.assert_array_equal(data.amplitudes, load_npz(new).amplitudes)
    assert "2 NPZ files" in caplog.text and "training on the newest, a_new.npz" in caplog.text

    only_test = tmp_path / "only_test"
    scan(5, only_test, "test_data.npz")
    with pytest.raises(FileNotFoundError, match="no training data in"):
        find_training_data(only_test)


def test_training_and_validation_losses_reach_ptychodus_each_as_itself():
    """Ptychodus plots TrainOutput.training_loss and .validation_loss; a swap, or a NaN or a
    missing validation value in the log-scale plot, would pass every other test."""
    from ptychodus_torch_plugin.engine.model import EpochRecord
    from ptychodus_torch_plugin.host.convert import losses_from_history, validation_losses

    history = [
        EpochRecord(1, 300.0, 310.0, 1e-3, 1.0),
        EpochRecord(2, 200.0, None, 1e-3, 1.0),
        EpochRecord(3, float("nan"), 250.0, 1e-3, 1.0),
    ]
    assert [(v.epoch, v.value) for v in losses_from_history(history)] == [(1, 300.0), (2, 200.0)]
    assert [(v.epoch, v.value) for v in validation_losses(history)] == [(1, 310.0), (3, 250.0)]
