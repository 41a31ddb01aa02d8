"""The PtychoPINN generator: diffraction amplitudes (B, C, N, N) -> complex object (B, C, N, N).

Architecture (design note section 5; the layout for N != 64 is our documented choice):

* Encoder: ``log2(N) - 3`` blocks of [3x3 conv, ReLU, 3x3 conv, ReLU, 2x2 max-pool], so the
  bottleneck is always 8 x 8 (N/8 at N=64, N/16 at N=128, as the design fixes for those two
  sizes). Widths double from block to block and end at 128*f (f = ``n_filters_scale``):
  N=32 -> (64, 128)*f, N=64 -> (32, 64, 128)*f, N=128 -> (16, 32, 64, 128)*f,
  N=256 -> (8, 16, 32, 64, 128)*f.
* Two decoders (amplitude, phase), each ``log2(N) - 4`` blocks [conv, ReLU, conv, ReLU, x2
  nearest upsample] mirroring the encoder widths without the last one (N=64: (64, 32)*f;
  N=128: (64, 32, 16)*f; N=32: (64,)*f), taking the 8 x 8 bottleneck back to N/2.
* Heads, per decoder: a central branch (3x3 conv to C at N/2) predicts the central
  N/2 x N/2 box, zero-padded to N; when ``probe_big``, a border branch (3x3 conv + ReLU at N/2,
  x2 upsample, 3x3 conv to C at N) fills everything outside the central box. Without
  ``probe_big`` the object outside the central box is exactly zero (amplitude 0, phase 0).
  Every 3x3 conv that reads a x2-upsampled map (both heads, the border's first conv) is
  computed at the coarse resolution (``upsample_conv3x3``: the same sums, faster on the CPU);
  the modules, and so the state_dict keys, are the ones listed here.
* Amplitude activation sigmoid (default) or SiLU; phase ``pi * tanh``. Output
  ``A * exp(i Phi)`` as complex64.
* ``normalization = "batch"`` (ours, not in the design note; default ``"none"``): a
  BatchNorm2d between every hidden 3x3 conv and its ReLU (not after the heads). Same
  convolutions and FLOPs. Why: on Run1084 it reached the validation NLL that the plain
  network had after 20 epochs in 13 (same learning rate, 2e-3), and trains well at 5e-3
  (docs/performance.md). Inference uses the running statistics, so a group's output does not
  depend on the rest of its batch.

Channel counts come from ``ModelConfig.in_channels`` / ``out_channels`` only (= gridsize**2).
At N=64, f=2, C=1 (probe_big) this has 2,327,108 parameters and 0.80 GMAC per group.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .physics import pad_to

__all__ = [
    "Generator",
    "count_parameters",
    "decoder_widths",
    "encoder_widths",
    "flops_per_group",
    "upsample_conv3x3",
]

_BOTTLENECK_WIDTH = 128  # x f: width of the last encoder block for every N


def encoder_widths(n: int, n_filters_scale: int) -> tuple[int, ...]:
    """Encoder block widths for patch size ``n``: log2(n)-3 blocks doubling up to 128*f."""
    blocks = int(round(math.log2(n))) - 3
    if blocks < 2 or 2 ** (blocks + 3) != n:
        raise ValueError(f"Generator: N = {n} must be a power of two >= 32")
    top = _BOTTLENECK_WIDTH * n_filters_scale
    return tuple(top // 2 ** (blocks - 1 - i) for i in range(blocks))


def decoder_widths(n: int, n_filters_scale: int) -> tuple[int, ...]:
    """Decoder block widths: the encoder widths mirrored, without the bottleneck (8 -> N/2)."""
    return tuple(reversed(encoder_widths(n, n_filters_scale)[:-1]))


def _conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)


# For output row phase a (0: even, 1: odd fine rows), which coarse row offset (-1, 0, +1) each
# 3x3 kernel row (dy = -1, 0, +1) reads after a nearest x2 upsample: [a, coarse offset, dy].
_UPSAMPLED_TAPS = torch.tensor(
    [
        [[1, 0, 0], [0, 1, 1], [0, 0, 0]],
        [[0, 0, 0], [1, 1, 0], [0, 0, 1]],
    ],
    dtype=torch.float32,
)


def upsample_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv2d(upsample_nearest_x2(x), weight, bias, padding=1)``, computed at x's resolution.

    A 3x3 kernel over a nearest-upsampled map reads, for each of the four output phases
    (even/odd row, even/odd column), a 3x3 neighbourhood of the coarse map with some taps
    summed and some zero. So the same sums are one coarse 3x3 convolution with 4x the output
    channels (the phase kernels, derived from ``weight`` on every call so gradients reach it
    as usual) followed by a pixel shuffle. Why: the heads convolve to C = gridsize**2 outputs,
    and oneDNN's convolution with one to four output channels runs an order of magnitude
    below its rate for the hidden layers, in the backward pass most of all; with 4C outputs
    at a quarter of the pixels, and no upsampled map to build, a bf16 training step at N=64,
    gridsize 2 is ~7% faster and a float32 predict 1.1-1.5x (docs/performance.md). The
    multiply-adds are the same in number (the zero taps included).
    """
    out_ch, in_ch = weight.shape[:2]
    taps = _UPSAMPLED_TAPS.to(device=weight.device, dtype=weight.dtype)
    # Broadcast products and sums, not einsum: autocast leaves them alone, so the kernel is
    # summed in the weights' own precision and rounded once by the convolution, as the
    # weights of a plain convolution are (and no autocast context is needed on any device).
    # rows[o, i, a, u, x] = sum_y taps[a, u, y] weight[o, i, y, x]
    rows = (taps[:, :, :, None] * weight[:, :, None, None]).sum(dim=4)
    # kernel[o, i, a, u, b, v] = sum_x taps[b, v, x] rows[o, i, a, u, x]
    kernel = (taps * rows[:, :, :, :, None, None, :]).sum(dim=-1)
    kernel = kernel.permute(0, 2, 4, 1, 3, 5).reshape(out_ch * 4, in_ch, 3, 3)
    phase_bias = bias.repeat_interleave(4) if bias is not None else None
    return nn.functional.pixel_shuffle(nn.functional.conv2d(x, kernel, phase_bias, padding=1), 2)


