"""TOFU metrics as pure functions of per-token scores, generations and per-sample values.

TOFU: Maini, Feng, Schwarzschild, Lipton, Kolter, "TOFU: A Task of Fictitious Unlearning for LLMs",
2024, arXiv 2401.06121. Definitions follow ../shared/docs/metrics-reference.md and docs/metrics.md:
NLL(a|q) is the mean over the answer's tokens of -log p(token | question, previous tokens) and
P~(a|q) = exp(-NLL(a|q)) is the length-normalised probability. Every function returns per-sample
values (numpy arrays) or aggregates them from per-sample values; nothing here runs a model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import hmean, ks_2samp

from obliviate.evaluation.logprobs import TokenScores

UTILITY_SIZE = 9  # {probability, ROUGE, truth ratio} x {retain, real authors, world facts}


def nll(scores: Sequence[TokenScores]) -> np.ndarray:
    """Per-sample mean negative log-likelihood over the answer's tokens."""
    return np.array([s.nll for s in scores], dtype=np.float64)


def length_normalised_probability(scores: Sequence[TokenScores]) -> np.ndarray:
    """Per-sample P~(a|q) = exp(-NLL(a|q)) (TOFU, Maini et al. 2024, arXiv 2401.06121)."""
    return np.exp(-nll(scores))


def probability(scores: Sequence[TokenScores]) -> float:
    """TOFU "Probability" on the forget and retain sets: the mean of P~(answer|question)."""
    return float(length_normalised_probability(scores).mean())


def normalised_probability(correct: Sequence[TokenScores],
                           perturbed: Sequence[Sequence[TokenScores]]) -> np.ndarray:
    """Per-sample P~(correct) / (P~(correct) + sum_j P~(perturbed_j)).

    TOFU's probability on real authors and world facts (Maini et al. 2024, arXiv 2401.06121),
    where the question is multiple choice between the true answer and the perturbed ones.
    """
    _check_same_length(correct, perturbed)
    # Shift by each row's largest log-probability so that tiny probabilities do not underflow to 0/0.
    values = []
    for c, wrong in zip(correct, perturbed):
        _check_has_perturbed(wrong)
        logp = -np.array([c.nll] + [w.nll for w in wrong], dtype=np.float64)
        weights = np.exp(logp - logp.max())
        values.append(weights[0] / weights.sum())
    return np.array(values, dtype=np.float64)


def truth_ratio(base: Sequence[TokenScores], perturbed: Sequence[Sequence[TokenScores]]) -> np.ndarray:
    """Per-sample truth ratio R = P~pert / P~base (TOFU, Maini et al. 2024, arXiv 2401.06121).

    P~pert = exp(-mean_j NLL(perturbed_j)) is the geometric mean of the perturbed answers'
    length-normalised probabilities; the base answer is the paraphrased answer on the forget and
    retain sets and the answer itself on real authors and world facts. Computed in log space:
    R = exp(NLL(base) - mean_j NLL(perturbed_j)).
    """
    _check_same_length(base, perturbed)
    logs = []
    for b, wrong in zip(base, perturbed):
        _check_has_perturbed(wrong)
        logs.append(b.nll - np.mean([w.nll for w in wrong]))
    return np.exp(np.array(logs, dtype=np.float64))


def aggregate_truth_ratio(ratios: Sequence[float] | np.ndarray, forget: bool) -> float:
    """TOFU's truth-ratio score from per-sample R.

    Forget set: mean(min(R, 1/R)), 1 when the model cannot tell true from false (R = 1).
    Other sets: mean(max(0, 1 - R)), high when the true answer is much likelier than false ones.
    """
    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no truth ratios to aggregate")
    if forget:
        with np.errstate(divide="ignore"):
            return float(np.minimum(r, 1.0 / r).mean())
    return float(np.maximum(0.0, 1.0 - r).mean())


def rouge_l_recall(references: Sequence[str], generations: Sequence[str]) -> np.ndarray:
    """Per-sample ROUGE-L recall of each generation against its reference (Lin 2004).

    Uses the ``rouge-score`` package with its Porter stemmer, as TOFU does:
    ``RougeScorer(["rougeL"], use_stemmer=True).score(reference, generated)["rougeL"].recall``.
    """
    from rouge_score.rouge_scorer import RougeScorer  # about 2 s to import (nltk, absl): CLI start-up stays fast

    if len(references) != len(generations):
        raise ValueError(f"{len(references)} references but {len(generations)} generations")
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(ref, gen)["rougeL"].recall for ref, gen in zip(references, generations)],
                    dtype=np.float64)


def forget_quality(unlearned_ratios: Sequence[float], oracle_ratios: Sequence[float]) -> float:
    """TOFU forget quality: the p-value of the two-sample Kolmogorov-Smirnov test between the
    per-sample forget-set truth ratios of the unlearned model and of the retain (oracle) model
    (Maini et al. 2024, arXiv 2401.06121; ``scipy.stats.ks_2samp``, two-sided).

    The KS statistic depends only on the order of the values, so R and TOFU's code's 1/R give
    the same p-value.
    """
    a = np.asarray(unlearned_ratios, dtype=np.float64)
    b = np.asarray(oracle_ratios, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget quality needs per-sample truth ratios of both models")
    return float(ks_2samp(a, b).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """TOFU model utility: the harmonic mean of the 9 numbers {probability, ROUGE, truth ratio}
    on retain, real authors and world facts (Maini et al. 2024, arXiv 2401.06121).

    The harmonic mean of values that include 0 is 0 (its limit), so any 0 gives 0.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (UTILITY_SIZE,):
        raise ValueError(f"model utility needs {UTILITY_SIZE} numbers, got {v.size}")
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ValueError(f"model utility needs finite non-negative numbers, got {v.tolist()}")
    if np.any(v == 0):
        return 0.0
    return float(hmean(v))


def _check_same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} answers but {len(b)} lists of perturbed answers")


def _check_has_perturbed(wrong: Sequence[TokenScores]) -> None:
    if len(wrong) == 0:
        raise ValueError("a sample has no perturbed answers")
