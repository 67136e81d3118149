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

from collections import deque
from typing import Any, Callable, Hashable, Sequence, cast

import torch
from transformers.cache_utils import DynamicLayer

from obliviate.data.chat import ChatFormat, length_grouped_batches
from obliviate.evaluation.forward import Prefill, Runner, prefill, select_rows


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


class DecodePool:
    """Greedy decoding of up to ``width`` rows at a time, rows joining as others finish.

    A decoding step reads every weight whatever its number of rows (on 2 CPU cores, SmolLM2-135M: about
    100 ms for 8 rows, 145 ms for 32), so a batch whose rows finish one by one pays for its late,
    nearly empty steps. Here a
    finished row leaves the batch and its cache, and a queued row (prefilled elsewhere, e.g. with the
    scoring of its question's answers) takes its place: its cache is aligned to the pool's on the
    right, with masked columns on the left, and columns masked in every row are cut. Masked columns
    carry zero attention weight and position ids count real tokens only, so a row's tokens do not
    depend on its neighbours beyond float rounding.

    Rows join a running batch only when every cache layer is a plain ``DynamicLayer`` (its keys and
    values can be padded and joined); with other caches (sliding windows, ...) queued rows wait until
    the batch is empty, which is the plain batch-by-batch decoding."""

    def __init__(self, runner: Runner, width: int, stop_ids: Sequence[int]):
        if width < 1:
            raise ValueError(f"width must be at least 1, got {width}")
        self.runner, self.width, self.stops = runner, width, set(stop_ids)
        self.queue: deque[tuple[Prefill, int, Hashable, int]] = deque()
        self.done: dict[Hashable, list[int]] = {}
        self.keys: list[Hashable] = []  # the row each batch row continues
        self.budgets: list[int] = []
        self.out: list[list[int]] = []
        self.cache: Any = None
        self.mask = self.positions = self.tokens = torch.zeros(0)

    def add(self, pre: Prefill, rows: Sequence[int], keys: Sequence[Hashable], budgets: Sequence[int]) -> None:
        """Queue ``rows`` of ``pre``: the answer to ``pre``'s row ``rows[i]`` will be ``done[keys[i]]``,
        at most ``budgets[i]`` tokens long."""
        self.queue.extend(zip([pre] * len(rows), rows, keys, budgets))

    @property
    def full(self) -> bool:
        return len(self.keys) >= self.width

    @torch.no_grad()
    def step(self) -> bool:
        """Admit queued rows, then run one decoding step; False when there was nothing to run."""
        self._admit()
        if not self.keys:
            return False
        self._forward()
        return True

    @torch.no_grad()
    def run_while_full(self) -> None:
        """Decode while the batch is full or rows wait (filling it from the queue): return when it has
        room and the queue is empty, so the caller can queue more."""
        self._admit()
        while self.full or self.queue:  # rows still queued after admitting: the batch is full, or not joinable
            self._forward()
            self._admit()

    @torch.no_grad()
    def drain(self) -> None:
        while self.step():
            pass

    def _forward(self) -> None:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        last, self.cache = self.runner.states(self.tokens[:, None], self.mask, self.positions, self.cache,
                                              keep_cache=True, last_only=True)
        self.positions = self.positions + 1
        self._settle(self.runner.logits(last).argmax(-1))

    def _settle(self, tokens: torch.Tensor, start: int = 0) -> None:
        """``tokens`` are the batch's next tokens; those of rows ``start`` on are new: each is appended
        to its row's answer, and rows at a stop token or at their budget leave the batch."""
        keep = list(range(start))
        for j, t in enumerate(tokens[start:].tolist(), start):
            if t not in self.stops:
                self.out[j].append(t)
                if len(self.out[j]) < self.budgets[j]:
                    keep.append(j)
                    continue
            self.done[self.keys[j]] = self.out[j]
        self.tokens = tokens
        if len(keep) == len(self.keys):
            return
        self.keys = [self.keys[j] for j in keep]
        self.budgets = [self.budgets[j] for j in keep]
        self.out = [self.out[j] for j in keep]
        if not keep:
            self.cache = None
            return
        rows = torch.tensor(keep, dtype=torch.long, device=tokens.device)
        self.cache.batch_select_indices(rows)
        self.tokens, self.mask, self.positions = tokens[rows], self.mask[rows], self.positions[rows]
        self._trim()

    def _trim(self) -> None:
        """Cut the leading columns that are masked in every row (padding of rows that have left)."""
        lead = int(self.mask.argmax(dim=1).min())  # each row's first real column
        if lead > 0 and _joinable(self.cache):
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]

    def _admit(self) -> None:
        """Move queued rows into the batch, up to ``width``, one prefill's rows at a time; a row whose
        first token (from its prefill) already ends it never enters."""
        while self.queue and not self.full:
            pre = self.queue[0][0]
            if self.keys and not (_joinable(self.cache) and _joinable(pre.cache)):
                return  # other caches: the next rows start when this batch is done
            group: list[tuple[Prefill, int, Hashable, int]] = []
            while self.queue and self.queue[0][0] is pre and len(self.keys) + len(group) < self.width:
                group.append(self.queue.popleft())
            rows = torch.tensor([g[1] for g in group], dtype=torch.long, device=self.runner.device)
            cache, mask = select_rows(pre.cache, rows), pre.mask[rows]
            positions, first = pre.lengths[rows][:, None], self.runner.logits(pre.last[rows]).argmax(-1)
            start = len(self.keys)
            if start:
                self.cache, self.mask = _join(self.cache, self.mask, cache, mask)
                self.positions, first = torch.cat([self.positions, positions]), torch.cat([self.tokens, first])
            else:
                self.cache, self.mask, self.positions = cache, mask, positions
            self.keys += [g[2] for g in group]
            self.budgets += [g[3] for g in group]
            self.out += [[] for _ in group]
            self._settle(first, start)


