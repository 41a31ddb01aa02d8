"""Tests of stitching (geometry, weighting, streaming) and of model inference end to end."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ptychodus_torch_plugin.engine import simulate as sim
from ptychodus_torch_plugin.engine.grouping import group_positions
from ptychodus_torch_plugin.engine.inference import (
    PROBE_OVERLAP_WARNING,
    CanvasGeometry,
    InferenceResult,
    Stitcher,
    crop_size,
    probe_overlap,
    reconstruct,
    reconstruct_iter,
    select_device,
    stitch_patches,
    warn_if_other_probe,
    warn_if_other_sampling,
)
from ptychodus_torch_plugin.engine.model import TrainedModel
from ptychodus_torch_plugin.engine.payload import create_training_payload

N = 32


def _object(shape=(96, 104), seed=3) -> np.ndarray:
    return sim.random_object(shape, seed=seed, smoothness=2.0)


def _integer_raster(obj_shape, step=8) -> tuple[np.ndarray, np.ndarray]:
    h, w = obj_shape
    xs = np.arange(N // 2, w - N // 2 + 1, step, dtype=np.float64)
    ys = np.arange(N // 2, h - N // 2 + 1, step, dtype=np.float64)
    xg, yg = np.meshgrid(xs, ys)
    return xg.ravel(), yg.ravel()


def _reference_on_canvas(obj: np.ndarray, canvas: CanvasGeometry) -> np.ndarray:
    """The object resampled onto an integer-origin canvas (zero outside the object)."""
    out = np.zeros(canvas.shape, dtype=obj.dtype)
    ox, oy = int(canvas.origin_x), int(canvas.origin_y)
    h, w = obj.shape
    r0, c0 = max(0, -oy), max(0, -ox)
    r1, c1 = min(canvas.height, h - oy), min(canvas.width, w - ox)
    out[r0:r1, c0:c1] = obj[oy + r0 : oy + r1, ox + c0 : ox + c1]
    return out


# ------------------------------------------------------------------ stitching true patches
@pytest.mark.parametrize("weighting", ["probe", "uniform"])
@pytest.mark.parametrize("gridsize", [1, 2])
def test_true_patches_reproduce_object(weighting, gridsize):
    obj = _object()
    x, y = _integer_raster(obj.shape)
    patches = sim.extract_patches(obj, x, y, N)
    groups = group_positions(x, y, gridsize, neighbor_count=4)
    probe = sim.disk_probe(N)
    stitched = stitch_patches(
        patches[groups.indices], groups.positions, N, probe=probe, weighting=weighting
    )
    canvas = stitched.canvas
    assert float(canvas.origin_x).is_integer() and float(canvas.origin_y).is_integer()
    assert stitched.object.shape == canvas.shape and stitched.object.dtype == np.complex64
    assert stitched.weights.dtype == np.float32
    covered = stitched.covered
    # Cropped boxes [x - 8, x + 7] of a step-8 raster tile the scan's interior completely.
    oy, ox = int(canvas.origin_y), int(canvas.origin_x)
    expected_rows = slice(int(y.min()) - 8 - oy, int(y.max()) + 8 - oy)
    expected_cols = slice(int(x.min()) - 8 - ox, int(x.max()) + 8 - ox)
    if weighting == "uniform":
        assert covered[expected_rows, expected_cols].all()
    assert covered.mean() > 0.5
    reference = _reference_on_canvas(obj, canvas)
    np.testing.assert_allclose(stitched.object[covered], reference[covered], atol=1e-5)
    assert np.all(stitched.object[~covered] == 0)


def test_fractional_positions_constant_object():
    value = np.complex64(0.8 * np.exp(0.7j))
    obj = np.full((80, 88), value, dtype=np.complex64)
    rng = np.random.default_rng(5)
    x, y = _integer_raster(obj.shape, step=7)
    x = np.clip(x + rng.uniform(-0.49, 0.49, x.shape), N / 2, obj.shape[1] - N / 2)
    y = np.clip(y + rng.uniform(-0.49, 0.49, y.shape), N / 2, obj.shape[0] - N / 2)
    assert np.any(x % 1 != 0)
    patches = sim.extract_patches(obj, x, y, N)
    positions = np.stack([x, y], axis=1)
    for weighting in ("probe", "uniform"):
        stitched = stitch_patches(patches, positions, N, sim.gaussian_probe(N), weighting)
        covered = stitched.covered
        assert covered.sum() > 1000
        np.testing.assert_allclose(stitched.object[covered], value, atol=1e-5)
        # Nothing was clipped: the canvas holds every splat, so the summed weight equals the
        # weight of every patch (bilinear corner weights sum to one per pixel).
        intensity = np.abs(sim.gaussian_probe(N)[8:24, 8:24]) ** 2
        kernel_sum = 256.0 if weighting == "uniform" else float(intensity.sum())
        assert stitched.weights.sum() == pytest.approx(len(x) * kernel_sum, rel=1e-5)


def test_bright_pixel_lands_at_documented_coordinate():
    h, w = 60, 70
    frame = CanvasGeometry(0, 0, w, h)
    patch = np.zeros((1, N, N), np.complex64)
    jr, jc = 13, 20  # inside the central 16x16 box (8..23)
    patch[0, jr, jc] = 1.0
    x, y = 30.0, 25.0
    stitched = stitch_patches(patch, np.array([[x, y]]), N, weighting="uniform", canvas=frame)
    row, col = int(y - N / 2 + jr), int(x - N / 2 + jc)
    assert stitched.object[row, col] == 1.0
    assert np.count_nonzero(stitched.object) == 1
    # Covered box: rows y - 8 .. y + 7, columns x - 8 .. x + 7.
    covered_rows, covered_cols = np.nonzero(stitched.covered)
    assert covered_rows.min() == y - 8 and covered_rows.max() == y + 7
    assert covered_cols.min() == x - 8 and covered_cols.max() == x + 7

    # A quarter-pixel shift to the right: bilinear splits the pixel between two columns ...
    quarter = np.array([[x + 0.25, y]])
    stitched = stitch_patches(
        patch, quarter, N, weighting="uniform", canvas=frame, subpixel="bilinear"
    )
    assert stitched.object[row, col] == pytest.approx(0.75, abs=1e-6)
    assert stitched.object[row, col + 1] == pytest.approx(0.25, abs=1e-6)
    assert np.count_nonzero(np.abs(stitched.object) > 1e-7) == 2
    # ... Lanczos (the default) spreads it along the row over the kernel's six columns, the
    # most at the nearest one, keeping its sum and moving its centre of mass right by ~1/4.
    stitched = stitch_patches(patch, quarter, N, weighting="uniform", canvas=frame)
    line = stitched.object[row].real
    assert np.count_nonzero(np.abs(stitched.object) > 1e-7) == 6
    assert np.nonzero(np.abs(line) > 1e-7)[0].tolist() == list(range(col - 2, col + 4))
    assert np.argmax(line) == col and line.sum() == pytest.approx(1.0, abs=1e-6)
    centre = float((np.arange(w) * line).sum())
    assert centre == pytest.approx(col + 0.25, abs=0.03)


def test_fine_detail_at_fractional_positions_lanczos_versus_bilinear():
    """Patches of fine detail measured at fractional positions stitch back onto the grid.

    The object is a sum of two fringes of period 4.3 and 3.1 pixels, sampled exactly at each
    patch pixel's coordinate (no interpolation in the patches). Lanczos resampling (the
    default) places them with a mean error of ~2% of the amplitude (measured 0.021, worst
    0.054); the bilinear splat blurs them by up to half a pixel (mean 0.21, worst 0.48),
    which is why Lanczos is the default. Integer positions are exact either way.
    """
    h, w = 80, 88

    def fringes(cols, rows):
        return np.exp(2j * np.pi * cols / 4.3) + 0.5 * np.exp(2j * np.pi * rows / 3.1)

    rng = np.random.default_rng(11)
    x0, y0 = _integer_raster((h, w), step=6)
    rows, cols = np.mgrid[0:h, 0:w]
    j = np.arange(N) - N / 2
    frame = CanvasGeometry(0, 0, w, h)
    errors = {}
    for jitter in (0.0, 0.5):
        x = x0 + rng.uniform(-jitter, jitter, x0.shape)
        y = y0 + rng.uniform(-jitter, jitter, y0.shape)
        patches = fringes(x[:, None, None] + j[None, None, :], y[:, None, None] + j[None, :, None])
        for subpixel in ("lanczos3", "bilinear"):
            stitched = stitch_patches(
                patches.astype(np.complex64),
                np.stack([x, y], 1),
                N,
                weighting="uniform",
                canvas=frame,
                subpixel=subpixel,
            )
            interior = stitched.covered.copy()
            interior[:12], interior[-12:] = False, False
            interior[:, :12], interior[:, -12:] = False, False
            assert interior.sum() > 1000
            errors[jitter, subpixel] = np.abs(stitched.object - fringes(cols, rows))[interior]
    assert errors[0.0, "lanczos3"].max() < 1e-5 and errors[0.0, "bilinear"].max() < 1e-5
    lanczos, bilinear = errors[0.5, "lanczos3"], errors[0.5, "bilinear"]
    assert lanczos.mean() < 0.03 and lanczos.max() < 0.08
    assert bilinear.mean() > 5 * lanczos.mean()  # the blur the default avoids is real


def test_group_channels_land_at_their_own_positions():
    """Regression: a group's channels must not be averaged at the group centroid."""
    positions = np.array([[[20.0, 20.0], [44.0, 20.0], [20.0, 44.0], [44.0, 44.0]]])
    values = np.array([1.0, 2.0, 3.0j, -4.0], dtype=np.complex64)
    patches = np.broadcast_to(values[None, :, None, None], (1, 4, N, N)).copy()
    frame = CanvasGeometry(0, 0, 64, 64)
    stitched = stitch_patches(patches, positions, N, probe=sim.disk_probe(N), canvas=frame)
    for (px, py), value in zip(positions[0], values, strict=True):
        box = stitched.object[int(py) - 4 : int(py) + 4, int(px) - 4 : int(px) + 4]
        np.testing.assert_allclose(box, value, atol=1e-6)
    # The centroid (32, 32) lies between the cropped boxes: nothing is stitched there.
    assert stitched.object[32, 32] == 0 and stitched.weights[32, 32] == 0


