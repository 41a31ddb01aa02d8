"""The optimisers: Muon's orthogonalised steps, the Adam part against torch's Adam, wiring."""

import copy

import numpy as np
import pytest
import torch
from engine_helpers import tiny_overrides
from lightning.pytorch.callbacks import Callback

from ptychodus_torch_plugin.engine.config import ExecutionConfig
from ptychodus_torch_plugin.engine.inference import CanvasGeometry, reconstruct
from ptychodus_torch_plugin.engine.metrics import scanned_region
from ptychodus_torch_plugin.engine.network import Generator
from ptychodus_torch_plugin.engine.optimizers import MuonWithAdam, build_optimizer, orthogonalize
from ptychodus_torch_plugin.engine.payload import create_training_payload
from ptychodus_torch_plugin.engine.simulate import simulate_dataset
from ptychodus_torch_plugin.engine.training import train


def test_orthogonalize_brings_every_singular_value_near_one():
    generator = torch.Generator().manual_seed(0)
    # a gradient-like matrix: random, with singular values from ~0.1 to ~2.5 of its mean
    matrices = torch.randn(3, 32, 96, generator=generator)
    values = torch.linalg.svdvals(orthogonalize(matrices))
    # the quintic iteration's band: not exact, but every direction moves about as much
    assert values.min() > 0.6 and values.max() < 1.25, values


def test_orthogonalize_evens_out_an_ill_conditioned_matrix():
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(32, 32, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(96, 96, generator=generator))
    matrix = (u @ torch.diag(torch.logspace(-4, 0, 32)) @ v[:32]).unsqueeze(0)
    values = torch.linalg.svdvals(orthogonalize(matrix))[0]
    # five steps lift the weakest directions by orders of magnitude, not all the way to 1
    # (Muon's intent: no direction's step is negligible beside the strongest one's)
    assert values.max() < 1.25, values
    assert float(values.min() / values.max()) > 100 * 1e-4, values
    assert (values > 0.6).sum() >= 16, values  # half the directions are in the band


def test_orthogonalize_refuses_tall_matrices():
    with pytest.raises(ValueError, match=r"m <= n"):
        orthogonalize(torch.randn(1, 9, 4))


def test_the_adam_group_steps_exactly_as_torch_adam():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    mine = MuonWithAdam([], ours, lr=3e-2)
    reference = torch.optim.Adam(theirs, lr=3e-2)
    for step in range(6):
        grads = [torch.randn_like(p) * (step + 1) for p in ours]
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        mine.step()
        reference.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_muon_step_has_the_documented_size_for_every_shape():
    # 0.2 * lr root-mean-square per element, whatever the matrix's shape: one rate for all
    lr = 1e-2
    for shape in [(64, 32, 3, 3), (16, 128, 3, 3), (48, 48)]:
        weight = torch.nn.Parameter(torch.randn(shape))
        before = weight.detach().clone()
        weight.grad = torch.randn(shape)
        MuonWithAdam([weight], [], lr=lr).step()
        rms = float((weight.detach() - before).pow(2).mean().sqrt())
        assert 0.6 * 0.2 * lr < rms < 1.25 * 0.2 * lr, (shape, rms)


def _reference_muon_direction(update: torch.Tensor) -> torch.Tensor:
    """The orthogonalised direction of one update, computed by hand (SVD-free, unbatched)."""
    matrix = update.reshape(update.shape[0], -1)
    tall = matrix.shape[0] > matrix.shape[1]
    x = (matrix.T if tall else matrix) / matrix.norm()
    for _ in range(5):
        gram = x @ x.T
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    return (x.T if tall else x).reshape(update.shape)


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (64, 4, 1, 1)])
def test_two_muon_steps_follow_nesterov_momentum(shape):
    # Step 2's update is g2 + 0.95 * (0.95 * g1 + g2): plain momentum (0.95 * g1 + g2) or a
    # dropped back-transpose for the tall (64, 4) matrix would give another direction
    lr, momentum = 1e-2, 0.95
    generator = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(shape, generator=generator))
    expected = weight.detach().clone()
    optimizer = MuonWithAdam([weight], [], lr=lr, momentum=momentum)
    rows, cols = shape[0], int(np.prod(shape[1:]))
    size = 0.2 * lr * max(rows, cols) ** 0.5
    buffer = torch.zeros(shape)
    for _ in range(2):
        grad = torch.randn(shape, generator=generator)
        weight.grad = grad.clone()
        optimizer.step()
        buffer = momentum * buffer + grad
        expected -= size * _reference_muon_direction(grad + momentum * buffer)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-4, atol=1e-5)


