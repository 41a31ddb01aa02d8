"""Reconstruction quality against a known object: alignment, SSIM, PSNR and FRC.

Why alignment comes first: a ptychographic reconstruction is only defined up to ambiguities
that say nothing about its quality - a global complex factor (amplitude scale and constant
phase), a small sub-pixel translation of the whole image, and (with an uncertain probe) a
linear phase ramp. Scoring without removing them would rank reconstructions by those
ambiguities. :func:`align` removes them in that order of robustness; :func:`evaluate` then
scores amplitude and phase separately (they fail differently) on the scanned region only,
because pixels the probe never illuminated are not reconstructed by any method.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage, optimize
from skimage.metrics import structural_similarity
from skimage.registration import phase_cross_correlation

__all__ = [
    "QualityMetrics",
    "align",
    "evaluate",
    "frc",
    "frc_threshold",
    "global_scale",
    "register_shift",
    "remove_linear_phase",
    "scanned_region",
]

_UPSAMPLE = 20  # sub-pixel registration precision: 1/20 pixel
_SSIM_WINDOW = 7  # scikit-image's default window side


def _check_pair(reconstruction: np.ndarray, reference: np.ndarray) -> None:
    if reconstruction.ndim != 2 or reconstruction.shape != reference.shape:
        raise ValueError(
            f"reconstruction/reference: found shapes {reconstruction.shape} and "
            f"{reference.shape}, expected two 2-D images of the same shape"
        )


def _mask_for(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"mask: found shape {mask.shape}, expected {shape}")
    if not mask.any():
        raise ValueError("mask: it selects no pixel; nothing to compare")
    return mask


def scanned_region(weights: np.ndarray, erode: int = 0, threshold: float = 1e-3) -> np.ndarray:
    """Pixels the scan reconstructed: ``weights > threshold * max(weights)``, then eroded.

    ``weights`` are a stitcher's summed patch weights. Eroding by ``erode`` pixels drops the
    thinly covered rim, where every method is poorly constrained: a pixel is kept when it is
    more than ``erode`` px (Euclidean) from every pixel outside the region and from the array's
    edge. Euclidean, not repeated 4-neighbour erosion, which erodes only ``erode / sqrt(2)``
    along diagonal edges and so kept more of the rim at a round scan's corners.
    """
    weights = np.asarray(weights, dtype=np.float64)
    peak = float(weights.max()) if weights.size else 0.0
    if peak <= 0:
        return np.zeros(weights.shape, dtype=bool)
    region = weights > threshold * peak
    if erode > 0:
        region = _eroded(region, erode)
    return region


def _eroded(region: np.ndarray, distance: float, band_pixels: int = 1 << 22) -> np.ndarray:
    """Pixels of ``region`` more than ``distance`` px from any pixel outside it or the array.

    The Euclidean distance transform holds ~40 bytes per pixel (4 GB for a 10,000^2 canvas),
    so it runs on bands of rows of about ``band_pixels`` pixels, each with ``distance + 1``
    rows of context above and below: every background pixel within ``distance`` of a band's
    row lies in that context, so each band's answer is exact.
    """
    padded = np.pad(region, 1)  # the array's edge counts as outside
    height, width = region.shape
    margin = int(math.ceil(distance)) + 1
    band = max(1, band_pixels // (width + 2))
    out = np.zeros(region.shape, dtype=bool)
    for top in range(0, height, band):
        stop = min(top + band, height)
        low, high = max(top + 1 - margin, 0), min(stop + 1 + margin, height + 2)
        edt = ndimage.distance_transform_edt(padded[low:high])
        out[top:stop] = edt[top + 1 - low : stop + 1 - low, 1:-1] > distance
    return out


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _registration_image(amplitude: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Amplitude minus its mean inside the region, zero outside, tapered by a Hann window.

    Mean removal and zeroing avoid a step at the region edge; the taper removes the step at
    the array border that a periodic (FFT) correlation would otherwise lock onto at zero shift.
    """
    centred = np.where(mask, amplitude - amplitude[mask].mean(), 0.0)
    return centred * (np.hanning(amplitude.shape[0])[:, None] * np.hanning(amplitude.shape[1]))


