"""The trained model as the rest of the product sees it: networks plus everything to use them.

``TrainedModel`` is what training returns, what the archive saves and restores, and what
inference and the Ptychodus host consume. It carries the flat configuration (the payload's
vocabulary), the normalisation constants and the training history, so a model is usable from
the archive alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import SUPPORTED_BACKEND, ExecutionConfig, ModelConfig
from .network import Generator
from .payload import InferencePayload, create_inference_payload, create_training_payload
from .physics import ForwardModel


class Autoencoder(nn.Module):
    """Generator followed by the differentiable physics: diffraction -> object -> diffraction."""

    def __init__(self, generator: Generator, forward_model: ForwardModel) -> None:
        super().__init__()
        self.generator = generator
        self.forward_model = forward_model

    def forward(
        self, inputs: torch.Tensor, offsets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.generator(inputs)
        # The physics and the loss stay in float32 under mixed precision (bf16-mixed,
        # 16-mixed): the network may round, the forward model and the likelihood must not.
        with torch.autocast(device_type=patches.device.type, enabled=False):
            return patches, self.forward_model(patches.to(torch.complex64), offsets)


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of training as the history, the GUI loss plot and the archive keep it."""

    epoch: int
    train_loss: float
    val_loss: float | None
    learning_rate: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "learning_rate": self.learning_rate,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EpochRecord:
        return cls(
            epoch=int(values["epoch"]),
            train_loss=float(values["train_loss"]),
            val_loss=None if values.get("val_loss") is None else float(values["val_loss"]),
            learning_rate=float(values.get("learning_rate", 0.0)),
            seconds=float(values.get("seconds", 0.0)),
        )


@dataclass(eq=False)
class TrainedModel:
    """A generator with its physics, configuration, normalisation and history."""

    autoencoder: Autoencoder
    config: dict[str, Any]  # flat payload vocabulary (TrainingPayload.to_flat())
    input_scale: float  # a of the training data (reused with input_normalization="stored")
    intensity_scale: float  # s of the training data
    nphotons: float
    history: list[EpochRecord] = field(default_factory=list)
    training_device: str = "cpu"
    backend: str = SUPPORTED_BACKEND
    #: With probe refinement: the probe the refinement started from (the training scan's),
    #: (modes, N, N) complex64, so that the refined probe is handed back only to that scan.
    starting_probe: np.ndarray | None = None
    #: (width, height) of the training scan's object pixels in metres, when its source said:
    #: a scan of another sampling gets a warning at inference
    pixel_size_m: tuple[float, float] | None = None

    @property
    def generator(self) -> Generator:
        return self.autoencoder.generator  # type: ignore[return-value]

    @property
    def probe(self) -> np.ndarray:
        """The normalised probe the model was trained with, (modes, N, N) complex64."""
        return self.autoencoder.forward_model.probe.detach().cpu().numpy()

    @property
    def probe_refined(self) -> bool:
        """Whether :attr:`probe` was fitted to the training data (``probe_refinement_epochs``).

        The rule is ``TrainingConfig.refines_probe``; archives written before the setting
        existed have no key, which reads as the default 0: not refined.
        """
        return create_training_payload(self.config, check_environment=False).training.refines_probe

    def kept_weights(self, epoch: int | None) -> str:
        """Which epoch's weights training handed over, for messages ("the best epoch's (3)").

        ``final_weights`` decides: the best epoch by the monitored metric, or the last one;
        a message that always said "best" would be wrong for the quality settings ("last").
        """
        which = "last" if self.config.get("final_weights") == "last" else "best"
        return f"the {which} epoch's weights (epoch {epoch})"

    @property
    def model_config(self) -> ModelConfig:
        return create_training_payload(self.config, check_environment=False).model

    @property
    def N(self) -> int:  # noqa: N802 - N is the project-wide symbol for the patch size
        return int(self.config["N"])

    @property
    def gridsize(self) -> int:
        return int(self.config["gridsize"])

    @property
    def epochs_trained(self) -> int:
        return len(self.history)

    def inference_payload(self, overrides: dict[str, Any] | None = None) -> InferencePayload:
        """Inference configs with this model's geometry unless explicitly overridden."""
        return create_inference_payload(overrides, archived=self.config)

    @classmethod
    def build(
        cls,
        config: dict[str, Any],
        probe: np.ndarray,
        *,
        input_scale: float,
        intensity_scale: float,
        nphotons: float,
        history: list[EpochRecord] | None = None,
        training_device: str = "cpu",
    ) -> TrainedModel:
        """A fresh (untrained) model for ``config``; the archive loads weights into it."""
        payload = create_training_payload(config, check_environment=False)
        generator = Generator(payload.model)
        forward_model = ForwardModel.from_config(
            payload.model, probe, probe_scale=payload.data.probe_scale
        )
        return cls(
            autoencoder=Autoencoder(generator, forward_model),
            config=dict(config),
            input_scale=float(input_scale),
            intensity_scale=float(intensity_scale),
            nphotons=float(nphotons),
            history=list(history or []),
            training_device=training_device,
        )

    def predict(
        self,
        inputs: np.ndarray | torch.Tensor,
        batch_size: int = ExecutionConfig.inference_batch_size,
    ) -> np.ndarray:
        """Object patches (G, C, N, N) complex64 for normalised inputs (G, C, N, N).

        Runs in channels-last memory format, which lets oneDNN's convolutions run about 1.7x
        faster on CPUs (measured in benchmarks/speed.py); results are the same up to float
        rounding. The layout change happens outside inference mode: parameters re-laid out
        inside it would become inference tensors, and training the model again afterwards
        would fail.
        """
        generator = self.generator
        generator.eval()
        generator.to(memory_format=torch.channels_last)
        return self._predict_channels_last(inputs, batch_size)

    @torch.inference_mode()
    def _predict_channels_last(
        self, inputs: np.ndarray | torch.Tensor, batch_size: int
    ) -> np.ndarray:
        generator = self.generator
        device = next(generator.parameters()).device
        tensor = torch.as_tensor(inputs)
        out = []
        for start in range(0, tensor.shape[0], batch_size):
            chunk = tensor[start : start + batch_size].to(device, torch.float32)
            out.append(generator(chunk.contiguous(memory_format=torch.channels_last)).cpu())
        if not out:
            return np.zeros((0, *tensor.shape[1:]), np.complex64)
        return torch.cat(out).contiguous().numpy()