def test_uncovered_pixels_are_zero_and_frame_placement():
    obj = _object((80, 80))
    x, y = _integer_raster(obj.shape, step=8)
    keep = (x < 50) & (y < 50)  # cover only the upper-left part of the object
    x, y = x[keep], y[keep]
    frame = CanvasGeometry(0, 0, 80, 80)
    stitched = stitch_patches(
        sim.extract_patches(obj, x, y, N),
        np.stack([x, y], 1),
        N,
        weighting="uniform",
        canvas=frame,
    )
    assert stitched.object.shape == obj.shape
    covered = stitched.covered
    np.testing.assert_allclose(stitched.object[covered], obj[covered], atol=1e-5)
    assert covered[8:56, 8:56].all()
    assert not covered[60:, :].any() and not covered[:, 60:].any()
    assert np.all(stitched.object[~covered] == 0) and np.all(stitched.weights[~covered] == 0)


def test_host_frame_with_offset_origin_clips_and_places():
    obj = _object((80, 80))
    x, y = _integer_raster(obj.shape, step=8)
    patches = sim.extract_patches(obj, x, y, N)
    # A frame that cuts through the scanned area: splats outside it are dropped, the rest
    # lands at canvas pixel (row - 20, col - 12).
    frame = CanvasGeometry(12, 20, 40, 30)
    stitched = stitch_patches(patches, np.stack([x, y], 1), N, sim.disk_probe(N), canvas=frame)
    assert stitched.object.shape == (30, 40)
    assert stitched.covered.all()
    np.testing.assert_allclose(stitched.object, obj[20:50, 12:52], atol=1e-5)


