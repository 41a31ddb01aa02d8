"""Synthetic ptychography data: objects, probes, scans, far-field patterns and Poisson noise.

Why: training and testing PtychoPINN needs datasets whose ground truth is known. Everything here
is plain numpy/scipy (no torch, no Qt) so the simulator can run in any test or worker process.

Conventions (binding, shared with the forward model and stitching, see PTYCHOPINN.md 1 and 6):
- Positions are probe centres in object pixels, x = column, y = row; object pixel i has its
  centre at coordinate i.
- Patch pixel j (0..N-1) of a pattern at position x samples object coordinate x - N/2 + j (rows
  likewise with y). For integer positions the patch is
  ``obj[y - N//2 : y + N//2, x - N//2 : x + N//2]``; otherwise it is sampled bilinearly.
  A patch fits inside an (H, W) object when N/2 <= x <= W - N/2 and N/2 <= y <= H - N/2.
- Patterns are amplitudes |fftshift(fft2(probe * patch, norm="ortho"))| (zero frequency at the
  array centre); incoherent probe modes add intensities before the square root.
- Photon scaling: the mean over patterns of the total counts per pattern equals ``nphotons``.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.ndimage import gaussian_filter

from .data import PtychoData, save_npz

PROBE_KINDS = ("disk", "gaussian", "zoneplate")
SCAN_KINDS = ("raster", "snake", "fermat")
OBJECT_KINDS = ("random", "siemens")
GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))
_CHUNK = 1024  # patterns per vectorised chunk: bounds peak memory for large M

Coords = tuple[np.ndarray, np.ndarray]


def _unknown_kind(kind: str, allowed: tuple[str, ...]) -> ValueError:
    return ValueError(f"kind = {kind!r} is unknown: allowed values are {', '.join(allowed)}")


def _rescale(field: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``field`` linearly onto [low, high]; a constant field maps to ``low``."""
    lo, hi = float(field.min()), float(field.max())
    unit = (field - lo) / (hi - lo) if hi > lo else np.zeros_like(field)
    return low + (high - low) * unit


def _shape2(shape: tuple[int, int] | int) -> tuple[int, int]:
    h, w = (shape, shape) if isinstance(shape, int) else (int(shape[0]), int(shape[1]))
    if h < 1 or w < 1:
        raise ValueError(f"object shape = {(h, w)} is invalid: allowed positive sizes")
    return h, w


# --------------------------------------------------------------------- objects
def random_object(
    shape: tuple[int, int] | int,
    seed: int = 0,
    smoothness: float = 8.0,
    amplitude_range: tuple[float, float] = (0.5, 1.0),
    phase_range: tuple[float, float] = (-1.0, 1.0),
) -> np.ndarray:
    """Smooth random complex object (H, W) complex64.

    Gaussian-filtered white noise gives features of about ``smoothness`` pixels, a texture the
    network can learn without being trivially flat; amplitude and phase are independent fields
    rescaled to exactly span their ranges.
    """
    h, w = _shape2(shape)
    rng = np.random.default_rng(seed)
    fields = [gaussian_filter(rng.standard_normal((h, w)), smoothness) for _ in range(2)]
    amplitude = _rescale(fields[0], *amplitude_range)
    phase = _rescale(fields[1], *phase_range)
    return (amplitude * np.exp(1j * phase)).astype(np.complex64)


def siemens_star(
    shape: tuple[int, int] | int,
    spokes: int = 36,
    amplitude_range: tuple[float, float] = (0.3, 1.0),
    phase_max: float = 1.0,
) -> np.ndarray:
    """Siemens star (H, W) complex64 with ``spokes`` bright sectors around the centre.

    Its spatial frequency grows towards the centre, so a reconstruction shows at a glance the
    radius where resolution is lost. Edges are softened by half a pixel to limit aliasing.
    """
    h, w = _shape2(shape)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    theta = np.arctan2(yy - (h - 1) / 2.0, xx - (w - 1) / 2.0)
    star = gaussian_filter((np.cos(spokes * theta) > 0).astype(np.float64), 0.5)
    low, high = amplitude_range
    amplitude = low + (high - low) * star
    return (amplitude * np.exp(1j * phase_max * star)).astype(np.complex64)


