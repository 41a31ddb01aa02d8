"""Inference: predict object patches for a scan and stitch them into one object image.

Why stitching looks the way it does (shared/design/PTYCHOPINN.md section 8):

* Every channel patch is placed at **its own absolute scan position**. The reference averaged a
  group's channels at the group centroid without shifting them, which blurs every gridsize > 1
  reconstruction; here a group is just C independent patches for the stitcher.
* Only the central ``round(N * crop_fraction)`` box of a patch is used: the network's border
  pixels are the least constrained (probe intensity is low there).
* Patches are weighted by the probe intensity ``sum_modes |P|^2`` (cropped the same way), the
  local signal-to-noise of the prediction, or uniformly. The stitched object is
  ``sum(w * patch) / sum(w)``, so overlapping true patches reproduce the object exactly.
* Fractional positions (``subpixel``, ``InferenceConfig.subpixel``): by default
  (``"lanczos3"``) each patch is first resampled onto the canvas grid with a normalised
  6-tap Lanczos kernel (a = 3) and then added at whole pixels; ``"bilinear"`` (the design
  note's method) splats each cropped pixel over the four nearest canvas pixels. Why the
  default differs from the design note: a bilinear splat is a low-pass filter of up to half a
  pixel, visible as lost fine texture. Stitching the true Run1084 patches at their real
  (fractional) positions gives amplitude SSIM 0.961 bilinear, 0.980 Lanczos; on a trained
  network's patches +0.005 (docs/performance.md). Both keep a constant object constant (the
  kernel weights sum to one; the weight map is the same in numerator and denominator).
* Geometry is the engine-wide convention: patch pixel ``j`` of a pattern at position ``x``
  samples object coordinate ``x - N/2 + j`` (rows likewise), object pixel ``i`` is centred at
  coordinate ``i``; positions are ``(x, y) = (column, row)``.
* The constant phase of each patch is unobservable (a far-field amplitude does not change with
  it), so the network's choice drifts across the scan. With ``align_phases`` (the inference
  default, ``InferenceConfig.phase_alignment``) the final image is stitched after turning each
  patch by the phase that makes it agree with its neighbours (``phase_alignment.py``).
* The canvas geometry (origin and size) is explicit and returned, so a host can place the image;
  a host that passes its object frame ``CanvasGeometry(0, 0, W, H)`` gets the result in it.

Everything is vectorised (``np.add.at`` on flattened indices, applied in patch order so chunked
and one-shot stitching perform the identical sequence of additions). The streaming entry point
:func:`reconstruct_iter` predicts one chunk of patches at a time; phase alignment keeps the
stitched (cropped) part of every patch until the final image, complex64, ``(N*crop)^2 * 8``
bytes per patch (8 KiB at N = 64: 35 MB for the 4,348 patches of a 1,087-pattern gridsize-2
scan). The alignment itself works on a binned copy (1/binning^2 of the kept pixels; binning
n // 8, 1 to 4) and each of its iterations makes about seven temporaries of that size: about
half the kept patches' memory again at N = 128 (measured: +109 MB over 197 MB kept for 6,000
patches), up to seven times it for crops under 16 px, where nothing is binned. The final
image then needs only one block's temporaries and the canvas (the kept blocks are never
joined). Switch alignment off to bound memory by the chunk alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .config import SUBPIXEL_METHODS
from .data import PtychoData
from .devices import select_device
from .model import TrainedModel
from .payload import InferencePayload
from .phase_alignment import align_patch_phases
from .prepare import prepare_scan

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_CANVAS_PIXELS",
    "CanvasGeometry",
    "InferenceChunk",
    "InferenceResult",
    "StitchedObject",
    "Stitcher",
    "crop_size",
    "refuse_huge_canvas",
    "reconstruct",
    "reconstruct_iter",
    "select_device",
    "stitch_patches",
    "warn_if_flat",
]

Weighting = Literal["probe", "uniform"]
Subpixel = Literal["lanczos3", "bilinear"]
#: Lanczos kernel half-width (taps per axis = 2 * _LANCZOS_A).
_LANCZOS_A = 3

#: Canvas pixels whose summed weight is below this fraction of the largest single-pixel patch
#: weight count as uncovered (they are 0 in the result). Relative, so the probe's scale does
#: not matter.
_RELATIVE_EPS = 1e-9
#: Patches splatted per vectorised block inside :meth:`Stitcher.add` (bounds index memory).
_BLOCK = 512


def crop_size(N: int, crop_fraction: float) -> int:  # noqa: N803 - N is the patch size
    """Side of the central box of a patch that is stitched: ``round(N * crop_fraction)``."""
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction = {crop_fraction!r} is invalid: allowed (0, 1]")
    return max(1, min(N, int(round(N * crop_fraction))))


def _crop_start(N: int, size: int) -> int:  # noqa: N803
    """First patch index of the central box; keeps pixel ``N//2`` central like ``center_crop``."""
    return N // 2 - size // 2


