"""What the rest of the package relies on from a method: two protocols.

- :class:`Method`, a gradient method the training loop runs: a :class:`Composite` (see
  ``composite.py``) of one forget objective that returns a per-sample loss vector and an optional
  retain regulariser that returns a scalar, both small :class:`Objective` dataclasses whose fields
  are their hyperparameters.
- :class:`Procedure`, a method that is not trained by the loop but edits the model in one call
  (UniErase, ``methods.unierase``).

``build_method(name, **options)`` returns one or the other; callers tell them apart with
``isinstance(method, Procedure)``, never by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch

from obliviate.data.chat import ChatFormat
from obliviate.data.qa import QADataset


@dataclass
class StepInputs:
    """Everything one optimisation step of a method sees."""

    model: torch.nn.Module  # the model being trained (may be peft- or accelerate-wrapped)
    forget: dict | None  # {"answer": view, "idk": view?, "index", "weight", "ref_logp"?}
    retain: dict | None  # {"answer": view, "index"}
    ref_model: torch.nn.Module | None = None  # frozen reference, only if method.needs_ref_model
    step: int = 0
    # logs as floats (a device sync); the loop asks for device tensors and reads them at its log sync
    float_logs: bool = True


@runtime_checkable
class Method(Protocol):
    """What the training loop relies on; every attribute is always present.

    ``__call__`` returns ``(loss, logs)``: a scalar loss with a graph, and ``logs`` mapping
    ``loss``, ``forget_loss`` (and ``retain_loss``) to floats for the per-step log; with
    ``inp.float_logs`` False (what the loop asks) they may be detached 0-dim tensors, which stay on the
    device until the loop reads its log: no sync per step.
    """

    name: str

    @property
    def needs_ref_model(self) -> bool: ...  # a frozen copy must stay live during training

    @property
    def needs_ref_logps(self) -> bool: ...  # forget["ref_logp"] must be precomputed before training

    @property
    def views(self) -> tuple[str, ...]: ...  # forget views the batch must carry ("answer", "idk")

    @property
    def uses_retain(self) -> bool: ...

    def __call__(self, inp: StepInputs) -> tuple[torch.Tensor, dict[str, Any]]: ...

    def trainable(self, name: str) -> bool: ...

    def bind(self, model: torch.nn.Module) -> None: ...


@runtime_checkable
class SplitMethod(Protocol):
    """A method whose loss is a forget term plus a retain term, each computable alone (every
    :class:`~obliviate.methods.composite.Composite`): what the loop needs for sharpness-aware and
    smoothed unlearning, which evaluate the forget term at perturbed weights. Each returns the term
    (a scalar with a graph; None when there is no retain part) and its logs."""

    def forget_term(self, inp: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def retain_term(self, inp: StepInputs) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]: ...


@dataclass
class ProcedureResult:
    """What a :class:`Procedure` returns: the edited model and tokenizer (a procedure may add
    tokens) and JSON-able statistics of what it did."""

    model: torch.nn.Module
    tokenizer: Any
    stats: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Procedure(Protocol):
    """A method that edits the model in one call instead of being trained by the loop.

    ``apply`` uses ``forget`` (and ``retain``, ``general`` where given: what to preserve), laid out
    with ``fmt``; ``log`` receives progress lines. The caller saves ``result.model`` with
    ``result.tokenizer`` and writes ``result.stats``.
    """

    name: str

    def apply(self, model: torch.nn.Module, tokenizer: Any, forget: QADataset, retain: QADataset | None,
              fmt: ChatFormat, *, general: QADataset | None = None,
              log: Callable[[str], None] | None = None) -> ProcedureResult: ...


class Objective:
    """Defaults shared by forget objectives and retain regularisers.

    A forget objective's ``__call__(inp)`` returns a per-sample loss ``[B]`` computed from
    ``inp.forget`` only; a retain regulariser's returns a scalar computed from ``inp.retain`` only.
    """

    needs_ref_model: ClassVar[bool] = False
    needs_ref_logps: ClassVar[bool] = False
    views: ClassVar[tuple[str, ...]] = ("answer",)

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no loss")

    def bind(self, model: torch.nn.Module) -> None:
        """Resolve options that depend on the model (e.g. RMU's default layer). No-op by default."""

    def trainable(self, name: str) -> bool:
        return True


def _number(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def positive(name: str, value) -> float:
    """``value`` as a finite float > 0, or a ValueError naming the hyperparameter."""
    x = _number(name, value)
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return x


def nonnegative(name: str, value) -> float:
    """``value`` as a finite float >= 0, or a ValueError naming the hyperparameter."""
    x = _number(name, value)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return x


def finite(name: str, value) -> float:
    x = _number(name, value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return x


def require_view(batch: dict | None, view: str, who: str) -> dict:
    """``batch[view]``, or a ValueError saying which method needed which view."""
    if batch is None:
        raise ValueError(f"{who} needs the view '{view}' in its batch; got no batch")
    if view not in batch:
        present = sorted(k for k, v in batch.items() if isinstance(v, dict) and "input_ids" in v)
        raise ValueError(f"{who} needs the view '{view}' in its batch; the batch has views {present}")
    return batch[view]


def require_ref_logp(batch: dict | None, view: str, who: str) -> torch.Tensor:
    """The precomputed reference log-probs of ``view`` (see ``common.reference_logps``)."""
    ref = (batch or {}).get("ref_logp") or {}
    if view not in ref:
        raise ValueError(f"{who} needs forget['ref_logp']['{view}'], the reference model's summed log-probs, "
                         "precomputed once before training (methods.reference_logps)")
    return ref[view]


def require_ref_model(inp: StepInputs, who: str) -> torch.nn.Module:
    """The frozen reference model of the step, or a ValueError naming the method that needs it."""
    if inp.ref_model is None:
        raise ValueError(f"{who} needs a frozen reference model; got ref_model=None")
    return inp.ref_model
