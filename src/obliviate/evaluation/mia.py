"""Membership-inference attacks (MIA) on QA answers, their ROC AUC, and MUSE's PrivLeak.

Every score is per sample and oriented so that **higher = more likely a member** (a training
example). The likelihood attacks are pure functions of one answer's
:class:`~obliviate.evaluation.logprobs.TokenScores` (answer tokens only, scored once by
``score_pairs``); the gradient-norm attack needs the model and runs one backward pass per sample.

Unlearning reads them on the forget set (members of the original training data) against a holdout
set (never trained on): after real forgetting the two are indistinguishable, AUC near 0.5, as for a
model retrained without the forget set. Definitions follow ../shared/docs/metrics-reference.md.
"""

from __future__ import annotations

import math
import zlib
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from obliviate.data.chat import ChatFormat
from obliviate.data.qa import QADataset
from obliviate.evaluation.logprobs import TokenScores, score_pairs

DEFAULT_K = 0.4  # Min-K% with k = 40%, the setting MUSE's PrivLeak uses


def loss_score(s: TokenScores) -> float:
    """LOSS attack: -NLL, the mean log-prob of the answer's tokens.

    Yeom, Giacomelli, Fredrikson, Jha, "Privacy Risk in Machine Learning: Analyzing the Connection
    to Overfitting", 2018, arXiv 1709.01604.
    """
    return -s.nll


def zlib_score(s: TokenScores, text: str) -> float:
    """zlib attack: -NLL_total / (zlib-compressed length in bytes of ``text``).

    NLL_total is the summed negative log-likelihood of the answer's tokens and ``text`` is the
    answer itself (the scored text; the question is context, not part of the sample). Dividing by
    the compressed length calibrates for how predictable the text is in general.
    Carlini et al., "Extracting Training Data from Large Language Models", 2021, arXiv 2012.07805.
    """
    compressed = len(zlib.compress(text.encode("utf-8")))
    return s.total_logprob / compressed