#: The largest canvas :meth:`CanvasGeometry.covering` makes (20,000^2 pixels, ~9 GiB of
#: float64 accumulators): beyond it the positions are almost surely in the wrong unit or hold
#: an outlier, and numpy would fail with a MemoryError or swap the machine.
MAX_CANVAS_PIXELS = 400_000_000


def refuse_huge_canvas(positions: np.ndarray, width: int, height: int) -> None:
    """Raise ``ValueError`` naming the positions' span when a canvas covering them would exceed
    :data:`MAX_CANVAS_PIXELS` (a clear message instead of a MemoryError, or a swapping machine).
    """
    if width * height <= MAX_CANVAS_PIXELS:
        return
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    raise ValueError(
        f"positions: span x {pos[:, 0].min():.6g}..{pos[:, 0].max():.6g}, y "
        f"{pos[:, 1].min():.6g}..{pos[:, 1].max():.6g} object pixels, a {width} x {height} "
        f"canvas (more than {MAX_CANVAS_PIXELS:.0e} pixels, about "
        f"{width * height * 24 / 2**30:.0f} GiB); positions must be in object pixels (not nm "
        "or m): convert them, or remove the stray positions"
    )


@dataclass(frozen=True)
class CanvasGeometry:
    """Where the stitched image lies: canvas pixel (r, c) is object coordinate
    ``(origin_y + r, origin_x + c)`` (row, column)."""

    origin_x: float
    origin_y: float
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"CanvasGeometry.{name} = {value!r} is invalid: allowed >= 1")
        for name in ("origin_x", "origin_y"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"CanvasGeometry.{name} = {getattr(self, name)!r} is not finite")

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the canvas arrays."""
        return (int(self.height), int(self.width))

    @classmethod
    def covering(
        cls,
        positions: np.ndarray,
        N: int,  # noqa: N803
        crop_fraction: float = 0.5,
    ) -> CanvasGeometry:
        """The smallest integer-origin canvas holding every cropped patch at ``positions``.

        ``positions`` is (..., 2) in (x, y). A 1-pixel margin on every side leaves room for the
        bilinear splat of fractional positions, so nothing is ever dropped at the edge.
        """
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        if pos.shape[0] == 0:
            raise ValueError("positions: found none, expected at least one (x, y) position")
        if not np.all(np.isfinite(pos)):
            raise ValueError("positions: found NaN/inf values, expected finite positions")
        size = crop_size(N, crop_fraction)
        first = _crop_start(N, size) - N / 2.0  # coordinate of cropped pixel 0 minus position
        low = np.floor(pos.min(axis=0) + first) - 1.0
        high = np.ceil(pos.max(axis=0) + first + size - 1) + 1.0
        width, height = (high - low + 1).astype(np.int64)
        refuse_huge_canvas(pos, int(width), int(height))
        return cls(float(low[0]), float(low[1]), int(width), int(height))


@dataclass
class StitchedObject:
    """A stitched object: ``object`` (H, W) complex64, 0 wherever ``weights`` is ~0."""

    object: np.ndarray  # (H, W) complex64
    weights: np.ndarray  # (H, W) float32 summed patch weights
    canvas: CanvasGeometry

    @property
    def covered(self) -> np.ndarray:
        """(H, W) bool: pixels that received patch weight."""
        return self.weights > 0


def _probe_weight(probe: np.ndarray | None, N: int, weighting: str) -> np.ndarray:  # noqa: N803
    """(N, N) float64 per-pixel patch weight before cropping."""
    if weighting == "uniform":
        return np.ones((N, N), dtype=np.float64)
    if weighting != "probe":
        raise ValueError(f"weighting = {weighting!r} is invalid: allowed 'probe' or 'uniform'")
    if probe is None:
        raise ValueError("weighting = 'probe' needs a probe: pass probe=, or use 'uniform'")
    p = np.asarray(probe)
    if p.ndim == 2:
        p = p[np.newaxis]
    if p.ndim != 3 or p.shape[1:] != (N, N):
        raise ValueError(
            f"probe: found shape {np.shape(probe)}, expected ({N}, {N}) or (modes, N, N)"
        )
    intensity = np.sum(np.abs(p.astype(np.complex128)) ** 2, axis=0)
    if not np.all(np.isfinite(intensity)) or intensity.max() <= 0:
        raise ValueError("probe: its intensity is zero or not finite; cannot weight patches")
    return intensity


def _lanczos_taps(frac: np.ndarray) -> np.ndarray:
    """(P, 2a) normalised Lanczos weights of source offsets ``-a .. a-1`` for shifts ``frac``.

    Output pixel ``j`` takes ``sum_i w_i * in[j + i]`` for ``i = -a .. a-1``: the value at
    ``j - frac`` (0 <= frac < 1), i.e. content moved by ``+frac``. An exactly zero ``frac``
    gives the identity (a single weight 1). The weights are divided by their sum so a
    constant stays constant.
    """
    offsets = np.arange(-_LANCZOS_A, _LANCZOS_A, dtype=np.float64)
    distance = offsets[None, :] + frac[:, None]  # (P, 2a): source minus target coordinate
    kernel = np.sinc(distance) * np.sinc(distance / _LANCZOS_A)
    kernel[np.abs(distance) >= _LANCZOS_A] = 0.0
    kernel /= kernel.sum(axis=1, keepdims=True)
    whole = frac == 0.0
    kernel[whole] = 0.0
    kernel[whole, _LANCZOS_A] = 1.0
    return kernel


def _lanczos_crop(patches: np.ndarray, frac: np.ndarray, start: int, size: int) -> np.ndarray:
    """The ``size`` x ``size`` box at ``start`` of each patch, moved by ``+frac`` (P, 2) (x, y).

    Vectorised separable resampling: one weighted sum of 2a shifted slices per axis. Samples
    beyond the patch edge repeat the edge pixel (only reached when the box is the whole patch),
    so a constant patch stays constant. Returns complex128 (P, size, size).

    Only the source window the box reads (``size + 2a - 1`` pixels a side) is converted to
    complex128 and edge-padded, not the whole patch: at N = 256 with the default half-size
    box that is a quarter of the patch, and the temporaries shrink accordingly.
    """
    a = _LANCZOS_A
    n = patches.shape[-1]
    first, stop = start - a, start + size + a - 1  # source pixels [first, stop) are read
    low, high = max(0, -first), max(0, stop - n)  # beyond the patch edge: repeat the edge
    window = patches[:, max(first, 0) : min(stop, n), max(first, 0) : min(stop, n)]
    window = window.astype(np.complex128)
    if low or high:
        window = np.pad(window, ((0, 0), (low, high), (low, high)), mode="edge")
    wx = _lanczos_taps(frac[:, 0])
    wy = _lanczos_taps(frac[:, 1])
    along_x = np.zeros((patches.shape[0], window.shape[1], size), dtype=np.complex128)
    for t in range(2 * a):
        along_x += wx[:, t, None, None] * window[:, :, t : t + size]
    out = np.zeros((patches.shape[0], size, size), dtype=np.complex128)
    for t in range(2 * a):
        out += wy[:, t, None, None] * along_x[:, t : t + size, :]
    return out


class Stitcher:
    """Accumulates weighted, cropped patches on a fixed canvas (see ``subpixel`` above).

    Call :meth:`add` once per chunk of patches (memory is bounded by the chunk) and
    :meth:`result` whenever a snapshot is wanted; ``result`` does not disturb the accumulation.
    """

    def __init__(
        self,
        canvas: CanvasGeometry,
        N: int,  # noqa: N803
        probe: np.ndarray | None = None,
        weighting: Weighting | str = "probe",
        crop_fraction: float = 0.5,
        align_phases: bool = False,
        previews: bool = True,
        subpixel: Subpixel | str = "lanczos3",
    ) -> None:
        if subpixel not in SUBPIXEL_METHODS:
            raise ValueError(
                f"subpixel = {subpixel!r} is invalid: allowed {', '.join(SUBPIXEL_METHODS)}"
            )
        self.subpixel = subpixel
        self.canvas = canvas
        self.align_phases = bool(align_phases)
        #: With alignment, whether plain snapshots (``result(aligned=False)``) are wanted: only
        #: then is the plain average accumulated as patches arrive (streaming shows it).
        self.previews = bool(previews) or not self.align_phases
        #: With ``align_phases``: the stitched part of every patch added (resampled when
        #: ``subpixel`` is lanczos3) and the canvas coordinate of its pixel 0.
        self._kept: list[tuple[np.ndarray, np.ndarray]] = []
        #: Seconds the last aligned :meth:`result` spent finding the phases.
        self.alignment_seconds = 0.0
        self.N = int(N)
        self.crop = crop_size(self.N, crop_fraction)
        self._start = _crop_start(self.N, self.crop)
        box = slice(self._start, self._start + self.crop)
        self._weight = np.ascontiguousarray(_probe_weight(probe, self.N, weighting)[box, box])
        self._eps = _RELATIVE_EPS * float(self._weight.max())
        h, w = canvas.shape
        # float64 accumulators: many overlapping patches are summed without visible rounding.
        self._numerator = np.zeros(h * w, dtype=np.complex128)
        self._denominator = np.zeros(h * w, dtype=np.float64)
        self.patches_added = 0

    def add(self, patches: np.ndarray, positions: np.ndarray) -> None:
        """Splat ``patches`` (..., N, N) complex, each at its own ``positions`` (..., 2) (x, y).

        Typically (G, C, N, N) with (G, C, 2) absolute channel positions from
        ``grouping.Groups.positions``; any matching leading shape works (e.g. (M, N, N)).
        """
        n = self.N
        patches = np.asarray(patches)
        positions = np.asarray(positions, dtype=np.float64)
        if patches.ndim < 3 or patches.shape[-2:] != (n, n):
            raise ValueError(f"patches: found shape {patches.shape}, expected (..., {n}, {n})")
        if positions.shape != (*patches.shape[:-2], 2):
            raise ValueError(
                f"positions: found shape {positions.shape}, expected "
                f"{(*patches.shape[:-2], 2)} (one (x, y) per patch)"
            )
        flat_patches = patches.reshape(-1, n, n)
        flat_positions = positions.reshape(-1, 2)
        if not np.all(np.isfinite(flat_positions)):
            raise ValueError("positions: found NaN/inf values, expected finite positions")
        for begin in range(0, flat_patches.shape[0], _BLOCK):
            block, origins = self._cropped(
                flat_patches[begin : begin + _BLOCK], flat_positions[begin : begin + _BLOCK]
            )
            numerator = self._numerator if self.previews else None
            self._splat(block, origins, numerator, True)
            if self.align_phases:
                # Only patches that reach the canvas: one far off it (a stray position in a
                # host scan) adds nothing to the image, and the alignment's own canvas, which
                # spans every kept patch, would reach out to it (250 GB for one at 1e6 px).
                touches = self._touches_canvas(origins)
                if touches.any():
                    self._kept.append((block[touches].astype(np.complex64), origins[touches]))
        self.patches_added += flat_patches.shape[0]

    def _cropped(self, patches: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The stitched box of each patch (P, n, n) complex128 and its canvas origin (P, 2).

        Lanczos: the box is resampled so its pixels sit on whole canvas pixels, and the origin
        returned is whole; bilinear: the box as predicted, at its fractional origin.
        """
        origins = self._crop_origins(positions)
        if self.subpixel == "bilinear":
            box = slice(self._start, self._start + self.crop)
            return patches[:, box, box].astype(np.complex128), origins
        whole = np.floor(origins)
        resampled = _lanczos_crop(patches, origins - whole, self._start, self.crop)
        return resampled, whole

    def _aligned_numerator(self, should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """The numerator re-accumulated from the kept patches, each turned by its phase.

        The kept blocks are used as they are, never joined: a joined copy (and the complex128
        temporaries the alignment used to make of it) would multiply the kept patches' memory
        (8 bytes per pixel) about six times at the end of a large scan.
        """
        blocks = [p for p, _ in self._kept]
        origins = np.concatenate([x for _, x in self._kept])
        tic = time.perf_counter()
        alignment = align_patch_phases(blocks, origins, self._weight, should_stop=should_stop)
        self.alignment_seconds = time.perf_counter() - tic
        if alignment.stopped:
            logger.warning(
                "phase alignment of the %d patches stopped on request after %d iterations: "
                "the image keeps part of the phase drift",
                len(origins),
                alignment.iterations,
            )
        elif not alignment.converged:  # the image keeps some of the drift: say so
            logger.warning(
                "phase alignment of the %d patches stopped after %d iterations before it had "
                "converged (last step %.2g rad): a slow phase drift may remain across the "
                "image",
                len(origins),
                alignment.iterations,
                alignment.last_step,
            )
        factors = alignment.factors
        numerator = np.zeros_like(self._numerator)
        begin = 0
        for kept in blocks:
            end = begin + kept.shape[0]
            block = kept.astype(np.complex128)
            block *= factors[begin:end, None, None]
            self._splat(block, origins[begin:end], numerator, False)
            begin = end
        return numerator

    def _touches_canvas(self, origins: np.ndarray) -> np.ndarray:
        """(P,) bool: the cropped box at canvas ``origins`` (P, 2) overlaps the canvas (the
        bilinear splat reaches one pixel beyond a fractional origin)."""
        h, w = self.canvas.shape
        col, row = origins.T
        return (col > -self.crop - 1) & (col < w) & (row > -self.crop - 1) & (row < h)

    def _crop_origins(self, positions: np.ndarray) -> np.ndarray:
        """(P, 2) canvas (column, row) coordinate of cropped pixel 0 of each patch."""
        first = self._start - self.N / 2.0
        return positions + [first - self.canvas.origin_x, first - self.canvas.origin_y]

    def _splat(
        self,
        cropped: np.ndarray,
        origins: np.ndarray,
        numerator: np.ndarray | None,
        with_weights: bool,
    ) -> None:
        """Bilinear splat of cropped patches (P, n, n) with pixel 0 at canvas ``origins`` (P, 2).

        Vectorised; a whole origin (always, after Lanczos resampling) is a plain addition.

        Adds into ``numerator`` (unless None), and into the weight sum when ``with_weights``
        (the weights do not depend on the patches' phases, so an aligned re-stitch reuses them).
        """
        h, w = self.canvas.shape
        k = np.arange(self.crop, dtype=np.float64)
        # Canvas coordinate of cropped pixel 0 of each patch, split in integer + fraction; the
        # fraction is shared by every pixel of a patch (integer positions: exactly 0).
        col0, row0 = origins.T
        col_int, row_int = np.floor(col0), np.floor(row0)
        fx, fy = col0 - col_int, row0 - row_int
        cols = col_int[:, None] + k  # (P, n)
        rows = row_int[:, None] + k
        corners = (
            (0, 0, (1 - fx) * (1 - fy)),
            (0, 1, fx * (1 - fy)),
            (1, 0, (1 - fx) * fy),
            (1, 1, fx * fy),
        )
        for dr, dc, corner_weight in corners:
            use = corner_weight > 0  # skip exact zeros: adding 0 changes nothing
            if not use.any():
                continue
            r = (rows[use] + dr).astype(np.int64)[:, :, None]  # (p, n, 1)
            c = (cols[use] + dc).astype(np.int64)[:, None, :]  # (p, 1, n)
            wts = corner_weight[use][:, None, None] * self._weight  # (p, n, n)
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)  # host canvases may clip
            index = np.broadcast_to(r * w + c, inside.shape)[inside]
            if numerator is not None:
                np.add.at(numerator, index, (wts * cropped[use])[inside])
            if with_weights:
                np.add.at(self._denominator, index, np.broadcast_to(wts, inside.shape)[inside])

    def result(
        self, aligned: bool | None = None, should_stop: Callable[[], bool] | None = None
    ) -> StitchedObject:
        """numerator / denominator where the denominator exceeds a tiny eps, else 0.

        ``aligned`` (default: ``align_phases``) stitches the patches turned by their aligned
        phases; ``False`` gives the plain running average (cheap: for streamed previews).
        ``should_stop`` is polled during the phase alignment: a stop ends it early and the
        image is stitched with the phases found so far (and says so in the log).
        """
        aligned = self.align_phases if aligned is None else aligned
        if aligned and not self.align_phases:
            raise ValueError("result(aligned=True) needs a Stitcher made with align_phases=True")
        if not aligned and not self.previews:
            raise ValueError("result(aligned=False) needs a Stitcher made with previews=True")
        h, w = self.canvas.shape
        covered = self._denominator > self._eps
        if aligned and self._kept:
            numerator = self._aligned_numerator(should_stop)
        else:
            numerator = self._numerator
        obj = np.zeros(h * w, dtype=np.complex128)
        np.divide(numerator, self._denominator, out=obj, where=covered)
        weights = np.where(covered, self._denominator, 0.0)
        return StitchedObject(
            object=obj.reshape(h, w).astype(np.complex64),
            weights=weights.reshape(h, w).astype(np.float32),
            canvas=self.canvas,
        )


