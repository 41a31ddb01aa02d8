"""LightningModules: physics-informed (unsupervised) and supervised training of the generator.

Both wrap the same ``Autoencoder`` (generator + forward model) so the archive, inference and
the host see one model type whichever way it was trained. Logged metric names are fixed here
(``train_loss``, ``val_loss``) and are the names checkpointing and early stopping monitor.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from .config import CHECKPOINT_MONITORS
from .model import Autoencoder
from .optimizers import build_optimizer
from .physics import mae_loss, poisson_nll

VAL_LOSS, TRAIN_LOSS = CHECKPOINT_MONITORS  # the metric names config validates monitors against


def _wrapped_phase_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Phase difference wrapped to (-pi, pi], so phases near +-pi compare correctly."""
    return torch.atan2(torch.sin(a - b), torch.cos(a - b))


def cosine_decay(progress: float) -> float:
    """Learning-rate factor of the ``cosine`` schedule after warm-up: 1 at 0, 0.05 from 1 on.

    The 5% floor keeps the last epochs learning. Shared with schedules keyed on other clocks
    (the quality benchmark's wall-time one), so the shape is written once.
    """
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _ReconstructionModule(L.LightningModule):
    """Shared optimiser/scheduler plumbing; subclasses define ``_loss``."""

    def __init__(
        self,
        autoencoder: Autoencoder,
        *,
        learning_rate: float,
        scheduler: str,
        max_epochs: int,
        optimizer: str,
        monitor: str = VAL_LOSS,
    ) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.learning_rate = learning_rate
        self.scheduler_name = scheduler
        self.optimizer_name = optimizer
        self.max_epochs = max_epochs
        self.monitor = monitor

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.generator(inputs)

    def _loss(self, batch: dict[str, torch.Tensor], validation: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        size = batch["inputs"].shape[0]
        # sync_dist: with several devices each sees its own share of the batches; the epoch
        # values the scheduler, checkpoints and history use must be the same on all of them.
        self.log(
            TRAIN_LOSS,
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=size,
            sync_dist=True,
        )
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch, validation=True)
        size = batch["inputs"].shape[0]
        self.log(VAL_LOSS, loss, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(
            self.optimizer_name, self, self.autoencoder.generator, self.learning_rate
        )
        epochs = max(1, self.max_epochs)
        if self.scheduler_name == "constant":
            return optimizer
        if self.scheduler_name == "exponential":
            # Decays to 10% of the initial rate over the run, whatever its length.
            gamma = 0.1 ** (1.0 / epochs)
            scheduler: Any = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
        elif self.scheduler_name == "cosine":
            warmup = max(1, epochs // 10)

            def factor(epoch: int) -> float:
                if epoch < warmup:
                    return (epoch + 1) / warmup
                return cosine_decay((epoch - warmup) / max(1, epochs - warmup))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        elif self.scheduler_name == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=0.5, patience=2
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {
                    "scheduler": scheduler,
                    "monitor": self.monitor,
                    "interval": "epoch",
                },
            }
        else:  # pragma: no cover - ExecutionConfig validates the name
            raise ValueError(f"scheduler = {self.scheduler_name!r} is unknown")
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }


class PINNModule(_ReconstructionModule):
    """Unsupervised: the predicted diffraction must explain the measured diffraction.

    ``val_intensity_scale``: the physics scale ``s`` of a separate test scan. Each scan's
    inputs are normalised on their own (``input_normalization = "recompute"``), so only its
    own ``s`` turns them back into its counts; with the training scan's, a test scan at
    another dose would be scored against counts off by the dose ratio. ``val_bad_pixels``:
    that scan's own detector mask (its bad pixels are zeroed in its inputs; scored with the
    training mask they would count as measured zeros; all False for a scan without one).
    Both default (None) to the training scan's.
    """

    def __init__(
        self,
        autoencoder: Autoencoder,
        *,
        intensity_scale: float,
        loss: str = "poisson",
        bad_pixels: torch.Tensor | None = None,
        val_intensity_scale: float | None = None,
        val_bad_pixels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(autoencoder, **kwargs)
        self.intensity_scale = float(intensity_scale)
        self.val_intensity_scale = (
            self.intensity_scale if val_intensity_scale is None else float(val_intensity_scale)
        )
        self.loss_name = loss
        self.register_buffer("bad_pixels", bad_pixels, persistent=False)
        same = val_bad_pixels is None
        self.register_buffer("val_bad_pixels", bad_pixels if same else val_bad_pixels, False)

    def _loss(self, batch: dict[str, torch.Tensor], validation: bool = False) -> torch.Tensor:
        inputs = batch["inputs"]
        _, predicted = self.autoencoder(inputs, batch["offsets"])
        scale = self.val_intensity_scale if validation else self.intensity_scale
        mask = self.val_bad_pixels if validation else self.bad_pixels
        with torch.autocast(device_type=predicted.device.type, enabled=False):  # fp32 loss
            if self.loss_name == "poisson":
                return poisson_nll(predicted, inputs.float(), scale, mask, full=True)
            return mae_loss(predicted, inputs.float(), mask)


class SupervisedModule(_ReconstructionModule):
    """Supervised: L1 on amplitude and wrapped phase against ground-truth object patches."""

    def _loss(self, batch: dict[str, torch.Tensor], validation: bool = False) -> torch.Tensor:
        amplitude, phase = self.autoencoder.generator.amplitude_phase(batch["inputs"])
        target = batch["targets"]
        amplitude_loss = (amplitude - target.abs()).abs().mean()
        phase_loss = _wrapped_phase_difference(phase, target.angle()).abs().mean()
        return amplitude_loss + phase_loss
