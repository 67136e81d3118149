"""Which processes this run has: one, or the N that ``accelerate launch`` / ``torchrun`` started."""

from __future__ import annotations

import os

import torch
from accelerate import PartialState


def launched_on_cpus() -> bool:
    """Several processes on a machine without GPUs. Accelerate picks gloo for those only when told
    ``cpu=True`` (``accelerate launch --cpu`` sets it; ``torchrun`` does not): without it each process
    would run alone and they would all write the same run directory."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("LOCAL_RANK") is not None
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return launched and not gpu


def processes():
    """Accelerate's process state (a singleton the training loop's Accelerator shares)."""
    return PartialState(cpu=launched_on_cpus())