def stitch_patches(
    patches: np.ndarray,
    positions: np.ndarray,
    N: int,  # noqa: N803
    probe: np.ndarray | None = None,
    weighting: Weighting | str = "probe",
    crop_fraction: float = 0.5,
    canvas: CanvasGeometry | None = None,
    align_phases: bool = False,
    subpixel: Subpixel | str = "lanczos3",
) -> StitchedObject:
    """One-shot stitching of all ``patches`` (..., N, N) at ``positions`` (..., 2).

    ``canvas`` defaults to :meth:`CanvasGeometry.covering` of the positions.
    """
    if canvas is None:
        canvas = CanvasGeometry.covering(positions, N, crop_fraction)
    stitcher = Stitcher(canvas, N, probe, weighting, crop_fraction, align_phases, subpixel=subpixel)
    stitcher.add(patches, positions)
    return stitcher.result()


# ---------------------------------------------------------------------------------------------
# Model inference
# ---------------------------------------------------------------------------------------------


class InferenceChunk:
    """One streamed step: the stitched object so far and how far the scan has got.

    ``stitched`` is made when first read (the last chunk's, the final image, is made at
    once): a host that shows ten of a scan's hundreds of chunks does not pay a full-canvas
    division for every chunk (minutes for a 100,000-pattern scan). Read it before asking the
    stream for the next chunk; later it would include patches the chunk had not seen, so it
    is refused then.
    """

    def __init__(
        self,
        stitcher: Stitcher,
        groups_done: int,
        groups_total: int,
        chunk_index: int,  # 0-based
        n_chunks: int,
        stitched: StitchedObject | None = None,
    ) -> None:
        self.groups_done = groups_done
        self.groups_total = groups_total
        self.chunk_index = chunk_index
        self.n_chunks = n_chunks
        self._stitcher = stitcher
        self._patches_added = stitcher.patches_added
        self._stitched = stitched

    @property
    def stitched(self) -> StitchedObject:
        """The plain running average of the patches stitched so far (final chunk: the image)."""
        if self._stitched is None:
            if self._stitcher.patches_added != self._patches_added:
                raise RuntimeError(
                    f"the image of chunk {self.chunk_index + 1} of {self.n_chunks} was asked for "
                    "after later chunks were stitched: read chunk.stitched before taking the "
                    "next chunk"
                )
            self._stitched = self._stitcher.result(aligned=False)
        return self._stitched


