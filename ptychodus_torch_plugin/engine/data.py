"""The PtychoPINN NPZ data contract: load, validate, build from arrays, save.

Units are explicit at every boundary: the stored field is ``amplitudes`` (sqrt of counts); a
constructor that takes detector counts says so in its name (``from_counts``) and converts in
float64 before the square root, because squaring or rooting an integer array (Ptychodus hands
over uint16 counts) silently overflows or truncates.

Contract (see shared/design/PTYCHOPINN.md section 1): ``diff3d`` (M,N,N) float32 amplitude,
zero frequency at the array centre; ``xcoords``/``ycoords`` (M,) probe-centre positions in object
pixels (x = column, y = row); ``probeGuess`` (N,N) or (modes,N,N) complex; optional
``objectGuess`` (H,W) complex, ``scan_index``, ``xcoords_start``/``ycoords_start``.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_path

logger = logging.getLogger(__name__)

UNITS_AMPLITUDE = "amplitude"
UNITS_COUNTS = "counts"
DIFFRACTION_KEYS = ("diff3d", "diffraction")  # "diffraction" is the legacy alias


def _bad(key: str, found: Any, expected: str) -> ValueError:
    return ValueError(f"{key}: found {found}, expected {expected}")


def _check_real(key: str, array: np.ndarray) -> None:
    if np.iscomplexobj(array):
        raise _bad(key, f"complex values (dtype {array.dtype})", "real values")
    if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
        raise _bad(key, f"dtype {array.dtype}", "a numeric array")


def _check_finite_real(key: str, array: np.ndarray) -> None:
    _check_real(key, array)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise _bad(key, f"{count} NaN/inf value(s)", "finite values")


def mean_pattern_power(amplitudes: np.ndarray, chunk: int = 1024) -> float:
    """``mean_m sum_hw x_m^2`` of patterns (..., N, N), accumulated in float64 chunk by chunk.

    The one implementation behind the mean photon count and the normalisation constants. A
    whole-scan float64 copy would be gigabytes for large scans (50,000 x 128^2 patterns:
    6.5 GB); chunks keep the temporary to ``chunk`` patterns.
    """
    values = np.asarray(amplitudes)
    if values.ndim < 2:
        raise ValueError(f"expected patterns (..., N, N), found shape {values.shape}")
    patterns = values.reshape(-1, *values.shape[-2:])
    if patterns.shape[0] == 0:
        raise ValueError("expected at least one pattern, found none")
    total = 0.0
    for start in range(0, patterns.shape[0], chunk):
        block = patterns[start : start + chunk].astype(np.float64)
        total += float(np.square(block).sum())
    return total / patterns.shape[0]


def amplitudes_from_counts(
    counts: np.ndarray,
    chunk: int = 1024,
    *,
    bad_pixels: np.ndarray | None = None,
    clip_negative: bool = False,
) -> np.ndarray:
    """Detector counts (any real dtype, e.g. uint16) -> float32 amplitudes, via float64.

    Converted ``chunk`` patterns at a time: a whole-scan float64 temporary would be 4x a
    uint16 scan (50,000 x 128^2 patterns: 6.5 GB) on top of the result. ``bad_pixels``
    ((N, N), True = bad) are zeroed first, whatever they hold (NaN included); NaN or inf in a
    good pixel is refused. Negative counts are refused, or with ``clip_negative`` (background-
    subtracted data, as Ptychodus may hand over) clipped to 0 with a warning.
    """
    values = np.asarray(counts)
    if values.ndim == 0:
        values = values.reshape(1)
    out = np.empty(values.shape, dtype=np.float32)
    mask = bad_pixels if bad_pixels is not None and np.any(bad_pixels) else None
    floating = np.issubdtype(values.dtype, np.floating)
    negatives, minimum, not_finite = 0, 0.0, 0
    for start in range(0, values.shape[0], chunk):
        block = np.array(values[start : start + chunk], dtype=np.float64)
        if mask is not None:
            block[:, mask] = 0.0
        if floating:
            finite = np.isfinite(block)
            if not finite.all():
                not_finite += int(block.size - np.count_nonzero(finite))
                block[~finite] = 0.0
        negative = block < 0
        if negative.any():
            negatives += int(negative.sum())
            minimum = min(minimum, float(block.min()))
            block[negative] = 0.0
        np.sqrt(block, out=block)
        out[start : start + chunk] = block
    if not_finite:
        raise _bad(
            "counts",
            f"{not_finite} NaN/inf value(s) in good detector pixels",
            "finite values: mark those pixels bad (the bad-pixel mask)",
        )
    if negatives and not clip_negative:
        raise _bad("counts", f"minimum {minimum:g}", "non-negative detector counts")
    if negatives:
        logger.warning(
            "%d negative intensities (min %.3g) clipped to 0 before the square root",
            negatives,
            minimum,
        )
    return out.reshape(np.shape(counts))


def _flag_masks(
    counts: np.ndarray, bad_pixels: np.ndarray | None = None, chunk: int = 1024
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(N, N) masks of the detector's flag values in ``counts`` (M, N, N), not yet masked.

    First: pixels at the integer dtype's largest value in any pattern. Second (signed dtypes,
    two patterns or more): pixels holding one and the same negative value in every pattern.
    Each is None when empty (both are for floating point). Why "the same in every pattern"
    for negatives: Pilatus and Eiger write gap and dead pixels as a constant -1 or -2 in
    every frame of an int32 scan, while background-subtracted counts dip below 0 in some
    patterns of many dim pixels, and an over-subtracted background can leave a dim pixel
    negative in all of them, by varying amounts; masking those would throw away much of the
    detector, so they stay with the clipping (or refusal) of negative counts.
    """
    if not np.issubdtype(counts.dtype, np.integer) or counts.ndim != 3 or counts.shape[0] == 0:
        return None, None
    top = np.iinfo(counts.dtype).max
    signed = np.issubdtype(counts.dtype, np.signedinteger) and counts.shape[0] >= 2
    at_top = np.zeros(counts.shape[1:], dtype=bool)
    negative = np.full(counts.shape[1:], signed, dtype=bool)
    first = counts[0] if signed else None
    for start in range(0, counts.shape[0], chunk):
        block = counts[start : start + chunk]
        at_top |= (block == top).any(axis=0)
        if signed:
            negative &= ((block < 0) & (block == first)).all(axis=0)
    if bad_pixels is not None:
        known = np.asarray(bad_pixels, dtype=bool)
        at_top &= ~known
        negative &= ~known
    return (at_top if at_top.any() else None), (negative if negative.any() else None)