def _joinable(cache) -> bool:
    """Whether rows can be padded and joined: every layer is a plain growing cache."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _join(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """``cache`` with ``other``'s rows appended, both right-aligned: the shorter gets masked columns
    on the left (``cache`` is changed in place and returned with the joined mask)."""
    width = max(mask.shape[1], other_mask.shape[1])

    def left(x: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - x.shape[dim]
        if not missing:
            return x
        shape = list(x.shape)
        shape[dim] = missing
        return torch.cat([x.new_zeros(shape), x], dim=dim)

    for layer, extra in zip(cache.layers, other.layers):
        layer.keys = torch.cat([left(layer.keys, 2), left(extra.keys, 2)])
        layer.values = torch.cat([left(layer.values, 2), left(extra.values, 2)])
    return cache, torch.cat([left(mask, 1), left(other_mask, 1)])


@torch.no_grad()
def decode(runner: Runner, pre: Prefill, budgets: Sequence[int], stop_ids: Sequence[int]) -> list[list[int]]:
    """Greedy continuations of prefilled prompts (``pre`` is consumed: its cache grows and loses
    rows), each cut before its first stop token and at most ``budgets[i]`` tokens long."""
    pool = DecodePool(runner, max(1, len(budgets)), stop_ids)
    pool.add(pre, range(len(budgets)), range(len(budgets)), budgets)
    pool.drain()
    return [pool.done[i] for i in range(len(budgets))]


@torch.no_grad()
def greedy_batch(model, prompts: Sequence[list[int]], stop_ids: Sequence[int], pad_id: int,
                 max_new_tokens: int | Sequence[int], runner: Runner | None = None) -> list[list[int]]:
    """Greedy continuations of token-id prompts run as one batch, each cut before its first stop
    token; ``max_new_tokens`` is one budget for all or one per prompt."""
    budgets = budgets_for(max_new_tokens, len(prompts))
    runner = runner or Runner(model)
    return decode(runner, prefill(runner, prompts, pad_id), budgets, stop_ids)


@torch.no_grad()
def greedy_many(model, prompts: Sequence[list[int]], stop_ids: Sequence[int], pad_id: int,
                max_new_tokens: int | Sequence[int], batch_size: int,
                progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """:func:`greedy_batch` for any number of prompts: prefilled ``batch_size`` at a time in groups
    of similar length, decoded on one :class:`DecodePool` of ``batch_size`` rows (a prompt starts as
    another finishes). The model is put in eval mode and restored after; ``progress(n)`` is called
    as answers finish."""
    budgets = budgets_for(max_new_tokens, len(prompts))
    was_training = model.training
    model.eval()
    try:
        runner = Runner(model)
        pool = DecodePool(runner, batch_size, stop_ids)
        reported = 0

        def report() -> None:
            nonlocal reported
            if progress and len(pool.done) > reported:
                progress(len(pool.done) - reported)
                reported = len(pool.done)

        for idx in length_grouped_batches([len(p) for p in prompts], batch_size, shuffle=False):
            pool.add(prefill(runner, [prompts[i] for i in idx], pad_id), range(len(idx)), idx,
                     [budgets[i] for i in idx])
            pool.run_while_full()
            report()
        pool.drain()
        report()
    finally:
        model.train(was_training)
    return [pool.done[i] for i in range(len(prompts))]


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
    surrounding whitespace. ``batch_size`` rows decode at a time (:func:`greedy_many`);
    ``progress(n)`` is called as answers finish.
    """
    tokens = greedy_many(model, [fmt.prompt_ids(q) for q in questions], stop_token_ids(fmt), pad_token_id(fmt),
                         max_new_tokens, batch_size, progress)
    return [answer_text(fmt, t) for t in tokens]
