"""MUSE's memorisation metrics: VerbMem (verbatim continuation) and KnowMem (answers to questions).

Shi et al., "MUSE: Machine Unlearning Six-Way Evaluation for Language Models", 2024,
arXiv 2407.06460. VerbMem prompts the model with the start of a forget-set text, decodes greedily
(up to 128 new tokens) and scores the continuation against the true one with ROUGE-L F1; KnowMem
scores the model's answers to questions about the corpus with ROUGE-L recall (MUSE's code; some
ports use F1). ROUGE-L (Lin 2004) comes from the ``rouge-score`` package with its Porter stemmer;
its tokenizer keeps ASCII letters and digits only, so texts in other scripts score 0.

Forget texts are plain text: no chat template. ``data.text.prefix_continuations`` cuts documents
into (prompt, true continuation) pairs; continuations come from the same greedy decoder as TOFU's
answers (``evaluation.generation.greedy_batch``) run on raw token ids.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence, cast

import numpy as np
import torch

from obliviate.data.chat import length_grouped_batches
from obliviate.evaluation.generation import greedy_batch

VERBMEM_MAX_NEW_TOKENS = 128
# Tokens that end a plain text: the tokenizer's end of sequence, and the pretraining document end
# and chat end-of-turn markers of chat models.
_END_TOKENS = ("<|endoftext|>", "<|im_end|>")


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer  # about 2 s to import (nltk, absl); only generation metrics need it

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, generated: str):
    """ROUGE-L of ``generated`` against ``reference``: a Score with precision, recall, fmeasure."""
    return _scorer().score(reference, generated)["rougeL"]


def _check_pairs(generations: Sequence[str], references: Sequence[str]) -> None:
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations but {len(references)} references")
    if not references:
        raise ValueError("no samples to score")


def verbmem_scores(generations: Sequence[str], continuations: Sequence[str]) -> dict:
    """VerbMem from texts: ROUGE-L F1 of each generation against its true continuation.

    Returns ``{"verbmem": mean, "per_sample": [...]}``.
    """
    _check_pairs(generations, continuations)
    values = [rouge_l(ref, gen).fmeasure for gen, ref in zip(generations, continuations)]
    return {"verbmem": float(np.mean(values)), "per_sample": values}


def knowmem_scores(generations: Sequence[str], answers: Sequence[str]) -> dict:
    """KnowMem from texts: ROUGE-L recall of each generated answer against the reference answer.

    Returns ``{"knowmem": mean, "per_sample": [...]}``.
    """
    _check_pairs(generations, answers)
    values = [rouge_l(ref, gen).recall for gen, ref in zip(generations, answers)]
    return {"knowmem": float(np.mean(values)), "per_sample": values}


def knowmem(generate: Callable[[list[str]], list[str]], questions: Sequence[str],
            answers: Sequence[str]) -> dict:
    """KnowMem with any answer generator (e.g. ``lambda qs: generate_answers(model, fmt, qs)``).

    Adds the generations to the result as ``"generation"``.
    """
    generations = list(generate(list(questions)))
    result = knowmem_scores(generations, answers)
    result["generation"] = generations
    return result


def text_stop_ids(tokenizer) -> list[int]:
    """Ids that end a plain-text continuation: end of sequence plus any end-of-text markers."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in _END_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def continue_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
                   batch_size: int = 16) -> list[str]:
    """Greedy continuations of plain-text prompts, in input order (left-padded batches by length).

    Prompts are tokenised as the tokenizer does for plain text (its own special tokens, e.g. a BOS,
    included); each continuation stops at an end-of-text token or after ``max_new_tokens``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} is empty after tokenisation")
    stops = text_stop_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    out: list[str | None] = [None] * len(ids)
    was_training = model.training
    model.eval()
    try:
        for idx in length_grouped_batches([len(r) for r in ids], batch_size, shuffle=False):
            for i, new in zip(idx, greedy_batch(model, [ids[i] for i in idx], stops, pad_id, max_new_tokens)):
                out[i] = tokenizer.decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return cast(list[str], out)  # every index is in one batch: no None is left


@torch.no_grad()
def verbmem(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
            max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS, batch_size: int = 16) -> dict:
    """MUSE VerbMem: greedy continuation of each prompt, ROUGE-L F1 against the true continuation.

    Returns ``{"verbmem": mean, "per_sample": [...], "generation": [...]}``.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    generations = continue_texts(model, tokenizer, prompts, max_new_tokens, batch_size)
    result = verbmem_scores(generations, continuations)
    result["generation"] = generations
    return result
