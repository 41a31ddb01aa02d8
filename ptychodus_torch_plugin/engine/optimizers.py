"""Optimisers training can use: Adam, and Muon for the hidden convolutions with Adam for the rest.

Why Muon: the quality line of this product is set by how far training gets within a fixed
number of CPU minutes. Muon (Jordan et al., 2024: momentum whose update matrix is replaced by
the nearest semi-orthogonal matrix, found by a few Newton-Schulz iterations) changes every
direction of a weight matrix by the same amount, where Adam's per-element steps are dominated
by a few large directions. On the Run1084 benchmark it reached in about 50 epochs the Poisson
loss Adam reached after about 110 (docs/performance.md, sixteenth session). It is defined for
weight *matrices*: each hidden 3x3 convolution's weight (out, in, 3, 3) is treated as the
(out, in * 9) matrix it multiplies. The network's first convolution (reading the C input
channels) and its output heads (writing C channels), the biases and the normalisation
parameters keep Adam, as Muon's authors advise: they are not matrices between hidden
features, and for a few channels the orthogonalised update is a poor step.

The step length: the orthogonalised update of an m x n matrix has a root-mean-square element
of 1/sqrt(max(m, n)); scaling it by ``rms_scale * sqrt(max(m, n))`` (0.2, Liu et al., 2025,
"Muon is scalable") gives every matrix an update of the typical size of Adam's, so one
learning rate (and one schedule) serves both parameter groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

#: The quintic Newton-Schulz coefficients of Muon's reference implementation: in five steps
#: they drive the singular values of a norm-1 matrix into roughly [0.7, 1.2], except for
#: directions far weaker than the matrix as a whole (below ~1e-3 of its norm), which are lifted
#: by orders of magnitude but not all the way. That is all the update needs: no direction's step
#: is negligible beside the strongest one's (exact orthogonality would cost more iterations).
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrices: Tensor, steps: int = 5) -> Tensor:
    """Approximately semi-orthogonal matrices nearest to ``matrices`` (B, m, n) with m <= n.

    Batched over B so that the many same-shaped convolutions of the network cost one call.
    """
    if matrices.ndim != 3 or matrices.shape[1] > matrices.shape[2]:
        raise ValueError(f"orthogonalize: expected (B, m, n) with m <= n, got {matrices.shape}")
    a, b, c = NEWTON_SCHULZ
    norms = matrices.flatten(1).norm(dim=1).clamp_min(1e-7).view(-1, 1, 1)
    x = matrices / norms
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x


class MuonWithAdam(torch.optim.Optimizer):
    """Muon for the ``muon_params`` (2-D or more), Adam for the ``adam_params``.

    One optimiser with two parameter groups (``use_muon`` True / False), not two optimisers:
    Lightning's automatic optimisation, its learning-rate schedulers and its checkpoints take
    one optimiser, and every group follows the same ``lr`` so any schedule applies unchanged.
    The Adam part is torch's Adam (no weight decay, no AMSGrad) written out on this class's own
    state, so the state dict holds both parts.
    """

    def __init__(
        self,
        muon_params: Iterable[Tensor],
        adam_params: Iterable[Tensor],
        *,
        lr: float,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        rms_scale: float = 0.2,
        ns_steps: int = 5,
    ) -> None:
        muon, adam = list(muon_params), list(adam_params)
        for p in muon:
            if p.ndim < 2:
                raise ValueError(
                    f"MuonWithAdam: Muon parameters must be weight matrices (2-D or more), "
                    f"got shape {tuple(p.shape)}; pass it among the Adam parameters"
                )
        groups = [{"params": muon, "use_muon": True}, {"params": adam, "use_muon": False}]
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "betas": betas,
            "eps": eps,
            "rms_scale": rms_scale,
            "ns_steps": ns_steps,
        }
        super().__init__([g for g in groups if g["params"]], defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adam_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        momentum = group["momentum"]
        # Same-shaped updates are orthogonalised together, transposed to m <= n.
        pending: dict[tuple[int, int, torch.device], list[tuple[Tensor, bool, Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffer = state["momentum_buffer"]
            buffer.mul_(momentum).add_(p.grad)
            update = p.grad.add(buffer, alpha=momentum)  # Nesterov
            matrix = update.reshape(update.shape[0], -1).float()
            transposed = matrix.shape[0] > matrix.shape[1]
            if transposed:
                matrix = matrix.T
            key = (matrix.shape[0], matrix.shape[1], matrix.device)
            pending.setdefault(key, []).append((p, transposed, matrix))
        for (m, n, _), items in pending.items():
            directions = orthogonalize(torch.stack([u for _, _, u in items]), group["ns_steps"])
            step = group["lr"] * group["rms_scale"] * math.sqrt(max(m, n))
            for direction, (p, transposed, _) in zip(directions, items, strict=True):
                if transposed:
                    direction = direction.T
                p.add_(direction.reshape(p.shape).to(p.dtype), alpha=-step)

    def _adam_step(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = float(state["step"])
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(p.grad, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
            denominator = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**t)).add_(group["eps"])
            p.addcdiv_(exp_avg, denominator, value=-group["lr"] / (1.0 - beta1**t))


def hidden_matrices(network: nn.Module) -> list[Tensor]:
    """The weights Muon trains: those the network lists as hidden, else none.

    A network opts in by defining ``hidden_weights()`` (``network.Generator`` does); anything
    else is trained by Adam entirely, which is always valid.
    """
    lister = getattr(network, "hidden_weights", None)
    return list(lister()) if callable(lister) else []


def build_optimizer(
    name: str, module: nn.Module, network: nn.Module, lr: float
) -> torch.optim.Optimizer:
    """``name`` ("adam" or "muon") for all of ``module``'s parameters.

    ``network`` is the part of ``module`` whose hidden convolutions Muon takes; every other
    trainable parameter of ``module`` goes to Adam.
    """
    parameters = [p for p in module.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name != "muon":  # pragma: no cover - ExecutionConfig validates the name
        raise ValueError(f"optimizer = {name!r} is unknown: allowed 'adam' or 'muon'")
    hidden = [p for p in hidden_matrices(network) if p.requires_grad]
    chosen = {id(p) for p in hidden}
    rest = [p for p in parameters if id(p) not in chosen]
    return MuonWithAdam(hidden, rest, lr=lr)