def object_from_image(
    image: np.ndarray,
    amplitude_range: tuple[float, float] = (0.3, 1.0),
    phase_max: float = 1.0,
) -> np.ndarray:
    """Any 2-D image -> complex64 object; complex input is passed through unchanged.

    A real image is normalised to [0, 1]; amplitude and phase are both derived from it, so a
    photograph becomes a correlated amplitude/phase test object.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image: found shape {image.shape}, expected a 2-D array (H, W)")
    if not np.all(np.isfinite(image)):
        raise ValueError("image: found NaN/inf values, expected finite values")
    if np.iscomplexobj(image):
        return image.astype(np.complex64)
    unit = _rescale(image.astype(np.float64), 0.0, 1.0)
    low, high = amplitude_range
    return ((low + (high - low) * unit) * np.exp(1j * phase_max * unit)).astype(np.complex64)


# --------------------------------------------------------------------- probes
def _radius_grid(n: int) -> np.ndarray:
    """Distance of every pixel from the probe centre, pixel (N//2, N//2)."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) - n // 2
    return np.hypot(xx, yy)


def _smooth_complex(field: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return field
    return gaussian_filter(field.real, sigma) + 1j * gaussian_filter(field.imag, sigma)


def disk_probe(N: int, radius: float | None = None, blur: float = 1.0) -> np.ndarray:  # noqa: N803
    """Flat disk of ``radius`` (default N/4) with edges blurred by ``blur`` pixels.

    The default matches the radius of the probe-normalisation disk (PTYCHOPINN.md 2.3).
    """
    radius = N / 4.0 if radius is None else float(radius)
    aperture = (_radius_grid(N) <= radius).astype(np.complex128)
    return _smooth_complex(aperture, blur).astype(np.complex64)


def gaussian_probe(N: int, sigma: float | None = None) -> np.ndarray:  # noqa: N803
    """Real Gaussian probe exp(-r^2 / 2 sigma^2), sigma default N/8 (negligible at the edge)."""
    sigma = N / 8.0 if sigma is None else float(sigma)
    return np.exp(-(_radius_grid(N) ** 2) / (2.0 * sigma**2)).astype(np.complex64)


def zone_plate_probe(
    N: int,  # noqa: N803
    radius: float | None = None,
    curvature: float = 4.0,
    central_stop: float = 0.0,
    blur: float = 1.0,
) -> np.ndarray:
    """Out-of-focus zone-plate-like probe: aperture with quadratic phase, smoothed.

    ``curvature`` is the phase in radians at the aperture edge (phase = curvature*(r/radius)^2),
    like the defocus term of a focused beam; ``central_stop`` is the inner radius of the ring
    as a fraction of ``radius`` (0 = full disk). A structured phase makes the probe a harder,
    more realistic test than a flat disk.
    """
    radius = N / 4.0 if radius is None else float(radius)
    r = _radius_grid(N)
    aperture = (r <= radius) & (r >= central_stop * radius)
    field = aperture * np.exp(1j * curvature * (r / radius) ** 2)
    return _smooth_complex(field, blur).astype(np.complex64)


_PROBES: dict[str, Callable[..., np.ndarray]] = {
    "disk": disk_probe,
    "gaussian": gaussian_probe,
    "zoneplate": zone_plate_probe,
}


def make_probe(kind: str, N: int, **kw: Any) -> np.ndarray:  # noqa: N803
    """Build a probe by name: ``kind`` in {"disk", "gaussian", "zoneplate"}."""
    if kind not in _PROBES:
        raise _unknown_kind(kind, PROBE_KINDS)
    return _PROBES[kind](N, **kw)


# --------------------------------------------------------------------- scans
def _jitter(coords: Coords, jitter: float, seed: int) -> Coords:
    """Add uniform jitter in [-jitter, jitter]: bounded, so margins can guarantee fit."""
    if jitter <= 0:
        return coords
    rng = np.random.default_rng(seed)
    x, y = coords
    return x + rng.uniform(-jitter, jitter, x.shape), y + rng.uniform(-jitter, jitter, y.shape)


def _grid(nx: int, ny: int, step: float, origin: tuple[float, float]) -> Coords:
    xs = origin[0] + step * np.arange(nx, dtype=np.float64)
    ys = origin[1] + step * np.arange(ny, dtype=np.float64)
    xg, yg = np.meshgrid(xs, ys)  # (ny, nx): rows are scan lines
    return xg, yg


def raster_scan(
    nx: int,
    ny: int,
    step: float,
    origin: tuple[float, float] = (0.0, 0.0),
    jitter: float = 0.0,
    seed: int = 0,
) -> Coords:
    """Rectangular grid, row by row left to right; ``origin`` is the first (x, y)."""
    xg, yg = _grid(nx, ny, step, origin)
    return _jitter((xg.ravel(), yg.ravel()), jitter, seed)


def snake_scan(
    nx: int,
    ny: int,
    step: float,
    origin: tuple[float, float] = (0.0, 0.0),
    jitter: float = 0.0,
    seed: int = 0,
) -> Coords:
    """Raster grid with every other row reversed (how stages usually scan, no fly-back)."""
    xg, yg = _grid(nx, ny, step, origin)
    xg[1::2] = xg[1::2, ::-1]
    return _jitter((xg.ravel(), yg.ravel()), jitter, seed)


def fermat_scan(
    n_points: int,
    step: float,
    centre: tuple[float, float] = (0.0, 0.0),
    jitter: float = 0.0,
    seed: int = 0,
) -> Coords:
    """Fermat spiral r = step*sqrt(k), angle k*golden angle: uniform density, no grid artefacts.

    Each point occupies an area of pi*step^2, so nearest neighbours lie about 1.7 steps apart.
    """
    k = np.arange(n_points, dtype=np.float64)
    r = step * np.sqrt(k)
    theta = k * GOLDEN_ANGLE
    coords = (centre[0] + r * np.cos(theta), centre[1] + r * np.sin(theta))
    return _jitter(coords, jitter, seed)


_SCANS: dict[str, Callable[..., Coords]] = {
    "raster": raster_scan,
    "snake": snake_scan,
    "fermat": fermat_scan,
}


def make_scan(kind: str, *args: Any, **kw: Any) -> Coords:
    """Build a scan by name: ``kind`` in {"raster", "snake", "fermat"}; arguments pass through."""
    if kind not in _SCANS:
        raise _unknown_kind(kind, SCAN_KINDS)
    return _SCANS[kind](*args, **kw)


def position_range(
    object_shape: tuple[int, int],
    N: int,  # noqa: N803
) -> tuple[tuple[float, float], tuple[float, float]]:
    """((xmin, xmax), (ymin, ymax)): where a probe centre may sit with its patch inside."""
    h, w = _shape2(object_shape)
    half = N / 2.0
    return (half, w - half), (half, h - half)


def scan_for_object(
    object_shape: tuple[int, int],
    N: int,  # noqa: N803
    step: float,
    kind: str = "raster",
    jitter: float = 0.0,
    seed: int = 0,
) -> Coords:
    """Positions of a ``kind`` scan, centred on the object, with every N x N patch inside it.

    A margin of ``jitter`` is kept from the allowed range so jittered positions still fit.
    """
    if kind not in _SCANS:
        raise _unknown_kind(kind, SCAN_KINDS)
    if not (math.isfinite(step) and step > 0):  # "not >" also catches NaN
        raise ValueError(f"step = {step} is invalid: allowed a positive number of pixels")
    if not (math.isfinite(jitter) and jitter >= 0):
        raise ValueError(f"jitter = {jitter} is invalid: allowed a number of pixels >= 0")
    (x0, x1), (y0, y1) = position_range(object_shape, N)
    x0, x1, y0, y1 = x0 + jitter, x1 - jitter, y0 + jitter, y1 - jitter
    if x1 < x0 or y1 < y0:
        raise ValueError(
            f"object_shape = {tuple(object_shape)} is too small for N = {N} with jitter "
            f"{jitter}: allowed at least {N + 2 * jitter:g} pixels per side"
        )
    if kind == "fermat":
        rmax = min(x1 - x0, y1 - y0) / 2.0
        n_points = int(math.floor((rmax / step) ** 2 + 1e-9)) + 1
        _check_scan_size(n_points, step, N)
        return fermat_scan(n_points, step, ((x0 + x1) / 2, (y0 + y1) / 2), jitter, seed)
    nx = int(math.floor((x1 - x0) / step + 1e-9)) + 1
    ny = int(math.floor((y1 - y0) / step + 1e-9)) + 1
    _check_scan_size(nx * ny, step, N)
    origin = (x0 + (x1 - x0 - (nx - 1) * step) / 2, y0 + (y1 - y0 - (ny - 1) * step) / 2)
    return make_scan(kind, nx, ny, step, origin, jitter, seed)


#: The most patterns a simulated scan may hold (N = 64: ~3 GB of float32 amplitudes).
MAX_SIMULATED_PATTERNS = 200_000


def _check_scan_size(n_patterns: int, step: float, n: int) -> None:
    """Refuse a scan too dense to simulate (``--step 0.25`` read as "N/4": 591,361 patterns)."""
    if n_patterns > MAX_SIMULATED_PATTERNS:
        gib = n_patterns * n * n * 4 / 2**30
        raise ValueError(
            f"step = {step:g} gives {n_patterns:,} patterns ({gib:.1f} GiB of patterns at N = "
            f"{n}): allowed at most {MAX_SIMULATED_PATTERNS:,}; the step is in pixels (the "
            f"default N/4 is {n / 4:g}): use a larger step or a smaller object"
        )


# --------------------------------------------------------------------- patches
def _check_inside(coords: np.ndarray, low: float, high: float, name: str) -> None:
    tol = 1e-9
    bad = np.flatnonzero((coords < low - tol) | (coords > high + tol) | ~np.isfinite(coords))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name}[{i}] = {coords[i]:g} puts the patch outside the object "
            f"({bad.size} position(s) affected): allowed {name} in [{low:g}, {high:g}]"
        )


