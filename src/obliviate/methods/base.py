"""The step interface between the training loop and the unlearning methods.

A method is a :class:`Composite` (see ``composite.py``): one forget objective that returns a
per-sample loss vector, plus an optional retain regulariser that returns a scalar. Both are small
:class:`Objective` dataclasses whose fields are their hyperparameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch


@dataclass
class StepInputs:
    """Everything one optimisation step of a method sees."""

    model: torch.nn.Module  # the model being trained (may be peft- or accelerate-wrapped)
    forget: dict | None  # {"answer": view, "idk": view?, "index", "weight", "ref_logp"?}
    retain: dict | None  # {"answer": view, "index"}
    ref_model: torch.nn.Module | None = None  # frozen reference, only if method.needs_ref_model
    step: int = 0


@runtime_checkable
class Method(Protocol):
    """What the training loop relies on."""

    name: str

    @property
    def needs_ref_model(self) -> bool: ...  # a frozen copy must stay live during training

    @property
    def needs_ref_logps(self) -> bool: ...  # forget["ref_logp"] must be precomputed before training

    @property
    def views(self) -> tuple[str, ...]: ...  # forget views the batch must carry ("answer", "idk")

    @property
    def uses_retain(self) -> bool: ...

    def __call__(self, inp: StepInputs) -> tuple[torch.Tensor, dict[str, float]]: ...

    def trainable(self, name: str) -> bool: ...

    def bind(self, model: torch.nn.Module) -> None: ...


class Objective:
    """Defaults shared by forget objectives and retain regularisers.

    A forget objective's ``__call__(inp)`` returns a per-sample loss ``[B]`` computed from
    ``inp.forget`` only; a retain regulariser's returns a scalar computed from ``inp.retain`` only.
    """

    needs_ref_model: ClassVar[bool] = False
    needs_ref_logps: ClassVar[bool] = False
    views: ClassVar[tuple[str, ...]] = ("answer",)

    def bind(self, model: torch.nn.Module) -> None:
        """Resolve options that depend on the model (e.g. RMU's default layer). No-op by default."""

    def trainable(self, name: str) -> bool:
        return True


def positive(name: str, value) -> float:
    """``value`` as a finite float > 0, or a ValueError naming the hyperparameter."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return x


def finite(name: str, value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return x


def require_view(batch: dict, view: str, who: str) -> dict:
    """``batch[view]``, or a ValueError saying which method needed which view."""
    if view not in batch:
        present = sorted(k for k, v in batch.items() if isinstance(v, dict) and "input_ids" in v)
        raise ValueError(f"{who} needs the view '{view}' in its batch; the batch has views {present}")
    return batch[view]


def require_ref_logp(batch: dict, view: str, who: str) -> torch.Tensor:
    """The precomputed reference log-probs of ``view`` (see ``common.reference_logps``)."""
    ref = batch.get("ref_logp") or {}
    if view not in ref:
        raise ValueError(f"{who} needs forget['ref_logp']['{view}'], the reference model's summed log-probs, "
                         "precomputed once before training (methods.reference_logps)")
    return ref[view]
