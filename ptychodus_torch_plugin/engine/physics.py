"""Differentiable ptychography physics: shifts, overlap constraint, far field, losses, scales.

Conventions (binding for the whole engine, see ``design/PTYCHOPINN.md`` sections 2, 3 and 6):

* Patch pixel ``j`` (0..N-1) of a pattern measured at probe position ``x`` samples object
  coordinate ``x - N/2 + j`` (rows likewise with ``y``). The centre pixel ``N//2`` of a patch is
  therefore the probe position, and every pad/crop here keeps pixel ``size//2`` as the centre.
* Offsets are ``r_c = position_c - group centroid`` in ``(x, y)`` order, ``x`` = column (right),
  ``y`` = row (down). "Translate by r" moves content by ``+r``:
  ``output[y, x] = input[y - r_y, x - r_x]`` (bilinear for fractional r, zero outside).
* Object patches are complex64 ``(B, C, N, N)``; offsets float32 ``(B, C, 2)``; amplitudes are
  float32 ``(B, C, N, N)`` with zero frequency at the array centre (fftshifted).

Everything is vectorised over the batch and channels: no Python loop per patch, so the same
code serves training on a GPU and tests on a laptop CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .config import ModelConfig
from .data import mean_pattern_power

__all__ = [
    "ForwardModel",
    "center_crop",
    "disk_mask",
    "exit_waves",
    "far_field_amplitude",
    "input_normalization_factor",
    "intensity_scale",
    "mae_loss",
    "merge_and_reextract",
    "normalize_probe",
    "pad_to",
    "poisson_nll",
    "predicted_amplitude",
    "translate",
]

# ---------------------------------------------------------------------------------------------
# Geometry: sub-pixel translation, centred pad and crop
# ---------------------------------------------------------------------------------------------


def _shift_along(
    images: Tensor, shift: Tensor, dim: int, out_len: int | None = None, start: int = 0
) -> Tensor:
    """Shift ``images`` (B, C, H, W) along ``dim`` (2 = rows, 3 = columns) by ``shift`` (B, C).

    Exact separable linear interpolation: with ``shift = n + t`` (n integer, 0 <= t < 1),
    ``out[i] = (1 - t) * in[i + start - n] + t * in[i + start - n - 1]`` for
    ``i = 0 .. out_len - 1``; samples outside the input read as zero. ``start`` and
    ``out_len`` (default: the input length) let one call pad or crop as it shifts, so a
    centred pad (``start < 0``) or crop (``start > 0``) never materialises the larger array.
    For an integer shift ``t == 0`` exactly, so the result is an exact copy (no resampling
    error), which ``grid_sample`` cannot guarantee because of its coordinate normalisation.
    The gradient with respect to ``shift`` flows through ``t`` (``floor`` is locally constant),
    which is the derivative of the piecewise-linear interpolant.

    Cost: one gather of ``out_len + 1`` samples per line; both taps are slices of it, and the
    zero fill outside the input is folded into the two (B, C, out_len) tap weights, so the
    full-size arrays are touched four times (gather, two products, sum).
    """
    length = images.shape[dim]
    out_len = length if out_len is None else out_len
    whole = torch.floor(shift)
    frac = (shift - whole).to(images.real.dtype if images.is_complex() else images.dtype)
    base = torch.arange(out_len + 1, device=images.device).view(1, 1, out_len + 1)
    src = base + (start - 1) - whole.to(torch.long).unsqueeze(-1)  # (B, C, out_len + 1)
    valid = ((src >= 0) & (src < length)).to(frac.dtype)
    frac = frac.unsqueeze(-1)
    w_low = frac * valid[..., :-1]  # weight of in[i + start - n - 1]
    w_high = (1.0 - frac) * valid[..., 1:]  # weight of in[i + start - n]
    batch, channels = images.shape[:2]
    if dim == 3:
        index = src.clamp(0, length - 1).view(batch, channels, 1, out_len + 1)
        index = index.expand(batch, channels, images.shape[2], out_len + 1)
        taps = torch.gather(images, 3, index)
        w_low = w_low.view(batch, channels, 1, out_len)
        w_high = w_high.view(batch, channels, 1, out_len)
        return w_high * taps[..., 1:] + w_low * taps[..., :-1]
    index = src.clamp(0, length - 1).view(batch, channels, out_len + 1, 1)
    index = index.expand(batch, channels, out_len + 1, images.shape[3])
    taps = torch.gather(images, 2, index)
    w_low = w_low.view(batch, channels, out_len, 1)
    w_high = w_high.view(batch, channels, out_len, 1)
    return w_high * taps[..., 1:, :] + w_low * taps[..., :-1, :]


def translate(images: Tensor, shifts: Tensor) -> Tensor:
    """Translate each image by its own ``(dx, dy)`` shift, content moving by ``+shift``.

    ``images`` (B, C, H, W) real or complex; ``shifts`` (B, C, 2) in pixels, ``(x, y)`` order.
    ``output[y, x] = input[y - dy, x - dx]``, bilinear for sub-pixel shifts, zero fill.
    Integer shifts are exact copies. Differentiable in both ``images`` and ``shifts``.
    """
    if images.ndim != 4:
        raise ValueError(f"translate: images must be (B, C, H, W), got shape {tuple(images.shape)}")
    expected = (images.shape[0], images.shape[1], 2)
    if tuple(shifts.shape) != expected:
        raise ValueError(
            f"translate: shifts must have shape {expected} (dx, dy per image), "
            f"got {tuple(shifts.shape)}"
        )
    shifts = shifts.to(device=images.device)
    out = _shift_along(images, shifts[..., 0], dim=3)
    return _shift_along(out, shifts[..., 1], dim=2)


def pad_to(images: Tensor, size: int) -> Tensor:
    """Zero-pad the last two dims from ``n`` to ``size`` keeping pixel ``n//2`` at ``size//2``.

    Keeping the centre index (not just "equal margins") is what makes pad and crop agree with
    the patch convention for every parity: the probe position is always pixel ``size//2``.
    """
    h, w = images.shape[-2:]
    if size < h or size < w:
        raise ValueError(f"pad_to: size {size} is smaller than the input {h}x{w}")
    top, left = size // 2 - h // 2, size // 2 - w // 2
    pad = (left, size - w - left, top, size - h - top)
    if images.is_complex():
        real = torch.nn.functional.pad(images.real, pad)
        imag = torch.nn.functional.pad(images.imag, pad)
        return torch.complex(real, imag)
    return torch.nn.functional.pad(images, pad)


def center_crop(images: Tensor, size: int) -> Tensor:
    """Crop the last two dims to ``size`` around pixel ``n//2`` (the inverse of :func:`pad_to`)."""
    h, w = images.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"center_crop: size {size} is larger than the input {h}x{w}")
    top, left = h // 2 - size // 2, w // 2 - size // 2
    return images[..., top : top + size, left : left + size]


