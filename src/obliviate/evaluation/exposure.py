"""Exposure: how high the true answer still ranks in likelihood among comparable candidates.

Exposure of a secret s among a candidate set R (s in R) is log2|R| - log2 rank(s), rank by the
model's likelihood with rank 1 the most likely: log2|R| when the secret is the model's first choice,
0 when it is the last. Carlini, Liu, Erlingsson, Kos, Song, "The Secret Sharer: Evaluating and
Testing Unintended Memorization in Neural Networks", 2019, arXiv 1802.08232. Baluta, Lamblin,
Tarlow, Pedregosa, Dziugaite, "Unlearning in- vs. out-of-distribution data in LLMs under gradient-
based method", 2024, arXiv 2411.04388, formalise unlearning quality for generative models in the
same spirit: how far the forgotten sequence falls in likelihood against comparable alternatives.

Likelihood here is the *total* log-prob of the candidate answer's tokens given the question (the
answer tokens only, chat template as everywhere else). Candidates of different lengths are
therefore not length-normalised: the measure is meant for candidates of the same format.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from obliviate.data.chat import ChatFormat
from obliviate.data.qa import DataError, QAExample
from obliviate.evaluation.logprobs import TokenScores, score_pairs


def likelihood_rank(secret: float, others: Sequence[float]) -> int:
    """Rank of the secret's log-likelihood among all candidates: 1 + #(others strictly more likely).

    Ties go to the secret (a candidate exactly as likely does not push it down), so exposure is
    never understated: the cautious reading when the question is whether something was forgotten.
    """
    if math.isnan(secret) or any(math.isnan(o) for o in others):
        raise ValueError("log-likelihoods must not be NaN")
    return 1 + sum(1 for o in others if o > secret)


def exposure(secret: float, others: Sequence[float]) -> float:
    """log2 |R| - log2 rank(secret), with R = the secret plus ``others`` (log-likelihoods)."""
    if not others:
        raise ValueError("exposure needs at least one other candidate")
    return math.log2(len(others) + 1) - math.log2(likelihood_rank(secret, others))


def _where(example: QAExample, source: str) -> tuple[str, int | None]:
    return source, example.meta.get("row")


def candidate_set(example: QAExample, source: str = "examples") -> list[str]:
    """The candidates for one example, true answer first, duplicates removed.

    From ``meta["candidates"]`` (a list of texts that includes the true answer), else, as for TOFU,
    the answer plus its ``perturbed_answers``. Raises :class:`DataError` naming the row otherwise.
    """
    given = example.meta.get("candidates")
    if given is not None:
        if not isinstance(given, list) or not all(isinstance(c, str) and c.strip() for c in given):
            raise DataError(*_where(example, source), "'candidates' must be a list of non-empty texts")
        if example.answer not in given:
            raise DataError(*_where(example, source), "'candidates' does not include the answer")
        pool = given
    else:
        pool = [example.answer] + list(example.perturbed_answers)
    unique = [example.answer] + [c for c in dict.fromkeys(pool) if c != example.answer]
    if len(unique) < 2:
        raise DataError(*_where(example, source),
                        "exposure needs at least one candidate besides the answer "
                        "(meta 'candidates' or 'perturbed_answer')")
    return unique


def exposure_pairs(examples: Sequence[QAExample], source: str = "examples") -> list[tuple[str, str]]:
    """Every (question, candidate) pair :func:`exposure_from_scores` reads, row by row, answer first."""
    return [(e.question, c) for e in examples for c in candidate_set(e, source)]


def exposure_from_scores(examples: Sequence[QAExample], scores: Sequence[TokenScores],
                         source: str = "examples") -> dict:
    """Exposure of each example's answer among its candidates, from the scores of
    :func:`exposure_pairs` (same order). Returns ``{"exposure": mean, "per_sample": {"exposure":
    [...], "rank": [...], "n_candidates": [...]}}``."""
    if not examples:
        raise ValueError(f"{source} has no examples")
    sets = [candidate_set(e, source) for e in examples]
    if len(scores) != sum(len(c) for c in sets):
        raise ValueError(f"{len(scores)} score rows for {sum(len(c) for c in sets)} candidates")
    values, ranks, sizes = [], [], []
    start = 0
    for cands in sets:
        logps = [s.total_logprob for s in scores[start:start + len(cands)]]
        start += len(cands)
        ranks.append(likelihood_rank(logps[0], logps[1:]))
        values.append(exposure(logps[0], logps[1:]))
        sizes.append(len(cands))
    return {"exposure": float(np.mean(values)),
            "per_sample": {"exposure": values, "rank": ranks, "n_candidates": sizes}}


def exposure_for_examples(model, fmt: ChatFormat, examples: Iterable[QAExample], batch_size: int = 32,
                          source: str | None = None) -> dict:
    """Exposure of each example's answer among its candidates (:func:`candidate_set`), all
    (question, candidate) pairs scored in one batched pass; see :func:`exposure_from_scores`."""
    where: str = source or getattr(examples, "source", None) or "examples"
    examples = list(examples)
    if not examples:
        raise ValueError(f"{where} has no examples")
    pairs = exposure_pairs(examples, where)
    return exposure_from_scores(examples, score_pairs(model, fmt, pairs, batch_size), where)
