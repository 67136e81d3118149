"""Paraphrase and format probes: the same questions asked differently.

A model that only learned to refuse or deflect the exact forget-set wording can still answer the
same question reworded, preceded by a few ordinary QA pairs, or inside a longer message (Lynch,
Guo, Ewart, Casper, Hadfield-Menell, "Eight Methods to Evaluate Robust Unlearning in LLMs", 2024,
arXiv 2402.16835; TOFU's paraphrased questions, Maini et al. 2024, arXiv 2401.06121). Each probe is
a pure data transform QADataset -> QADataset that changes only the question text (answers,
paraphrased and perturbed answers are kept), so the normal evaluation runs on it unchanged and its
rows line up with the original set's. Each row's meta records ``probe`` (e.g. ``paraphrase+context``
when probes are chained) and ``original_question`` (the question before any probe).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable

from obliviate.data.qa import DataError, QADataset, QAExample

NEUTRAL_CONTEXT = (
    "The following note is from a community newsletter. The library on the corner of the main "
    "square will keep its usual opening hours this month, from nine in the morning until six in the "
    "evening on weekdays and until noon on Saturdays. Volunteers have repainted the reading room and "
    "added two long tables near the windows. The weekly board-game evening moves to Thursdays, and "
    "the bicycle racks outside have been replaced. Visitors are reminded that the car park closes at "
    "seven and that the side entrance is used only for deliveries."
)


def _probe(ds: QADataset, name: str, rewrite: Callable[[int, QAExample], str]) -> QADataset:
    """Apply ``rewrite(row index, example) -> new question`` to every row."""
    examples = []
    for i, e in enumerate(ds):
        # Probes compose: keep the first question and list every probe applied, in order.
        probe = f"{e.meta['probe']}+{name}" if "probe" in e.meta else name
        meta = {**e.meta, "probe": probe, "original_question": e.meta.get("original_question", e.question)}
        # The new question replaces the old one; a paraphrase of the old one no longer applies.
        examples.append(replace(e, question=rewrite(i, e), paraphrased_question=None,
                                perturbed_answers=list(e.perturbed_answers), meta=meta))
    return QADataset(examples, f"{ds.source}+{name}", ds.skipped)


def paraphrase_probe(ds: QADataset) -> QADataset:
    """Each question replaced by its ``paraphrased_question``; rows without one keep the original
    (meta ``paraphrased`` says which). Raises :class:`DataError` if no row has a paraphrase."""
    if not any(e.paraphrased_question for e in ds):
        raise DataError(ds.source, None, "no row has a 'paraphrased_question'; the paraphrase probe needs them")
    out = _probe(ds, "paraphrase", lambda i, e: e.paraphrased_question or e.question)
    for new, old in zip(out, ds):
        new.meta["paraphrased"] = old.paraphrased_question is not None
    return out


def format_shots(shots: list[QAExample]) -> str:
    return "\n\n".join(f"Question: {s.question}\nAnswer: {s.answer}" for s in shots)


def few_shot_probe(ds: QADataset, shots: QADataset, k: int = 3, seed: int = 0) -> QADataset:
    """Each question preceded, in the same user message, by ``k`` QA pairs drawn from ``shots``
    (typically the retain set)::

        Question: <shot question 1>
        Answer: <shot answer 1>

        ...

        Question: <the question>

    Shots are drawn per row without replacement, never with the row's own question, reproducibly
    from ``seed``; the shot questions are recorded in meta ``shots``.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    pool = shots.examples
    by_question: dict[str, list[int]] = {}
    for i, s in enumerate(pool):
        by_question.setdefault(s.question, []).append(i)
    rng = random.Random(seed)
    chosen: list[list[QAExample]] = []
    for e in ds:
        excluded = set(by_question.get(e.question, []))
        if len(pool) - len(excluded) < k:
            raise DataError(shots.source, None, f"{len(pool) - len(excluded)} usable shots for "
                            f"question {e.question[:60]!r}, fewer than k={k}")
        # The first k valid indices of a uniformly random ordering are a uniform k-subset of the valid ones.
        draw = rng.sample(range(len(pool)), k + len(excluded))
        chosen.append([pool[i] for i in draw if i not in excluded][:k])
    out = _probe(ds, "few_shot", lambda i, e: f"{format_shots(chosen[i])}\n\nQuestion: {e.question}")
    for row, picked in zip(out, chosen):
        row.meta["shots"] = [s.question for s in picked]
    return out


def context_probe(ds: QADataset, context: str = NEUTRAL_CONTEXT, position: str = "before") -> QADataset:
    """Each question inside a longer message with unrelated ``context``: ``"<context>\\n\\n<question>"``
    (``position="before"``) or ``"<question>\\n\\n<context>"`` (``"after"``)."""
    if not context.strip():
        raise ValueError("context is empty")
    if position == "before":
        return _probe(ds, "context", lambda i, e: f"{context}\n\n{e.question}")
    if position == "after":
        return _probe(ds, "context", lambda i, e: f"{e.question}\n\n{context}")
    raise ValueError(f"position must be 'before' or 'after', got {position!r}")
