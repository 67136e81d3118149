"""Multiple-choice accuracy by the log-likelihood of each choice (WMDP, MMLU and the like).

As lm-evaluation-harness scores ``multiple_choice`` tasks (Gao et al., "A framework for few-shot
language model evaluation", Zenodo 10.5281/zenodo.5371628; WMDP: Li et al. 2024, arXiv 2403.03218;
MMLU: Hendrycks et al. 2021, arXiv 2009.03300): each choice is scored as a continuation of the
question, its log-likelihood is the sum of its tokens' log-probs, and the prediction is the choice
with the highest one (``accuracy``, lm-eval's ``acc``), with the log-likelihood divided by the
choice's length in characters (``accuracy_norm``, lm-eval's ``acc_norm``) or in UTF-8 bytes
(``accuracy_bytes``, lm-eval's ``acc_bytes``). Ties go to the first choice, as ``np.argmax`` does.

Prompt layout: the question is the user turn of the chat template (``data.chat.ChatFormat``), and each
choice's text is scored as the assistant's answer, its tokens alone, without the closing end-of-turn
token (``scored_tokens="answer"``): the likelihood of the choice text, as lm-eval scores it. By default
the prompt is the question alone (the "cloze" form, lm-eval's ``mmlu_continuation``); with
``list_choices=True`` the lettered choices (``A. ...``) follow the question, as in lm-eval's default
MMLU / WMDP prompts, but the choice texts, not the letters, are scored. For lm-eval's own numbers
(letters scored after ``Answer:``) run its tasks through ``evaluation.lm_eval_bridge``.

Every (prompt, choice) pair is scored once, through the same path as the TOFU metrics
(``evaluation.scores.ModelScores`` over ``logprobs.score_pairs``), and kept: sets that share pairs
share their scores. The metrics are pure functions of the per-choice log-likelihoods.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from obliviate.data.chat import ChatFormat
from obliviate.data.multiple_choice import LETTERS, MCItem, MCSet
from obliviate.data.qa import DataError
from obliviate.errors import UserError
from obliviate.evaluation.distributed import score_pairs_distributed
from obliviate.evaluation.logprobs import TokenScores, score_pairs
from obliviate.evaluation.results import MCResult
from obliviate.evaluation.scores import ModelScores, Pair

PROMPTS = ("question", "question+choices")


class NonFiniteScores(UserError):
    """A choice's log-likelihood is not a finite number: the model's outputs are broken."""


# -- the prompt and the pairs ---------------------------------------------------------------------


def mc_format(fmt: ChatFormat) -> ChatFormat:
    """The layout multiple-choice scoring uses: ``fmt`` with the answer's tokens alone scored."""
    return fmt if fmt.scored_tokens == "answer" else dataclasses.replace(fmt, scored_tokens="answer")


def mc_prompt(item: MCItem, list_choices: bool = False) -> str:
    """The user turn for one question: the question, and with ``list_choices`` the lettered choices."""
    if not list_choices:
        return item.question
    return item.question.rstrip() + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))


def mc_pairs(mc: MCSet, fmt: ChatFormat, list_choices: bool = False) -> list[list[Pair]]:
    """The (prompt, choice) pairs of each question, each checked against ``fmt``'s length limit."""
    out = []
    for i, item in enumerate(mc.items):
        prompt = mc_prompt(item, list_choices)
        for j, choice in enumerate(item.choices):
            try:
                fmt.encode_scored(prompt, choice)
            except ValueError as exc:
                raise DataError(mc.source, int(item.meta.get("row", i + 1)),
                                f"choice {LETTERS[j]}: {exc}") from None
        out.append([(prompt, choice) for choice in item.choices])
    return out


# -- pure metrics over per-choice log-likelihoods -------------------------------------------------


def choice_loglikelihoods(scores: Sequence[TokenScores]) -> np.ndarray:
    """The log-likelihood of each choice of one question: the sum of its tokens' log-probs."""
    return np.array([s.total_logprob for s in scores], dtype=np.float64)


