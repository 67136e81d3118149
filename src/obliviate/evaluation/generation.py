"""Batched greedy answers to questions, as the TOFU ROUGE metric needs them.

TOFU (Maini et al. 2024, arXiv 2401.06121) scores greedy generations (no sampling) of up to 200 new
tokens that stop at the end of the assistant's turn. This module decodes with a short hand-written
loop over the model's KV cache instead of ``model.generate``: the loop is pure argmax, so no
generation config shipped with a checkpoint (repetition penalty, forced tokens, ...) can change it.

Prompts are left-padded so every row's next token sits in the last column, with position ids that
count real tokens only, so a question gets the same answer alone or in a batch. The prompts are run
once (``forward.prefill``; ``logprobs.score_and_generate`` shares that prefill with the scoring of the
question's answers), and a row that has finished (a stop token, or its own token budget) leaves the
batch and its cache, so the batch does no work for answers that are already complete.
"""

from __future__ import annotations

from typing import Callable, Sequence, cast

import torch

from obliviate.data.chat import ChatFormat, length_grouped_batches
from obliviate.evaluation.forward import Prefill, Runner, prefill


def stop_token_ids(fmt: ChatFormat) -> list[int]:
    """End-of-turn and end-of-sequence ids (one id when they are the same token)."""
    ids = {fmt.end_of_turn_id}
    if fmt.tokenizer.eos_token_id is not None:
        ids.add(fmt.tokenizer.eos_token_id)
    return sorted(ids)


def budgets_for(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    """One token budget per row from a number or a per-row sequence; each at least 1."""
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else [int(b) for b in max_new_tokens]
    if len(budgets) != n:
        raise ValueError(f"{len(budgets)} token budgets for {n} prompts")
    for b in budgets:
        if b < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {b}")
    return budgets


@torch.no_grad()
def decode(runner: Runner, pre: Prefill, budgets: Sequence[int], stop_ids: Sequence[int]) -> list[list[int]]:
    """Greedy continuations of prefilled prompts (``pre`` is consumed: its cache grows and loses
    rows), each cut before its first stop token and at most ``budgets[i]`` tokens long.

    A row leaves the batch, cache included, at its stop token or when its budget is spent."""
    stops = set(stop_ids)
    out: list[list[int]] = [[] for _ in budgets]
    active = list(range(len(budgets)))  # the row of ``out`` each batch row continues
    cache, mask = pre.cache, pre.mask
    positions = pre.lengths[:, None]
    token = runner.logits(pre.last).argmax(-1)
    while True:
        keep = []
        for j, (row, t) in enumerate(zip(active, token.tolist())):
            if t in stops:
                continue
            out[row].append(t)
            if len(out[row]) < budgets[row]:
                keep.append(j)
        if not keep:
            return out
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=token.device)
            cache.batch_select_indices(rows)
            mask, positions, token = mask[rows], positions[rows], token[rows]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last, cache = runner.states(token[:, None], mask, positions, cache, keep_cache=True, last_only=True)
        token = runner.logits(last).argmax(-1)
        positions = positions + 1


@torch.no_grad()
def greedy_batch(model, prompts: Sequence[list[int]], stop_ids: Sequence[int], pad_id: int,
                 max_new_tokens: int | Sequence[int], runner: Runner | None = None) -> list[list[int]]:
    """Greedy continuations of token-id prompts, each cut before its first stop token;
    ``max_new_tokens`` is one budget for all or one per prompt."""
    budgets = budgets_for(max_new_tokens, len(prompts))
    runner = runner or Runner(model)
    return decode(runner, prefill(runner, prompts, pad_id), budgets, stop_ids)


def pad_token_id(fmt: ChatFormat) -> int:
    tok = fmt.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else fmt.end_of_turn_id


def answer_text(fmt: ChatFormat, tokens: list[int]) -> str:
    """A generated answer as text: special tokens dropped, surrounding whitespace stripped."""
    return cast(str, fmt.tokenizer.decode(tokens, skip_special_tokens=True)).strip()  # one sequence: one str


def generate_answers(model, fmt: ChatFormat, questions: list[str], max_new_tokens: int | Sequence[int] = 200,
                     batch_size: int = 32, progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers to ``questions`` (chat-templated by ``fmt``), in input order.

    Each answer stops at the end-of-turn or end-of-sequence token or after ``max_new_tokens`` (one
    number, or one per question); the text is decoded without special tokens and stripped of
    surrounding whitespace. Questions are batched by prompt length to cut padding; ``progress(n)`` is
    called after each batch.
    """
    budgets = budgets_for(max_new_tokens, len(questions))
    stops = stop_token_ids(fmt)
    pad_id = pad_token_id(fmt)
    prompts = [fmt.prompt_ids(q) for q in questions]
    answers: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        runner = Runner(model)
        for idx in length_grouped_batches([len(p) for p in prompts], batch_size, shuffle=False):
            outs = greedy_batch(model, [prompts[i] for i in idx], stops, pad_id, [budgets[i] for i in idx], runner)
            for i, out in zip(idx, outs):
                answers[i] = answer_text(fmt, out)
            if progress:
                progress(len(idx))
    finally:
        model.train(was_training)
    return cast(list[str], answers)  # every index is in one batch: no None is left
