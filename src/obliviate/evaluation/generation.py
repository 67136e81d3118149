"""Batched greedy answers to questions, as the TOFU ROUGE metric needs them.

TOFU (Maini et al. 2024, arXiv 2401.06121) scores greedy generations (no sampling) of up to 200 new
tokens that stop at the end of the assistant's turn. This module decodes with a short hand-written
loop over the model's KV cache instead of ``model.generate``: the loop is pure argmax, so no
generation config shipped with a checkpoint (repetition penalty, forced tokens, ...) can change it.

Prompts are left-padded so every row's next token sits in the last column, with position ids that
count real tokens only, so a question gets the same answer alone or in a batch.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence, cast

import torch

from obliviate.data.chat import ChatFormat, left_pad_prompts, length_grouped_batches


def stop_token_ids(fmt: ChatFormat) -> list[int]:
    """End-of-turn and end-of-sequence ids (one id when they are the same token)."""
    ids = {fmt.end_of_turn_id}
    if fmt.tokenizer.eos_token_id is not None:
        ids.add(fmt.tokenizer.eos_token_id)
    return sorted(ids)


@torch.no_grad()
def greedy_batch(model, prompts: Sequence[list[int]], stop_ids: Sequence[int], pad_id: int,
                 max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of token-id prompts, each cut before its first stop token."""
    device = next(model.parameters()).device
    batch = left_pad_prompts(prompts, pad_id)
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    stops = torch.tensor(list(stop_ids), device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    cache_arg = _cache_argument(model)
    past = None
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{cache_arg: past})
        past = getattr(out, cache_arg)
        token = out.logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        steps.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()):
            break
        ids = token[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    if not steps:
        return [[] for _ in prompts]
    rows = torch.stack(steps, dim=1).tolist()
    stop_set = set(stop_ids)
    return [_until_stop(row, stop_set) for row in rows]


def _cache_argument(model) -> str:
    """The KV-cache keyword of ``model.forward``: ``cache`` in recent transformers, where
    ``past_key_values`` is a deprecated alias; ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i]
    return tokens


def generate_answers(model, fmt: ChatFormat, questions: list[str], max_new_tokens: int = 200,
                     batch_size: int = 32, progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers to ``questions`` (chat-templated by ``fmt``), in input order.

    Each answer stops at the end-of-turn or end-of-sequence token or after ``max_new_tokens``;
    the text is decoded without special tokens and stripped of surrounding whitespace. Questions
    are batched by prompt length to cut padding; ``progress(n)`` is called after each batch.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tok = fmt.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else fmt.end_of_turn_id
    stops = stop_token_ids(fmt)
    prompts = [fmt.prompt_ids(q) for q in questions]
    answers: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for idx in length_grouped_batches([len(p) for p in prompts], batch_size, shuffle=False):
            outs = greedy_batch(model, [prompts[i] for i in idx], stops, pad_id, max_new_tokens)
            for i, out in zip(idx, outs):
                answers[i] = cast(str, tok.decode(out, skip_special_tokens=True)).strip()  # one sequence: one str
            if progress:
                progress(len(idx))
    finally:
        model.train(was_training)
    return cast(list[str], answers)  # every index is in one batch: no None is left
