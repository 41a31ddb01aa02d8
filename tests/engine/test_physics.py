"""Physics invariants: shift direction, overlap constraint, far field, losses, scales."""

import math

import numpy as np
import pytest
import torch
from scipy.special import gammaln
from scipy.stats import poisson

from ptychodus_torch_plugin.engine.config import GridConfig, ModelConfig
from ptychodus_torch_plugin.engine.physics import (
    BORDER_MERGE_WEIGHT,
    ForwardModel,
    center_crop,
    disk_mask,
    exit_waves,
    far_field_amplitude,
    input_normalization_factor,
    intensity_scale,
    mae_loss,
    merge_and_reextract,
    normalize_probe,
    pad_to,
    poisson_nll,
    predicted_amplitude,
    translate,
)

# ------------------------------------------------------------------ helpers


def _random_complex(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def _bilinear_patch(obj: np.ndarray, x: float, y: float, n: int) -> np.ndarray:
    """Patch pixel j samples object coordinate p - n/2 + j (bilinear), the project convention."""
    xs = x - n / 2 + np.arange(n)
    ys = y - n / 2 + np.arange(n)
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    tx, ty = (xs - x0)[None, :], (ys - y0)[:, None]
    o = obj.astype(np.complex128)

    def at(yy, xx):
        return o[np.ix_(yy, xx)]

    return (
        (1 - ty) * (1 - tx) * at(y0, x0)
        + (1 - ty) * tx * at(y0, x0 + 1)
        + ty * (1 - tx) * at(y0 + 1, x0)
        + ty * tx * at(y0 + 1, x0 + 1)
    ).astype(np.complex64)


def _consistent_group(n, gridsize, frac, seed=0, batch=2):
    """Patches cut from one random object at positions sharing a sub-pixel part ``frac``."""
    obj = _random_complex((4 * n, 4 * n), seed)
    rng = np.random.default_rng(seed + 1)
    c = gridsize * gridsize
    patches = np.zeros((batch, c, n, n), np.complex64)
    offsets = np.zeros((batch, c, 2), np.float32)
    for b in range(batch):
        base = rng.integers(-n // 4, n // 4 + 1, size=(c, 2)).astype(np.float64)
        pos = 2 * n + base + np.asarray(frac)
        for ch in range(c):
            patches[b, ch] = _bilinear_patch(obj, pos[ch, 0], pos[ch, 1], n)
        offsets[b] = pos - pos.mean(axis=0)
    return torch.from_numpy(patches), torch.from_numpy(offsets)


def _central_box(n):
    box = np.zeros((n, n), bool)
    box[n // 4 : n // 4 + n // 2, n // 4 : n // 4 + n // 2] = True
    return box


# ------------------------------------------------------------------ translate, pad, crop


def test_translate_integer_moves_pixel_right_and_up_exactly():
    img = torch.zeros(1, 1, 16, 16)
    img[0, 0, 8, 5] = 7.0  # (y, x)
    out = translate(img, torch.tensor([[[3.0, -2.0]]]))  # dx = +3 (right), dy = -2 (up)
    expected = torch.zeros_like(img)
    expected[0, 0, 6, 8] = 7.0
    assert torch.equal(out, expected)


def test_translate_integer_complex_is_exact_copy_with_zero_fill():
    img = torch.from_numpy(_random_complex((2, 3, 12, 12)))
    shifts = torch.tensor([[[1.0, 2.0], [-3.0, 0.0], [0.0, 0.0]], [[4.0, -1.0], [0, 5], [-2, -2]]])
    out = translate(img, shifts)
    for b in range(2):
        for c in range(3):
            dx, dy = (int(v) for v in shifts[b, c])
            ref = torch.zeros(12, 12, dtype=torch.complex64)
            ys, xs = slice(max(dy, 0), 12 + min(dy, 0)), slice(max(dx, 0), 12 + min(dx, 0))
            src_y, src_x = slice(max(-dy, 0), 12 - max(dy, 0)), slice(max(-dx, 0), 12 - max(dx, 0))
            ref[ys, xs] = img[b, c, src_y, src_x]
            assert torch.equal(out[b, c], ref)


def test_translate_half_pixel_averages_neighbours():
    img = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, 10, 10))).float()
    out_x = translate(img, torch.tensor([[[0.5, 0.0]]]))
    # output[y, x] = input[y, x - 0.5] = mean of input[y, x - 1] and input[y, x]
    torch.testing.assert_close(out_x[..., 1:], 0.5 * (img[..., 1:] + img[..., :-1]))
    out_y = translate(img, torch.tensor([[[0.0, -0.5]]]))
    torch.testing.assert_close(out_y[..., :-1, :], 0.5 * (img[..., :-1, :] + img[..., 1:, :]))