@dataclass
class InferenceResult:
    """A finished reconstruction, tagged with the backend that produced it."""

    stitched: StitchedObject
    backend: str
    #: seconds per stage: "group", "predict", "stitch", "align" (phase alignment)
    timings: dict[str, float] = field(default_factory=dict)
    n_groups: int = 0


def _run(
    model: TrainedModel,
    data: PtychoData,
    payload: InferencePayload | None,
    canvas: CanvasGeometry | None,
    should_stop: Callable[[], bool] | None,
    timings: dict[str, float],
    previews: bool = True,
) -> Iterator[tuple[Stitcher, int, int, int, int]]:
    """Shared engine of :func:`reconstruct_iter` and :func:`reconstruct`.

    Yields (stitcher, groups_done, groups_total, chunk_index, n_chunks) after each chunk and
    accumulates the seconds spent per stage in ``timings``; taking the snapshot is left to the
    caller so a one-shot run does not pay for a division per chunk.
    """
    payload = model.inference_payload() if payload is None else payload
    for key in ("group", "predict", "stitch"):
        timings.setdefault(key, 0.0)
    warn_if_other_probe(model, data)
    warn_if_other_sampling(model, data)
    device = select_device(payload.execution.accelerator)
    model.autoencoder.to(device)

    tic = time.perf_counter()
    scan = prepare_scan(
        data,
        payload.grid,
        payload.data,
        n_groups=payload.inference.n_groups,
        input_scale=model.input_scale,
        with_physics=False,
    )
    timings["group"] += time.perf_counter() - tic

    n = payload.grid.N
    crop_fraction = payload.inference.crop_fraction
    groups = scan.groups
    if canvas is None:
        canvas = CanvasGeometry.covering(groups.positions, n, crop_fraction)
    stitcher = Stitcher(
        canvas,
        n,
        model.probe,
        payload.inference.patch_weighting,
        crop_fraction,
        align_phases=payload.inference.phase_alignment,
        previews=previews,
        subpixel=payload.inference.subpixel,
    )
    total = groups.n_groups
    chunk = payload.inference.chunk_size
    n_chunks = math.ceil(total / chunk)
    batch_size = payload.execution.inference_batch_size
    for index in range(n_chunks):
        if should_stop is not None and should_stop():
            return
        rows = slice(index * chunk, min(total, (index + 1) * chunk))
        tic = time.perf_counter()
        patches = model.predict(scan.group_inputs(rows), batch_size=batch_size)
        timings["predict"] += time.perf_counter() - tic
        tic = time.perf_counter()
        stitcher.add(patches, groups.positions[rows])
        timings["stitch"] += time.perf_counter() - tic
        del patches
        yield stitcher, rows.stop, total, index, n_chunks


