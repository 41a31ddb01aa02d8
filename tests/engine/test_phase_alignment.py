"""Phase alignment of patches: recovers unobservable per-patch phase offsets before stitching."""

from __future__ import annotations

import numpy as np
import pytest

from ptychodus_torch_plugin.engine import simulate as sim
from ptychodus_torch_plugin.engine.inference import (
    CanvasGeometry,
    Stitcher,
    crop_size,
    stitch_patches,
)
from ptychodus_torch_plugin.engine.metrics import evaluate, scanned_region
from ptychodus_torch_plugin.engine.phase_alignment import align_patch_phases

N = 32


def _scan(seed: int = 0):
    """A random object and a dense jittered scan (fractional positions), true patches."""
    rng = np.random.default_rng(seed)
    obj = sim.random_object((112, 112), seed=seed, smoothness=2.0)
    grid = np.arange(N // 2 + 2, 112 - N // 2 - 2, 4.0)
    x, y = (v.ravel() for v in np.meshgrid(grid, grid))
    x = x + rng.uniform(-1.5, 1.5, x.size)
    y = y + rng.uniform(-1.5, 1.5, y.size)
    return obj, x, y, sim.extract_patches(obj, x, y, N), sim.disk_probe(N)


def _drift(x: np.ndarray, y: np.ndarray, seed: int = 1) -> np.ndarray:
    """What a network does: a smooth phase offset across the scan (ramp + bump) plus jitter."""
    rng = np.random.default_rng(seed)
    bump = 1.5 * np.exp(-((x - 60) ** 2 + (y - 50) ** 2) / (2 * 20.0**2))
    return 0.03 * x - 0.02 * y + bump + rng.normal(0, 0.05, x.size)


def _crop_inputs(patches, x, y, probe):
    size = crop_size(N, 0.5)
    start = N // 2 - size // 2
    box = slice(start, start + size)
    corners = np.stack([x, y], axis=1) + (start - N / 2.0)
    weight = np.abs(probe) ** 2
    return patches[:, box, box], corners, weight[box, box]


def test_recovers_offsets_up_to_one_constant():
    obj, x, y, patches, probe = _scan()
    drift = _drift(x, y)
    drifted = patches * np.exp(1j * drift)[:, None, None]
    cropped, corners, weight = _crop_inputs(drifted, x, y, probe)
    result = align_patch_phases(cropped, corners, weight)
    residual = np.angle(np.exp(1j * (result.phases + drift)))
    residual = np.angle(np.exp(1j * (residual - residual.mean())))
    assert result.iterations < 100 and result.last_step < 1e-3
    # A drift of several radians comes back to within a few hundredths of a radian.
    assert np.ptp(drift) > 2.5
    assert np.sqrt(np.mean(residual**2)) < 0.02 and np.abs(residual).max() < 0.06, residual
    assert abs(result.phases.mean()) < 1e-9


def test_consistent_patches_are_left_alone():
    _, x, y, patches, probe = _scan()
    result = align_patch_phases(*_crop_inputs(patches, x, y, probe))
    # Only the estimator's noise (the coarse canvas and bilinear sampling): hundredths of a
    # radian, where the drift test above moves patches by radians.
    print(np.sqrt(np.mean(result.phases**2)), np.abs(result.phases).max(), result.iterations)
    assert np.sqrt(np.mean(result.phases**2)) < 0.02 and np.abs(result.phases).max() < 0.05


def test_aligned_stitching_restores_the_object():
    obj, x, y, patches, probe = _scan()
    drifted = patches * np.exp(1j * _drift(x, y))[:, None, None]
    canvas = CanvasGeometry(0.0, 0.0, obj.shape[1], obj.shape[0])
    positions = np.stack([x, y], axis=1)
    plain = stitch_patches(drifted, positions, N, probe, canvas=canvas)
    aligned = stitch_patches(drifted, positions, N, probe, canvas=canvas, align_phases=True)
    mask = scanned_region(aligned.weights, erode=N // 8)
    before = evaluate(plain.object, obj, mask, register=False)
    after = evaluate(aligned.object, obj, mask, register=False)
    assert before.phase_ssim < 0.8 < 0.97 < after.phase_ssim
    assert after.amplitude_ssim > before.amplitude_ssim
    assert after.amplitude_ssim > 0.97


def test_stitcher_keeps_patches_only_when_aligning_and_validates():
    obj, x, y, patches, probe = _scan()
    canvas = CanvasGeometry(0.0, 0.0, obj.shape[1], obj.shape[0])
    positions = np.stack([x, y], axis=1)
    plain = Stitcher(canvas, N, probe)
    plain.add(patches, positions)
    assert plain._kept == []
    with pytest.raises(ValueError, match="align_phases=True"):
        plain.result(aligned=True)
    chunked = Stitcher(canvas, N, probe, align_phases=True)
    for part in np.array_split(np.arange(len(x)), 3):
        chunked.add(patches[part], positions[part])
    one_shot = stitch_patches(patches, positions, N, probe, canvas=canvas, align_phases=True)
    np.testing.assert_allclose(chunked.result().object, one_shot.object, atol=1e-6)
    np.testing.assert_array_equal(chunked.result(aligned=False).object, plain.result().object)


def test_a_patch_far_off_the_canvas_is_not_kept_for_alignment():
    """A stray host position far outside the object adds nothing to the image; kept for the
    alignment, whose canvas spans every kept patch, it asked for 250 GB at 1e6 px."""
    obj, x, y, patches, probe = _scan()
    canvas = CanvasGeometry(0.0, 0.0, obj.shape[1], obj.shape[0])
    positions = np.stack([x, y], axis=1)
    stray = np.concatenate([positions, [[1e6, 5e5]]])
    stitcher = Stitcher(canvas, N, probe, align_phases=True)
    stitcher.add(np.concatenate([patches, patches[:1]]), stray)
    assert sum(len(block) for block, _ in stitcher._kept) == len(x)
    expected = stitch_patches(patches, positions, N, probe, canvas=canvas, align_phases=True)
    np.testing.assert_array_equal(stitcher.result().object, expected.object)
    # A patch that reaches the canvas by one pixel is still kept.
    edge = Stitcher(canvas, N, probe, align_phases=True)
    edge.add(patches[:1], np.array([[obj.shape[1] + N / 4 - 1, 20.0]]))
    assert len(edge._kept) == 1


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="patches"):
        align_patch_phases(np.zeros((4, 8, 8), complex), np.zeros((4, 2)), np.ones((6, 6)))
    with pytest.raises(ValueError, match="corners"):
        align_patch_phases(np.zeros((4, 8, 8), complex), np.zeros((3, 2)), np.ones((8, 8)))
    single = align_patch_phases(np.ones((1, 8, 8), complex), np.zeros((1, 2)), np.ones((8, 8)))
    assert single.phases.tolist() == [0.0] and single.iterations == 0


def test_without_previews_only_the_aligned_image_is_made():
    obj, x, y, patches, probe = _scan()
    canvas = CanvasGeometry(0.0, 0.0, obj.shape[1], obj.shape[0])
    positions = np.stack([x, y], axis=1)
    final_only = Stitcher(canvas, N, probe, align_phases=True, previews=False)
    final_only.add(patches, positions)
    assert not final_only._numerator.any()  # the plain average was never accumulated
    with pytest.raises(ValueError, match="previews=True"):
        final_only.result(aligned=False)
    with_previews = stitch_patches(patches, positions, N, probe, canvas=canvas, align_phases=True)
    np.testing.assert_array_equal(final_only.result().object, with_previews.object)
    np.testing.assert_array_equal(final_only.result().weights, with_previews.weights)


def test_blocks_give_the_phases_of_the_joined_patches():
    """The stitcher hands its kept blocks over as they are (no joined copy)."""
    obj, x, y, patches, probe = _scan()
    drifted = patches * np.exp(1j * _drift(x, y))[:, None, None]
    cropped, corners, weight = _crop_inputs(drifted, x, y, probe)
    joined = align_patch_phases(cropped, corners, weight)
    blocks = align_patch_phases([cropped[:50], cropped[50:51], cropped[51:]], corners, weight)
    np.testing.assert_array_equal(blocks.phases, joined.phases)
    with pytest.raises(ValueError, match=r"corners: found shape \(3, 2\), expected \(4, 2\)"):
        align_patch_phases([np.zeros((1, 8, 8)), np.zeros((3, 8, 8))], np.zeros((3, 2)), np.eye(8))


def test_aligned_stitching_memory_stays_near_the_kept_patches():
    """The final aligned image costs little beyond the kept patches (8 bytes per pixel).

    Joining the kept blocks and weighting them in complex128 used to cost about six times
    their size at the end: 39 GB for a 50,000-pattern N = 128 gridsize-2 scan whose patches
    take 6.5 GB.
    """
    import tracemalloc

    n, count, chunk = 64, 3000, 500
    rng = np.random.default_rng(0)
    block = (rng.normal(size=(chunk, n, n)) + 1j * rng.normal(size=(chunk, n, n))).astype(
        np.complex64
    )
    canvas = CanvasGeometry(0.0, 0.0, 400, 400)
    stitcher = Stitcher(canvas, n, sim.disk_probe(n), align_phases=True, previews=False)
    for _ in range(count // chunk):
        stitcher.add(block, rng.uniform(n / 2, 400 - n / 2, (chunk, 2)))
    kept = sum(p.nbytes for p, _ in stitcher._kept)
    assert kept == count * crop_size(n, 0.5) ** 2 * 8
    tracemalloc.start()
    try:
        result = stitcher.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.covered.any()
    # measured: 37 MB, one block's temporaries and the canvas, the same at 6,000 patches;
    # 123 MB (5 x the kept 25 MB) before
    assert peak < kept + 20e6, (peak, kept)


def test_a_drift_across_a_large_scan_is_followed_to_convergence():
    """The steps needed grow with the scan's extent: a fixed 100 stopped short on large scans
    (a 111 x 111 scan needed 377) and left the drift in the image without a word."""
    rng = np.random.default_rng(3)
    side = 300
    obj = sim.random_object((side, side), seed=3, smoothness=2.0)
    grid = np.arange(N // 2 + 2, side - N // 2 - 2, 4.0)
    x, y = (v.ravel() for v in np.meshgrid(grid, grid))
    x, y = x + rng.uniform(-1.5, 1.5, x.size), y + rng.uniform(-1.5, 1.5, y.size)
    patches = sim.extract_patches(obj, x, y, N)
    drift = 3.0 * np.exp(-((x - 150) ** 2 + (y - 140) ** 2) / (2 * 70.0**2))
    drifted = patches * np.exp(1j * drift)[:, None, None]
    cropped, corners, weight = _crop_inputs(drifted, x, y, sim.disk_probe(N))

    def rms_residual(result):
        residual = np.angle(np.exp(1j * (result.phases + drift)))
        residual = np.angle(np.exp(1j * (residual - residual.mean())))
        return float(np.sqrt(np.mean(residual**2)))

    short = align_patch_phases(cropped, corners, weight, max_iterations=100)
    assert not short.converged and short.iterations == 100
    full = align_patch_phases(cropped, corners, weight)  # the default limit, from the scan
    assert full.converged and full.iterations > 100, (x.size, full.iterations)
    assert rms_residual(full) < 0.5 * rms_residual(short), (rms_residual(full), rms_residual(short))


def test_stitching_says_when_the_alignment_stopped_before_converging(monkeypatch, caplog):
    from ptychodus_torch_plugin.engine import inference

    def stopped_short(*args, **kwargs):
        return align_patch_phases(*args, **kwargs, max_iterations=2)

    monkeypatch.setattr(inference, "align_patch_phases", stopped_short)
    obj, x, y, patches, probe = _scan()
    drifted = patches * np.exp(1j * _drift(x, y))[:, None, None]
    canvas = CanvasGeometry(0.0, 0.0, obj.shape[1], obj.shape[0])
    positions = np.stack([x, y], axis=1)
    with caplog.at_level("WARNING", logger="ptychodus_torch_plugin.engine.inference"):
        stitch_patches(drifted, positions, N, probe, canvas=canvas, align_phases=True)
    assert "stopped after 2 iterations before it had converged" in caplog.text
    caplog.clear()
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="ptychodus_torch_plugin.engine.inference"):
        stitch_patches(drifted, positions, N, probe, canvas=canvas, align_phases=True)
    assert "before it had converged" not in caplog.text


def test_a_stop_ends_the_alignment_and_the_image_says_so(caplog):
    """Stop is polled every iteration (a 100,000-pattern scan iterates for minutes); the image
    is stitched with the phases found so far, and the log says the alignment was cut short."""
    obj, x, y, patches, probe = _scan()
    drifted = patches * np.exp(1j * _drift(x, y))[:, None, None]
    polls = []

    def after_three() -> bool:
        polls.append(1)
        return len(polls) > 3

    cropped, corners, weight = _crop_inputs(drifted, x, y, probe)
    cut = align_patch_phases(cropped, corners, weight, should_stop=after_three)
    assert cut.stopped and not cut.converged and cut.iterations == 3
    full = align_patch_phases(cropped, corners, weight, should_stop=lambda: False)
    assert not full.stopped and full.converged and full.iterations > 3

    canvas = CanvasGeometry(0.0, 0.0, obj.shape[1], obj.shape[0])
    stitcher = Stitcher(canvas, N, probe, align_phases=True)
    stitcher.add(drifted, np.stack([x, y], axis=1))
    with caplog.at_level("WARNING", logger="ptychodus_torch_plugin.engine.inference"):
        image = stitcher.result(should_stop=lambda: True)
    assert "stopped on request after 0 iterations" in caplog.text
    np.testing.assert_allclose(image.object, stitcher.result(aligned=False).object, atol=1e-6)