def flagged_pixels(
    counts: np.ndarray, bad_pixels: np.ndarray | None = None, chunk: int = 1024
) -> np.ndarray | None:
    """Detector pixels holding the integer dtype's flag values, not yet masked.

    Those are pixels at the dtype's largest value in any pattern and, for signed dtypes,
    pixels holding the same negative value in every pattern (:func:`_flag_masks` says why).
    Why: detectors write their gap, dead or overflowed pixels as such values (0xFFFFFFFF on a
    32-bit Eiger, 65535 on 16 bits, -1 and -2 in int32 on a Pilatus or an Eiger). Unmasked,
    one such column held 99.999% of a scan's normalised input power and set the photon count
    10^5 too high, which wrecks training without an error; a negative flag, clipped to 0,
    became a measured zero in the loss. ``counts`` is (M, N, N); returns an (N, N) mask, or
    None when there are none (or the counts are floating point).
    """
    at_top, negative = _flag_masks(counts, bad_pixels, chunk)
    if at_top is None or negative is None:
        return at_top if negative is None else negative
    return at_top | negative


# How the loaders read a stack (_stack_order): as (M, N, N), transposed from (N, N, M), or as
# (M, N, N) with a warning when an (N, N, N) stack's content does not tell.
_ORDER_MNN, _ORDER_NNM, _ORDER_AMBIGUOUS = "(M, N, N)", "(N, N, M)", "ambiguous"
#: For an (N, N, N) stack's order to count as clear, the detector axis's centre-to-edge
#: contrast (|log ratio|) must reach log(4) and this many times that of the other candidate.
_ORDER_MARGIN = 3.0


