"""A divergence on cue, for the engine, host and GUI tests of what a NaN loss does."""

import torch
from lightning.pytorch.callbacks import Callback


class PoisonWeights(Callback):
    """Writes NaN into the first weight before batch ``batch`` of epoch ``epoch`` (1-based).

    The loss of that batch is NaN, and its optimiser step spreads NaN into every weight, as a
    learning rate far too high does after a few steps.
    """

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, idx):
        if (trainer.current_epoch + 1, idx + 1) == (self.epoch, self.batch):
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


class PoisonInputs(Callback):
    """Makes batch ``batch`` of epoch ``epoch`` (1-based) all NaN: its loss is NaN, the weights
    are untouched until the optimiser steps on its gradients."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, idx):
        if (trainer.current_epoch + 1, idx + 1) == (self.epoch, self.batch):
            batch["inputs"].fill_(float("nan"))


class SkipNonFiniteSteps(Callback):
    """Zeroes non-finite gradients before the step, as a float16 gradient scaler skips them."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for parameter in pl_module.parameters():
            if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
                parameter.grad.zero_()


def make_training_diverge(monkeypatch, epoch: int, batch: int) -> None:
    """Make every ``train`` the CLI, the host and the GUI start diverge at (epoch, batch).

    They look ``train`` up in ``engine.training`` when they run, so patching it there reaches
    them all; the callbacks a caller passes (the GUI's prompt stop) are kept. Patching again
    replaces the first patch (it always wraps the original).
    """
    import ptychodus_torch_plugin.engine.training as training

    original = getattr(training.train, "original", training.train)

    def diverging(*args, callbacks=(), **kwargs):
        poison = PoisonWeights(epoch, batch)
        return original(*args, callbacks=[*callbacks, poison], **kwargs)

    diverging.original = original
    monkeypatch.setattr(training, "train", diverging)