def _central_box(n: int, size: int, device: torch.device | None = None) -> Tensor:
    """Float (n, n) indicator of the central ``size`` box, centred like :func:`pad_to`."""
    return pad_to(torch.ones(1, 1, size, size, device=device), n)[0, 0]


# ---------------------------------------------------------------------------------------------
# Overlap constraint (section 6.2)
# ---------------------------------------------------------------------------------------------


#: Merge weight of a patch's border (outside its central N/2 box) when the network predicts
#: one (probe_big). Small, so a central prediction dominates wherever one exists, yet non-zero,
#: so illuminated object outside every central box is still represented: real probes spill
#: out of the N/2 box (28% of the Run1084 probe's energy lies outside it), and a zero object
#: there would make the measured diffraction impossible to fit at gridsize > 1.
BORDER_MERGE_WEIGHT = 0.01


def merge_and_reextract(
    patches: Tensor, offsets: Tensor, eps: float = 1e-6, border_weight: float = 0.0
) -> Tensor:
    """Enforce that the C patches of a group are views of one object (the overlap constraint).

    Each patch is padded to a canvas of side S centred on the group centroid, translated by
    ``+r_c``, and the central N/2 box of each (the part the network is trusted to predict) is
    averaged: ``O = sum_c w_c T(O_c) / sum_c w_c`` with ``w_c`` the translated box
    indicator; pixels no box covers are zero. Every channel is then re-extracted by translating
    the merged canvas by ``-r_c`` and centre-cropping to N.

    Sub-pixel care: bilinear translate then translate back is a blur, not an identity. The
    canvas frame is internal, so per group and axis it is moved by a common sub-pixel amount
    ``delta`` (the fractional part of channel 0's offset) and the shifts actually applied are
    ``r_c - delta``. When all positions of a group share their sub-pixel part (the usual case:
    integer scan positions, fractional centroid) every applied shift is an integer and the
    round trip is exact; otherwise interpolation is unavoidable and is what it is.
    The canvas side follows the design rule on the applied shifts:
    S = smallest even >= N/2 + 2*ceil(max|shift|) and >= N, so no box is ever clipped.

    ``border_weight`` > 0 also merges each patch's border (outside its central box) with that
    weight (see ``BORDER_MERGE_WEIGHT``); the canvas then grows to N + 2*ceil(max|shift|) so no
    border is clipped. Consistent patches still come back unchanged.

    For C == 1 there is nothing to constrain and the input is returned unchanged.

    Implementation: the pads and the final crop are folded into the resampling (only the
    pixels kept are computed) and the weights are translated as 1-D profiles; the result equals
    the formula above written with ``pad_to`` / ``translate`` / ``center_crop`` (a test pins
    it). At gridsize 2, batch 16, N = 64 this made a bf16 training step 1.25x faster on CPU.
    """
    if patches.ndim != 4 or patches.shape[-1] != patches.shape[-2]:
        raise ValueError(
            f"merge_and_reextract: patches must be (B, C, N, N), got {tuple(patches.shape)}"
        )
    batch, channels, n, _ = patches.shape
    if tuple(offsets.shape) != (batch, channels, 2):
        raise ValueError(
            f"merge_and_reextract: offsets must be {(batch, channels, 2)}, got "
            f"{tuple(offsets.shape)}"
        )
    if channels == 1:
        return patches
    offsets = offsets.to(device=patches.device, dtype=torch.float32)
    ref = offsets[:, :1, :]
    delta = ref - torch.round(ref)
    shifts = offsets - delta
    max_shift = float(shifts.detach().abs().max()) if shifts.numel() else 0.0
    margin = 2 * math.ceil(max_shift - 1e-6)
    side = max(n, n // 2 + margin, n + margin if border_weight > 0 else 0)
    side += side % 2

    top = side // 2 - n // 2  # where pad_to puts a patch's pixel 0 on the canvas

    # translate(pad_to(patches, side), shifts), without building the padded array
    canvas = _shift_along(patches, shifts[..., 0], 3, side, -top)
    canvas = _shift_along(canvas, shifts[..., 1], 2, side, -top)
    weights = _translated_box_weights(n, side, shifts, border_weight, patches.device)
    total = weights.sum(dim=1, keepdim=True)
    merged = (weights * canvas).sum(dim=1, keepdim=True) / total.clamp_min(eps)
    merged = torch.where(total > eps, merged, torch.zeros_like(merged))
    # center_crop(translate(merged, -shifts), n), resampling only the N x N that is kept
    out = _shift_along(merged.expand(batch, channels, side, side), -shifts[..., 1], 2, n, top)
    return _shift_along(out, -shifts[..., 0], 3, n, top)


def _translated_box_weights(
    n: int, side: int, shifts: Tensor, border_weight: float, device: torch.device
) -> Tensor:
    """Merge weights (B, C, side, side): ``translate(pad_to(box, side), shifts)``, separably.

    The weight map ``box + border_weight * (1 - box)`` is a sum of two outer products of 1-D
    profiles (the central N/2 box, and all ones), and the bilinear translation is separable,
    so translating the four short profiles and multiplying them gives exactly the translated
    map at the cost of one full-size product instead of a 2-D resampling and its gradient.
    """
    batch, channels = shifts.shape[:2]
    top = side // 2 - n // 2
    box = _central_box(n, n // 2, device=device)[n // 2]  # its centre row: the 1-D profile

    def along_x(profile: Tensor) -> Tensor:  # (B, C, 1, side)
        rows = profile.view(1, 1, 1, n).expand(batch, channels, 1, n)
        return _shift_along(rows, shifts[..., 0], 3, side, -top)

    def along_y(profile: Tensor) -> Tensor:  # (B, C, side, 1)
        cols = profile.view(1, 1, n, 1).expand(batch, channels, n, 1)
        return _shift_along(cols, shifts[..., 1], 2, side, -top)

    weights = along_y(box) * along_x(box)
    if border_weight > 0:
        ones = torch.ones(n, device=device)
        weights = (1.0 - border_weight) * weights + border_weight * (along_y(ones) * along_x(ones))
    return weights


# ---------------------------------------------------------------------------------------------
# Probe and far field
# ---------------------------------------------------------------------------------------------


def disk_mask(n: int, radius: float | None = None, device: torch.device | None = None) -> Tensor:
    """Hard disk (n, n) bool of ``radius`` (default n/4) centred on pixel ``(n//2, n//2)``."""
    radius = n / 4 if radius is None else radius
    coords = torch.arange(n, device=device, dtype=torch.float32) - n // 2
    return coords.view(-1, 1) ** 2 + coords.view(1, -1) ** 2 <= radius**2


def normalize_probe(probe: Tensor, probe_scale: float = 4.0) -> Tensor:
    """``P / (probe_scale * mean_{NxN}(|P_mode0 * D|))``, D the hard disk of radius N/4.

    This is the single place the probe is normalised (section 2.3): :class:`ForwardModel` calls
    it when it is built, and nothing else rescales the probe. The operation is idempotent
    (a normalised probe has ``mean |P D| = 1/probe_scale`` and maps to itself), so a probe read
    back from a model archive may safely pass through it again. For a (modes, N, N) stack all
    modes share the factor of mode 0, preserving their relative powers.
    """
    if probe.ndim not in (2, 3) or probe.shape[-1] != probe.shape[-2]:
        raise ValueError(
            f"normalize_probe: probe must be (N, N) or (modes, N, N), got {tuple(probe.shape)}"
        )
    if probe_scale <= 0:
        raise ValueError(f"normalize_probe: probe_scale = {probe_scale!r} must be > 0")
    probe = probe.to(torch.complex64)
    mode0 = probe if probe.ndim == 2 else probe[0]
    disk = disk_mask(probe.shape[-1], device=probe.device)
    norm = (mode0.abs() * disk).mean()
    if float(norm) <= 0:
        raise ValueError(
            "probeGuess: the probe is zero inside the patch's central disk (radius N/4), which "
            "it must illuminate: centre the probe in its array (numpy.fft.fftshift if it was "
            "stored shifted), or use the scan's own probe"
        )
    return probe / (probe_scale * norm)


def far_field_amplitude(exit_waves: Tensor) -> Tensor:
    """``|fftshift(fft2(psi, norm='ortho'))|`` over the last two dims.

    Orthonormal scaling makes the transform unitary (Parseval holds), so the physics scale s
    alone relates network units to photon counts; fftshift puts zero frequency at the centre
    like the measured patterns.
    """
    spectrum = torch.fft.fft2(exit_waves, norm="ortho")
    return torch.fft.fftshift(spectrum, dim=(-2, -1)).abs()


def exit_waves(object_patches: Tensor, probe: Tensor) -> Tensor:
    """Exit waves ``O * P``: (B, C, N, N) for a (N, N) probe, (B, C, modes, N, N) for a stack."""
    if probe.ndim == 2:
        return object_patches * probe
    if probe.ndim == 3:
        return object_patches.unsqueeze(-3) * probe
    raise ValueError(f"exit_waves: probe must be (N, N) or (modes, N, N), got {tuple(probe.shape)}")


def predicted_amplitude(object_patches: Tensor, probe: Tensor) -> Tensor:
    """Far-field amplitude (B, C, N, N) of ``object_patches`` under ``probe``.

    Incoherent probe modes add in intensity, not amplitude, so several modes give
    ``sqrt(sum_modes |F(O P_m)|^2)``. The square root's argument is clamped away from zero so
    its gradient stays finite at dark pixels (the clamp is ~1e-15 in amplitude, far below one
    photon).
    """
    if probe.ndim == 3 and probe.shape[0] == 1:
        probe = probe[0]
    if probe.ndim == 2:
        return far_field_amplitude(exit_waves(object_patches, probe))
    intensity = far_field_amplitude(exit_waves(object_patches, probe)).square().sum(dim=-3)
    return torch.sqrt(intensity.clamp_min(1e-30))


class ForwardModel(torch.nn.Module):
    """Object patches + offsets -> predicted diffraction amplitudes (section 6, amplitude mode).

    Holds the normalised probe as a complex64 (modes, N, N) buffer, so it moves with the module
    between devices and is saved in its state dict. The probe given here is normalised by
    :func:`normalize_probe` (the one place; idempotent, so an already-normalised probe is fine).
    """

    probe: Tensor
    probe_mask: Tensor | None

    def __init__(
        self,
        probe: Tensor | np.ndarray,
        gridsize: int = 1,
        object_big: bool = True,
        probe_scale: float = 4.0,
        probe_mask: Tensor | np.ndarray | None = None,
        border_weight: float = 0.0,
    ) -> None:
        super().__init__()
        probe_t = torch.as_tensor(np.asarray(probe) if not isinstance(probe, Tensor) else probe)
        probe_t = normalize_probe(probe_t.to(torch.complex64), probe_scale)
        if probe_t.ndim == 2:
            probe_t = probe_t.unsqueeze(0)
        self.register_buffer("probe", probe_t.contiguous())
        if probe_mask is not None:
            mask_t = torch.as_tensor(
                np.asarray(probe_mask) if not isinstance(probe_mask, Tensor) else probe_mask
            ).to(torch.float32)
            if tuple(mask_t.shape) != tuple(probe_t.shape[-2:]):
                raise ValueError(
                    f"ForwardModel: probe_mask must be {tuple(probe_t.shape[-2:])}, "
                    f"got {tuple(mask_t.shape)}"
                )
            self.register_buffer("probe_mask", mask_t)
        else:
            self.probe_mask = None
        self.gridsize = int(gridsize)
        self.object_big = bool(object_big)
        self.probe_scale = float(probe_scale)
        self.border_weight = float(border_weight)

    @classmethod
    def from_config(
        cls, config: ModelConfig, probe: Tensor | np.ndarray, probe_scale: float = 4.0
    ) -> ForwardModel:
        """Build from a ``ModelConfig`` (gridsize and object_big taken from it)."""
        return cls(
            probe,
            gridsize=config.grid.gridsize,
            object_big=config.object_big,
            probe_scale=probe_scale,
            border_weight=BORDER_MERGE_WEIGHT if config.probe_big else 0.0,
        )

    @property
    def channels(self) -> int:
        return self.gridsize * self.gridsize

    @property
    def N(self) -> int:  # noqa: N802 - N is the project-wide symbol for the patch size
        return int(self.probe.shape[-1])

    def forward(self, object_patches: Tensor, offsets: Tensor | None = None) -> Tensor:
        if object_patches.ndim != 4 or object_patches.shape[1] != self.channels:
            raise ValueError(
                f"ForwardModel: object patches must be (B, {self.channels}, {self.N}, {self.N}) "
                f"for gridsize {self.gridsize}, got {tuple(object_patches.shape)}"
            )
        if tuple(object_patches.shape[-2:]) != (self.N, self.N):
            raise ValueError(
                f"ForwardModel: patch size {tuple(object_patches.shape[-2:])} does not match "
                f"the probe size {self.N}"
            )
        patches = object_patches
        if self.channels > 1 and self.object_big:
            if offsets is None:
                raise ValueError("ForwardModel: offsets are required when gridsize > 1")
            patches = merge_and_reextract(patches, offsets, border_weight=self.border_weight)
        probe = self.probe if self.probe_mask is None else self.probe * self.probe_mask
        return predicted_amplitude(patches, probe)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def _good_pixels(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """Float weight 1 for good pixels, 0 for bad ones (``mask`` True = bad), broadcastable."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=like.device).to(torch.bool)
    return (~mask).to(like.dtype)


def poisson_nll(
    pred_amp: Tensor,
    measured_amp: Tensor,
    intensity_scale: float | Tensor,
    mask: Tensor | None = None,
    eps: float = 1e-12,
    *,
    full: bool = False,
) -> Tensor:
    """Per-pattern Poisson negative log-likelihood (by default without the constant ``log k!``).

    ``full=True`` adds ``log k!`` (no gradient, same optimum): the result is then exactly
    ``-log P(k | lam)``, never negative, which is what the logs and the host's log-scale loss
    plot show.

    Rate ``lam = (s*pred)^2`` and counts ``k = (s*measured)^2``; per pixel ``lam - k*log(lam+eps)``.
    Bad pixels (``mask`` True, shape (N, N) or broadcastable to the amplitudes) contribute
    nothing. The sum over pixels and channels is averaged over groups and divided by C, i.e. it
    is the mean over patterns of each pattern's NLL, so values compare across batch sizes and
    gridsizes.
    """
    if pred_amp.shape != measured_amp.shape:
        raise ValueError(
            f"poisson_nll: prediction {tuple(pred_amp.shape)} and measurement "
            f"{tuple(measured_amp.shape)} differ in shape"
        )
    lam = (intensity_scale * pred_amp).square()
    counts = (intensity_scale * measured_amp).square()
    per_pixel = lam - counts * torch.log(lam + eps)
    if full:
        per_pixel = per_pixel + torch.lgamma(counts.detach() + 1.0)
    good = _good_pixels(mask, per_pixel)
    if good is not None:
        per_pixel = per_pixel * good
    per_pattern = per_pixel.sum(dim=(-2, -1))
    return per_pattern.mean()


def mae_loss(pred_amp: Tensor, measured_amp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean absolute amplitude error over good pixels (``mask`` True = bad)."""
    if pred_amp.shape != measured_amp.shape:
        raise ValueError(
            f"mae_loss: prediction {tuple(pred_amp.shape)} and measurement "
            f"{tuple(measured_amp.shape)} differ in shape"
        )
    error = (pred_amp - measured_amp).abs()
    good = _good_pixels(mask, error)
    if good is None:
        return error.mean()
    good = good.expand_as(error)
    return (error * good).sum() / good.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# Normalisation constants (section 2)
# ---------------------------------------------------------------------------------------------


def _mean_pattern_power(amplitudes: Tensor | np.ndarray) -> tuple[float, int]:
    """(mean total power per pattern, N), via ``data.mean_pattern_power`` (chunked float64)."""
    if isinstance(amplitudes, Tensor):
        amplitudes = amplitudes.detach().cpu().numpy()
    values = np.asarray(amplitudes)
    if np.iscomplexobj(values):
        raise ValueError("normalisation expects real amplitudes, got a complex array")
    return mean_pattern_power(values), values.shape[-1]


def input_normalization_factor(amplitudes: Tensor | np.ndarray) -> float:
    """``a = sqrt((N/2)^2 / mean_m sum_hw x_m^2)`` for raw amplitudes ``x`` (..., N, N).

    Scales the network input so a pattern's total power is (N/2)^2 whatever the dose; computed
    in float64 so large counts do not lose precision.
    """
    power, n = _mean_pattern_power(amplitudes)
    if power <= 0:
        raise ValueError(
            "diff3d: the patterns are all zero on their good pixels, so there is nothing to "
            "learn or reconstruct: check the data file and the bad-pixel mask"
        )
    return math.sqrt((n / 2) ** 2 / power)


def intensity_scale(normalized_amplitudes: Tensor | np.ndarray, nphotons: float) -> float:
    """``s = sqrt(nphotons / mean_m sum_hw X_m^2)`` for normalised amplitudes ``X``.

    Maps network-unit amplitudes back to photon counts for the Poisson loss only.
    """
    if not nphotons > 0:
        raise ValueError(f"intensity_scale: nphotons = {nphotons!r} must be > 0")
    power, _ = _mean_pattern_power(normalized_amplitudes)
    if power <= 0:
        raise ValueError("intensity_scale: the patterns are all zero")
    return math.sqrt(nphotons / power)
