"""One model's per-token scores, each (question, answer) pair scored once and shared by every metric.

An evaluation scores every pair of every set (``evaluate.evaluate_with_scores``); membership
inference, memorisation and exposure (``privacy.privacy_from_scores``) then read the same
:class:`~obliviate.evaluation.logprobs.TokenScores` instead of running the model again. A pair
that is not there yet is scored by :meth:`ModelScores.ensure`, in one batched call with the other
missing pairs, and kept.

Scores depend on the prompt layout as well as on the model, so a ``ModelScores`` remembers the
layout it was made with (:func:`layout_of`) and refuses to mix in scores of another layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from obliviate.data.chat import ChatFormat
from obliviate.evaluation.logprobs import TokenScores, score_pairs

Pair = tuple[str, str]
Layout = tuple[str | None, int, str | None, str]


def layout_of(fmt: ChatFormat) -> Layout:
    """What, besides the weights, a pair's scores depend on: system prompt, length limit, tokenizer,
    and which tokens are scored (``ChatFormat.scored_tokens``)."""
    return fmt.system_prompt, fmt.max_length, getattr(fmt.tokenizer, "name_or_path", None), fmt.scored_tokens


class MissingScores(KeyError):
    """Pairs were asked for that this model's scores do not hold."""


@dataclass
class ModelScores:
    """TokenScores of one model per (question, answer) pair, and its greedy answer per question."""

    layout: Layout
    label: str | None = None
    pairs: dict[Pair, TokenScores] = field(default_factory=dict)
    generations: dict[str, str] = field(default_factory=dict)
    scored: int = 0  # pairs this object had the model score (each once): what a caller can count

    @classmethod
    def empty(cls, fmt: ChatFormat, label: str | None = None) -> ModelScores:
        return cls(layout_of(fmt), label)

    def __contains__(self, pair: object) -> bool:
        return pair in self.pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def missing(self, pairs: Iterable[Pair], distribution: bool = False) -> list[Pair]:
        """The pairs not held yet, each once, in first-seen order; with ``distribution`` also those held
        without the distribution statistics (Min-K%++ reads them)."""
        return [p for p in dict.fromkeys(pairs)
                if p not in self.pairs or (distribution and self.pairs[p].dist_mean is None)]

    def get(self, pairs: Sequence[Pair]) -> list[TokenScores]:
        """Scores of ``pairs`` in order; :class:`MissingScores` when any is not held."""
        missing = self.missing(pairs)
        if missing:
            q, a = missing[0]
            raise MissingScores(f"{len(missing)} pair(s) were never scored for {self.label or 'this model'}, "
                                f"first: question {q!r}, answer {a!r}")
        return [self.pairs[p] for p in pairs]

    def add(self, pairs: Sequence[Pair], scores: Sequence[TokenScores]) -> None:
        if len(pairs) != len(scores):
            raise ValueError(f"{len(pairs)} pairs but {len(scores)} score rows")
        self.pairs.update(zip(pairs, scores))

    def ensure(self, model, fmt: ChatFormat, pairs: Sequence[Pair], batch_size: int = 32,
               score: Callable[..., list[TokenScores]] = score_pairs,
               distribution: bool = True) -> list[TokenScores]:
        """Scores of ``pairs`` in order, scoring only those not held yet (one batched call).
        ``distribution``: the scores must have the distribution statistics (Min-K%++ reads them); a
        held score without them is scored again, with them. Without it, new pairs are scored without."""
        if layout_of(fmt) != self.layout:
            raise ValueError(f"these scores were made with the prompt layout {self.layout}, not {layout_of(fmt)}")
        missing = self.missing(pairs, distribution)
        if missing:
            self.add(missing, score(model, fmt, missing, batch_size=batch_size, distribution=distribution))
            self.scored += len(missing)
        return self.get(pairs)


class StepScores:
    """The scores of a model in training, one :class:`ModelScores` per optimizer step: whatever runs at
    the same step (the calibrated check, a trajectory point of the pipeline) reads and adds to the
    same one, so each pair is scored once per step, not once per consumer. The weights do not change
    within a step, and a new step starts afresh. :meth:`seed` hands in scores already made of the
    same weights elsewhere (the pipeline's evaluation of the target, for step 0)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.scores: ModelScores | None = None

    def seed(self, step: int, scores: ModelScores) -> None:
        """``scores`` (kept as they are: a copy of their pairs is extended) as step ``step``'s."""
        self.step, self.scores = step, ModelScores(scores.layout, scores.label, dict(scores.pairs),
                                                   dict(scores.generations))

    def at(self, step: int, fmt: ChatFormat) -> ModelScores:
        """Step ``step``'s scores in ``fmt``'s layout (scores of another layout are not reused)."""
        if step != self.step or self.scores is None or self.scores.layout != layout_of(fmt):
            self.step, self.scores = step, ModelScores.empty(fmt)
        return self.scores