def test_muon_lowers_a_least_squares_loss():
    """Muon's steps have a fixed size, so a decaying rate (as training uses) converges."""
    torch.manual_seed(1)
    target = torch.randn(32, 64)
    inputs = torch.randn(256, 64)
    weight = torch.nn.Parameter(torch.zeros(32, 64))
    optimizer = MuonWithAdam([weight], [], lr=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)

    def loss() -> torch.Tensor:
        return ((inputs @ weight.T - inputs @ target.T) ** 2).mean()

    with torch.no_grad():
        start = float(loss())
    for _ in range(200):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        assert float(loss()) < 0.05 * start


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="weight matrices"):
        MuonWithAdam([torch.nn.Parameter(torch.zeros(4))], [], lr=1e-3)


@pytest.mark.parametrize("gridsize", [1, 2])
@pytest.mark.parametrize("probe_big", [True, False])
def test_hidden_weights_are_the_feature_to_feature_convolutions(gridsize, probe_big):
    payload = create_training_payload(
        tiny_overrides(gridsize=gridsize, probe_big=probe_big, normalization="batch")
    )
    network = Generator(payload.model)
    hidden = {id(p) for p in network.hidden_weights()}
    channels = gridsize**2
    convolutions = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convolutions:
        touches_data = channels in (conv.in_channels, conv.out_channels)
        assert (id(conv.weight) in hidden) != touches_data, conv
    # the input layer and the heads (2 decoders x 1 or 2 heads) are all that is left out
    heads = 2 * (2 if probe_big else 1)
    assert len(hidden) == len(convolutions) - 1 - heads


def test_build_optimizer_gives_every_parameter_to_exactly_one_rule():
    payload = create_training_payload(tiny_overrides(normalization="batch"))
    network = Generator(payload.model)
    optimizer = build_optimizer("muon", network, network, 1e-3)
    assert isinstance(optimizer, MuonWithAdam)
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in network.parameters())
    muon = next(g for g in optimizer.param_groups if g["use_muon"])
    assert {id(p) for p in muon["params"]} == {id(p) for p in network.hidden_weights()}
    assert isinstance(build_optimizer("adam", network, network, 1e-3), torch.optim.Adam)


def test_the_optimizer_setting_is_validated():
    with pytest.raises(ValueError, match=r"ExecutionConfig\.optimizer = 'sgd'.*'adam'.*'muon'"):
        ExecutionConfig(optimizer="sgd")


def test_the_state_dict_resumes_the_same_steps():
    # Lightning checkpoints hold the optimiser's state dict: a resumed run must step as the
    # uninterrupted one would (both the momentum buffers and Adam's moments)
    torch.manual_seed(2)
    network = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    inputs, targets = torch.randn(32, 8), torch.randn(32, 4)

    def step(model, optimizer):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()

    def make(model):
        return MuonWithAdam(
            [model[2].weight], [model[0].weight, model[0].bias, model[2].bias], lr=1e-2
        )

    optimizer = make(network)
    for _ in range(3):
        step(network, optimizer)
    resumed = copy.deepcopy(network)
    resumed_optimizer = make(resumed)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for _ in range(2):
        step(network, optimizer)
        step(resumed, resumed_optimizer)
    for a, b in zip(network.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


class _OptimizerSeen(Callback):
    """Records the optimiser Lightning actually trains with (not what the config says)."""

    def __init__(self) -> None:
        self.seen: list[type] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen = [type(optimizer) for optimizer in trainer.optimizers]


def test_muon_training_reconstructs_the_object():
    # The end-to-end test's scan and settings with Muon: Lightning trains with MuonWithAdam,
    # the loss falls and the amplitude correlates with the ground truth the network never saw.
    data = simulate_dataset(
        object_kind="random", probe_kind="zoneplate", N=32, step=6, nphotons=1e5, seed=0
    )
    payload = create_training_payload(
        tiny_overrides(epochs=8, batch_size=8, learning_rate=2e-3, optimizer="muon")
    )
    observed = _OptimizerSeen()
    result = train(payload, data, callbacks=[observed])
    assert observed.seen == [MuonWithAdam]
    assert result.model.config["optimizer"] == "muon"  # recorded in the archive's config
    losses = [record.train_loss for record in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    height, width = data.object_guess.shape
    stitched = reconstruct(
        result.model, data, canvas=CanvasGeometry(0.0, 0.0, width, height)
    ).stitched
    mask = scanned_region(stitched.weights, erode=4)
    truth = np.abs(data.object_guess[mask])
    correlation = np.corrcoef(np.abs(stitched.object[mask]), truth)[0, 1]
    assert correlation > 0.5, correlation
