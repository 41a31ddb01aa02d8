"""From ``ExecutionConfig.accelerator`` to hardware, in one place for training and inference.

An explicit request for hardware that is missing fails loudly instead of silently running on
the CPU (a trap of the reference's command line).
"""

from __future__ import annotations

import torch

from .config import ACCELERATORS


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_accelerator(accelerator: str) -> str:
    """Lightning's accelerator name ('gpu' -> 'cuda'); missing requested hardware raises."""
    if accelerator not in ACCELERATORS:
        raise ValueError(
            f"accelerator = {accelerator!r} is invalid: allowed "
            + ", ".join(repr(a) for a in ACCELERATORS)
        )
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"accelerator = {accelerator!r} was requested but no CUDA GPU is available to "
            f"PyTorch (torch {torch.__version__}): use accelerator 'auto' or 'cpu', or "
            "install a CUDA build of torch"
        )
    if accelerator == "mps" and not _mps_available():
        raise RuntimeError(
            "accelerator = 'mps' was requested but Apple MPS is not available: use "
            "accelerator 'auto' or 'cpu'"
        )
    return "cuda" if accelerator == "gpu" else accelerator


def select_device(accelerator: str) -> torch.device:
    """The torch device for inference: 'auto' prefers CUDA, then MPS, then the CPU."""
    name = resolve_accelerator(accelerator)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    return torch.device(name)