def _axis_samples(pos: np.ndarray, n: int, size: int) -> tuple[np.ndarray, ...]:
    """Lower index, upper index and upper weight of the bilinear samples along one axis."""
    coords = pos[:, None] - n / 2.0 + np.arange(n)  # (M, N) object coordinates
    # Inside the object: a position a rounding error below N/2 (scan_for_object makes them)
    # would otherwise clip its first sample's lower index to 0 and its upper to 0 + 1 with a
    # weight of ~1, reading column 1 for column 0.
    coords = np.clip(coords, 0.0, size - 1.0)
    lower = np.floor(coords)
    frac = coords - lower
    lower = lower.astype(np.int64)
    upper = np.minimum(lower + 1, size - 1)  # weight 0 when clipped at the far edge
    return lower, upper, frac


def _bilinear_chunk(obj: np.ndarray, x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    h, w = obj.shape
    x_lo, x_hi, fx = _axis_samples(x, n, w)
    y_lo, y_hi, fy = _axis_samples(y, n, h)
    rows_lo, rows_hi = y_lo[:, :, None], y_hi[:, :, None]
    cols_lo, cols_hi = x_lo[:, None, :], x_hi[:, None, :]
    wx, wy = fx[:, None, :], fy[:, :, None]
    top = obj[rows_lo, cols_lo] * (1 - wx) + obj[rows_lo, cols_hi] * wx
    bottom = obj[rows_hi, cols_lo] * (1 - wx) + obj[rows_hi, cols_hi] * wx
    return top * (1 - wy) + bottom * wy


def extract_patches(
    obj: np.ndarray,
    xcoords: np.ndarray,
    ycoords: np.ndarray,
    N: int,  # noqa: N803
) -> np.ndarray:
    """(M, N, N) complex64 object patches centred on the positions (module convention).

    Integer positions give exact slices; others are interpolated bilinearly (a vectorised gather
    in chunks, complex128 internally). Raises ValueError naming the first position whose patch
    leaves the object and the allowed coordinate range.
    """
    obj = np.asarray(obj)
    if obj.ndim != 2:
        raise ValueError(f"obj: found shape {obj.shape}, expected a 2-D array (H, W)")
    x = np.asarray(xcoords, dtype=np.float64).ravel()
    y = np.asarray(ycoords, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"xcoords/ycoords: found shapes {x.shape} and {y.shape}, expected equal")
    (x0, x1), (y0, y1) = position_range(obj.shape, N)
    _check_inside(x, x0, x1, "xcoords")
    _check_inside(y, y0, y1, "ycoords")
    obj128 = obj.astype(np.complex128)
    out = np.empty((x.size, N, N), dtype=np.complex64)
    for start in range(0, x.size, _CHUNK):
        sl = slice(start, start + _CHUNK)
        out[sl] = _bilinear_chunk(obj128, x[sl], y[sl], N)
    return out


# --------------------------------------------------------------------- diffraction
def far_field_amplitude(patches: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """(M, N, N) float64 amplitudes |fftshift(fft2(probe * patch, norm="ortho"))|.

    The orthonormal FFT conserves energy (Parseval), so photon counts follow from the exit
    wave directly. A (modes, N, N) probe is incoherent: intensities add over modes.
    """
    patches = np.asarray(patches)
    probe = np.asarray(probe, dtype=np.complex128)
    if probe.ndim == 2:
        probe = probe[np.newaxis]
    if patches.ndim != 3 or probe.ndim != 3 or patches.shape[1:] != probe.shape[1:]:
        raise ValueError(
            f"patches/probe: found shapes {patches.shape} and {probe.shape}, expected "
            "(M, N, N) and (N, N) or (modes, N, N)"
        )
    out = np.empty(patches.shape, dtype=np.float64)
    for start in range(0, patches.shape[0], _CHUNK):
        chunk = patches[start : start + _CHUNK].astype(np.complex128)
        wave = np.fft.fft2(probe[None] * chunk[:, None], norm="ortho")  # (m, modes, N, N)
        intensity = np.sum(wave.real**2 + wave.imag**2, axis=1)
        out[start : start + _CHUNK] = np.sqrt(np.fft.fftshift(intensity, axes=(-2, -1)))
    return out


def photon_scale(amplitudes: np.ndarray, nphotons: float) -> float:
    """Factor on intensities making the mean total counts per pattern equal ``nphotons``."""
    if not (math.isfinite(nphotons) and nphotons > 0):  # NaN and inf included
        raise ValueError(f"nphotons = {nphotons} is invalid: allowed a positive, finite count")
    mean_total = float(np.mean(np.sum(np.square(amplitudes, dtype=np.float64), axis=(-2, -1))))
    if mean_total <= 0:
        raise ValueError("amplitudes: found all-zero patterns, expected some signal to scale")
    return nphotons / mean_total


def add_poisson_noise(
    amplitudes_noise_free: np.ndarray, nphotons: float, seed: int = 0
) -> tuple[np.ndarray, float]:
    """Scale to ``nphotons`` per pattern (on average), draw Poisson counts, return sqrt(counts).

    Returns (float32 noisy amplitudes, scale applied to the intensities). The expected mean
    total count per pattern is exactly ``nphotons``.
    """
    scale = photon_scale(amplitudes_noise_free, nphotons)
    rates = np.square(np.asarray(amplitudes_noise_free, dtype=np.float64)) * scale
    counts = np.random.default_rng(seed).poisson(rates)
    return np.sqrt(counts.astype(np.float64)).astype(np.float32), scale


# --------------------------------------------------------------------- datasets
def _pad_needed(shape: tuple[int, int], n: int, x: np.ndarray, y: np.ndarray) -> int:
    """Smallest border (pixels) that makes every patch fit inside the padded object."""
    (x0, x1), (y0, y1) = position_range(shape, n)
    worst = max(x0 - x.min(), x.max() - x1, y0 - y.min(), y.max() - y1, 0.0)
    return int(math.ceil(worst - 1e-9))


def pad_object(
    obj: np.ndarray,
    xcoords: np.ndarray,
    ycoords: np.ndarray,
    pad: int,
    mode: str = "edge",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad the object by ``pad`` pixels on every side and shift positions by +pad to match.

    ``mode`` is passed to ``np.pad`` ("edge" continues the object, "constant" pads zeros).
    """
    padded = np.pad(np.asarray(obj), pad, mode=mode)
    return padded, np.asarray(xcoords, np.float64) + pad, np.asarray(ycoords, np.float64) + pad


def simulate_from_object(
    obj: np.ndarray,
    probe: np.ndarray,
    xcoords: np.ndarray,
    ycoords: np.ndarray,
    nphotons: float | None = 1e6,
    seed: int = 0,
    noise: bool = True,
    pad: int | Literal["auto"] = 0,
    pad_mode: str = "edge",
    xcoords_start: np.ndarray | None = None,
    ycoords_start: np.ndarray | None = None,
) -> PtychoData:
    """Simulate the diffraction of ``probe`` over ``obj`` at the given positions.

    ``nphotons`` None: patterns are the raw far-field amplitudes (no scaling, no noise).
    Otherwise intensities are scaled to ``nphotons`` mean counts per pattern, and Poisson noise
    is drawn when ``noise``. ``pad`` (pixels, or "auto" = the least that makes every patch fit)
    pads the object with ``pad_mode`` and shifts all positions by +pad; the returned object
    guess and positions are then in the padded frame, consistent with each other.
    """
    x = np.asarray(xcoords, dtype=np.float64)
    y = np.asarray(ycoords, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(
            f"xcoords/ycoords: found shapes {x.shape} and {y.shape}, expected two equal, "
            "non-empty (M,) arrays of positions"
        )
    for name, values in (("xcoords", x), ("ycoords", y)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ValueError(
                f"{name}[{int(bad[0])}] = {values[bad[0]]} ({bad.size} position(s)): allowed "
                "finite positions only"
            )
    probe = np.asarray(probe)
    n = probe.shape[-1]
    if pad != "auto" and (isinstance(pad, bool) or int(pad) != pad or pad < 0):
        raise ValueError(f"pad = {pad!r} is invalid: allowed a non-negative integer or 'auto'")
    pad_px = _pad_needed(np.shape(obj), n, x, y) if pad == "auto" else int(pad)
    starts = [
        None if s is None else np.asarray(s, np.float64) + pad_px
        for s in (xcoords_start, ycoords_start)
    ]
    if pad_px:
        obj, x, y = pad_object(obj, x, y, pad_px, pad_mode)
    amplitudes = far_field_amplitude(extract_patches(obj, x, y, n), probe)
    if nphotons is not None:
        if noise:
            amplitudes, _ = add_poisson_noise(amplitudes, nphotons, seed)
        else:
            amplitudes = amplitudes * math.sqrt(photon_scale(amplitudes, nphotons))
    return PtychoData.from_amplitudes(
        amplitudes.astype(np.float32),
        x,
        y,
        probe,
        object_guess=obj,
        xcoords_start=starts[0],
        ycoords_start=starts[1],
        patterns_first=True,  # extract_patches returns (M, N, N)
    )


def simulate_from_object_npz(path: str | os.PathLike[str], **kw: Any) -> PtychoData:
    """Simulate from an NPZ holding objectGuess, probeGuess, xcoords, ycoords (e.g. run1084).

    Nominal positions (xcoords_start/ycoords_start) are carried over when present; ``kw`` goes
    to ``simulate_from_object``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"object file not found: {path}")
    if not zipfile.is_zipfile(path):  # np.load's own error would suggest allow_pickle
        raise ValueError(
            f"{path}: not an NPZ file; expected an .npz holding objectGuess, probeGuess, "
            "xcoords and ycoords"
        )
    with np.load(path, allow_pickle=False) as npz:
        missing = [
            k for k in ("objectGuess", "probeGuess", "xcoords", "ycoords") if k not in npz.files
        ]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; found {sorted(npz.files)}")
        extra = {k: npz[k] for k in ("xcoords_start", "ycoords_start") if k in npz.files}
        return simulate_from_object(
            npz["objectGuess"],
            npz["probeGuess"],
            npz["xcoords"],
            npz["ycoords"],
            **{**extra, **kw},
        )


def make_object(kind: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Build an object by name: ``kind`` in {"random", "siemens"}."""
    if kind == "random":
        return random_object(shape, seed=seed)
    if kind == "siemens":
        return siemens_star(shape)
    raise _unknown_kind(kind, OBJECT_KINDS)


def simulate_dataset(
    object_kind: str = "random",
    probe_kind: str = "disk",
    N: int = 64,  # noqa: N803
    object_shape: tuple[int, int] | None = None,
    scan_kind: str = "raster",
    step: float | None = None,
    nphotons: float | None = 1e6,
    jitter: float = 0.0,
    seed: int = 0,
    noise: bool = True,
) -> PtychoData:
    """A complete synthetic scan; every patch lies inside the object.

    Defaults: object 4N x 4N, step N/4 (75% linear overlap, plenty for ptychography). The
    object, jitter and noise use seeds ``seed``, ``seed + 1`` and ``seed + 2``.
    """
    shape = (4 * N, 4 * N) if object_shape is None else _shape2(object_shape)
    step = N / 4.0 if step is None else float(step)
    obj = make_object(object_kind, shape, seed)
    probe = make_probe(probe_kind, N)
    x, y = scan_for_object(shape, N, step, scan_kind, jitter, seed + 1)
    return simulate_from_object(obj, probe, x, y, nphotons=nphotons, seed=seed + 2, noise=noise)


def simulate_to_npz(path: str | os.PathLike[str], **kw: Any) -> Path:
    """``simulate_dataset(**kw)`` written to ``path`` in the NPZ contract (atomically)."""
    return save_npz(simulate_dataset(**kw), path)