#: Largest deviation from the mean value, relative to the mean amplitude, of a flat image.
_FLAT_TOLERANCE = 1e-4


#: Below this normalised overlap of the scan's probe with the model's, inference warns.
PROBE_OVERLAP_WARNING = 0.5


def probe_overlap(a: np.ndarray, b: np.ndarray) -> float | None:
    """``|<a, b>| / (|a| |b|)`` of two probes' first modes: 1 for the same illumination.

    Independent of each probe's power and global phase (which the model's normalisation and
    the physics ignore). None when the sizes differ or a probe has no power.
    """
    first_a = np.asarray(a).reshape(-1, *np.shape(a)[-2:])[0].astype(np.complex128)
    first_b = np.asarray(b).reshape(-1, *np.shape(b)[-2:])[0].astype(np.complex128)
    if first_a.shape != first_b.shape:
        return None
    norm = float(np.linalg.norm(first_a) * np.linalg.norm(first_b))
    if not math.isfinite(norm) or norm == 0.0:
        return None
    return float(abs(np.vdot(first_a, first_b)) / norm)


def warn_if_other_probe(model: TrainedModel, data: PtychoData) -> float | None:
    """Warn when the scan's probe is not the illumination the model was trained with.

    Why: the network learnt to predict objects that explain its training patterns through its
    own probe; on a scan taken with other illumination (another energy, defocus or aperture)
    its images can be wrong without any error. Inference itself never uses the scan's probe,
    so this comparison is the only place the mismatch can show. Returns the overlap.
    """
    overlap = probe_overlap(data.probe, model.probe)
    if overlap is None or overlap >= PROBE_OVERLAP_WARNING:
        return overlap
    if model.probe_refined:  # the model's probe was fitted: far from the given one by design
        logger.warning(
            "this scan's probe differs from the model's (normalised overlap %.2f of 1), which "
            "probe refinement fitted to its training scan: expected if this is that scan; on "
            "another scan this image may be wrong: train a model on it",
            overlap,
        )
    else:
        logger.warning(
            "this scan's probe differs from the one the model was trained with (normalised "
            "overlap %.2f of 1): the network predicts objects for its training illumination, "
            "so this image may be wrong; train a model on this scan, or on one taken with the "
            "same illumination",
            overlap,
        )
    return overlap


