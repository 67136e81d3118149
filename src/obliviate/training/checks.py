"""Checks during training: a callback the loop calls every ``check_every`` optimizer steps, and the
state the loop keeps from their answers.

The loop knows nothing of what a check measures (calibrated stopping, ``evaluation.stopping``, scores
forget against holdout rows): a check receives the model and the step and returns a
:class:`CheckDecision`:

- ``stop``: end training now;
- ``distance``: how far the model is from where the check wants it (0 = there). The loop keeps the
  trainable weights of the check with the smallest distance and restores them when training ends,
  so the model returned is the closest one seen, not the last one;
- ``gate``: indices of forget samples that stop contributing to the forget loss: the loop gives them
  weight 0 until a later check leaves them out of its gate (each decision's gate replaces the last);
- ``criteria``: JSON-able numbers the check measured, logged with the step in ``checks.jsonl``.

:class:`CheckState` is that state (gated samples, best step, its distance and weights). It is part of
the resumable state: a checkpoint holds it (``trainer_state.json`` and ``best.safetensors``), so a
resumed run gates the same samples and returns the same best weights, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

BEST_FILE = "best.safetensors"  # in a checkpoint folder: the best check's trainable weights


@dataclass(frozen=True)
class CheckDecision:
    """A check's answer (see the module doc)."""

    stop: bool
    distance: float
    gate: frozenset[int] = frozenset()
    criteria: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if math.isnan(self.distance):
            raise ValueError("a check's distance must be a number, got NaN")


Check = Callable[[torch.nn.Module, int], CheckDecision]


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters, on the host: what the best check keeps (frozen weights
    never change, so they need no copy)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class CheckState:
    """What the loop keeps from its checks across steps and resumes (see the module doc)."""

    gated: frozenset[int] = frozenset()
    best_step: int | None = None
    best_distance: float = math.inf
    best_weights: dict[str, torch.Tensor] | None = None
    stopped_at: int | None = None

    def record(self, decision: CheckDecision, step: int, model: torch.nn.Module) -> bool:
        """Take a decision made at ``step`` on ``model``; True when it is the best so far (ties keep
        the earlier check: fewer steps of unlearning for the same distance)."""
        self.gated = frozenset(int(i) for i in decision.gate)
        if decision.stop:
            self.stopped_at = step
        if decision.distance < self.best_distance:
            self.best_step, self.best_distance = step, float(decision.distance)
            self.best_weights = trainable_weights(model)
            return True
        return False

    def weights(self, base: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Per-sample weights with the gated samples at 0 (``base``: the caller's weights, or ones)."""
        if not self.gated:
            return base
        out = torch.ones(n) if base is None else base.clone()
        out[sorted(self.gated)] = 0.0
        return out

    def restore_best(self, model: torch.nn.Module) -> None:
        """Put the best check's weights back into ``model`` (exact copies)."""
        if self.best_weights is None:
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_weights.items():
                params[name].copy_(value)

    # -- resumable state ------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"gated": sorted(self.gated), "best_step": self.best_step,
                "best_distance": None if math.isinf(self.best_distance) else self.best_distance,
                "stopped_at": self.stopped_at}

    def write(self, folder: Path) -> None:
        """The best weights into a checkpoint folder (every checkpoint holds its own copy)."""
        if self.best_weights is not None:
            save_file({n: t.contiguous() for n, t in self.best_weights.items()}, str(folder / BEST_FILE))

    @classmethod
    def load(cls, state: dict[str, Any] | None, folder: Path) -> CheckState:
        """The state saved by :meth:`to_json` and :meth:`write` in checkpoint ``folder``."""
        if not state:
            return cls()
        best = folder / BEST_FILE
        distance = state.get("best_distance")
        return cls(gated=frozenset(state.get("gated", ())), best_step=state.get("best_step"),
                   best_distance=math.inf if distance is None else float(distance),
                   best_weights=load_file(str(best)) if best.exists() else None,
                   stopped_at=state.get("stopped_at"))
