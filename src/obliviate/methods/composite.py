"""A method = one forget objective + an optional retain regulariser.

    loss = forget_weight * mean_i(weight_i * forget_i) + retain_weight * retain

``forget_i`` is the forget objective's per-sample loss and ``weight_i`` the batch's per-sample weight
(GUARD weights, mean 1 over the forget set; ones when the batch has none), so a weight-0 sample
contributes nothing (the loop's per-sample gating sets it to 0).

Logs are floats (one device sync) unless ``inp.float_logs`` is False, as the training loop asks: then
they stay on the device (detached 0-dim tensors), so a step never waits for them. The two terms are
also available alone (:meth:`Composite.forget_term`, :meth:`Composite.retain_term`,
``methods.base.SplitMethod``): sharpness-aware and smoothed unlearning evaluate the forget term at
perturbed weights and the retain term at the weights themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from obliviate.methods.base import Objective, StepInputs


@dataclass
class Composite:
    forget: Objective
    retain: Objective | None = None
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    name: str = "custom"

    def _parts(self) -> list[Objective]:
        return [self.forget] + ([self.retain] if self.retain is not None else [])

    @property
    def needs_ref_model(self) -> bool:
        return any(p.needs_ref_model for p in self._parts())

    @property
    def needs_ref_logps(self) -> bool:
        return any(p.needs_ref_logps for p in self._parts())

    @property
    def views(self) -> tuple[str, ...]:
        return self.forget.views

    @property
    def uses_retain(self) -> bool:
        return self.retain is not None

    def bind(self, model: torch.nn.Module) -> None:
        for part in self._parts():
            part.bind(model)

    def trainable(self, name: str) -> bool:
        return all(part.trainable(name) for part in self._parts())

    def _check_inputs(self, inp: StepInputs) -> None:
        if inp.forget is None:
            raise ValueError(f"method '{self.name}' needs a forget batch; got forget=None")
        if self.uses_retain and inp.retain is None:
            raise ValueError(f"method '{self.name}' uses retain data; got retain=None (give it a retain set)")
        if self.needs_ref_model and inp.ref_model is None:
            raise ValueError(f"method '{self.name}' needs a frozen reference model; got ref_model=None")

    def forget_term(self, inp: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``forget_weight * mean_i(weight_i * forget_i)`` and its log (``forget_loss``, unscaled)."""
        self._check_inputs(inp)
        assert inp.forget is not None  # _check_inputs
        per_sample = self.forget(inp)
        weight = inp.forget.get("weight")
        weight = torch.ones_like(per_sample) if weight is None else weight.to(per_sample)
        if weight.shape != per_sample.shape:
            raise ValueError(f"forget['weight'] has shape {tuple(weight.shape)}, the batch has "
                             f"{per_sample.shape[0]} samples")
        forget_loss = (weight * per_sample).mean()
        return self.forget_weight * forget_loss, {"forget_loss": forget_loss.detach()}

    def retain_term(self, inp: StepInputs) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """``retain_weight * retain`` and its log (``retain_loss``, unscaled); None without a retain part."""
        if self.retain is None:
            return None, {}
        self._check_inputs(inp)
        retain_loss = self.retain(inp)
        return self.retain_weight * retain_loss, {"retain_loss": retain_loss.detach()}

    def __call__(self, inp: StepInputs) -> tuple[torch.Tensor, dict[str, Any]]:
        forget, logs = self.forget_term(inp)
        retain, retain_logs = self.retain_term(inp)
        loss = forget if retain is None else forget + retain
        parts = {"loss": loss.detach(), **logs, **retain_logs}
        if not inp.float_logs:  # the loop reads them later, with other steps' logs
            return loss, parts
        return loss, dict(zip(parts, torch.stack([v.float() for v in parts.values()]).tolist()))  # one device sync