#: Object pixel sizes within this fraction of each other count as the same sampling.
PIXEL_SIZE_TOLERANCE = 0.02


def warn_if_other_sampling(model: TrainedModel, data: PtychoData) -> bool:
    """Warn (and return True) when the scan's object pixels differ in size from the model's.

    Why: the network maps patterns to object patches in pixels; a scan taken at another photon
    energy, detector distance or binning has another pixel size, so the same features arrive
    at another scale and the image can be wrong without any error. Both sizes are known only
    when the sources said (Ptychodus's products do; NPZ files may).
    """
    trained, given = model.pixel_size_m, data.pixel_size_m
    if trained is None or given is None:
        return False
    ratios = [g / t for g, t in zip(given, trained, strict=True)]
    if all(abs(r - 1.0) <= PIXEL_SIZE_TOLERANCE for r in ratios):
        return False
    logger.warning(
        "this scan's object pixels are %.4g x %.4g nm, the model was trained on %.4g x %.4g nm "
        "(%.3g x %.3g times): the network sees its features at another scale, so this image "
        "may be wrong; train a model on data of this sampling (photon energy, detector "
        "distance and binning)",
        given[0] * 1e9,
        given[1] * 1e9,
        trained[0] * 1e9,
        trained[1] * 1e9,
        ratios[0],
        ratios[1],
    )
    return True