def test_probe_modes_add_intensities():
    rng = np.random.default_rng(0)
    probe = (rng.standard_normal((2, N, N)) + 1j * rng.standard_normal((2, N, N))).astype(
        np.complex64
    )
    patch = np.ones((1, N, N), np.complex64)
    stitched = stitch_patches(
        patch, np.array([[16.0, 16.0]]), N, probe=probe, canvas=CanvasGeometry(0, 0, 32, 32)
    )
    expected = (np.abs(probe[0]) ** 2 + np.abs(probe[1]) ** 2)[8:24, 8:24]
    np.testing.assert_allclose(stitched.weights[8:24, 8:24], expected, rtol=1e-5)
    assert stitched.weights.sum() == pytest.approx(expected.sum(), rel=1e-5)


def test_chunked_accumulation_equals_one_shot():
    obj = _object()
    rng = np.random.default_rng(1)
    x, y = _integer_raster(obj.shape, step=9)
    x = x + rng.uniform(-0.4, 0.4, x.shape)
    y = y + rng.uniform(-0.4, 0.4, y.shape)
    x = np.clip(x, N / 2, obj.shape[1] - N / 2)
    y = np.clip(y, N / 2, obj.shape[0] - N / 2)
    groups = group_positions(x, y, 2, neighbor_count=4)
    patches = sim.extract_patches(obj, x, y, N)[groups.indices]
    probe = sim.disk_probe(N)
    once = stitch_patches(patches, groups.positions, N, probe=probe)
    stitcher = Stitcher(once.canvas, N, probe, "probe")
    for start in range(0, groups.n_groups, 7):
        rows = slice(start, start + 7)
        stitcher.add(patches[rows], groups.positions[rows])
    chunked = stitcher.result()
    np.testing.assert_array_equal(chunked.object, once.object)
    np.testing.assert_array_equal(chunked.weights, once.weights)
    assert stitcher.patches_added == patches.shape[0] * patches.shape[1]


