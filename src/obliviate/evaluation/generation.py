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


def decode_width(batch_size: int) -> int:
    """Rows decoded at once for a scoring batch size: four times as many. A decoding step reads every
    weight (and every row's cache) for one token per row, so it is bound by memory traffic more than
    by arithmetic at a scoring batch's size: on 2 CPU cores with SmolLM2-135M and a 150-token cache,
    a step costs 6.5 ms per token at 64 rows, 5.0 at 96 and 4.4 at 128. The pool's cache grows with
    it (the issue-12 evaluation peaks at 4.0 GB of resident memory with 128 rows, 2.5 GB with 64)."""
    return 4 * batch_size


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
        to its row's answer, and rows at a stop token or at their budget leave the batch (the last
        rows fill their slots, so row order is not kept: each row carries its key)."""
        leaving: set[int] = set()
        for j, t in enumerate(tokens[start:].tolist(), start):
            if t not in self.stops:
                self.out[j].append(t)
                if len(self.out[j]) < self.budgets[j]:
                    continue
            self.done[self.keys[j]] = self.out[j]
            leaving.add(j)
        self.tokens = tokens
        if not leaving:
            return
        order = _fill_from_the_end(len(self.keys), leaving)
        self.keys = [self.keys[j] for j in order]
        self.budgets = [self.budgets[j] for j in order]
        self.out = [self.out[j] for j in order]
        if not order:
            self.cache = None
            return
        rows = torch.tensor(order, dtype=torch.long, device=tokens.device)
        for layer in self.cache.layers:
            if isinstance(layer, _PoolLayer):
                layer.move_rows(order)
            else:
                layer.batch_select_indices(rows)
        self.tokens, self.mask, self.positions = tokens[rows], self.mask[rows], self.positions[rows]
        self._trim()

    def _trim(self) -> None:
        """Cut the leading columns that are masked in every row (padding of rows that have left)."""
        lead = int(self.mask.argmax(dim=1).min())  # each row's first real column
        if lead > 0 and all(isinstance(layer, _PoolLayer) for layer in self.cache.layers):
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.cut(lead)

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
            mask = pre.mask[rows]
            positions, first = pre.lengths[rows][:, None], self.runner.logits(pre.last[rows]).argmax(-1)
            start = len(self.keys)
            if start:
                for layer, extra in zip(self.cache.layers, pre.cache.layers):
                    layer.join(extra.keys[rows], extra.values[rows])
                self.mask = _join_masks(self.mask, mask)
                self.positions, first = torch.cat([self.positions, positions]), torch.cat([self.tokens, first])
            else:
                self.cache = _pooled(select_rows(pre.cache, rows), self.width)
                self.mask, self.positions = mask, positions
            self.keys += [g[2] for g in group]
            self.budgets += [g[3] for g in group]
            self.out += [[] for _ in group]
            self._settle(first, start)


class _PoolLayer(DynamicLayer):
    """One layer of the decoding pool's cache, kept in buffers with room for the pool's ``width`` rows
    and for more columns; ``keys``/``values`` are views of the live block (rows ``[0, rows)``, columns
    ``[lo, hi)``). A decoding step writes its column in place, a leaving row's slot takes one of the
    last rows (:meth:`move_rows`), joining rows are written after the last row, right-aligned
    (:meth:`join`), and cutting masked leading columns moves ``lo`` (:meth:`cut`): only running out
    of room copies the cache. (``DynamicLayer`` concatenates the whole cache at every step and copies
    it at every change of rows; sampled in the issue-12 evaluation on 2 CPU cores, those copies were
    a sixth of the decoding time.) Columns a row does not use are zeros: masked, but never garbage (a NaN
    times a zero attention weight is still NaN)."""

    ROOM = 64  # columns of room a (re)allocation leaves at the right

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, width: int):
        super().__init__()
        self.is_initialized, self.device = True, keys.device
        self._fill(keys, values, width)

    def _fill(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        rows, _, cols, _ = keys.shape
        self.buffers = tuple(t.new_empty((max(width, rows), t.shape[1], cols + self.ROOM, t.shape[3]))
                             for t in (keys, values))
        for buf, t in zip(self.buffers, (keys, values)):
            buf[:rows, :, :cols] = t
        self.rows, self.lo, self.hi = rows, 0, cols
        self._view()

    def _view(self) -> None:
        self.keys, self.values = (b[:self.rows, :, self.lo:self.hi] for b in self.buffers)

    def get_seq_length(self) -> int:
        return self.hi - self.lo

    def _regrow(self, left: int, right: int) -> None:
        """New buffers: the live block with ``left`` columns of room before it and ``right`` after."""
        cols = self.hi - self.lo
        grown = []
        for buf in self.buffers:
            new = buf.new_empty((buf.shape[0], buf.shape[1], left + cols + right, buf.shape[3]))
            new[:self.rows, :, left:left + cols] = buf[:self.rows, :, self.lo:self.hi]
            grown.append(new)
        self.buffers, self.lo, self.hi = tuple(grown), left, left + cols

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if self.hi + new > self.buffers[0].shape[2]:
            self._regrow(0, new + self.ROOM)
        for buf, states in zip(self.buffers, (key_states, value_states)):
            buf[:self.rows, :, self.hi:self.hi + new] = states
        self.hi += new
        self._view()
        return self.keys, self.values

    def move_rows(self, order: Sequence[int]) -> None:
        """Keep ``len(order)`` rows, row ``i`` being the old row ``order[i]``; a moved row's source is
        not a kept slot (as :func:`_fill_from_the_end` orders them), so moving in place is safe."""
        for i, j in enumerate(order):
            if i != j:
                for buf in self.buffers:
                    buf[i, :, self.lo:self.hi] = buf[j, :, self.lo:self.hi]
        self.rows = len(order)
        self._view()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Any selection (``DynamicCache``'s interface): a copy of the chosen rows, with room again."""
        keys, values = cast(torch.Tensor, self.keys), cast(torch.Tensor, self.values)
        self._fill(keys[indices], values[indices], self.buffers[0].shape[0])

    def cut(self, lead: int) -> None:
        """Drop the first ``lead`` live columns (masked in every row)."""
        self.lo += lead
        self._view()

    def join(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append ``keys.shape[0]`` rows whose caches end at the batch's last column; the shorter of
        the two (batch or newcomers) gets zero columns on the left, as :func:`_join_masks` masks."""
        new, cols = keys.shape[0], keys.shape[2]
        if self.rows + new > self.buffers[0].shape[0]:
            raise ValueError(f"{self.rows + new} rows do not fit the pool's {self.buffers[0].shape[0]}")
        if cols > self.hi:  # the newcomers reach further left than the buffers do
            self._regrow(cols - (self.hi - self.lo), self.buffers[0].shape[2] - self.hi)
        lo = min(self.lo, self.hi - cols)
        for buf, states in zip(self.buffers, (keys, values)):
            buf[:self.rows, :, lo:self.lo] = 0
            buf[self.rows:self.rows + new, :, lo:self.hi - cols] = 0
            buf[self.rows:self.rows + new, :, self.hi - cols:self.hi] = states
        self.rows, self.lo = self.rows + new, lo
        self._view()


def _fill_from_the_end(count: int, leaving: set[int]) -> list[int]:
    """The order of the rows that stay when rows ``leaving`` of ``count`` leave: each gap among the
    first ``count - len(leaving)`` slots is filled by one of the last rows, so only those move."""
    kept = count - len(leaving)
    movers = [j for j in range(kept, count) if j not in leaving]
    order = list(range(kept))
    for i, j in zip([i for i in order if i in leaving], movers):
        order[i] = j
    return order


def _pooled(cache, width: int):
    """``cache`` with its plain layers made :class:`_PoolLayer` buffers of ``width`` rows."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = _PoolLayer(cast(torch.Tensor, layer.keys), cast(torch.Tensor, layer.values), width)
    return cache


def _joinable(cache) -> bool:
    """Whether rows can be padded and joined: every layer is a plain growing cache."""
    return all(type(layer) in (DynamicLayer, _PoolLayer) for layer in cache.layers)


def _join_masks(mask: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``other``'s rows after ``mask``'s, both right-aligned: the narrower gets zeros on the left
    (as :meth:`_PoolLayer.join` lays out the cache)."""
    width = max(mask.shape[1], other.shape[1])
    return torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in (mask, other)])


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
    of similar length, decoded on one :class:`DecodePool` of :func:`decode_width` rows (a prompt
    starts as another finishes). The model is put in eval mode and restored after; ``progress(n)`` is called
    as answers finish."""
    budgets = budgets_for(max_new_tokens, len(prompts))
    was_training = model.training
    model.eval()
    try:
        runner = Runner(model)
        pool = DecodePool(runner, decode_width(batch_size), stop_ids)
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
    surrounding whitespace. ``batch_size`` prompts are prefilled at a time and twice as many decode
    together (:func:`greedy_many`);
    ``progress(n)`` is called as answers finish.
    """
    tokens = greedy_many(model, [fmt.prompt_ids(q) for q in questions], stop_token_ids(fmt), pad_token_id(fmt),
                         max_new_tokens, batch_size, progress)
    return [answer_text(fmt, t) for t in tokens]
