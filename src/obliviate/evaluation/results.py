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


@dataclass
class EvalResult:
    """The evaluation of one model: per-set results and the model-level numbers."""

    model: str
    sets: dict[str, SetResult]
    forget_quality: float | None
    model_utility: float | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "sets": {name: s.to_json() for name, s in self.sets.items()},
                "forget_quality": self.forget_quality, "model_utility": self.model_utility,
                "seconds": self.seconds, **self.extra}

    @classmethod
    def from_json(cls, data: Any, where: str = "evaluation result") -> EvalResult:
        if not isinstance(data, Mapping) or not isinstance(data.get("sets"), Mapping):
            raise EvalFormatError(f"{where}: not an evaluation result (no 'sets' object)")
        sets = {name: SetResult.from_json(s, f"{where}: set '{name}'") for name, s in data["sets"].items()}
        return cls(**{k: _need(data, k, where) for k in RESULT_KEYS}, sets=sets,
                   extra=_extra(data, RESULT_KEYS + ("sets",)))