def test_canvas_covering_and_validation():
    positions = np.array([[16.5, 20.0], [40.25, 33.75]])
    canvas = CanvasGeometry.covering(positions, N, 0.5)
    # Cropped pixel 0 at x - 8; last at x + 7; one pixel of margin on both sides.
    assert canvas.origin_x == math.floor(16.5 - 8) - 1
    assert canvas.origin_y == math.floor(20.0 - 8) - 1
    assert canvas.origin_x + canvas.width - 1 == math.ceil(40.25 + 7) + 1
    assert canvas.origin_y + canvas.height - 1 == math.ceil(33.75 + 7) + 1
    assert crop_size(32, 0.5) == 16 and crop_size(32, 1.0) == 32
    with pytest.raises(ValueError, match="width"):
        CanvasGeometry(0, 0, 0, 5)
    with pytest.raises(ValueError, match="probe"):
        Stitcher(canvas, N, None, "probe")
    with pytest.raises(ValueError, match="positions"):
        Stitcher(canvas, N, None, "uniform").add(np.zeros((2, 3, N, N)), np.zeros((2, 2, 2)))
    # Positions in the wrong unit (nm) or with an outlier: a clear error, not a MemoryError.
    with pytest.raises(ValueError, match=r"span x 16\.5\.\.1e\+06.*object pixels"):
        CanvasGeometry.covering(np.array([[16.5, 20.0], [1e6, 5e5]]), N, 0.5)


# ------------------------------------------------------------------ model inference
@pytest.fixture(scope="module")
def scan():
    return sim.simulate_dataset(N=N, object_shape=(64, 64), step=8.0, nphotons=1e5, seed=0)


def _model(data, gridsize: int = 1) -> TrainedModel:
    config = create_training_payload(
        {"N": N, "gridsize": gridsize, "n_filters_scale": 1, "accelerator": "cpu"}
    ).to_flat()
    torch.manual_seed(0)
    return TrainedModel.build(
        config, data.probe, input_scale=1.0, intensity_scale=1.0, nphotons=1e5
    )


