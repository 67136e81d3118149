"""Token-level memorisation of answers: exact memorisation (EM) and extraction strength (ES).

Both are pure functions of :class:`~obliviate.evaluation.logprobs.TokenScores` (``argmax_match``:
whether the model's argmax at each answer position, teacher-forced on the question and the true
answer prefix, equals the answer's token). Definitions: ../shared/docs/metrics-reference.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from obliviate.data.chat import ChatFormat
from obliviate.data.qa import QADataset
from obliviate.evaluation.logprobs import TokenScores, score_pairs


def _matches(s: TokenScores) -> np.ndarray:
    match = np.asarray(s.argmax_match, dtype=bool)
    if match.size == 0:
        raise ValueError("cannot measure memorisation of an answer with no tokens")
    return match


def exact_memorisation(s: TokenScores) -> float:
    """EM: the fraction of answer tokens the model's argmax predicts, teacher-forced.

    Tirumala, Markosyan, Zettlemoyer, Aghajanyan, "Memorization Without Overfitting: Analyzing the
    Training Dynamics of Large Language Models", 2022, arXiv 2205.10770.
    """
    return float(_matches(s).mean())


def extraction_strength(s: TokenScores) -> float:
    """ES = 1 - k/|a|, k the shortest answer prefix after which greedy decoding reproduces the rest.

    Given the question and the true prefix a[:k], greedy decoding reproduces a[k:] exactly iff the
    argmax matches at every position from k on (once it matches, the generated and the true prefix
    coincide), so k is the index after the last mismatch: 0 when every token matches (ES = 1), |a|
    when the last token mismatches (ES = 0; the empty rest is trivially reproduced).
    Extraction in the sense of Carlini et al., "Extracting Training Data from Large Language
    Models", 2021, arXiv 2012.07805, and of prefix extractability in Carlini et al., "Quantifying
    Memorization Across Neural Language Models", 2023, arXiv 2202.07646 (metrics-reference.md).
    """
    match = _matches(s)
    misses = np.flatnonzero(~match)
    k = int(misses[-1]) + 1 if misses.size else 0
    return 1.0 - k / match.size


def memorisation_report(scores: Sequence[TokenScores]) -> dict:
    """``{"em": mean, "es": mean, "per_sample": {"em": [...], "es": [...]}}``."""
    if not scores:
        raise ValueError("no samples to measure")
    em = [exact_memorisation(s) for s in scores]
    es = [extraction_strength(s) for s in scores]
    return {"em": float(np.mean(em)), "es": float(np.mean(es)), "per_sample": {"em": em, "es": es}}


def run_memorisation(model, fmt: ChatFormat, dataset: QADataset, batch_size: int = 32) -> dict:
    """EM and ES of ``dataset``'s answers under ``model`` (one teacher-forced pass per answer)."""
    if len(dataset) == 0:
        raise ValueError(f"{dataset.source} is empty")
    scores = score_pairs(model, fmt, [(e.question, e.answer) for e in dataset], batch_size)
    return memorisation_report(scores)