def _correlation_cost(moved: np.ndarray, fixed: np.ndarray) -> float:
    """1 - Pearson correlation: insensitive to the amplitude scale and offset.

    For complex images, 1 - the modulus of the complex correlation coefficient, which is also
    insensitive to a global phase factor (a reconstruction's constant phase is arbitrary).
    """
    a = moved - moved.mean()
    b = fixed - fixed.mean()
    norm = math.sqrt(float(np.sum(np.abs(a) ** 2) * np.sum(np.abs(b) ** 2)))
    if norm <= 0:
        return 1.0
    if np.iscomplexobj(a) or np.iscomplexobj(b):
        return 1.0 - float(np.abs(np.vdot(b, a))) / norm
    return 1.0 - float(np.sum(a * b)) / norm


#: Below this relative spread (std / mean inside the region) the reference's amplitude is
#: treated as flat (a phase object, or a weak absorber): registration then uses the complex
#: images' local phase changes (:func:`_ramp_free_edges`), since an amplitude that is flat to
#: rounding or to a fraction of a percent holds no position to find, only noise that a
#: correlation would lock onto.
_FLAT_AMPLITUDE = 1e-2


def _is_flat(values: np.ndarray) -> bool:
    """True when ``values`` vary by less than ~1e-9 of their size (rounding, not structure)."""
    if values.size == 0:
        return True
    scale = float(np.abs(values).max())
    return scale == 0 or float(np.abs(values - values.mean()).max()) <= 1e-9 * scale


def _ramp_free_edges(image: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A complex image's local phase changes, blind to its constant phase and a linear ramp.

    Why: a phase object is registered on its complex image, but a reconstruction's phase may
    carry a linear ramp (the alignment removes it only after registering), which a plain
    complex correlation mistakes for a shift. Neighbouring-pixel products ``z[x+1] z*[x]``
    turn a ramp into one constant factor per axis, removed by its circular mean over the
    region; their imaginary parts (the phase's and amplitude's edges along x and along y)
    become the real and imaginary parts of the image returned, shape (H-1, W-1), with the
    region cut to the pixels whose neighbours lie in it too.
    """
    z = np.asarray(image, dtype=np.complex128)
    base = np.conj(z[:-1, :-1])
    inside = region[:-1, :-1] & region[:-1, 1:] & region[1:, :-1]
    parts = []
    for step in (z[:-1, 1:] * base, z[1:, :-1] * base):
        total = step[inside].sum()
        if total != 0:
            step = step * (np.conj(total) / abs(total))
        parts.append(step.imag)
    return parts[0] + 1j * parts[1], inside


def register_shift(
    reconstruction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """(row, column) shift that moves the reconstruction onto the reference.

    Registered on the amplitudes, which carry no arbitrary phase factor or ramp; when the
    reference's amplitude is flat (relative spread below 1%: a phase object or a weak
    absorber) on the complex images' local phase changes instead (:func:`_ramp_free_edges`),
    which ignore the arbitrary constant phase and a linear phase ramp.

    Two stages, because either alone is not accurate enough on a finite, non-periodic region:
    ``phase_cross_correlation`` (upsample factor 20) of the windowed images gives a robust
    estimate, biased towards zero by the window; a Nelder-Mead refinement then maximises the
    correlation of the cubic-spline-shifted image with the reference inside the region
    (eroded by the shift, so no extrapolated pixel counts). A shift that correlates no better
    than none is not applied. Returns (0, 0) when either image is flat inside the region
    (there is no position to find).
    """
    rec = np.asarray(reconstruction)
    ref = np.asarray(reference)
    _check_pair(rec, ref)
    mask = _mask_for(mask, rec.shape)
    rows, cols = _bounding_box(mask)
    region = mask[rows, cols]
    fixed = np.abs(ref[rows, cols]).astype(np.float64)
    spread = float(fixed[region].std())
    level = float(fixed[region].mean())
    if level > 0 and spread < _FLAT_AMPLITUDE * level:
        fixed, inside = _ramp_free_edges(ref[rows, cols], region)
        moving: np.ndarray = _ramp_free_edges(rec[rows, cols], region)[0]
        region = inside
    else:
        moving = np.abs(rec[rows, cols]).astype(np.float64)
    if _is_flat(moving[region]) or _is_flat(fixed[region]) or min(region.shape) < 4:
        return np.zeros(2)
    coarse, _, _ = phase_cross_correlation(
        _registration_image(fixed, region),
        _registration_image(moving, region),
        upsample_factor=_UPSAMPLE,
        normalization=None,
    )
    coarse = np.asarray(coarse, dtype=np.float64)
    if not np.all(np.isfinite(coarse)):
        return np.zeros(2)
    margin = int(math.ceil(float(np.abs(coarse).max()))) + 3
    interior = ndimage.binary_erosion(region, iterations=margin, border_value=0)
    if interior.sum() < 16:
        return coarse
    parts = (moving.real, moving.imag) if np.iscomplexobj(moving) else (moving,)
    coefficients = [ndimage.spline_filter(part, order=3, mode="nearest") for part in parts]
    target = fixed[interior]

    def cost(shift: np.ndarray) -> float:
        moved = [
            ndimage.shift(c, shift, order=3, mode="nearest", prefilter=False)[interior]
            for c in coefficients
        ]
        return _correlation_cost(moved[0] if len(moved) == 1 else moved[0] + 1j * moved[1], target)

    step = 0.5
    simplex = np.array([coarse, coarse + [step, 0.0], coarse + [0.0, step]])
    refined = optimize.minimize(
        cost,
        coarse,
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-12, "maxiter": 200},
    )
    best = coarse
    if refined.success or refined.fun < cost(coarse):
        if np.all(np.abs(refined.x - coarse) <= margin - 2):
            best = np.asarray(refined.x, dtype=np.float64)
    if cost(best) >= cost(np.zeros(2)):  # no better than leaving the image where it is
        return np.zeros(2)
    return best


def _shift_complex(image: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Sub-pixel shift of a complex image (cubic spline on real and imaginary parts).

    A spline avoids the wrap-around ringing a Fourier shift gives on non-periodic images and
    is more accurate than bilinear interpolation for the same cost here.
    """
    kw: dict[str, Any] = {"order": 3, "mode": "nearest"}
    real = ndimage.shift(image.real.astype(np.float64), shift, **kw)
    imag = ndimage.shift(image.imag.astype(np.float64), shift, **kw)
    return real + 1j * imag