def warn_if_flat(stitched: StitchedObject) -> bool:
    """Log a warning (and return True) when the covered image is one constant value.

    Why: a network whose outputs saturated (too few epochs, or a rate too high) predicts the
    same patch everywhere, and the image is then exactly uniform; without a word the user
    sees a blank object and cannot tell it from a display problem. Real objects, even weak
    ones, are never constant to 1e-4.
    """
    values = stitched.object[stitched.covered].astype(np.complex128)
    if values.size < 2:
        return False
    mean = values.mean()
    scale = max(float(np.abs(values).mean()), 1e-12)
    # Distance in the complex plane: a phase at +-pi is one value, not two (no wrap).
    if float(np.abs(values - mean).max()) > _FLAT_TOLERANCE * scale:
        return False
    logger.warning(
        "the reconstruction is flat (amplitude %.4g, phase %.4g rad at every pixel): the "
        "network predicts the same patch everywhere, so it has not learnt this scan yet; "
        "train more epochs (at least 12 for a tiny model) or with a lower learning rate",
        abs(mean),
        float(np.angle(mean)),
    )
    return True


def reconstruct_iter(
    model: TrainedModel,
    data: PtychoData,
    payload: InferencePayload | None = None,
    canvas: CanvasGeometry | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[InferenceChunk]:
    """Stream a reconstruction chunk by chunk (for live display and cancellation).

    ``payload`` defaults to ``model.inference_payload()`` (the model's own geometry). The
    groups are split into chunks of ``payload.inference.chunk_size``; after each chunk an
    :class:`InferenceChunk` is yielded, whose ``stitched`` (made when read) is the snapshot so
    far (the plain running average; the last one is the final image, phase-aligned when
    ``payload.inference.phase_alignment``). ``should_stop`` is
    polled before every chunk and ends the stream early when it returns True. The model's
    networks are moved to the device chosen by ``payload.execution.accelerator`` (they stay
    there afterwards).
    """
    timings: dict[str, float] = {}
    for stitcher, done, total, index, n_chunks in _run(
        model, data, payload, canvas, should_stop, timings
    ):
        snapshot = None
        if index == n_chunks - 1:
            snapshot = stitcher.result(should_stop=should_stop)  # phase-aligned when asked
            warn_if_flat(snapshot)
        yield InferenceChunk(stitcher, done, total, index, n_chunks, snapshot)


def reconstruct(
    model: TrainedModel,
    data: PtychoData,
    payload: InferencePayload | None = None,
    canvas: CanvasGeometry | None = None,
) -> InferenceResult:
    """Reconstruct a whole scan; returns the stitched object, backend tag and stage timings."""
    timings: dict[str, float] = {}
    last: Stitcher | None = None
    total = 0
    # Only the final image is wanted: no plain running average beside the aligned one.
    for stitcher, _done, groups_total, _index, _n in _run(
        model, data, payload, canvas, None, timings, previews=False
    ):
        last, total = stitcher, groups_total
    if last is None:  # pragma: no cover - prepare_scan always yields at least one group
        raise RuntimeError("inference produced no groups")
    tic = time.perf_counter()
    stitched = last.result()
    # Phase alignment is reported on its own; "stitch" keeps the splatting and the division.
    timings["align"] = last.alignment_seconds
    timings["stitch"] += time.perf_counter() - tic - last.alignment_seconds
    warn_if_flat(stitched)
    return InferenceResult(
        stitched=stitched, backend=model.backend, timings=timings, n_groups=total
    )