@pytest.mark.parametrize("gridsize", [1, 2])
def test_reconstruct_iter_streams_chunks(scan, gridsize):
    model = _model(scan, gridsize)
    payload = model.inference_payload({"chunk_size": 10, "inference_batch_size": 4})
    chunks, covered = [], []
    for chunk in reconstruct_iter(model, scan, payload):
        chunks.append(chunk)
        covered.append(int(chunk.stitched.covered.sum()))  # read before the next chunk
    total = scan.n_patterns
    assert total == 25
    assert len(chunks) == math.ceil(total / 10)
    assert [c.groups_done for c in chunks] == [10, 20, 25]
    assert all(c.groups_total == total and c.n_chunks == 3 for c in chunks)
    assert [c.chunk_index for c in chunks] == [0, 1, 2]
    assert covered == sorted(covered) and covered[0] < covered[-1]
    final = chunks[-1].stitched
    assert final.object.shape == final.canvas.shape
    assert np.all(np.isfinite(final.object)) and np.abs(final.object[final.covered]).min() > 0


def test_unread_snapshots_are_never_made_and_late_reads_are_refused(scan, monkeypatch):
    """A host shows ten of a scan's hundreds of chunks: the others' full-canvas snapshots
    (minutes in all for 100,000 patterns) are not made; a snapshot read after later chunks
    were stitched would include them, so it is refused rather than mislabelled."""
    model = _model(scan)
    payload = model.inference_payload({"chunk_size": 5})
    made = []
    original = Stitcher.result

    def counted(self, aligned=None, **kwargs):
        made.append(aligned)
        return original(self, aligned, **kwargs)

    monkeypatch.setattr(Stitcher, "result", counted)
    chunks = list(reconstruct_iter(model, scan, payload))
    assert len(chunks) == 5 and len(made) == 1  # the final image only
    with pytest.raises(RuntimeError, match="chunk 2 of 5.*before taking the next chunk"):
        _ = chunks[1].stitched
    final = chunks[-1].stitched
    assert final is chunks[-1].stitched and len(made) == 1


def test_reconstruct_iter_should_stop_and_frame(scan):
    model = _model(scan)
    payload = model.inference_payload({"chunk_size": 5})
    seen = []
    frame = CanvasGeometry(0, 0, 64, 64)
    for chunk in reconstruct_iter(model, scan, payload, frame, should_stop=lambda: bool(seen)):
        seen.append(chunk)
    assert len(seen) == 1 and seen[0].groups_done == 5 and seen[0].n_chunks == 5
    assert seen[0].stitched.object.shape == (64, 64)


def test_reconstruct_result_is_tagged_and_timed(scan):
    model = _model(scan)
    result = reconstruct(model, scan)
    assert isinstance(result, InferenceResult)
    assert result.backend == "pytorch" == model.backend
    assert set(result.timings) == {"group", "predict", "stitch", "align"}
    assert all(t >= 0 for t in result.timings.values())
    assert result.n_groups == scan.n_patterns
    expected = CanvasGeometry.covering(scan.positions, N, 0.5)
    assert result.stitched.canvas == expected
    assert np.all(np.isfinite(result.stitched.object))


def test_streamed_final_image_is_the_aligned_one_shot_image(scan):
    """Previews are the plain running average; the last snapshot equals reconstruct()."""
    model = _model(scan, 2)
    payload = model.inference_payload({"chunk_size": 10})
    assert payload.inference.phase_alignment  # the default
    chunks = list(reconstruct_iter(model, scan, payload))
    one_shot = reconstruct(model, scan, payload).stitched
    np.testing.assert_allclose(chunks[-1].stitched.object, one_shot.object, atol=1e-6)
    plain = reconstruct(model, scan, model.inference_payload({"phase_alignment": False}))
    assert not np.allclose(plain.stitched.object, one_shot.object, atol=1e-6)
    np.testing.assert_array_equal(plain.stitched.weights, one_shot.weights)