def min_k_count(n: int, k: float) -> int:
    """How many tokens Min-K% averages: floor(k * n), at least 1."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if n < 1:
        raise ValueError("cannot score an answer with no tokens")
    return max(1, int(k * n))


def _lowest_mean(values: np.ndarray, k: float) -> float:
    n = min_k_count(len(values), k)
    return float(np.sort(values)[:n].mean())


def min_k_score(s: TokenScores, k: float = DEFAULT_K) -> float:
    """Min-K% Prob: the mean of the lowest k-fraction of the answer's token log-probs.

    Members rarely contain very unlikely tokens. floor(k * |a|) tokens, at least one.
    Shi et al., "Detecting Pretraining Data from Large Language Models", 2024, arXiv 2310.16789.
    """
    return _lowest_mean(np.asarray(s.logprobs, dtype=np.float64), k)


def standardised_logprobs(s: TokenScores) -> np.ndarray:
    """(log p(token) - mu) / sigma per token, mu and sigma of log p under the model's own
    next-token distribution at that position. A position whose distribution has sigma = 0 gives 0
    (every token there has the same log-prob, so the token's log-prob equals mu)."""
    if s.dist_mean is None or s.dist_std is None:
        raise ValueError("these scores were made without the next-token distribution statistics that Min-K%++ "
                         "needs: score with distribution=True")
    lp = np.asarray(s.logprobs, dtype=np.float64)
    mu = np.asarray(s.dist_mean, dtype=np.float64)
    sigma = np.asarray(s.dist_std, dtype=np.float64)
    safe = np.where(sigma > 0, sigma, 1.0)
    return np.where(sigma > 0, (lp - mu) / safe, 0.0)


def min_k_plus_plus_score(s: TokenScores, k: float = DEFAULT_K) -> float:
    """Min-K%++: Min-K% over the standardised token log-probs (see :func:`standardised_logprobs`).

    Zhang et al., "Min-K%++: Improved Baseline for Detecting Pre-Training Data from Large Language
    Models", 2024, arXiv 2404.02936.
    """
    return _lowest_mean(standardised_logprobs(s), k)


def reference_score(s: TokenScores, ref: TokenScores) -> float:
    """Reference-model attack: NLL(reference) - NLL(target).

    metrics-reference.md states the statistic as NLL(target) - NLL(reference), which is *lower* for
    members; this returns its negation so that, like every score here, higher = member. The
    reference model must share the target's tokenizer (the same tokens are scored).
    Carlini et al. 2021, arXiv 2012.07805 (comparison with a second model); Watson, Guo, Cormode,
    Sablayrolles, "On the Importance of Difficulty Calibration in Membership Inference Attacks",
    2022, arXiv 2111.08440.
    """
    if len(s) != len(ref) or not np.array_equal(s.token_ids, ref.token_ids):
        raise ValueError("reference scores are for different tokens; the reference model must use the "
                         "target's tokenizer and the same (question, answer) pairs")
    return ref.nll - s.nll


def mia_scores(scores: Sequence[TokenScores], answers: Sequence[str], k: float = DEFAULT_K,
               ref_scores: Sequence[TokenScores] | None = None) -> dict[str, list[float]]:
    """Per-sample likelihood scores of every attack: ``{attack: [score per sample]}``.

    ``answers`` are the texts of the scored answers (for zlib); ``ref_scores`` the same pairs scored
    by a reference model (adds the ``reference`` attack).
    """
    if len(scores) != len(answers):
        raise ValueError(f"{len(scores)} score rows but {len(answers)} answers")
    out = {
        "loss": [loss_score(s) for s in scores],
        "zlib": [zlib_score(s, a) for s, a in zip(scores, answers)],
        "min_k": [min_k_score(s, k) for s in scores],
        "min_k_plus_plus": [min_k_plus_plus_score(s, k) for s in scores],
    }
    if ref_scores is not None:
        if len(ref_scores) != len(scores):
            raise ValueError(f"{len(scores)} target score rows but {len(ref_scores)} reference rows")
        out["reference"] = [reference_score(s, r) for s, r in zip(scores, ref_scores)]
    return out


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of members against non-members: P(score_member > score_nonmember), ties counted 1/2.

    Computed from ranks (Mann-Whitney U): tied scores share their average rank, which counts each
    tied member/non-member pair as one half. 1.0 = members always score higher, 0.5 = chance.
    """
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if m.size == 0 or n.size == 0:
        raise ValueError(f"AUC needs members and non-members, got {m.size} and {n.size}")
    if np.isnan(m).any() or np.isnan(n).any():
        raise ValueError("AUC got NaN scores")
    ranks = rankdata(np.concatenate([m, n]))  # average ranks for ties, 1-based
    u = ranks[:m.size].sum() - m.size * (m.size + 1) / 2
    return float(u / (m.size * n.size))


def mia_report(forget_scores: Mapping[str, Sequence[float]],
               holdout_scores: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """AUC per attack, forget set as members and holdout as non-members."""
    if set(forget_scores) != set(holdout_scores):
        raise ValueError(f"attacks differ: forget has {sorted(forget_scores)}, holdout {sorted(holdout_scores)}")
    report = {}
    for name in forget_scores:
        try:
            report[name] = auc(forget_scores[name], holdout_scores[name])
        except ValueError as exc:
            raise ValueError(f"attack '{name}': {exc}") from None
    return report


def privleak(auc_unlearned: float, auc_retain: float) -> float:
    """MUSE PrivLeak in percent: (AUC_u - AUC_r) / AUC_r x 100, with MUSE's AUC orientation.

    Shi et al., "MUSE: Machine Unlearning Six-Way Evaluation for Language Models", 2024,
    arXiv 2407.06460 (Min-K% with k = 40%, forget vs holdout). The inputs are AUCs as this module
    computes them (members score higher, so an un-unlearned model is near 1). MUSE's scores are
    losses (higher = non-member), so its AUC is 1 - ours; this function converts before applying
    the formula, which keeps MUSE's reading and its published numbers comparable: near 0 is ideal,
    strongly negative = under-unlearned (forget data still looks like training data), strongly
    positive = over-unlearned (forget data looks *less* familiar than unseen data).
    """
    for name, value in (("auc_unlearned", auc_unlearned), ("auc_retain", auc_retain)):
        if not 0 <= value <= 1 or math.isnan(value):
            raise ValueError(f"{name} must be an AUC in [0, 1], got {value}")
    muse_u, muse_r = 1 - auc_unlearned, 1 - auc_retain
    if muse_r == 0:
        raise ValueError("PrivLeak is undefined when the retain model's AUC is 1 (MUSE orientation 0)")
    return (muse_u - muse_r) / muse_r * 100


def gradnorm_scores(model, fmt: ChatFormat, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """Gradient-norm attack: -||d NLL(a|q) / d theta||_2 per sample (one backward pass each).

    NLL is the mean over the answer's tokens (the LOSS statistic) and theta every parameter that
    requires grad (only the adapters of a LoRA model). Members sit near a minimum of the training
    loss, where gradients are small. The norm is the global L2 norm over all those parameters
    (MIMIR-style ports average per-tensor norms instead, which ranks samples differently).
    Wang, Wang, Li, Neel, "Pandora's White-Box: Precise Training Data Detection and Extraction in
    Large Language Models", 2024, arXiv 2402.17012.
    The model's ``.grad`` buffers are left untouched (gradients come from ``torch.autograd.grad``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the gradient-norm attack needs parameters with requires_grad=True")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the score is a deterministic function of the weights
    scores = []
    try:
        for q, a in pairs:
            enc = fmt.encode_scored(q, a)
            ids = torch.tensor([enc.input_ids], device=device)
            with torch.enable_grad():
                logits = model(input_ids=ids).logits[0, enc.answer_start - 1:enc.answer_start - 1 + enc.scored_len]
                target = ids[0, enc.answer_start:enc.answer_start + enc.scored_len]
                nll = -torch.log_softmax(logits.float(), -1).gather(-1, target[:, None]).mean()
                grads = torch.autograd.grad(nll, params, allow_unused=True)
            sq = torch.zeros((), device=device)
            for g in grads:
                if g is not None:  # None: a parameter this sample's loss does not reach
                    sq = sq + g.float().pow(2).sum().to(device)
            scores.append(-float(sq.sqrt()))
    finally:
        model.train(was_training)
    return scores


def run_mia(model, fmt: ChatFormat, forget: QADataset, holdout: QADataset, ref_model=None,
            k: float = DEFAULT_K, batch_size: int = 32, with_gradnorm: bool = False) -> dict:
    """Score forget (members) and holdout (non-members) with every attack and report AUCs.

    Returns ``{"k", "n_forget", "n_holdout", "scores": {"forget": {attack: [...]}, "holdout": {...}},
    "auc": {attack: float}}``. ``ref_model`` (same tokenizer) adds the reference attack;
    ``with_gradnorm`` adds the gradient-norm attack (one backward pass per sample).
    """
    min_k_count(1, k)  # validate k before any model work
    scores: dict[str, dict[str, list[float]]] = {}
    for name, ds in (("forget", forget), ("holdout", holdout)):
        if len(ds) == 0:
            raise ValueError(f"{name} set {ds.source} is empty")
        pairs = [(e.question, e.answer) for e in ds]
        target = score_pairs(model, fmt, pairs, batch_size)
        ref = score_pairs(ref_model, fmt, pairs, batch_size) if ref_model is not None else None
        scores[name] = mia_scores(target, [a for _, a in pairs], k, ref)
        if with_gradnorm:
            scores[name]["gradnorm"] = gradnorm_scores(model, fmt, pairs)
    return {
        "k": k,
        "n_forget": len(forget),
        "n_holdout": len(holdout),
        "scores": scores,
        "auc": mia_report(scores["forget"], scores["holdout"]),
    }