def _centre_contrast(profile: np.ndarray) -> float:
    """|log| of the mean of ``profile``'s central quarter over that of its outer eighths.

    Large along a detector axis: far-field patterns are bright at their zero frequency, in
    the middle (or, stored unshifted, at both ends); small along the pattern axis, whose
    total counts vary far less from one pattern to the next. Entries that are exactly 0 are
    left out first: dark frames (the shutter closed at the start and end of a scan) along the
    pattern axis would otherwise look like a dim edge, and a detector axis keeps its peak.
    """
    profile = profile[profile > 0]
    if profile.size < 4:
        return 0.0
    n = profile.size
    q = max(1, n // 8)
    centre = float(profile[n // 2 - q : n // 2 + q].mean())
    edges = float(np.concatenate([profile[:q], profile[-q:]]).mean())
    tiny = 1e-12 * float(profile.max()) + 1e-300  # all-dark data: ratio 1, contrast 0
    return abs(float(np.log((centre + tiny) / (edges + tiny))))


def _cube_order(array: np.ndarray, chunk: int = 32) -> str:
    """The order of an (N, N, N) stack, from the axes along which its patterns peak.

    Axis 1 is a detector axis in either order; axis 0 or axis 2 holds the patterns, and is
    the flat one. Read in float64 blocks of ``chunk`` planes; NaN, inf, negatives and an
    integer dtype's flag value (bad pixels, not masked yet) count as 0, so that they cannot
    fake a peak.
    """
    n = array.shape[0]
    if n < 4:
        return _ORDER_AMBIGUOUS
    top = np.iinfo(array.dtype).max if np.issubdtype(array.dtype, np.integer) else None
    profile0 = np.zeros(n)
    profile2 = np.zeros(n)
    for start in range(0, n, chunk):
        raw = array[start : start + chunk]
        block = np.array(raw, dtype=np.float64)
        if top is not None:
            block[raw == top] = 0.0
        np.nan_to_num(block, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        np.maximum(block, 0.0, out=block)
        profile0[start : start + chunk] = block.sum(axis=(1, 2))
        profile2 += block.sum(axis=(0, 1))
    contrast0, contrast2 = _centre_contrast(profile0), _centre_contrast(profile2)
    if contrast2 >= np.log(4.0) and contrast2 >= _ORDER_MARGIN * contrast0:
        return _ORDER_MNN
    if contrast0 >= np.log(4.0) and contrast0 >= _ORDER_MARGIN * contrast2:
        return _ORDER_NNM
    return _ORDER_AMBIGUOUS


def _stack_order(array: np.ndarray, m: int) -> str:
    """How the loaders read ``array`` for ``m`` scan positions (the ``_ORDER_*`` values).

    An (N, N, M) stack with M != N is told by its shape; with M = N the shape says nothing,
    and an (N, N, M) stack read as (M, N, N) trains on wrong patterns without an error, so
    the content decides (:func:`_cube_order`).
    """
    if array.ndim != 3 or array.shape[0] != array.shape[1] or array.shape[2] != m:
        return _ORDER_MNN
    if array.shape[1] != m:
        return _ORDER_NNM
    return _cube_order(array)


def _is_nnm_stack(array: np.ndarray, m: int) -> bool:
    """True for an (N, N, M) stack of M patterns, which the loaders transpose.

    M != N is told by the shape, M = N by the content when it is clear (:func:`_stack_order`).
    """
    return _stack_order(array, m) == _ORDER_NNM


def _patterns_first(array: np.ndarray, m: int, key: str) -> np.ndarray:
    """``array`` as (M, N, N): an (N, N, M) stack (MATLAB order) is transposed, and logged."""
    order = _stack_order(array, m)
    if order == _ORDER_AMBIGUOUS:
        logger.warning(
            "%s has shape %s: with as many patterns as pixels per side it may be an (M, N, N) "
            "or an (N, N, M) stack, and its patterns show no clear zero-frequency peak to tell "
            "which: reading it as (M, N, N); if it is (N, N, M) (MATLAB order), move the "
            "pattern axis first (numpy.moveaxis(array, 2, 0)) before loading it",
            key,
            array.shape,
        )
        return array
    if order != _ORDER_NNM:
        return array
    cube = array.shape[0] == array.shape[2]
    logger.warning(
        "%s has shape %s, an (N, N, M) stack: transposing to (M, N, N)%s",
        key,
        array.shape,
        " (M = N: its patterns peak along axes 0 and 1)" if cube else "",
    )
    return np.moveaxis(array, 2, 0)


def _check_mask_shape(bad_pixels: np.ndarray | None, patterns: np.ndarray) -> None:
    """Refuse a bad-pixel mask that is not one (N, N) mask for the (M, N, N) ``patterns``.

    Why before any conversion: a mask of another shape (e.g. one per frame, (M, N, N)) masked
    nothing, and the NaN or flag values it was meant to hide were then blamed on "good
    detector pixels". Patterns of a wrong shape are left for ``from_amplitudes`` to name.
    """
    if bad_pixels is None or patterns.ndim != 3 or patterns.shape[1] != patterns.shape[2]:
        return
    n = patterns.shape[1]
    if np.shape(bad_pixels) != (n, n):
        raise _bad(
            "bad_pixels",
            f"shape {np.shape(bad_pixels)}",
            f"({n}, {n}), one mask for every pattern (True = bad pixel); combine per-pattern "
            "masks (M, N, N) into one with mask.any(axis=0)",
        )


def _pattern_mask(bad_pixels: np.ndarray | None, patterns: np.ndarray) -> np.ndarray | None:
    """``bad_pixels`` as a boolean (N, N) mask when it fits ``patterns`` (M, N, N), else None.

    A mask of the wrong shape masks nothing here: the loaders refuse it first
    (:func:`_check_mask_shape`), and only patterns of a wrong shape get this far with one.
    """
    if bad_pixels is None or patterns.ndim != 3 or np.shape(bad_pixels) != patterns.shape[1:]:
        return None
    mask = np.asarray(bad_pixels, dtype=bool)
    return mask if mask.any() else None


def with_flagged_pixels(
    counts: np.ndarray,
    bad_pixels: np.ndarray | None,
    *,
    source: str,
    advice: str = "list them in bad_pixels to silence this",
    m: int = -1,
) -> np.ndarray | None:
    """``bad_pixels`` joined by the detector's flag values in ``counts`` (:func:`flagged_pixels`).

    Logs a warning naming ``source``, the count and ``advice`` (what the user can do, in the
    caller's words) when there are any. ``counts`` is (M, N, N), or (N, N, M) with ``m`` = M
    (read as ``from_amplitudes`` reads it). Left as given when the shapes fit neither way
    (``from_amplitudes`` then names the problem).
    """
    if _is_nnm_stack(counts, m):
        counts = np.moveaxis(counts, 2, 0)
    if counts.ndim != 3 or counts.shape[1] != counts.shape[2]:
        return bad_pixels
    if bad_pixels is not None and np.shape(bad_pixels) != counts.shape[1:]:
        return bad_pixels
    at_top, negative = _flag_masks(counts, bad_pixels)
    if at_top is not None:
        logger.warning(
            "%s: %d detector pixel(s) hold %d, the largest %s value (a detector's mark for gap, "
            "dead or overflowed pixels), and are not in the bad-pixel mask: treating them as "
            "bad; %s",
            source,
            int(at_top.sum()),
            np.iinfo(counts.dtype).max,
            counts.dtype,
            advice,
        )
    if negative is not None:
        logger.warning(
            "%s: %d detector pixel(s) hold the same negative value in every pattern (a "
            "detector's mark for gap or dead pixels in signed %s counts, e.g. -1 and -2 on a "
            "Pilatus or an Eiger), and "
            "are not in the bad-pixel mask: treating them as bad; %s",
            source,
            int(negative.sum()),
            counts.dtype,
            advice,
        )
    found = [mask for mask in (at_top, negative) if mask is not None]
    if not found:
        return bad_pixels
    flagged = np.logical_or.reduce(found)
    return flagged if bad_pixels is None else (np.asarray(bad_pixels, dtype=bool) | flagged)


def pixel_size_from(value: Any) -> tuple[float, float] | None:
    """(width, height) in metres from a number or a pair; None stays None."""
    if value is None:
        return None
    sizes = np.asarray(value, dtype=np.float64).reshape(-1)
    if sizes.size == 1:
        sizes = np.repeat(sizes, 2)
    if sizes.size != 2 or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise _bad("pixel_size_m", repr(value), "one or two finite sizes > 0 (metres)")
    return float(sizes[0]), float(sizes[1])


@dataclass(frozen=True, eq=False)
class PtychoData:
    """One validated scan in amplitude units. Build with ``from_amplitudes``/``from_counts``."""

    amplitudes: np.ndarray  # (M, N, N) float32, sqrt(counts), DC at the centre
    xcoords: np.ndarray  # (M,) float64, object pixels, column
    ycoords: np.ndarray  # (M,) float64, object pixels, row
    probe: np.ndarray  # (modes, N, N) complex64; mode 0 first
    object_guess: np.ndarray | None = None  # (H, W) complex64
    scan_index: np.ndarray | None = None  # (M,) int
    xcoords_start: np.ndarray | None = None
    ycoords_start: np.ndarray | None = None
    bad_pixels: np.ndarray | None = None  # (N, N) bool, True where the detector is bad
    #: (width, height) of an object pixel in metres, when the source says (Ptychodus does;
    #: an NPZ may, as ``pixel_size_m``): a model records it, and a scan of another sampling
    #: gets a warning at inference
    pixel_size_m: tuple[float, float] | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_amplitudes(
        cls,
        amplitudes: np.ndarray,
        xcoords: np.ndarray,
        ycoords: np.ndarray,
        probe: np.ndarray,
        *,
        object_guess: np.ndarray | None = None,
        scan_index: np.ndarray | None = None,
        xcoords_start: np.ndarray | None = None,
        ycoords_start: np.ndarray | None = None,
        bad_pixels: np.ndarray | None = None,
        pixel_size_m: Any = None,
        key: str = "diff3d",
        patterns_first: bool = False,
    ) -> PtychoData:
        """Validate in-memory arrays whose patterns are amplitudes (sqrt of counts).

        ``patterns_first``: the caller has already read the stack as (M, N, N) (the loaders
        and ``from_counts`` do), so an (N, N, M) stack is not looked for again: with M = N
        that check reads every pattern, and would repeat its warning.
        """
        amplitudes = np.asarray(amplitudes)
        _check_finite_real(key, amplitudes)
        if amplitudes.ndim != 3:
            raise _bad(key, f"shape {amplitudes.shape}", "a 3-D stack (M, N, N)")
        xcoords = np.asarray(xcoords)
        ycoords = np.asarray(ycoords)
        for name, coords in (("xcoords", xcoords), ("ycoords", ycoords)):
            _check_finite_real(name, coords)
            if coords.ndim != 1:
                raise _bad(name, f"shape {coords.shape}", "a 1-D array (M,)")
        m = len(xcoords)
        if len(ycoords) != m:
            raise _bad("ycoords", f"shape {ycoords.shape}", f"({m},) to match xcoords")
        if not patterns_first:
            amplitudes = _patterns_first(amplitudes, m, key)
        n = amplitudes.shape[1]
        if amplitudes.shape[2] != n:
            raise _bad(key, f"shape {amplitudes.shape}", "square patterns (M, N, N)")
        if amplitudes.shape[0] != m:
            raise _bad(
                key,
                f"{amplitudes.shape[0]} patterns (shape {amplitudes.shape})",
                f"{m} patterns, one per scan position in xcoords/ycoords",
            )
        if m == 0:
            raise _bad(key, "no patterns", "at least one diffraction pattern")
        if np.any(amplitudes < 0):
            raise _bad(key, f"minimum {amplitudes.min():g}", "non-negative amplitudes")

        given_probe = np.asarray(probe)
        if not np.issubdtype(given_probe.dtype, np.number):
            raise _bad("probeGuess", f"dtype {given_probe.dtype}", "complex (or real) numbers")
        probe = given_probe[np.newaxis] if given_probe.ndim == 2 else given_probe
        if probe.ndim != 3 or probe.shape[0] == 0 or probe.shape[1:] != (n, n):
            raise _bad(
                "probeGuess", f"shape {given_probe.shape}", f"({n}, {n}) or (modes, {n}, {n})"
            )
        if not np.all(np.isfinite(probe)):
            raise _bad("probeGuess", "NaN/inf values", "finite values")
        warn_if_probe_not_centred(probe)

        if object_guess is not None:
            object_guess = np.asarray(object_guess)
            if not np.issubdtype(object_guess.dtype, np.number):
                raise _bad(
                    "objectGuess", f"dtype {object_guess.dtype}", "complex (or real) numbers"
                )
            if object_guess.ndim != 2:
                raise _bad("objectGuess", f"shape {object_guess.shape}", "a 2-D array (H, W)")
            if not np.all(np.isfinite(object_guess)):
                raise _bad("objectGuess", "NaN/inf values", "finite values")
            object_guess = object_guess.astype(np.complex64)
        optional_1d: dict[str, np.ndarray | None] = {}
        for name, value in (
            ("scan_index", scan_index),
            ("xcoords_start", xcoords_start),
            ("ycoords_start", ycoords_start),
        ):
            if value is not None:
                value = np.asarray(value)
                _check_finite_real(name, value)
                if value.shape != (m,):
                    raise _bad(name, f"shape {value.shape}", f"({m},)")
            optional_1d[name] = value
        if bad_pixels is not None:
            _check_mask_shape(bad_pixels, amplitudes)
            bad_pixels = np.asarray(bad_pixels, dtype=bool)
            if bad_pixels.all():
                raise ValueError(
                    "bad_pixels: every detector pixel is marked bad, so nothing is measured; "
                    "check the bad-pixel mask (Ptychodus's diffraction settings)"
                )

        return cls(
            pixel_size_m=pixel_size_from(pixel_size_m),
            amplitudes=np.ascontiguousarray(amplitudes, dtype=np.float32),
            xcoords=xcoords.astype(np.float64),
            ycoords=ycoords.astype(np.float64),
            probe=np.ascontiguousarray(probe, dtype=np.complex64),
            object_guess=object_guess,
            scan_index=optional_1d["scan_index"],
            xcoords_start=optional_1d["xcoords_start"],
            ycoords_start=optional_1d["ycoords_start"],
            bad_pixels=bad_pixels,
        )

    @classmethod
    def from_counts(
        cls,
        counts: np.ndarray,
        *args: Any,
        clip_negative: bool = False,
        patterns_first: bool = False,
        **kwargs: Any,
    ) -> PtychoData:
        """Validate arrays whose patterns are detector counts (intensities, e.g. uint16).

        Bad pixels (``bad_pixels``, and pixels at the integer dtype's flag values: see
        :func:`flagged_pixels`) are zeroed before any check, whatever they hold: a NaN or a -1
        gap marker there is what the mask is for. ``bad_pixels`` must be one (N, N) mask.
        ``clip_negative``: see :func:`amplitudes_from_counts`. ``patterns_first``: ``counts``
        is known to be (M, N, N), so an (N, N, M) stack is not looked for (as in
        :meth:`from_amplitudes`).
        """
        counts = np.asarray(counts)
        _check_real("counts", counts)
        if not patterns_first:
            xcoords = args[0] if args else kwargs.get("xcoords")
            m = int(np.size(xcoords)) if xcoords is not None else -1
            counts = _patterns_first(counts, m, "counts")
        _check_mask_shape(kwargs.get("bad_pixels"), counts)
        bad_pixels = with_flagged_pixels(counts, kwargs.get("bad_pixels"), source="counts")
        kwargs["bad_pixels"] = bad_pixels
        amplitudes = amplitudes_from_counts(
            counts, bad_pixels=_pattern_mask(bad_pixels, counts), clip_negative=clip_negative
        )
        return cls.from_amplitudes(amplitudes, *args, key="counts", patterns_first=True, **kwargs)

    # ----------------------------------------------------------------- views
    @property
    def n_patterns(self) -> int:
        return int(self.amplitudes.shape[0])

    @property
    def N(self) -> int:  # noqa: N802 - N is the method's name for the patch size
        return int(self.amplitudes.shape[1])

    @property
    def probe_mode0(self) -> np.ndarray:
        return self.probe[0]

    @property
    def positions(self) -> np.ndarray:
        """(M, 2) positions as (x, y) in object pixels."""
        return np.stack([self.xcoords, self.ycoords], axis=1)

    def outside(self, width: float, height: float) -> np.ndarray:
        """(M,) bool: positions outside an object frame of ``width`` x ``height`` pixels.

        What the host and the CLI report before stitching into such a frame: a patch there is
        cut off (the frame is the object the image is written into, or scored against).
        """
        x, y = self.xcoords, self.ycoords
        return (x < 0) | (x > width) | (y < 0) | (y > height)

    def counts(self) -> np.ndarray:
        """Patterns as counts (float64), the Poisson-rate domain."""
        return np.square(self.amplitudes.astype(np.float64))

    def mean_photons(self) -> float:
        """Mean total counts per pattern on the kept pixels (the default nphotons).

        Bad pixels do not count: the loss ignores them, and a hot or saturated pixel flagged
        bad would otherwise inflate the dose the loss and the probe refinement assume.
        """
        total = mean_pattern_power(self.amplitudes)
        if self.bad_pixels is not None and self.bad_pixels.any():
            bad = self.amplitudes[:, self.bad_pixels].astype(np.float64)
            total -= float(np.square(bad).sum(axis=-1).mean())
        return total

    def subset(self, indices: np.ndarray) -> PtychoData:
        """The patterns at ``indices`` (positions and per-pattern fields follow)."""
        idx = np.asarray(indices)

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return replace(
            self,
            amplitudes=self.amplitudes[idx],
            xcoords=self.xcoords[idx],
            ycoords=self.ycoords[idx],
            scan_index=pick(self.scan_index),
            xcoords_start=pick(self.xcoords_start),
            ycoords_start=pick(self.ycoords_start),
        )


# --------------------------------------------------------------------- NPZ I/O
def _detect_units(arrays: dict[str, np.ndarray], key: str, raw: np.ndarray) -> str:
    if "diff3d_units" in arrays:
        stored = np.asarray(arrays["diff3d_units"])
        if stored.size != 1:
            raise _bad("diff3d_units", f"an array of shape {stored.shape}", "one string")
        value = stored.item()
        if isinstance(value, bytes):  # h5py and MATLAB pipelines store byte strings
            value = value.decode("utf-8", "replace")
        units = str(value).strip().lower()
        if units in ("amplitude", "amplitudes"):
            return UNITS_AMPLITUDE
        if units in ("counts", "count", "intensity", "intensities"):
            return UNITS_COUNTS
        raise _bad("diff3d_units", repr(units), "'amplitude' or 'counts'")
    if set(arrays) == _PTYCHODUS_EXPORT_KEYS:
        # Ptychodus's own training export (recognised by its exact keys) always holds the
        # measured intensities: corrected detectors give fractional counts, which the
        # whole-number guess below would read as amplitudes.
        logger.info("%s of Ptychodus's PtychoPINN training export: read as detector counts", key)
        return UNITS_COUNTS
    if raw.size == 0:  # nothing to tell by, nor to warn about: the shape check refuses it
        return UNITS_COUNTS if np.issubdtype(raw.dtype, np.integer) else UNITS_AMPLITUDE
    if np.issubdtype(raw.dtype, np.integer):
        logger.warning(
            "%s has integer dtype %s and no diff3d_units key: reading it as detector counts",
            key,
            raw.dtype,
        )
        return UNITS_COUNTS
    whole = _whole_numbers(raw, arrays.get("bad_pixels"))
    if whole:
        # Ptychodus's own training export keeps float counts and names no units; amplitudes
        # (square roots of counts) are almost never all whole numbers. Its inpainted bad
        # pixels (listed in bad_pixels) are not whole numbers, so they are left out.
        logger.warning(
            "%s holds only whole numbers and no diff3d_units key: reading it as detector counts",
            key,
        )
        return UNITS_COUNTS
    if whole is None:
        # Dark frames only: the square root changes neither 0 nor 1, so either reading gives
        # the same patterns; the file still says nothing, which the user should know.
        logger.warning(
            "%s holds no fractional value and none above 1 in its good pixels (dark patterns?) "
            "and no diff3d_units key: counts and amplitudes read alike there; reading it as "
            "amplitudes (square roots of counts); add diff3d_units='counts' or 'amplitude' to "
            "the file to say which",
            key,
        )
        return UNITS_AMPLITUDE
    # Said as loudly as the other guesses: read the wrong way, every pattern is squared (or
    # rooted) once too often and the Poisson loss is wrong without an error.
    logger.warning(
        "%s holds fractional values and no diff3d_units key: reading it as amplitudes (square "
        "roots of counts); if these are intensities (e.g. background-subtracted counts), add "
        "diff3d_units='counts' to the file",
        key,
    )
    return UNITS_AMPLITUDE


def _whole_numbers(
    values: np.ndarray, bad_pixels: np.ndarray | None = None, sample_size: int = 1_000_000
) -> bool | None:
    """Whether float patterns look like counts, from their good pixels (sampled).

    True: all whole numbers, some > 1. False: some fractional. None: undecided, no good
    pixel of any pattern being fractional or above 1 (dark frames: 0 and 1 read alike as
    counts and as amplitudes).

    About ``sample_size`` values are read at a time, a whole number of patterns: first
    patterns spread evenly over the scan (why: the first ones alone are often dark frames,
    taken before the beam or the sample is in, and all zero), then, while nothing above 1 has
    been seen, the others in order. Patterns are picked before the mask is applied (which
    copies): a large scan is never copied whole.
    """
    if values.ndim == 0:
        values = values.reshape(1)
    total = values.shape[0]
    per_pattern = max(1, int(np.prod(values.shape[1:])))
    step = max(1, -(-sample_size // per_pattern))  # patterns per look
    good = None
    if values.ndim == 3 and bad_pixels is not None and np.shape(bad_pixels) == values.shape[1:]:
        good = ~np.asarray(bad_pixels, dtype=bool)
    spread = np.unique(np.linspace(0, total - 1, min(step, total)).round().astype(np.intp))
    rest = np.setdiff1d(np.arange(total), spread)
    for indices in [spread] + [rest[i : i + step] for i in range(0, rest.size, step)]:
        if indices.size == 0:
            continue
        sample = values[indices]
        if good is not None:
            sample = sample[..., good]
        if not np.all(sample == np.round(sample)):  # NaN counts as fractional
            return False
        if sample.size and sample.max() > 1.0:
            return True
    return None


def load_npz(path: str | os.PathLike[str]) -> PtychoData:
    """Load and validate an NPZ in the PtychoPINN contract.

    Raises ``FileNotFoundError`` naming the path when it does not exist and ``ValueError``
    naming the path, the key and what was expected for every malformed field. Pixels listed in
    ``bad_pixels`` are not checked (a NaN or a -1 gap marker there is what the mask is for);
    negative counts (background-subtracted data) are clipped to 0 with a warning, as Ptychodus's
    own data are (``host/convert.py``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if not zipfile.is_zipfile(path):  # np.load would read it as a pickle, and say so
        raise ValueError(
            f"{path}: not an NPZ file (an NPZ is a zip archive of .npy arrays); export the "
            "training data again, or write it with numpy.savez"
        )
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable NPZ file ({exc})") from exc
    try:
        with npz:
            key = next((k for k in DIFFRACTION_KEYS if k in npz.files), None)
            if key is None:
                raise ValueError(
                    f"{path}: missing key 'diff3d' (or legacy 'diffraction'); found keys "
                    f"{sorted(npz.files)}"
                )
            for required in ("xcoords", "ycoords", "probeGuess"):
                if required not in npz.files:
                    raise ValueError(f"{path}: missing key '{required}'; found {sorted(npz.files)}")
            arrays = {name: _member(npz, name, path) for name in npz.files}  # CRC-checked
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ValueError(
            f"{path}: not a readable NPZ file ({type(exc).__name__}: {exc}); the file is "
            "corrupt or truncated: export or copy it again"
        ) from exc
    try:
        return _from_arrays(arrays, key)
    except ValueError as exc:  # with two files (training and test data), say which one
        raise ValueError(f"{path}: {exc}") from exc


#: Exactly what Ptychodus's ``save_ptychopinn_training_data`` writes (Export Training Data
#: with its built-in PtychoPINN selected); ours also writes ``diff3d_units``.
_PTYCHODUS_EXPORT_KEYS = frozenset(
    {"xcoords", "ycoords", "xcoords_start", "ycoords_start", "diff3d", "bad_pixels"}
    | {"probeGuess", "objectGuess", "scan_index"}
)

#: Our positions minus Ptychodus's pixel coordinates: Ptychodus centres pixel i at i and cuts
#: an N-pixel patch from x - (N-1)/2, this engine from x - N/2 (``host/convert.py``).
PTYCHODUS_PIXEL_OFFSET = 0.5


def _ptychodus_positions_moved(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ptychodus's own export, recognised by its exact keys, in this engine's positions.

    Why: its positions are Ptychodus pixel coordinates, half a pixel off this engine's; the
    PINN is blind to that (only relative positions enter), but supervised training cut its
    targets from objectGuess half a pixel away from the patterns, and ``infer`` placed the
    image half a pixel off objectGuess.
    """
    if set(arrays) != _PTYCHODUS_EXPORT_KEYS:
        return arrays
    same_start = np.array_equal(arrays["xcoords"], arrays["xcoords_start"]) and np.array_equal(
        arrays["ycoords"], arrays["ycoords_start"]
    )
    if not same_start or np.any(np.asarray(arrays["scan_index"]) != 0):
        return arrays
    logger.info(
        "reading Ptychodus's PtychoPINN training export: its positions (Ptychodus pixel "
        "coordinates) are moved by +%.1f px into this engine's (patch from x - N/2)",
        PTYCHODUS_PIXEL_OFFSET,
    )
    moved = dict(arrays)
    for name in ("xcoords", "ycoords", "xcoords_start", "ycoords_start"):
        moved[name] = np.asarray(arrays[name], dtype=np.float64) + PTYCHODUS_PIXEL_OFFSET
    return moved


def _from_arrays(arrays: dict[str, np.ndarray], key: str) -> PtychoData:
    arrays = _ptychodus_positions_moved(arrays)
    m = int(np.size(arrays["xcoords"]))
    raw = arrays[key]
    _check_real(key, raw)
    raw = _patterns_first(raw, m, key)
    _check_mask_shape(arrays.get("bad_pixels"), raw)
    units = _detect_units(arrays, key, raw)
    optional = {
        name: arrays.get(src)
        for name, src in (
            ("object_guess", "objectGuess"),
            ("scan_index", "scan_index"),
            ("xcoords_start", "xcoords_start"),
            ("ycoords_start", "ycoords_start"),
            ("bad_pixels", "bad_pixels"),
            ("pixel_size_m", "pixel_size_m"),
        )
    }
    if units == UNITS_COUNTS:
        bad_pixels = with_flagged_pixels(raw, optional["bad_pixels"], source=key)
        optional["bad_pixels"] = bad_pixels
        amplitudes = amplitudes_from_counts(
            raw, bad_pixels=_pattern_mask(bad_pixels, raw), clip_negative=True
        )
    else:
        amplitudes = _bad_pixels_zeroed(raw, _pattern_mask(optional["bad_pixels"], raw))
    warn_if_not_centred(amplitudes, key, bad_pixels=_pattern_mask(optional["bad_pixels"], raw))
    return PtychoData.from_amplitudes(
        amplitudes,
        arrays["xcoords"],
        arrays["ycoords"],
        arrays["probeGuess"],
        key=key,
        patterns_first=True,
        **optional,
    )


def warn_if_not_centred(
    amplitudes: np.ndarray,
    key: str = "diff3d",
    sample: int = 512,
    *,
    bad_pixels: np.ndarray | None = None,
) -> bool:
    """Warn (and return True) when the patterns are brightest in their corners.

    Why: the forward model puts the zero spatial frequency at pixel (N/2, N/2); a file written
    from an unshifted FFT has it at (0, 0), and trains on without an error to a wrong image.
    Compares the mean intensity (of the first ``sample`` patterns) in the central N/4 box with
    that in the four N/16 corner boxes; a real far-field pattern is brightest at its centre.
    Only good pixels count (``bad_pixels`` (N, N), True = bad): a masked beamstop is zero
    there, and made centred data look unshifted (with advice that would have broken them).
    With the central box or the corners (almost) all masked there is nothing to compare.
    """
    if amplitudes.ndim != 3 or min(amplitudes.shape[1:]) < 16:
        return False
    n = amplitudes.shape[-1]
    good = np.ones(amplitudes.shape[1:], dtype=bool)
    if bad_pixels is not None and np.shape(bad_pixels) == good.shape:
        good = ~np.asarray(bad_pixels, dtype=bool)
    count = min(sample, amplitudes.shape[0])
    total = np.zeros(amplitudes.shape[1:], dtype=np.float64)
    for begin in range(0, count, 32):  # blocks: 512 float64 patterns of 256^2 are 256 MB
        block = np.asarray(amplitudes[begin : min(begin + 32, count)], dtype=np.float64)
        total += np.square(block).sum(axis=0)
    mean = total / max(count, 1)
    q, e = n // 8, n // 16
    box = (slice(n // 2 - q, n // 2 + q),) * 2
    corner_boxes = [
        (slice(None, e), slice(None, e)),
        (slice(None, e), slice(-e, None)),
        (slice(-e, None), slice(None, e)),
        (slice(-e, None), slice(-e, None)),
    ]
    centre_good = good[box]
    corner_good = np.concatenate([good[c].reshape(-1) for c in corner_boxes])
    # Fewer than a tenth of either region's pixels measured: a beamstop (or a detector gap)
    # there, and too few pixels left to tell where the patterns are brightest.
    if centre_good.mean() < 0.1 or corner_good.mean() < 0.1:
        return False
    centre = float(mean[box][centre_good].mean())
    corner_values = np.concatenate([mean[c].reshape(-1) for c in corner_boxes])
    corners = float(corner_values[corner_good].mean())
    if not corners > 4.0 * centre:
        return False
    logger.warning(
        "%s: the patterns are brightest in their corners (mean intensity %.3g there, %.3g at "
        "the centre): their zero frequency seems to be at pixel (0, 0), where this engine "
        "expects it at (N/2, N/2); apply numpy.fft.fftshift over the last two axes and save "
        "the file again",
        key,
        corners,
        centre,
    )
    return True


def warn_if_probe_not_centred(probe: np.ndarray, key: str = "probeGuess") -> bool:
    """Warn (and return True) when mode 0 of ``probe`` is brightest in its corners.

    Why: the forward model, the stitching weights and the probe normalisation (mean |P| over
    the central disk of radius N/4) expect the beam centred at pixel (N/2, N/2); a probe
    stored fftshifted has it split over the four corners and trains on without an error to a
    wrong image (``physics.normalize_probe`` only refuses a probe that is zero in that disk).
    Compares the mean intensity in the central disk with that in the same disk moved to the
    corners (the pixels within N/4 of one), which is where a shifted probe's centre lands.
    ``probe`` is (N, N) or (modes, N, N); N < 8 is too small to tell.
    """
    mode0 = probe[0] if probe.ndim == 3 else probe
    n = mode0.shape[-1]
    if mode0.ndim != 2 or mode0.shape[0] != n or n < 8:
        return False
    coords = np.arange(n) - n // 2
    disk = coords[:, np.newaxis] ** 2 + coords[np.newaxis, :] ** 2 <= (n / 4) ** 2
    intensity = np.square(np.abs(mode0.astype(np.complex128)))
    centre = float(intensity[disk].mean())
    corners = float(intensity[np.fft.ifftshift(disk)].mean())  # disk centre moved to (0, 0)
    if not corners > 4.0 * centre:
        return False
    logger.warning(
        "%s: the probe (mode 0) is brightest in its corners (mean intensity %.3g within N/4 of "
        "them, %.3g in the central disk of radius N/4): it seems stored fftshifted, centred at "
        "pixel (0, 0), where this engine expects it at (N/2, N/2); apply numpy.fft.fftshift "
        "over its last two axes and save it again",
        key,
        corners,
        centre,
    )
    return True


def _bad_pixels_zeroed(amplitudes: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Amplitudes with their bad pixels set to 0 where those hold NaN, inf or negatives.

    Only then: valid values in bad pixels stay as stored (the loss ignores them either way).
    """
    if mask is None or not np.issubdtype(amplitudes.dtype, np.floating):
        return amplitudes
    bad = amplitudes[:, mask]
    if np.all(np.isfinite(bad)) and not np.any(bad < 0):
        return amplitudes
    fixed = np.array(amplitudes, dtype=np.float32)
    fixed[:, mask] = 0.0
    return fixed


def _member(npz: Any, name: str, path: Path) -> np.ndarray:
    """One array of the NPZ; an array numpy cannot read without pickle is named, not obscure."""
    try:
        return npz[name]
    except ValueError as exc:  # object (pickled) arrays, malformed .npy headers
        raise ValueError(
            f"{path}: key '{name}' cannot be read as a plain array ({exc}); store numbers "
            "only (no Python objects) in the NPZ"
        ) from exc


def save_npz(data: PtychoData, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` in the NPZ contract (amplitudes, with ``diff3d_units``), atomically."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {
        "diff3d": data.amplitudes,
        "diff3d_units": np.asarray(UNITS_AMPLITUDE),
        "xcoords": data.xcoords,
        "ycoords": data.ycoords,
        "probeGuess": data.probe[0] if data.probe.shape[0] == 1 else data.probe,
    }
    for key, value in (
        ("objectGuess", data.object_guess),
        ("scan_index", data.scan_index),
        ("xcoords_start", data.xcoords_start),
        ("ycoords_start", data.ycoords_start),
        ("bad_pixels", data.bad_pixels),
        ("pixel_size_m", None if data.pixel_size_m is None else np.asarray(data.pixel_size_m)),
    ):
        if value is not None:
            arrays[key] = value
    with atomic_write_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return path