def _conv_act(in_ch: int, out_ch: int, normalization: str) -> list[nn.Module]:
    """3x3 conv, optional normalisation, ReLU."""
    layers: list[nn.Module] = [_conv(in_ch, out_ch)]
    if normalization == "batch":
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


def _double_conv(in_ch: int, out_ch: int, normalization: str = "none") -> list[nn.Module]:
    return _conv_act(in_ch, out_ch, normalization) + _conv_act(out_ch, out_ch, normalization)


class _Decoder(nn.Module):
    """One decoder (amplitude or phase) with its central and optional border heads.

    Returns pre-activation logits: the central box (B, C, N/2, N/2) and, when ``probe_big``,
    the border map (B, C, N, N).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        n: int,
        n_filters_scale: int,
        probe_big: bool,
        normalization: str = "none",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_ch
        for w in decoder_widths(n, n_filters_scale):
            layers += _double_conv(width, w, normalization)
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            width = w
        self.body = nn.Sequential(*layers)
        self.central = _conv(width, out_ch)
        self.border: nn.Sequential | None = None
        if probe_big:
            self.border = nn.Sequential(
                *_conv_act(width, width, normalization),
                nn.Upsample(scale_factor=2, mode="nearest"),
                _conv(width, out_ch),
            )

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor | None]:
        """What ``self.body`` then the heads compute, each upsample + conv fused.

        The modules stay as declared (so the state_dict keys are unchanged), but every 3x3
        convolution that reads a x2-upsampled map (the central head, the border branch's
        first convolution, the border head) runs at the coarse resolution through
        :func:`upsample_conv3x3` instead of convolving the upsampled map.
        """
        coarse = self.body[:-1](features)  # the body's last layer is its x2 upsample
        central = upsample_conv3x3(coarse, self.central.weight, self.central.bias)
        if self.border is None:
            return central, None
        first, *middle, _upsample, head = self.border
        hidden = upsample_conv3x3(coarse, first.weight, first.bias)
        for layer in middle:  # normalisation (if any) and ReLU at N/2
            hidden = layer(hidden)
        return central, upsample_conv3x3(hidden, head.weight, head.bias)


class Generator(nn.Module):
    """Diffraction amplitudes -> complex object patches (see the module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"Generator expects a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.N = config.grid.N
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        f = config.n_filters_scale

        layers: list[nn.Module] = []
        width = self.in_channels
        for w in encoder_widths(self.N, f):
            layers += _double_conv(width, w, config.normalization)
            layers.append(nn.MaxPool2d(2))
            width = w
        self.encoder = nn.Sequential(*layers)
        norm = config.normalization
        self.amplitude_decoder = _Decoder(
            width, self.out_channels, self.N, f, config.probe_big, norm
        )
        self.phase_decoder = _Decoder(width, self.out_channels, self.N, f, config.probe_big, norm)
        self.amp_activation: nn.Module = (
            nn.Sigmoid() if config.amp_activation == "sigmoid" else nn.SiLU()
        )
        box = pad_to(torch.ones(1, 1, self.N // 2, self.N // 2), self.N).to(torch.bool)
        self.register_buffer("central_box", box, persistent=False)

    def hidden_weights(self) -> list[nn.Parameter]:
        """Weights of the convolutions from hidden features to hidden features.

        Why: ``optimizers.MuonWithAdam`` orthogonalises the updates of exactly these. The
        encoder's first convolution (reading the C input channels) and the output heads
        (writing C channels) are left out: they connect the network to the data, not
        feature to feature, and a few channels make a poor matrix to orthogonalise.
        """
        convolutions = [m for m in self.encoder if isinstance(m, nn.Conv2d)][1:]
        for decoder in (self.amplitude_decoder, self.phase_decoder):
            convolutions += [m for m in decoder.body if isinstance(m, nn.Conv2d)]
            if decoder.border is not None:
                convolutions.append(decoder.border[0])  # its head, border[-1], is an output
        return [c.weight for c in convolutions]

    def _assemble(self, central: Tensor, border: Tensor | None) -> Tensor:
        """Central logits padded to N, with the border branch outside the box when present."""
        padded = pad_to(central, self.N)
        if border is None:
            return padded
        return torch.where(self.central_box, padded, border)

    def amplitude_phase(self, amplitudes: Tensor) -> tuple[Tensor, Tensor]:
        """Real amplitude and phase maps (B, C, N, N); used by the supervised reconstructor."""
        expected = (self.in_channels, self.N, self.N)
        if amplitudes.ndim != 4 or tuple(amplitudes.shape[1:]) != expected:
            raise ValueError(
                f"Generator: input must be (B, {self.in_channels}, {self.N}, {self.N}) "
                f"(C = gridsize**2 normalised amplitudes), got {tuple(amplitudes.shape)}"
            )
        if amplitudes.is_complex():
            raise ValueError("Generator: input must be real amplitudes, got a complex tensor")
        features = self.encoder(amplitudes.to(torch.float32))
        amp_central, amp_border = self.amplitude_decoder(features)
        phase_central, phase_border = self.phase_decoder(features)
        if self.config.probe_big:
            amplitude = self.amp_activation(self._assemble(amp_central, amp_border))
            phase = math.pi * torch.tanh(self._assemble(phase_central, phase_border))
        else:
            # Activate first, then pad: the outside of the central box is exactly zero.
            amplitude = pad_to(self.amp_activation(amp_central), self.N)
            phase = pad_to(math.pi * torch.tanh(phase_central), self.N)
        return amplitude, phase

    def forward(self, amplitudes: Tensor) -> Tensor:
        amplitude, phase = self.amplitude_phase(amplitudes)
        # In float32: under bf16/16-mixed the heads give bfloat16/float16, which torch.polar
        # refuses (bfloat16) or turns into complex32 (float16) wherever autocast has no fp32
        # rule for it - CUDA has none; the CPU's converts.
        return torch.polar(amplitude.float(), phase.float()).to(torch.complex64)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) scalar parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def flops_per_group(config: ModelConfig) -> int:
    """Analytic forward FLOPs of :class:`Generator` for one group (batch 1).

    Counts the 3x3 convolutions only (2 FLOPs per multiply-accumulate, biases, activations,
    pooling and upsampling excluded), which is what ``torch.utils.flop_counter`` reports and
    what dominates the run time. MACs = FLOPs / 2.
    """
    n, f = config.grid.N, config.n_filters_scale
    k2 = 9
    macs = 0
    res, width = n, config.in_channels
    for w in encoder_widths(n, f):
        macs += res * res * k2 * (width * w + w * w)
        res, width = res // 2, w
    per_decoder = 0
    for w in decoder_widths(n, f):
        per_decoder += res * res * k2 * (width * w + w * w)
        res, width = res * 2, w
    per_decoder += res * res * k2 * width * config.out_channels  # central head at N/2
    if config.probe_big:
        per_decoder += res * res * k2 * width * width  # border conv at N/2
        per_decoder += n * n * k2 * width * config.out_channels  # border head at N
    return 2 * (macs + 2 * per_decoder)