def remove_linear_phase(
    reconstruction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """Multiply ``reconstruction`` by the linear phase ramp that best matches ``reference``.

    Least-squares fit of a plane a + b*x + c*y to the phase difference over the mask, weighted
    by the product of the amplitudes (phase is meaningless where either is dark). The
    difference is unwrapped first so ramps of several radians across the image are handled.
    """
    from skimage.restoration import unwrap_phase

    rec = np.asarray(reconstruction, dtype=np.complex128)
    ref = np.asarray(reference, dtype=np.complex128)
    _check_pair(rec, ref)
    mask = _mask_for(mask, rec.shape)
    rows, cols = _bounding_box(mask)
    sub_mask = mask[rows, cols]
    wrapped = np.angle(ref[rows, cols] * np.conj(rec[rows, cols]))
    if sub_mask.all():
        difference = unwrap_phase(wrapped)
    else:
        difference = np.ma.getdata(unwrap_phase(np.ma.masked_array(wrapped, ~sub_mask)))
    yy, xx = np.nonzero(sub_mask)
    weight = np.sqrt(np.abs(ref[rows, cols]) * np.abs(rec[rows, cols]))[sub_mask]
    if not np.any(weight > 0):
        return rec
    design = np.stack([np.ones_like(xx), xx, yy], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design * weight[:, None], difference[sub_mask] * weight, rcond=None)
    y_all, x_all = np.mgrid[0 : rec.shape[0], 0 : rec.shape[1]].astype(np.float64)
    ramp = coef[0] + coef[1] * (x_all - cols.start) + coef[2] * (y_all - rows.start)
    return rec * np.exp(1j * ramp)


def global_scale(
    reconstruction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None
) -> complex:
    """c = sum(conj(rec) * ref) / sum(|rec|^2) over the mask: the least-squares complex factor."""
    rec = np.asarray(reconstruction, dtype=np.complex128)
    ref = np.asarray(reference, dtype=np.complex128)
    mask = _mask_for(mask, rec.shape)
    power = float(np.sum(np.abs(rec[mask]) ** 2))
    if power <= 0:
        return 1.0 + 0.0j
    return complex(np.sum(np.conj(rec[mask]) * ref[mask]) / power)


def align(
    reconstruction: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    register: bool = True,
    remove_phase_ramp: bool = False,
) -> np.ndarray:
    """The reconstruction with its translation, phase ramp and global complex factor removed.

    1. ``register``: sub-pixel shift of the reconstruction onto the reference (see
       :func:`register_shift`: ``phase_cross_correlation`` of the amplitudes inside the region,
       or of the complex images for a phase object, upsample factor 20, refined to ~1/1000 px),
       applied with a cubic spline.
    2. ``remove_phase_ramp``: remove the best-fitting linear phase ramp (see
       :func:`remove_linear_phase`).
    3. Multiply by :func:`global_scale` (amplitude scale and constant phase).

    Returns a complex128 image of the reference's shape.
    """
    rec = np.asarray(reconstruction, dtype=np.complex128)
    ref = np.asarray(reference, dtype=np.complex128)
    _check_pair(rec, ref)
    mask = _mask_for(mask, rec.shape)
    if register:
        shift = register_shift(rec, ref, mask)
        if np.any(shift != 0):
            rec = _shift_complex(rec, shift)
    if remove_phase_ramp:
        rec = remove_linear_phase(rec, ref, mask)
    return rec * global_scale(rec, ref, mask)


def _fourier_rings(n: int) -> np.ndarray:
    freq = np.fft.fftfreq(n) * n
    radius = np.hypot(freq[:, None], freq[None, :])
    return np.rint(radius).astype(np.int64)


def _square_crop(shape: tuple[int, int], mask: np.ndarray | None) -> tuple[slice, slice]:
    """The largest square centred in the mask's bounding box (the whole image without mask)."""
    rows, cols = (slice(0, shape[0]), slice(0, shape[1])) if mask is None else _bounding_box(mask)
    h, w = rows.stop - rows.start, cols.stop - cols.start
    side = min(h, w)
    top = rows.start + (h - side) // 2
    left = cols.start + (w - side) // 2
    return slice(top, top + side), slice(left, left + side)


def _inscribed_square(mask: np.ndarray, smallest: int = 8) -> tuple[slice, slice] | None:
    """The centred square of ``mask``'s bounding box, shrunk until every pixel is in the mask.

    Why: FRC needs a square image, and the corners of a round scan's bounding square were
    never reconstructed; filling them with the reference scored a perfect match there, leaving
    them empty scored their edge as an error (FRC50 0.29 for an exact round reconstruction).
    None when the square would be smaller than ``smallest``.
    """
    rows, cols = _square_crop(mask.shape, mask)
    side = rows.stop - rows.start
    # Shrunk by k px on every side, the square holds the pixels whose distance to the first
    # square's edge (Chebyshev) is >= k: so k must exceed that of every pixel outside the mask.
    r, c = np.nonzero(~mask[rows, cols])
    depth = np.minimum(np.minimum(r, side - 1 - r), np.minimum(c, side - 1 - c))
    k = int(depth.max()) + 1 if depth.size else 0
    if side - 2 * k < smallest:
        return None
    return slice(rows.start + k, rows.stop - k), slice(cols.start + k, cols.stop - k)


def frc(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, *, window: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Fourier ring correlation of two complex images.

    Computed on the largest centred square of ``mask``'s bounding box (the whole image, cropped
    square, without a mask), optionally tapered by a 2-D Hann window so the image edges do not
    add spurious correlated high frequencies. Returns (frequencies in cycles/pixel, 1/n ..
    0.5, curve). A ring with no power in either image counts as correlated (1).
    """
    a = np.asarray(a, dtype=np.complex128)
    b = np.asarray(b, dtype=np.complex128)
    _check_pair(a, b)
    rows, cols = _square_crop(a.shape, None if mask is None else _mask_for(mask, a.shape))
    a, b = a[rows, cols], b[rows, cols]
    n = a.shape[0]
    if n < 4:
        raise ValueError(f"frc: the region is {n} px wide, expected at least 4 px")
    if window:
        hann = np.hanning(n)
        taper = hann[:, None] * hann[None, :]
        a, b = a * taper, b * taper
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    rings = _fourier_rings(n).ravel()
    n_rings = n // 2 + 1
    keep = rings < n_rings
    rings = rings[keep]
    cross = fa.ravel()[keep] * np.conj(fb.ravel()[keep])
    numerator = np.abs(
        np.bincount(rings, cross.real, n_rings) + 1j * np.bincount(rings, cross.imag, n_rings)
    )
    power_a = np.bincount(rings, np.abs(fa.ravel()[keep]) ** 2, n_rings)
    power_b = np.bincount(rings, np.abs(fb.ravel()[keep]) ** 2, n_rings)
    denominator = np.sqrt(power_a * power_b)
    scale = max(float(power_a.max()), float(power_b.max()), 1e-300)
    empty_a, empty_b = power_a <= 1e-24 * scale, power_b <= 1e-24 * scale
    curve = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), 0.0)
    curve = np.where(empty_a & empty_b, 1.0, curve)
    curve = np.where(empty_a ^ empty_b, 0.0, curve)
    frequencies = np.arange(n_rings, dtype=np.float64) / n
    return frequencies[1:], np.clip(curve[1:], 0.0, 1.0)


def frc_threshold(frequencies: np.ndarray, curve: np.ndarray, threshold: float = 0.5) -> float:
    """First spatial frequency (cycles/pixel) where the FRC drops below ``threshold``.

    The crossing is interpolated linearly between the last ring above and the first ring
    below; a curve that starts below gives its first frequency, one that never drops gives 0.5
    (the Nyquist frequency: resolution limited by the pixel, not by the reconstruction).
    """
    frequencies = np.asarray(frequencies, dtype=np.float64)
    curve = np.asarray(curve, dtype=np.float64)
    below = np.flatnonzero(curve < threshold)
    if below.size == 0:
        return 0.5
    i = int(below[0])
    if i == 0:
        return float(frequencies[0])
    f0, f1, c0, c1 = frequencies[i - 1], frequencies[i], curve[i - 1], curve[i]
    return float(f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0))


@dataclass(frozen=True)
class QualityMetrics:
    """Scores of an aligned reconstruction against the reference on the scanned region."""

    amplitude_ssim: float
    phase_ssim: float
    amplitude_psnr: float  # dB; inf for identical images
    phase_psnr: float
    frc50: float  # cycles/pixel where the FRC falls below 0.5 (0.5 = never)

    def to_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


def _data_range(values: np.ndarray, fallback: float) -> float:
    """The reference's span on the region; ``fallback`` when it is flat.

    Flat means a span below 1e-6 of the values' size, not only exactly zero: a phase object's
    amplitude stored as complex64 spans ~1e-7 from rounding, and that as a data range scored a
    1% amplitude error at -267 dB.
    """
    if values.size == 0:
        return fallback
    span = float(values.max() - values.min())
    return span if span > 1e-6 * float(np.abs(values).max()) else fallback


def _ssim_psnr(
    rec: np.ndarray, ref: np.ndarray, data_range: float, region: np.ndarray
) -> tuple[float, float]:
    """SSIM and PSNR averaged over ``region`` pixels only (the rest feeds the SSIM windows)."""
    side = min(rec.shape)
    win = min(_SSIM_WINDOW, side if side % 2 else side - 1)
    ssim = math.nan
    if win >= 3:
        _, ssim_map = structural_similarity(
            ref, rec, data_range=data_range, win_size=win, full=True
        )
        ssim = float(ssim_map[region].mean())
    mse = float(np.mean((rec[region] - ref[region]) ** 2))
    psnr = math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)
    return ssim, psnr


def evaluate(
    reconstruction: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    register: bool = True,
    remove_phase_ramp: bool = False,
) -> QualityMetrics:
    """Align, then score amplitude and phase (SSIM, PSNR) and the complex images (FRC 0.5).

    SSIM is scikit-image's ``structural_similarity`` with its defaults (a uniform 7 x 7 window,
    sample covariance, K1 = 0.01, K2 = 0.03), not Wang et al.'s Gaussian window (sigma 1.5),
    which scores differently (a Run1084 reconstruction: amplitude 0.006 lower, phase 0.018
    higher). SSIM and PSNR are averaged over the pixels of ``mask`` only; the SSIM windows of
    the pixels near its edge see the reconstruction around it as it is (until 2026-12-03 the
    reference was pasted in there). FRC uses the largest centred square of the mask's
    bounding box that lies inside the mask, with a taper (the bounding box's square when that
    is smaller than 8 x 8). ``data_range`` comes from the reference on the region.

    Amplitude is scaled by its own least-squares factor (``sum |rec||ref| / sum |rec|^2``), not
    by the modulus of the complex one: a phase error of spread sigma shrinks the complex factor
    by about ``E[cos]``, which scored an exact amplitude as wrong (SSIM 0.96, PSNR 18 dB at an
    rms phase error of 0.5 rad on Run1084). Phase is compared as reference phase + wrapped
    phase difference, after removing the difference's circular mean, so phase wrapping and the
    global phase offset cannot create errors.

    These two changes (and the Euclidean erosion of :func:`scanned_region`) moved a Run1084
    reconstruction's scores from 0.837 / 0.861 (amplitude / phase SSIM) to 0.833 / 0.865.
    """
    ref = np.asarray(reference, dtype=np.complex128)
    mask = _mask_for(mask, ref.shape)
    aligned = align(
        reconstruction, ref, mask, register=register, remove_phase_ramp=remove_phase_ramp
    )
    # The region's bounding box and the half window around it, so the SSIM window of a region
    # pixel reads the reconstruction there (scanned pixels when the region was eroded by >= 5
    # px), not the filter's reflection at the box's edge (still so at the array's edge).
    rows, cols = _bounding_box(mask)
    half = _SSIM_WINDOW // 2
    rows = slice(max(rows.start - half, 0), min(rows.stop + half, mask.shape[0]))
    cols = slice(max(cols.start - half, 0), min(cols.stop + half, mask.shape[1]))
    region = mask[rows, cols]
    rec_box, ref_box = aligned[rows, cols], ref[rows, cols]

    amp_ref = np.abs(ref_box)
    amp_rec = np.abs(rec_box)
    power = float(np.sum(amp_rec[region] ** 2))
    if power > 0:
        amp_rec = amp_rec * (float(np.sum(amp_rec[region] * amp_ref[region])) / power)
    amp_range = _data_range(amp_ref[region], max(float(amp_ref[region].max()), 1.0))
    amp_ssim, amp_psnr = _ssim_psnr(amp_rec, amp_ref, amp_range, region)

    phase_ref = np.angle(ref_box)
    turn = rec_box * np.conj(ref_box)
    offset = np.angle(np.sum(np.exp(1j * np.angle(turn[region]))))
    phase_rec = phase_ref + np.angle(turn * np.exp(-1j * offset))
    phase_range = _data_range(phase_ref[region], 2 * math.pi)
    phase_ssim, phase_psnr = _ssim_psnr(phase_rec, phase_ref, phase_range, region)

    square = _inscribed_square(region)
    if square is None:  # no 8 x 8 square inside: the bounding box's, as it is
        frequencies, curve = frc(rec_box, ref_box, region)
    else:
        frequencies, curve = frc(rec_box[square], ref_box[square])
    return QualityMetrics(
        amplitude_ssim=amp_ssim,
        phase_ssim=phase_ssim,
        amplitude_psnr=amp_psnr,
        phase_psnr=phase_psnr,
        frc50=frc_threshold(frequencies, curve),
    )
