"""Stopping on divergence: a non-finite loss or non-finite weights end training with a clear error
instead of a model full of NaN reported as done."""

from __future__ import annotations

import math

import torch

from obliviate.errors import UserError


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite; the message names the step and the fix."""


def _advice(lr: float) -> str:
    return f"lower the learning rate (lr={lr:g}; try {lr / 10:g}) or keep gradient clipping on (max_grad_norm > 0)"


def check_loss(loss: float, step: int, lr: float) -> None:
    """Raise TrainingDiverged if ``loss`` (the value read for the step's log) is not finite."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"training diverged at step {step}: the loss is {loss}; {_advice(lr)}")


def check_weights(accelerator, model: torch.nn.Module, step: int, lr: float) -> None:
    """Raise TrainingDiverged if a trainable weight holds NaN or infinity: one pass over the
    trainable weights and one host sync. Every process must call it (the count is reduced over
    processes, so all of them raise together)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        return
    with torch.no_grad():
        bad = torch.stack([~torch.isfinite(p).all() for _, p in params])
    total = bad.sum()
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total.to(accelerator.device), reduction="sum")
    if int(total):
        names = [n for (n, _), b in zip(params, bad.tolist()) if b]
        where = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
        raise TrainingDiverged(f"training diverged by step {step}: weights{where} hold NaN or infinite values; "
                               f"{_advice(lr)}")