def test_a_flat_reconstruction_is_reported_and_a_real_one_is_not(scan, monkeypatch, caplog):
    """Saturated outputs give one patch everywhere: the user is told, not left with a blank."""
    model = _model(scan)
    with caplog.at_level("WARNING", logger="ptychodus_torch_plugin.engine.inference"):
        reconstruct(model, scan)  # an untrained network still varies with its input
        assert "reconstruction is flat" not in caplog.text
        saturated = np.full((1, 1, N, N), np.exp(1j * np.pi), np.complex64)
        saturated[..., ::2, :] = np.exp(-1j * (np.pi - 1e-7))  # the phase wraps: still flat
        monkeypatch.setattr(
            model, "predict", lambda inputs, batch_size=16: np.repeat(saturated, len(inputs), 0)
        )
        stitched = reconstruct(model, scan).stitched
        chunks = list(reconstruct_iter(model, scan, model.inference_payload({"chunk_size": 10})))
    assert np.allclose(stitched.object[stitched.covered], -1.0, atol=1e-5)
    flat = [r for r in caplog.records if "reconstruction is flat" in r.getMessage()]
    assert len(flat) == 2 and "amplitude 1, phase" in flat[0].getMessage()
    assert len(chunks) == 3  # warned once, on the final image only


def test_select_device(monkeypatch):
    from ptychodus_torch_plugin.engine import devices

    assert select_device("cpu").type == "cpu"
    # 'auto' prefers CUDA, then MPS, then the CPU (the hardware faked, so each answer is seen)
    for cuda, mps, expected in [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]:
        monkeypatch.setattr(devices.torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(devices, "_mps_available", lambda mps=mps: mps)
        assert select_device("auto").type == expected
    monkeypatch.undo()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU is available"):
            select_device("gpu")


def test_a_scan_taken_with_other_illumination_is_reported(scan, caplog):
    """Inference never uses the scan's probe: comparing it with the model's is the only check."""
    model = _model(scan)
    assert warn_if_other_probe(model, scan) == pytest.approx(1.0, abs=1e-5)
    rng = np.random.default_rng(1)
    defocused = scan.probe * np.exp(1j * rng.uniform(-np.pi, np.pi, scan.probe.shape[-2:]))
    other = dataclasses.replace(scan, probe=defocused.astype(np.complex64))
    with caplog.at_level("WARNING", logger="ptychodus_torch_plugin.engine.inference"):
        reconstruct(model, scan)
        assert "differs from the one the model was trained with" not in caplog.text
        stitched = reconstruct(model, other).stitched  # still reconstructs
    message = [r.getMessage() for r in caplog.records if "trained with" in r.getMessage()]
    assert len(message) == 1 and "train a model on this scan" in message[0]
    overlap = float(message[0].split("overlap ")[1].split(" ")[0])
    assert overlap < PROBE_OVERLAP_WARNING
    assert np.all(np.isfinite(stitched.object))
    assert probe_overlap(scan.probe, 3.0j * scan.probe) == pytest.approx(1.0)  # power, phase
    assert probe_overlap(scan.probe, scan.probe[..., :8, :8]) is None  # another size


def test_a_scan_of_another_sampling_is_reported(scan, caplog):
    """Object pixels of another size (energy, distance, binning): features at another scale."""
    model = _model(scan)
    model.pixel_size_m = (10e-9, 10e-9)
    same = dataclasses.replace(scan, pixel_size_m=(10.1e-9, 10e-9))  # within 2%
    coarser = dataclasses.replace(scan, pixel_size_m=(15e-9, 15e-9))
    assert not warn_if_other_sampling(model, scan)  # the scan does not say: nothing to compare
    assert not warn_if_other_sampling(model, same)
    with caplog.at_level("WARNING", logger="ptychodus_torch_plugin.engine.inference"):
        reconstruct(model, coarser)
    assert "object pixels are 15 x 15 nm, the model was trained on 10 x 10 nm" in caplog.text
    model.pixel_size_m = None  # an archive from before the size was recorded
    assert not warn_if_other_sampling(model, coarser)


def test_a_scan_whose_probe_inference_never_uses_is_reconstructed(scan):
    """A zero probe (a placeholder, or a failed probe build) used to stop inference in the
    probe's normalisation, which only training needs."""
    model = _model(scan)
    no_probe = dataclasses.replace(scan, probe=np.zeros_like(scan.probe))
    image = reconstruct(model, no_probe).stitched.object
    reference = reconstruct(model, scan).stitched.object
    np.testing.assert_array_equal(image, reference)  # the scan's probe never entered
