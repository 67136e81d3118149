"""Typed evaluation results, and their ``eval.json`` form (docs/ARCHITECTURE.md).

``EvalResult.to_json()`` gives exactly the mapping ``eval.json`` holds, key order included, and
``EvalResult.from_json(to_json())`` gives the result back; keys a file has beyond the documented
ones are kept (``extra``), so reading and writing a file never loses anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PER_SAMPLE_KEYS = ("probability", "rouge", "truth_ratio_raw", "nll", "generation", "question")
SET_KEYS = ("n", "probability", "rouge", "truth_ratio")
RESULT_KEYS = ("model", "forget_quality", "model_utility", "seconds")


class EvalFormatError(ValueError):
    """A mapping that is not an evaluation result; the message says where."""


def _need(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise EvalFormatError(f"{where} has no '{key}'")
    return data[key]


def _extra(data: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in known}


@dataclass
class PerSample:
    """One value per row of the set, in the set's order (docs/metrics.md)."""

    probability: list[float]
    rouge: list[float]
    truth_ratio_raw: list[float] | None  # None for sets without a truth ratio
    nll: list[float]
    generation: list[str]
    question: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in PER_SAMPLE_KEYS}, **self.extra}

    @classmethod
    def from_json(cls, data: Any, where: str) -> PerSample:
        if not isinstance(data, Mapping):
            raise EvalFormatError(f"{where} has no 'per_sample' object")
        return cls(**{k: _need(data, k, f"{where}, per_sample") for k in PER_SAMPLE_KEYS},
                   extra=_extra(data, PER_SAMPLE_KEYS))


@dataclass
class SetResult:
    """Aggregates and per-sample values of one evaluation set."""

    n: int
    probability: float
    rouge: float
    truth_ratio: float | None
    per_sample: PerSample
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in SET_KEYS}, "per_sample": self.per_sample.to_json(), **self.extra}

    @classmethod
    def from_json(cls, data: Any, where: str) -> SetResult:
        if not isinstance(data, Mapping):
            raise EvalFormatError(f"{where} is not an object")
        return cls(**{k: _need(data, k, where) for k in SET_KEYS},
                   per_sample=PerSample.from_json(data.get("per_sample"), where),
                   extra=_extra(data, SET_KEYS + ("per_sample",)))


MC_KEYS = ("n", "accuracy", "accuracy_norm", "accuracy_bytes", "chance", "source", "prompt")
MC_PER_SAMPLE_KEYS = ("question", "answer", "choice_logprob", "choice_chars", "choice_bytes", "predicted",
                      "predicted_norm", "predicted_bytes", "correct", "correct_norm", "correct_bytes")


@dataclass
class MCResult:
    """Multiple-choice accuracy of one model on one named set (``evaluation.multiple_choice``):
    aggregates, and per question the summed log-likelihood of each choice, the predicted index and
    whether it is the answer (raw, per-character and per-byte normalised, as lm-eval's acc,
    acc_norm and acc_bytes)."""

    n: int
    accuracy: float
    accuracy_norm: float
    accuracy_bytes: float
    chance: float  # expected accuracy of a uniform guess: mean of 1 / number of choices
    source: str
    prompt: str  # "question" or "question+choices" (the lettered choices listed under the question)
    per_sample: dict[str, list[Any]]  # MC_PER_SAMPLE_KEYS, one value per question
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in MC_KEYS},
                "per_sample": {k: self.per_sample[k] for k in MC_PER_SAMPLE_KEYS}, **self.extra}

    @classmethod
    def from_json(cls, data: Any, where: str) -> MCResult:
        if not isinstance(data, Mapping) or not isinstance(data.get("per_sample"), Mapping):
            raise EvalFormatError(f"{where} is not a multiple-choice result (no 'per_sample' object)")
        per = data["per_sample"]
        return cls(**{k: _need(data, k, where) for k in MC_KEYS},
                   per_sample={k: _need(per, k, f"{where}, per_sample") for k in MC_PER_SAMPLE_KEYS},
                   extra=_extra(data, MC_KEYS + ("per_sample",)))


@dataclass
class EvalResult:
    """The evaluation of one model: per-set results and the model-level numbers."""

    model: str
    sets: dict[str, SetResult]
    forget_quality: float | None
    model_utility: float | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    # named multiple-choice sets ("multiple_choice" in eval.json, only when there are any)
    multiple_choice: dict[str, MCResult] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        mc = {"multiple_choice": {name: r.to_json() for name, r in self.multiple_choice.items()}} \
            if self.multiple_choice else {}
        return {"model": self.model, "sets": {name: s.to_json() for name, s in self.sets.items()},
                "forget_quality": self.forget_quality, "model_utility": self.model_utility,
                "seconds": self.seconds, **mc, **self.extra}

    @classmethod
    def from_json(cls, data: Any, where: str = "evaluation result") -> EvalResult:
        if not isinstance(data, Mapping) or not isinstance(data.get("sets"), Mapping):
            raise EvalFormatError(f"{where}: not an evaluation result (no 'sets' object)")
        sets = {name: SetResult.from_json(s, f"{where}: set '{name}'") for name, s in data["sets"].items()}
        mc = data.get("multiple_choice") or {}
        if not isinstance(mc, Mapping):
            raise EvalFormatError(f"{where}: 'multiple_choice' is not an object")
        return cls(**{k: _need(data, k, where) for k in RESULT_KEYS}, sets=sets,
                   extra=_extra(data, RESULT_KEYS + ("sets", "multiple_choice")),
                   multiple_choice={name: MCResult.from_json(r, f"{where}: multiple-choice set '{name}'")
                                    for name, r in mc.items()})
