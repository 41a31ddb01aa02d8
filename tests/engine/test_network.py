"""Generator shape, channel, activation, border and size invariants."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ptychodus_torch_plugin.engine.config import GridConfig, ModelConfig
from ptychodus_torch_plugin.engine.network import (
    Generator,
    count_parameters,
    encoder_widths,
    flops_per_group,
    upsample_conv3x3,
)


def _config(n=32, gridsize=1, f=1, **kwargs):
    grid = GridConfig(N=n, gridsize=gridsize, neighbor_count=max(4, gridsize * gridsize))
    return ModelConfig(grid=grid, n_filters_scale=f, **kwargs)


def _central_box(n):
    box = torch.zeros(n, n, dtype=torch.bool)
    box[n // 4 : n // 4 + n // 2, n // 4 : n // 4 + n // 2] = True
    return box


@pytest.mark.parametrize("n, gridsize", [(32, 1), (32, 2), (32, 3), (64, 2)])
@pytest.mark.parametrize("probe_big", [True, False])
def test_channels_shapes_and_ranges(n, gridsize, probe_big):
    torch.manual_seed(0)
    config = _config(n, gridsize, probe_big=probe_big)
    c = gridsize * gridsize
    model = Generator(config).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == c == config.in_channels
    heads = [m for name, m in model.named_modules() if name.endswith(("central", "border.3"))]
    assert heads and all(h.out_channels == c == config.out_channels for h in heads)
    with torch.no_grad():
        out = model(torch.rand(2, c, n, n))
        amp, phase = model.amplitude_phase(torch.rand(2, c, n, n))
    assert out.shape == (2, c, n, n) and out.dtype == torch.complex64
    box = _central_box(n)
    assert amp[..., box].min() > 0 and amp.max() < 1  # the sigmoid head's range
    assert phase.abs().max() < math.pi  # the heads' own phase, not angle()'s wrapped one
    if probe_big:
        assert amp[..., ~box].min() > 0  # the border branch fills the outside
    else:
        assert amp[..., ~box].max() == 0  # without probe_big the outside is zero


def test_wrong_input_channels_raise():
    model = Generator(_config(32, 2))
    with pytest.raises(ValueError, match=r"\(B, 4, 32, 32\)"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError):
        model(torch.rand(1, 4, 64, 64))


def test_silu_amplitude_and_amplitude_phase_agree():
    torch.manual_seed(1)
    model = Generator(_config(32, 1, amp_activation="silu")).eval()
    assert isinstance(model.amp_activation, torch.nn.SiLU)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        amp, phase = model.amplitude_phase(x)
        out = model(x)
    torch.testing.assert_close(out, torch.polar(amp, phase))


def test_batch_normalization_follows_every_hidden_convolution():
    """normalization="batch": one BatchNorm2d after each hidden conv, none after the heads."""
    torch.manual_seed(2)
    plain = Generator(_config(32, 2))
    normed = Generator(_config(32, 2, normalization="batch"))
    convs = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in normed.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    heads = [m for name, m in plain.named_modules() if name.endswith(("central", "border.3"))]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert len(norms) == len(convs) - len(heads) > 0

    # Same convolutions (so flops_per_group, which counts them, holds for both).
    def conv_shapes(model):
        return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]

    assert conv_shapes(plain) == conv_shapes(normed)
    x = torch.rand(3, 4, 32, 32)
    normed.train()
    out = normed(x)
    assert out.shape == (3, 4, 32, 32) and out.dtype == torch.complex64
    assert not torch.equal(norms[0].running_mean, torch.zeros_like(norms[0].running_mean))
    normed.eval()  # inference uses the running statistics: a group's output is its own
    with torch.no_grad():
        alone = normed(x[:1])
        together = normed(x)
    torch.testing.assert_close(alone, together[:1], rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_the_convolutions_round_and_the_output_stays_complex64():
    """bf16-mixed: the convolutions compute in bfloat16; the patches come out complex64."""
    torch.manual_seed(3)
    model = Generator(_config(32, 2, normalization="batch")).eval()
    dtypes = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: dtypes.add(out.dtype))
    x = torch.rand(2, 4, 32, 32)
    with torch.no_grad():
        exact = model(x)
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
    assert dtypes == {torch.bfloat16}
    assert mixed.dtype == torch.complex64
    # Rounding inside the network only: the outputs agree to bf16 accuracy, not exactly.
    assert not torch.equal(mixed, exact)
    torch.testing.assert_close(mixed, exact, rtol=0.0, atol=0.05)


def test_half_precision_heads_still_give_complex64_patches(monkeypatch):
    """CUDA's autocast has no float32 rule for torch.polar, so under bf16-mixed the heads'
    bfloat16 reached it there: "Expected both inputs to be Half, Float or Double"."""
    torch.manual_seed(4)
    model = Generator(_config(32, 1)).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        amp, phase = model.amplitude_phase(x)
    for dtype in (torch.bfloat16, torch.float16):
        low = (amp.to(dtype), phase.to(dtype))
        monkeypatch.setattr(model, "amplitude_phase", lambda _inputs, low=low: low)
        with torch.no_grad():
            out = model(x)
        assert out.dtype == torch.complex64
        torch.testing.assert_close(out, torch.polar(low[0].float(), low[1].float()))


def test_default_size_parameters_and_flops():
    config = _config(64, 1, f=2)
    model = Generator(config)
    params = count_parameters(model)
    macs = flops_per_group(config) / 2
    print(f"N=64 f=2 C=1: {params:,} parameters, {macs / 1e9:.3f} GMAC per group")
    assert encoder_widths(64, 2) == (64, 128, 256)
    assert 2.0e6 < params < 2.6e6
    assert 0.7e9 < macs < 0.9e9


@pytest.mark.parametrize(
    "n, gridsize, f, probe_big", [(64, 1, 2, True), (32, 3, 1, False), (128, 2, 1, True)]
)
def test_analytic_flops_match_flop_counter(n, gridsize, f, probe_big):
    config = _config(n, gridsize, f, probe_big=probe_big)
    model = Generator(config).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, config.in_channels, n, n))
    measured = counter.get_total_flops()
    assert abs(flops_per_group(config) - measured) <= 0.05 * measured


def test_gradients_reach_every_parameter():
    torch.manual_seed(2)
    model = Generator(_config(32, 2, probe_big=True))
    out = model(torch.rand(3, 4, 32, 32))
    target = torch.polar(torch.rand(3, 4, 32, 32), torch.rand(3, 4, 32, 32))
    (out - target).abs().square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("out_channels", [1, 4, 9])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_upsample_conv_equals_conv_of_the_upsampled_map(out_channels, channels_last, with_bias):
    """The coarse-resolution form is the same 'same' convolution, borders and gradients too."""
    torch.manual_seed(out_channels)
    x = torch.randn(3, 16, 6, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, 16, 3, 3, requires_grad=True)
    bias = torch.randn(out_channels, requires_grad=True) if with_bias else None
    upsampled = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    expected = torch.nn.functional.conv2d(upsampled, weight, bias, padding=1)
    got = upsample_conv3x3(x, weight, bias)
    assert got.shape == expected.shape == (3, out_channels, 12, 20)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Not equal by accident: a one-pixel shift of the output is a different answer.
    assert not torch.allclose(got, torch.roll(expected, 1, dims=-1), atol=1e-3)
    probe = torch.randn_like(expected)
    wanted = torch.autograd.grad((expected * probe).sum(), [weight])[0]
    obtained = torch.autograd.grad((got * probe).sum(), [weight])[0]
    torch.testing.assert_close(obtained, wanted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("probe_big", [True, False])
@pytest.mark.parametrize("gridsize", [1, 2])
def test_decoders_give_what_their_modules_compute_in_sequence(gridsize, probe_big):
    """The fused decoder forward equals running the declared layers one after another."""
    torch.manual_seed(gridsize)
    model = Generator(_config(32, gridsize, probe_big=probe_big, normalization="batch")).eval()
    features = torch.randn(2, 128, 8, 8)
    for decoder in (model.amplitude_decoder, model.phase_decoder):
        for module in decoder.modules():  # non-trivial running statistics
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            central, border = decoder(features)
            hidden = decoder.body(features)
            torch.testing.assert_close(central, decoder.central(hidden), rtol=1e-5, atol=1e-5)
            if probe_big:
                torch.testing.assert_close(border, decoder.border(hidden), rtol=1e-5, atol=1e-5)
                assert border.shape == (2, gridsize**2, 32, 32)
            else:
                assert border is None
        assert central.shape == (2, gridsize**2, 16, 16)
