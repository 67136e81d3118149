"""Data-parallel evaluation: every process scores and generates a share of the batches.

Run under ``accelerate launch`` (or ``torchrun``), each process holding the whole model on its own
device (``accelerate.PartialState().device``). The work is split by *batches*, not by items: every
process plans the same batches that the one-process path plans (``logprobs.plan_batches``: the
prompts prefilled together, with their answers and generations) and takes every ``world``-th one,
so each batch is padded and computed exactly as in one process. The per-item results are gathered
(``gather_object``) and put back in input order, so the merged result is the one-process result:
bitwise where the kernels are deterministic, and never merely "close" because of a different padding.

Every process returns the full result. ``evaluate_model(..., distributed=True)`` uses these functions
in place of ``score_pairs`` and ``score_and_generate``.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from accelerate import PartialState
from accelerate.utils import gather_object

from obliviate.data.chat import ChatFormat
from obliviate.evaluation.generation import answer_text, budgets_for
from obliviate.evaluation.logprobs import Batch, TokenScores, plan_batches, run_batches

T = TypeVar("T")


def process_share(batches: list[T], rank: int, world: int) -> list[T]:
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


def score_and_generate_distributed(model, fmt: ChatFormat, pairs: Sequence[tuple[str, str]], questions: Sequence[str],
                                   max_new_tokens: int | Sequence[int] = 200, batch_size: int = 32,
                                   score_progress: Callable[[int], None] | None = None,
                                   generate_progress: Callable[[int], None] | None = None,
                                   distribution: bool = True) -> tuple[list[TokenScores], list[str]]:
    """``logprobs.score_and_generate`` with the batches split across processes; every process gets
    all scores and all answers. Progress counts whole rounds (one batch per process), so the main
    process's bars end at 100%."""
    state = PartialState()
    budgets = budgets_for(max_new_tokens, len(questions))
    batches = plan_batches(fmt, pairs, questions, batch_size)
    world = state.num_processes
    mine = process_share(batches, state.process_index, world)
    scores: list[tuple[int, TokenScores]] = []
    answers: list[tuple[int, str]] = []
    done = 0

    def keep(batch: Batch, batch_scores: list[TokenScores], generations: list[list[int]]) -> None:
        nonlocal done
        scores.extend(zip(batch.pairs, batch_scores))
        answers.extend((j, answer_text(fmt, tokens)) for j, tokens in zip(batch.generate, generations))
        round_ = batches[done * world:(done + 1) * world]
        done += 1
        if score_progress:
            score_progress(sum(len(b.pairs) for b in round_))
        if generate_progress:
            generate_progress(sum(len(b.generate) for b in round_))

    run_batches(model, fmt, pairs, questions, budgets, batch_size, mine, keep, distribution)
    return (merge_in_order(gather_object(scores), len(pairs)),
            merge_in_order(gather_object(answers), len(questions)))


def score_pairs_distributed(model, fmt: ChatFormat, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
                            progress: Callable[[int], None] | None = None,
                            distribution: bool = True) -> list[TokenScores]:
    """``score_pairs`` with the batches split across processes; every process gets all scores."""
    return score_and_generate_distributed(model, fmt, pairs, (), batch_size=batch_size, score_progress=progress,
                                          distribution=distribution)[0]


def generate_answers_distributed(model, fmt: ChatFormat, questions: list[str],
                                 max_new_tokens: int | Sequence[int] = 200, batch_size: int = 32,
                                 progress: Callable[[int], None] | None = None) -> list[str]:
    """``generate_answers`` with the batches split across processes; every process gets all answers."""
    return score_and_generate_distributed(model, fmt, (), questions, max_new_tokens, batch_size,
                                          generate_progress=progress)[1]
