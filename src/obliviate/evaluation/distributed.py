"""Data-parallel evaluation: every process scores and generates a share of the batches.

Run under ``accelerate launch`` (or ``torchrun``), each process holding the whole model on its own
device (``accelerate.PartialState().device``). The work is split by *batches*, not by items: every
process forms the same length-grouped batches that the one-process path forms (``score_pairs`` and
``generate_answers`` with ``shuffle=False``) and takes every ``world``-th one, so each batch is padded
and computed exactly as in one process. The per-item results are gathered (``gather_object``) and put
back in input order, so the merged result is the one-process result: bitwise where the kernels are
deterministic, and never merely "close" because of a different padding.

Every process returns the full result. ``evaluate_model(..., distributed=True)`` uses these two
functions in place of ``score_pairs`` and ``generate_answers``.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from accelerate import PartialState
from accelerate.utils import gather_object

from obliviate.data.chat import ChatFormat, length_grouped_batches
from obliviate.evaluation.generation import generate_answers
from obliviate.evaluation.logprobs import TokenScores, score_pairs

T = TypeVar("T")


def process_share(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """The batches process ``rank`` of ``world`` computes: every ``world``-th, starting at ``rank``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return batches[rank::world]


def merge_in_order(parts: Sequence[tuple[int, T]], n: int) -> list[T]:
    """``(index, value)`` pairs from all processes -> the values in index order, each index once."""
    out: list = [None] * n
    seen = [False] * n
    for i, value in parts:
        if not 0 <= i < n or seen[i]:
            raise ValueError(f"index {i} is out of range 0..{n - 1} or came back twice")
        out[i], seen[i] = value, True
    if not all(seen):
        raise ValueError(f"{seen.count(False)} of {n} items came back from no process")
    return out


def _run_sharded(lengths: list[int], batch_size: int, compute: Callable[[list[int]], list[T]],
                 progress: Callable[[int], None] | None) -> list[T]:
    state = PartialState()
    batches = length_grouped_batches(lengths, batch_size, shuffle=False)
    world = state.num_processes
    mine: list[tuple[int, T]] = []
    for k, idx in enumerate(process_share(batches, state.process_index, world)):
        mine += zip(idx, compute(idx))
        if progress:  # the whole round of batches (one per process), so the main process's bar ends at 100%
            progress(sum(len(b) for b in batches[k * world:(k + 1) * world]))
    return merge_in_order(gather_object(mine), len(lengths))


def score_pairs_distributed(model, fmt: ChatFormat, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
                            progress: Callable[[int], None] | None = None) -> list[TokenScores]:
    """``score_pairs`` with the batches split across processes; every process gets all scores.

    Each share is scored by ``score_pairs`` one batch at a time (``batch_size`` = the batch's size),
    which keeps that batch's rows and padding as they are in the one-process call.
    """
    lengths = [len(fmt.encode(q, a, close=False)) for q, a in pairs]
    return _run_sharded(lengths, batch_size,
                        lambda idx: score_pairs(model, fmt, [pairs[i] for i in idx], batch_size=len(idx)),
                        progress)


def generate_answers_distributed(model, fmt: ChatFormat, questions: list[str], max_new_tokens: int = 200,
                                 batch_size: int = 32, progress: Callable[[int], None] | None = None) -> list[str]:
    """``generate_answers`` with the batches split across processes; every process gets all answers."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    lengths = [len(fmt.prompt_ids(q)) for q in questions]
    return _run_sharded(lengths, batch_size,
                        lambda idx: generate_answers(model, fmt, [questions[i] for i in idx],
                                                     max_new_tokens=max_new_tokens, batch_size=len(idx)),
                        progress)