def predict(loglikelihoods: Sequence[np.ndarray], lengths: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """The predicted choice per question: argmax of the log-likelihoods, divided by ``lengths`` first
    when given (characters for acc_norm, bytes for acc_bytes); the first of tied choices wins."""
    if lengths is None:
        return np.array([int(np.argmax(ll)) for ll in loglikelihoods], dtype=np.int64)
    return np.array([int(np.argmax(ll / n)) for ll, n in zip(loglikelihoods, lengths, strict=True)],
                    dtype=np.int64)


def accuracy(predicted: np.ndarray, answers: Sequence[int]) -> float:
    """Share of questions whose predicted choice is the answer."""
    if len(predicted) == 0:
        raise ValueError("no questions to score")
    return float(np.mean(np.asarray(predicted) == np.asarray(answers)))


def char_lengths(choices: Sequence[str]) -> np.ndarray:
    return np.array([float(len(c)) for c in choices])


def byte_lengths(choices: Sequence[str]) -> np.ndarray:
    return np.array([float(len(c.encode("utf-8"))) for c in choices])


def chance_accuracy(items: Sequence[MCItem]) -> float:
    """Expected accuracy of a uniform random guess: the mean of 1 / number of choices."""
    return float(np.mean([1.0 / len(item.choices) for item in items]))


def mc_result(mc: MCSet, loglikelihoods: Sequence[np.ndarray], list_choices: bool = False) -> MCResult:
    """Accuracies and per-sample values from each question's choice log-likelihoods."""
    if len(loglikelihoods) != len(mc):
        raise ValueError(f"{len(loglikelihoods)} rows of log-likelihoods for {len(mc)} questions")
    for i, (item, ll) in enumerate(zip(mc.items, loglikelihoods)):
        if len(ll) != len(item.choices):
            raise ValueError(f"question {i}: {len(ll)} log-likelihoods for {len(item.choices)} choices")
        if not np.all(np.isfinite(ll)):
            raise NonFiniteScores(f"{mc.source}, row {item.meta.get('row', i + 1)}: a choice's log-likelihood is "
                                  f"not finite ({ll.tolist()}); the model's weights or outputs are broken")
    answers = [item.answer for item in mc.items]
    chars = [char_lengths(item.choices) for item in mc.items]
    nbytes = [byte_lengths(item.choices) for item in mc.items]
    pred, pred_norm, pred_bytes = predict(loglikelihoods), predict(loglikelihoods, chars), \
        predict(loglikelihoods, nbytes)
    return MCResult(
        n=len(mc), accuracy=accuracy(pred, answers), accuracy_norm=accuracy(pred_norm, answers),
        accuracy_bytes=accuracy(pred_bytes, answers), chance=chance_accuracy(mc.items), source=mc.source,
        prompt=PROMPTS[int(list_choices)],
        per_sample={
            "question": [item.question for item in mc.items],
            "answer": answers,
            "choice_logprob": [ll.tolist() for ll in loglikelihoods],
            "choice_chars": [[int(n) for n in c] for c in chars],
            "choice_bytes": [[int(n) for n in b] for b in nbytes],
            "predicted": pred.tolist(),
            "predicted_norm": pred_norm.tolist(),
            "predicted_bytes": pred_bytes.tolist(),
            "correct": (pred == np.array(answers)).tolist(),
            "correct_norm": (pred_norm == np.array(answers)).tolist(),
            "correct_bytes": (pred_bytes == np.array(answers)).tolist(),
        })


# -- the scoring call ------------------------------------------------------------------------------


def evaluate_mc(model, fmt: ChatFormat, mc: MCSet, scores: ModelScores | None = None, batch_size: int = 32, *,
                list_choices: bool = False,
                score: Callable[..., list[TokenScores]] = score_pairs) -> MCResult:
    """Multiple-choice accuracy of ``model`` on ``mc`` (module docstring: layout and metrics).

    ``scores``: the model's multiple-choice scores so far (``ModelScores.empty(mc_format(fmt))``), to
    which the pairs not held yet are added, each scored once; pass the same one for every set of
    one model. ``score`` is the scoring function (``evaluation.distributed.score_pairs_distributed``
    under ``accelerate launch``).
    """
    if len(mc) == 0:
        raise DataError(mc.source, None, f"the multiple-choice set {mc.name!r} is empty")
    fmt = mc_format(fmt)
    scores = scores if scores is not None else ModelScores.empty(fmt)
    pairs = mc_pairs(mc, fmt, list_choices)
    flat = [p for row in pairs for p in row]
    token_scores = iter(scores.ensure(model, fmt, flat, batch_size=batch_size, score=score))
    lls = [choice_loglikelihoods([next(token_scores) for _ in row]) for row in pairs]
    return mc_result(mc, lls, list_choices)


def evaluate_mc_sets(model, fmt: ChatFormat, sets: Sequence[MCSet], batch_size: int = 32, *,
                     list_choices: bool = False, distributed: bool = False,
                     scores: ModelScores | None = None) -> dict[str, MCResult]:
    """:func:`evaluate_mc` on each set, by name, sharing one model's scores (a pair two sets hold is
    scored once). ``distributed=True`` under ``accelerate launch`` splits the scoring batches across
    the processes (``evaluation.distributed``); every process returns the full result."""
    score = score_pairs_distributed if distributed else score_pairs
    scores = scores if scores is not None else ModelScores.empty(mc_format(fmt))
    return {mc.name: evaluate_mc(model, fmt, mc, scores, batch_size, list_choices=list_choices, score=score)
            for mc in sets}


def mc_summary(results: Mapping[str, MCResult | Mapping[str, Any]]) -> dict[str, float]:
    """Flat numbers per set for tables and logs: ``mc_<set>_accuracy``, ``_accuracy_norm``, ``_chance``."""
    row = {}
    for name, r in results.items():
        data = r.to_json() if isinstance(r, MCResult) else r
        for key in ("accuracy", "accuracy_norm", "chance"):
            row[f"mc_{name}_{key}"] = data[key]
    return row