def test_translate_is_differentiable_in_images_and_shifts():
    img = torch.rand(1, 2, 8, 8, requires_grad=True)
    shifts = torch.tensor([[[0.3, -1.2], [2.5, 0.7]]], requires_grad=True)
    translate(img, shifts).square().sum().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()
    assert shifts.grad is not None and shifts.grad.abs().sum() > 0


@pytest.mark.parametrize("n, size", [(8, 16), (7, 12), (8, 11), (9, 9)])
def test_pad_and_crop_keep_the_centre_pixel(n, size):
    img = torch.zeros(1, 1, n, n)
    img[0, 0, n // 2, n // 2] = 1.0
    padded = pad_to(img, size)
    assert padded.shape[-2:] == (size, size)
    assert padded[0, 0, size // 2, size // 2] == 1.0 and padded.sum() == 1.0
    assert torch.equal(center_crop(padded, n), img)


def test_pad_to_complex():
    img = torch.from_numpy(_random_complex((1, 1, 4, 4)))
    padded = pad_to(img, 8)
    assert padded.dtype == torch.complex64
    assert torch.equal(padded[..., 2:6, 2:6], img) and padded.abs().sum() == img.abs().sum()


# ------------------------------------------------------------------ overlap constraint


@pytest.mark.parametrize("gridsize, frac", [(2, (0.0, 0.0)), (2, (0.3, 0.65)), (3, (0.8, 0.25))])
def test_merge_and_reextract_returns_consistent_patches(gridsize, frac):
    n = 32
    patches, offsets = _consistent_group(n, gridsize, frac)
    # offsets have integer and fractional parts (the centroid is sub-pixel)
    assert (offsets - offsets.round()).abs().max() > 0.05 or frac == (0.0, 0.0)
    out = merge_and_reextract(patches, offsets)
    assert out.shape == patches.shape and out.dtype == torch.complex64
    box = torch.from_numpy(_central_box(n))
    diff = (out - patches)[..., box].abs().max()
    assert diff < 1e-5 * patches.abs().max()


def test_merge_and_reextract_averages_inconsistent_patches():
    n = 16
    patches = torch.stack([torch.ones(n, n), 3 * torch.ones(n, n)]).to(torch.complex64)[None]
    offsets = torch.zeros(1, 2, 2)
    out = merge_and_reextract(patches, offsets)
    box = torch.from_numpy(_central_box(n))
    torch.testing.assert_close(out[..., box], torch.full_like(out[..., box], 2.0))
    assert out[..., ~box].abs().max() == 0  # nothing covers the outside of the box


def test_merge_with_border_weight_keeps_consistent_full_patches():
    """With probe_big the border is merged too: true patches come back whole, not just centres."""
    n = 32
    patches, offsets = _consistent_group(n, 2, (0.0, 0.0))
    out = merge_and_reextract(patches, offsets, border_weight=BORDER_MERGE_WEIGHT)
    diff = (out - patches)[..., 1:-1, 1:-1].abs().max()
    assert diff < 1e-5 * patches.abs().max()


def test_merge_with_border_weight_lets_the_centre_dominate():
    n = 16
    centre = torch.from_numpy(_central_box(n))
    first = torch.where(centre, 1.0, 5.0)  # channel 0: centre 1, border 5
    second = torch.full((n, n), 3.0)
    patches = torch.stack([first, second]).to(torch.complex64)[None]
    out = merge_and_reextract(patches, torch.zeros(1, 2, 2), border_weight=0.01)
    torch.testing.assert_close(out[..., centre].real, torch.full_like(out[..., centre].real, 2.0))
    # outside every central box both borders count equally: (5 + 3) / 2
    torch.testing.assert_close(out[..., ~centre].real, torch.full_like(out[..., ~centre].real, 4.0))


@pytest.mark.parametrize("border_weight", [0.0, BORDER_MERGE_WEIGHT])
def test_merge_equals_its_definition_from_pad_translate_and_crop(border_weight):
    """The fused merge (no padded arrays, separable weights) is the section 6.2 formula.

    Reference: pad every patch to the canvas, translate by the applied shifts, average with
    the translated box weights, translate back and crop, written with the public primitives.
    Inconsistent random patches and non-shared sub-pixel offsets exercise every branch, and
    the gradient with respect to the patches must agree too (it is what training uses).
    """
    n, batch, channels = 16, 3, 4
    patches = torch.from_numpy(_random_complex((batch, channels, n, n), seed=5))
    patches.requires_grad_(True)
    offsets = torch.from_numpy(np.random.default_rng(6).normal(0, 3, (batch, channels, 2)))
    offsets = offsets.to(torch.float32)

    shifts = offsets - (offsets[:, :1] - offsets[:, :1].round())
    margin = 2 * math.ceil(float(shifts.abs().max()) - 1e-6)
    side = max(n, n // 2 + margin, n + margin if border_weight > 0 else 0)
    side += side % 2
    box = pad_to(torch.ones(1, 1, n // 2, n // 2), n)[0, 0]
    box = (box + border_weight * (1 - box)).expand(batch, channels, n, n)
    canvas = translate(pad_to(patches, side), shifts)
    weights = translate(pad_to(box, side), shifts)
    total = weights.sum(dim=1, keepdim=True)
    merged = (weights * canvas).sum(dim=1, keepdim=True) / total.clamp_min(1e-6)
    merged = torch.where(total > 1e-6, merged, torch.zeros_like(merged))
    expected = center_crop(translate(merged.expand(-1, channels, -1, -1), -shifts), n)

    out = merge_and_reextract(patches, offsets, border_weight=border_weight)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    upstream = torch.from_numpy(_random_complex(out.shape, seed=7))
    (grad_out,) = torch.autograd.grad((out * upstream).real.sum(), patches)
    (grad_ref,) = torch.autograd.grad((expected * upstream).real.sum(), patches)
    torch.testing.assert_close(grad_out, grad_ref, atol=1e-5, rtol=1e-5)


def test_merge_and_reextract_single_channel_is_identity():
    patches = torch.from_numpy(_random_complex((3, 1, 16, 16)))
    assert merge_and_reextract(patches, torch.rand(3, 1, 2)) is patches


# ------------------------------------------------------------------ probe, far field, forward


def _probe(n, radius=None, seed=2):
    mask = disk_mask(n, radius if radius is not None else n / 4).numpy()
    return _random_complex((n, n), seed) * mask


def test_normalize_probe_mean_and_idempotence():
    n = 32
    probe = torch.from_numpy(_random_complex((n, n)))
    p = normalize_probe(probe, probe_scale=4.0)
    disk = disk_mask(n)
    assert disk[n // 2, n // 2] and disk[n // 2, n // 2 + n // 4] and not disk[0, 0]
    assert math.isclose(float((p.abs() * disk).mean()), 0.25, rel_tol=1e-5)
    torch.testing.assert_close(normalize_probe(p, 4.0), p)
    modes = torch.stack([probe, 0.5 * probe])
    pm = normalize_probe(modes, 2.0)
    assert math.isclose(float((pm[0].abs() * disk).mean()), 0.5, rel_tol=1e-5)
    torch.testing.assert_close(pm[1], 0.5 * pm[0])


def test_far_field_parseval_and_centre():
    psi = torch.from_numpy(_random_complex((2, 3, 32, 32)))
    amp = far_field_amplitude(psi)
    assert amp.dtype == torch.float32
    ratio = amp.square().sum() / psi.abs().square().sum()
    assert abs(float(ratio) - 1.0) < 1e-5
    flat = torch.ones(1, 1, 32, 32, dtype=torch.complex64)
    peak = far_field_amplitude(flat)
    assert peak[0, 0, 16, 16] == peak.max() and math.isclose(float(peak.max()), 32.0, rel_tol=1e-6)


def test_forward_model_matches_numpy_reference_gridsize_1():
    n = 32
    obj = torch.from_numpy(_random_complex((4, 1, n, n), seed=5))
    probe = _probe(n, radius=n / 3)
    model = ForwardModel(probe, gridsize=1)
    assert model.probe.dtype == torch.complex64 and model.probe.shape == (1, n, n)
    p_used = probe / (4.0 * np.mean(np.abs(probe) * disk_mask(n).numpy()))
    ref = np.abs(np.fft.fftshift(np.fft.fft2(p_used * obj.numpy(), norm="ortho"), axes=(-2, -1)))
    out = model(obj).numpy()
    assert np.abs(out - ref).max() < 1e-5 * ref.max()
    assert "probe" in model.state_dict()


def test_a_probe_mask_multiplies_the_normalised_probe_and_is_checked():
    """The design's optional probe mask (exit wave = O' * P_used * mask), kept as a buffer."""
    n = 32
    obj = torch.from_numpy(_random_complex((2, 1, n, n), seed=6))
    probe = _probe(n, radius=n / 3)
    mask = np.zeros((n, n), np.float32)
    mask[8:-8, 10:-10] = 1.0  # cuts the probe disc (radius ~11 px) on all sides
    masked = ForwardModel(probe, gridsize=1, probe_mask=mask)
    plain = ForwardModel(probe, gridsize=1)
    assert "probe_mask" in masked.state_dict() and plain.probe_mask is None
    p_used = plain.probe[0].numpy() * mask  # normalised from the whole probe, then masked
    ref = np.abs(np.fft.fftshift(np.fft.fft2(p_used * obj.numpy(), norm="ortho"), axes=(-2, -1)))
    out = masked(obj).numpy()
    assert np.abs(out - ref).max() < 1e-5 * ref.max()
    assert np.abs(out - plain(obj).numpy()).max() > 0.1 * ref.max()
    with pytest.raises(ValueError, match=r"probe_mask must be \(32, 32\)"):
        ForwardModel(probe, probe_mask=np.ones((16, 16)))


def test_forward_model_gridsize_2_with_a_probe_larger_than_the_central_box():
    """Real probes spill out of the N/2 box (Run1084: 28% of the energy): with probe_big the
    overlap constraint must still reproduce the far field of true patches."""
    n = 32
    patches, offsets = _consistent_group(n, 2, (0.0, 0.0), seed=9, batch=2)
    probe = _probe(n, radius=0.45 * n)
    outside = 1.0 - torch.from_numpy(_central_box(n)).float().numpy()
    assert (np.abs(probe) ** 2 * outside).sum() > 0.3 * (np.abs(probe) ** 2).sum()
    config = ModelConfig(grid=GridConfig(N=n, gridsize=2), probe_big=True)
    model = ForwardModel.from_config(config, probe)
    out = model(patches, offsets).numpy()
    p_used = model.probe[0].numpy()
    ref = np.abs(
        np.fft.fftshift(np.fft.fft2(p_used * patches.numpy(), norm="ortho"), axes=(-2, -1))
    )
    assert np.abs(out - ref).max() < 1e-5 * ref.max()


def test_forward_model_gridsize_2_with_consistent_patches():
    """Probe inside the central box: the overlap constraint must not change the far field."""
    n = 32
    patches, offsets = _consistent_group(n, 2, (0.4, 0.9), seed=7, batch=3)
    probe = _probe(n, radius=n / 4 - 1)
    model = ForwardModel(probe, gridsize=2, object_big=True)
    out = model(patches, offsets).numpy()
    p_used = model.probe[0].numpy()
    ref = np.abs(
        np.fft.fftshift(np.fft.fft2(p_used * patches.numpy(), norm="ortho"), axes=(-2, -1))
    )
    assert out.shape == (3, 4, n, n)
    assert np.abs(out - ref).max() < 1e-5 * ref.max()
    with pytest.raises(ValueError, match="offsets"):
        model(patches)
    with pytest.raises(ValueError, match="gridsize 2"):
        model(patches[:, :1])


def test_multimode_sums_intensities():
    n = 16
    obj = torch.from_numpy(_random_complex((2, 4, n, n), seed=1))
    modes = torch.from_numpy(np.stack([_probe(n, seed=3), _probe(n, seed=4)]))
    waves = exit_waves(obj, modes)
    assert waves.shape == (2, 4, 2, n, n)
    amp = predicted_amplitude(obj, modes)
    expected = (
        far_field_amplitude(obj * modes[0]).square() + far_field_amplitude(obj * modes[1]).square()
    )
    torch.testing.assert_close(amp.square(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(amp, far_field_amplitude(obj * (modes[0] + modes[1])))


# ------------------------------------------------------------------ losses


def test_poisson_nll_matches_scipy_per_pattern():
    rng = np.random.default_rng(0)
    s = 3.0
    lam = rng.uniform(0.5, 40.0, size=(3, 4, 8, 8))
    k = rng.poisson(lam).astype(np.float64)
    pred = torch.from_numpy(np.sqrt(lam) / s)
    meas = torch.from_numpy(np.sqrt(k) / s)
    loss = poisson_nll(pred, meas, s)
    per_pixel = -poisson.logpmf(k, lam) - gammaln(k + 1)  # = lam - k log lam
    expected = per_pixel.sum(axis=(-2, -1)).mean()  # mean over patterns (groups and channels)
    assert math.isclose(float(loss), expected, rel_tol=1e-9)
    # per-pattern: regrouping the same patterns (B, C) -> (B*C, 1) gives the same value
    regrouped = poisson_nll(pred.reshape(12, 1, 8, 8), meas.reshape(12, 1, 8, 8), s)
    assert math.isclose(float(regrouped), float(loss), rel_tol=1e-12)
    # full=True is exactly -logpmf: a true negative log-likelihood, never negative.
    full = poisson_nll(pred, meas, s, full=True)
    expected_full = (-poisson.logpmf(k, lam)).sum(axis=(-2, -1)).mean()
    assert math.isclose(float(full), expected_full, rel_tol=1e-9)
    assert float(full) > 0


def test_losses_ignore_masked_pixels():
    rng = np.random.default_rng(1)
    pred = torch.from_numpy(rng.uniform(0.1, 2, (2, 4, 8, 8)))
    meas = torch.from_numpy(rng.uniform(0.1, 2, (2, 4, 8, 8)))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2, 3] = mask[5, 5] = True
    pred2, meas2 = pred.clone(), meas.clone()
    pred2[..., mask] = 100.0
    meas2[..., mask] = 0.0
    for loss in (lambda p, m, mk: poisson_nll(p, m, 2.0, mk), mae_loss):
        assert torch.equal(loss(pred, meas, mask), loss(pred2, meas2, mask))
        assert not torch.equal(loss(pred, meas, None), loss(pred2, meas2, None))
    expected_mae = (pred - meas).abs()[..., ~mask].mean()
    torch.testing.assert_close(mae_loss(pred, meas, mask), expected_mae)


def test_poisson_nll_gradient_is_finite_at_zero_prediction():
    pred = torch.zeros(1, 1, 4, 4, requires_grad=True)
    loss = poisson_nll(pred, torch.ones(1, 1, 4, 4), torch.tensor(2.0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


# ------------------------------------------------------------------ normalisation constants


def test_normalisation_constants_numpy_and_torch():
    rng = np.random.default_rng(2)
    n = 16
    counts = rng.poisson(50.0, size=(10, n, n)).astype(np.uint16)
    amps = np.sqrt(counts.astype(np.float64)).astype(np.float32)
    a = input_normalization_factor(amps)
    assert math.isclose(a, input_normalization_factor(torch.from_numpy(amps)), rel_tol=1e-12)
    scaled = amps.astype(np.float64) * a
    assert math.isclose(np.mean(np.sum(scaled**2, axis=(1, 2))), (n / 2) ** 2, rel_tol=1e-9)
    nphotons = float(counts.astype(np.float64).sum(axis=(1, 2)).mean())
    s = intensity_scale(torch.from_numpy(scaled), nphotons)
    # (s * X)^2 recovers the counts: the physics scale undoes the input normalisation
    assert math.isclose(s, 1.0 / a, rel_tol=1e-9)
    with pytest.raises(ValueError):
        intensity_scale(scaled, 0.0)
