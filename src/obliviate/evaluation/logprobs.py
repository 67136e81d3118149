"""Per-token log-probabilities of answers, computed once per (question, answer) pair.

Every likelihood metric (probability, truth ratio, memorisation, membership inference, exposure)
is a function of these arrays, so each evaluation scores each answer once and keeps, for each
answer token: its log-prob, whether it is the argmax, and the mean and standard deviation of
log-probs under the model's own next-token distribution (needed by Min-K%++ alone, so computed only
when asked: ``distribution=True``, the default of :func:`score_pairs`).
The scored tokens are the training labels, the answer and its closing end-of-turn token, as TOFU's
original code and the field's reference framework score them (``ChatFormat.scored_tokens="labels"``,
the default); ``scored_tokens="answer"`` scores the answer's tokens alone (docs/metrics.md).

The work is only what the scores need (``evaluation.forward``): the distinct prompts of a batch of
questions run once, and every answer to those questions (true, paraphrased, perturbed, candidates)
continues from its prompt's KV cache, so a prompt is not recomputed per answer; the question's greedy
generation continues from the same prefill (:func:`score_and_generate`). A prompt's answers run as one
token tree where the attention takes a 4D mask (:func:`_score_trees`), so a start several answers
share runs once too. The output layer runs only
at the scored positions (the prompt's last position once per question, since it predicts the first
token of every answer), a bounded number of positions at a time. Documents (an empty question,
``data.text``) have no prompt to share and are scored by one forward pass each, in padded batches.
The numbers equal those of one unpadded forward pass per pair up to float rounding (within 1e-5 on
a CPU in float32; tests/test_fast_scoring.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, cast

import numpy as np
import torch

from obliviate.data.chat import ChatFormat, Encoded, length_grouped_batches, pad_batch
from obliviate.evaluation.engines import Generate
from obliviate.evaluation.forward import PositionStats, Prefill, Runner, position_stats, prefill, select_rows
from obliviate.evaluation.generation import (
    DecodePool,
    answer_text,
    budgets_for,
    decode_width,
    pad_token_id,
    stop_token_ids,
)
from obliviate.models.attention import mask_4d, takes_4d_mask


@dataclass
class TokenScores:
    """Scores of one answer's tokens (all arrays have the answer's length)."""

    logprobs: np.ndarray  # log p(token | prefix)
    argmax_match: np.ndarray  # bool: the model's argmax equals the token
    dist_mean: np.ndarray | None  # E_{z~p}[log p(z)] at that position (None: not computed)
    dist_std: np.ndarray | None  # Std_{z~p}[log p(z)]
    token_ids: np.ndarray

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood over the answer's tokens."""
        return float(-self.logprobs.mean())

    @property
    def total_logprob(self) -> float:
        return float(self.logprobs.sum())

    def __len__(self) -> int:
        return len(self.logprobs)


# ----------------------------------------------------------------------------------------------
# the plan: which pairs and questions go through which prefill


@dataclass
class Batch:
    """One unit of work: the distinct ``prompts`` (questions) prefilled together, the ``pairs``
    (indices into the call's pairs) scored from them and the ``generate`` questions (indices into
    the call's questions) answered from them; or, with no prompts, a batch of document pairs."""

    prompts: list[str] = field(default_factory=list)
    pairs: list[int] = field(default_factory=list)
    generate: list[int] = field(default_factory=list)


def plan_batches(fmt: ChatFormat, pairs: Sequence[tuple[str, str]], questions: Sequence[str] = (),
                 batch_size: int = 32) -> list[Batch]:
    """The batches :func:`score_and_generate` runs, in order: up to ``batch_size`` distinct prompts
    of similar length per batch (length-grouped, no shuffling), with every pair and generation of
    those prompts; then the documents (pairs with an empty question), ``batch_size`` per batch.
    Deterministic, so every process of a distributed evaluation forms the same batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    by_prompt: dict[str, list[int]] = {}
    documents: list[int] = []
    for i, (q, _) in enumerate(pairs):
        if q:
            by_prompt.setdefault(q, []).append(i)
        else:
            documents.append(i)
    generate: dict[str, list[int]] = {}
    for j, q in enumerate(questions):
        generate.setdefault(q, []).append(j)
    prompts = list(dict.fromkeys([*by_prompt, *generate]))
    batches = []
    for idx in length_grouped_batches([len(fmt.prompt_ids(q)) for q in prompts], batch_size, shuffle=False):
        chosen = [prompts[k] for k in idx]
        batches.append(Batch(chosen, [i for q in chosen for i in by_prompt.get(q, ())],
                             [j for q in chosen for j in generate.get(q, ())]))
    if documents:
        lengths = [len(fmt.encode_scored(*pairs[i])) for i in documents]
        batches += [Batch(pairs=[documents[k] for k in idx])
                    for idx in length_grouped_batches(lengths, batch_size, shuffle=False)]
    return batches


# ----------------------------------------------------------------------------------------------
# running one batch


def _token_scores(targets: list[int], logprobs: np.ndarray, argmax: np.ndarray, mean: np.ndarray | None,
                  std: np.ndarray | None) -> TokenScores:
    ids = np.asarray(targets, dtype=np.int64)
    return TokenScores(logprobs=logprobs, argmax_match=argmax == ids, dist_mean=mean, dist_std=std, token_ids=ids)


def _numpy(stats: PositionStats) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(target log-probs, argmax, mean, std) on the host; mean and std None when not computed."""
    return (stats.target_logprob.cpu().numpy(), stats.argmax.cpu().numpy(),
            None if stats.mean is None else stats.mean.cpu().numpy(),
            None if stats.std is None else stats.std.cpu().numpy())


def _part(x: np.ndarray | None, start: int, n: int) -> np.ndarray | None:
    return None if x is None else x[start:start + n]


def _first_then(first: np.ndarray | None, q: int, rest: np.ndarray | None) -> np.ndarray | None:
    """``first[q]`` followed by ``rest`` (float32), or None when either was not computed."""
    if first is None or rest is None:
        return None
    return np.concatenate([[first[q]], rest]).astype(np.float32)


def _scored(e: Encoded) -> list[int]:
    return e.input_ids[e.answer_start:e.answer_start + e.scored_len]


def _score_from_prefill(runner: Runner, pre: Prefill, owner: list[int], encoded: list[Encoded], pad_id: int,
                        rows_per_pass: int, distribution: bool = True) -> list[TokenScores]:
    """Scores of answers continuing prefilled prompts: ``owner[r]`` is the prefill row of
    ``encoded[r]``'s prompt.

    The prompt's last position predicts each answer's first scored token: its distribution is
    computed once per prompt. The answers' remaining scored positions come from their tokens (all but
    the last scored one, which predicts nothing that is read) after their prompt's cache: as token
    trees, one per prompt (:func:`_score_trees`), where the attention takes a 4D mask; else one row per
    answer, ``rows_per_pass`` answers at a time, longest first. ``distribution``: also the mean and
    standard deviation of each position's log-probs (:func:`forward.position_stats`)."""
    device = runner.device
    targets = [_scored(e) for e in encoded]
    first_lp, first_argmax, first_mean, first_std = _numpy(position_stats(
        runner, pre.last, torch.tensor(owner, device=device), torch.tensor([t[0] for t in targets], device=device),
        distribution))
    empty = np.zeros(0, np.float32)
    # each answer's scores after its first token; one-token answers keep these empty arrays
    rest: list[tuple[np.ndarray | None, ...]] = [(empty, empty) + ((empty, empty) if distribution else (None, None))
                                                 ] * len(encoded)
    score = _score_trees if tree_attention(runner) else _score_rows
    score(runner, pre, owner, targets, pad_id, rows_per_pass, distribution, rest)
    out = []
    for r, t in enumerate(targets):
        q = owner[r]
        lp, am, mean, std = rest[r]
        out.append(_token_scores(t, np.concatenate([[first_lp[r]], lp]).astype(np.float32),
                                 np.concatenate([[first_argmax[q]], am]).astype(np.int64),
                                 _first_then(first_mean, q, mean), _first_then(first_std, q, std)))
    return out


def _score_rows(runner: Runner, pre: Prefill, owner: list[int], targets: list[list[int]], pad_id: int,
                rows_per_pass: int, distribution: bool, rest: list[tuple[np.ndarray | None, ...]]) -> None:
    """Fills ``rest`` as :func:`_score_trees` does, one row per answer after its prompt's cache,
    ``rows_per_pass`` answers at a time, longest first (for attention that takes no 4D mask)."""
    device = runner.device
    ordered = sorted((r for r in range(len(targets)) if len(targets[r]) > 1), key=lambda r: -len(targets[r]))
    for c in range(0, len(ordered), rows_per_pass):
        rows = ordered[c:c + rows_per_pass]
        width = len(targets[rows[0]]) - 1
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        real = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            n = len(targets[r]) - 1
            ids[k, :n] = torch.tensor(targets[r][:n])
            real[k, :n] = 1
        ids, real = ids.to(device), real.to(device)
        prompt_rows = torch.tensor([owner[r] for r in rows], device=device)
        mask = torch.cat([pre.mask[prompt_rows], real], dim=1)
        positions = pre.lengths[prompt_rows][:, None] + torch.arange(width, device=device)
        states, _ = runner.states(ids, mask, positions, select_rows(pre.cache, prompt_rows))
        flat = states[real.bool()]  # row by row, each row's real positions in order
        wanted = torch.tensor([t for r in rows for t in targets[r][1:]], device=device)
        found = _numpy(position_stats(runner, flat, torch.arange(len(wanted), device=device), wanted, distribution))
        start = 0
        for r in rows:
            n = len(targets[r]) - 1
            rest[r] = tuple(_part(x, start, n) for x in found)
            start += n


# A tree's attention is its nodes x (prompt + nodes): answers beyond this many nodes start another
# tree for the same prompt (long candidate lists), so no pass holds a quadratic-size mask.
TREE_NODES = 1024


@dataclass
class _AnswerTree:
    """Answers to one prompt (prefill row ``prompt``) as a token tree: the answers' inputs (each
    answer's scored tokens but the last) merged where they start alike, so a shared start runs once.
    Node ``n`` holds one token at depth ``depth[n]`` after the prompt, its ancestors are ``path[n]``
    (itself included), and ``reads`` lists (answer row, node, wanted token) for every scored token
    after an answer's first, in the answer's order."""

    prompt: int
    tokens: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    path: list[list[int]] = field(default_factory=list)
    reads: list[tuple[int, int, int]] = field(default_factory=list)
    index: dict[tuple[int, int], int] = field(default_factory=dict)  # (parent, token) -> node

    def add(self, row: int, targets: list[int]) -> None:
        parent = -1
        for d, token in enumerate(targets[:-1]):
            node = self.index.get((parent, token))
            if node is None:
                node = self.index[(parent, token)] = len(self.tokens)
                self.tokens.append(token)
                self.depth.append(d)
                self.path.append((self.path[parent] if parent >= 0 else []) + [node])
            self.reads.append((row, node, targets[d + 1]))
            parent = node


def tree_attention(runner: Runner) -> bool:
    """Whether the model takes the 4D attention mask :func:`_score_trees` needs."""
    return takes_4d_mask(runner.model)


def _answer_trees(owner: list[int], targets: list[list[int]]) -> list[_AnswerTree]:
    """The answers with a token after their first, as trees per prompt of at most about
    :data:`TREE_NODES` nodes."""
    open_tree: dict[int, _AnswerTree] = {}
    trees = []
    for r, t in enumerate(targets):
        if len(t) < 2:
            continue
        tree = open_tree.get(owner[r])
        if tree is None or (tree.tokens and len(tree.tokens) + len(t) - 1 > TREE_NODES):
            tree = open_tree[owner[r]] = _AnswerTree(owner[r])
            trees.append(tree)
        tree.add(r, t)
    return trees


def _score_trees(runner: Runner, pre: Prefill, owner: list[int], targets: list[list[int]], pad_id: int,
                 rows_per_pass: int, distribution: bool, rest: list[tuple[np.ndarray | None, ...]]) -> None:
    """Fills ``rest[r]`` with the scores of answer ``r``'s tokens after its first (as
    :func:`_score_from_prefill` keeps them), a prompt's answers run as :class:`_AnswerTree` after its
    prompt's cache: a node attends to
    the prompt and to its own ancestors only, at the position its depth gives, so it sees exactly
    what it sees in its answer alone, and an answer start that several answers share (a paraphrase
    and its perturbations often differ in a few words only) runs once. Trees go as many nodes at a
    time (padded) as ``rows_per_pass`` of the longest answers hold, the largest first."""
    device = runner.device
    nodes_per_pass = rows_per_pass * max(len(t) for t in targets)
    trees = sorted(_answer_trees(owner, targets), key=lambda tree: -len(tree.tokens))
    start = 0
    while start < len(trees):
        width = len(trees[start].tokens)
        chosen = trees[start:start + max(1, nodes_per_pass // width)]
        start += len(chosen)
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        depth = torch.zeros((len(chosen), width), dtype=torch.long)
        sees = torch.eye(width, dtype=torch.bool).repeat(len(chosen), 1, 1)  # padding nodes see themselves
        reads = []  # (answer row, node among the pass's real nodes, wanted token)
        first = 0
        for k, tree in enumerate(chosen):
            n = len(tree.tokens)
            ids[k, :n] = torch.tensor(tree.tokens)
            depth[k, :n] = torch.tensor(tree.depth)
            for node, ancestors in enumerate(tree.path):
                sees[k, node, ancestors] = True
            reads += [(r, first + node, token) for r, node, token in tree.reads]
            first += n
        real = torch.arange(width)[None, :] < torch.tensor([len(tree.tokens) for tree in chosen])[:, None]
        rows = torch.tensor([tree.prompt for tree in chosen], device=device)
        allowed = torch.cat([pre.mask[rows].bool()[:, None, :].expand(-1, width, -1), sees.to(device)], dim=2)
        mask = mask_4d(runner.model, allowed)  # [R, 1, W, P + W]
        positions = pre.lengths[rows][:, None] + depth.to(device)
        states, _ = runner.states(ids.to(device), mask, positions, select_rows(pre.cache, rows))
        # the output layer at the real nodes only, each once however many answers read it
        lp, am, mean, std = _numpy(position_stats(runner, states[real.to(device)],
                                                  torch.tensor([node for _, node, _ in reads], device=device),
                                                  torch.tensor([token for _, _, token in reads], device=device),
                                                  distribution))
        by_row: dict[int, list[int]] = {}
        for i, (r, _, _) in enumerate(reads):
            by_row.setdefault(r, []).append(i)
        for r, picks in by_row.items():
            nodes = [reads[i][1] for i in picks]
            rest[r] = (lp[picks], am[nodes], None if mean is None else mean[nodes], None if std is None else std[nodes])


def _score_documents(runner: Runner, encoded: list[Encoded], pad_id: int, distribution: bool = True
                     ) -> list[TokenScores]:
    """Scores of pairs without a prompt to share (documents): one right-padded forward pass, the
    output layer at the scored positions only."""
    device = runner.device
    batch = pad_batch(encoded, pad_id)
    states, _ = runner.states(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    # position t predicts token t + 1
    where = [(i, t) for i, e in enumerate(encoded)
             for t in range(e.answer_start - 1, e.answer_start - 1 + e.scored_len)]
    rows = torch.tensor([i for i, _ in where], device=device)
    cols = torch.tensor([t for _, t in where], device=device)
    targets = [_scored(e) for e in encoded]
    wanted = torch.tensor([t for ts in targets for t in ts], device=device)
    found = _numpy(position_stats(runner, states[rows, cols], torch.arange(len(wanted), device=device), wanted,
                                  distribution))
    out, start = [], 0
    for ts in targets:
        lp, am, mean, std = (_part(x, start, len(ts)) for x in found)
        out.append(_token_scores(ts, cast(np.ndarray, lp), cast(np.ndarray, am), mean, std))
        start += len(ts)
    return out


@torch.no_grad()
def run_batch(runner: Runner, fmt: ChatFormat, batch: Batch, pairs: Sequence[tuple[str, str]],
              encoded: Sequence[Encoded], questions: Sequence[str], budgets: Sequence[int], batch_size: int,
              pool: DecodePool, distribution: bool = True) -> list[TokenScores]:
    """The scores of ``batch.pairs``, in that order (``encoded[i]`` is ``pairs[i]`` as scored); the
    questions of ``batch.generate`` are queued on ``pool`` (``budgets[j]`` is ``questions[j]``'s token
    budget), their answers to come as ``pool.done[question]``. The prompts are prefilled once, the
    answers are scored from the prefill and the generations decode from it. Identical pairs are scored
    once, a question asked twice is answered once (greedy: a shorter budget's answer is the longer
    one's prefix)."""
    pad_id = pad_token_id(fmt)
    if not batch.prompts:
        return _score_documents(runner, [encoded[i] for i in batch.pairs], pad_id, distribution)
    pre = prefill(runner, [fmt.prompt_ids(q) for q in batch.prompts], pad_id)
    row_of = {q: k for k, q in enumerate(batch.prompts)}
    unique = list(dict.fromkeys(pairs[i] for i in batch.pairs))
    first_of: dict[tuple[str, str], int] = {}
    for i in batch.pairs:
        first_of.setdefault(pairs[i], i)
    scored = _score_from_prefill(runner, pre, [row_of[q] for q, _ in unique], [encoded[first_of[p]] for p in unique],
                                 pad_id, batch_size, distribution) if unique else []
    if batch.generate:
        budget_of: dict[str, int] = {}
        for j in batch.generate:
            budget_of[questions[j]] = max(budget_of.get(questions[j], 0), budgets[j])
        pool.add(pre, [row_of[q] for q in budget_of], list(budget_of), list(budget_of.values()))
    score_of = dict(zip(unique, scored))
    return [score_of[pairs[i]] for i in batch.pairs]


# ----------------------------------------------------------------------------------------------
# whole calls


@torch.no_grad()
def run_batches(model, fmt: ChatFormat, pairs: Sequence[tuple[str, str]], questions: Sequence[str],
                budgets: Sequence[int], batch_size: int, batches: Sequence[Batch],
                on_batch: Callable[[Batch, list[TokenScores], list[list[int]]], None],
                distribution: bool = True) -> None:
    """Run ``batches`` (from :func:`plan_batches` for these pairs and questions) in eval mode,
    handing each batch's scores and generated token ids (in ``batch.pairs`` and ``batch.generate``
    order) to ``on_batch`` once all of them are done; the model's train/eval mode is restored after.

    Generation runs on one :class:`DecodePool` of :func:`generation.decode_width` rows for the whole
    call (twice ``batch_size``: a decoding step holds one token per row): a batch's
    questions start decoding as earlier questions finish, and the next batch is prefilled and scored
    when the pool has room."""
    encoded = [fmt.encode_scored(q, a) for q, a in pairs]  # a pair too long fails before any model work
    if not batches:
        return
    was_training = model.training
    model.eval()
    try:
        runner = Runner(model)
        pool = DecodePool(runner, decode_width(batch_size), stop_token_ids(fmt))
        waiting: list[tuple[Batch, list[TokenScores]]] = []

        def hand_over_finished() -> None:
            for item in [w for w in waiting if all(questions[j] in pool.done for j in w[0].generate)]:
                waiting.remove(item)
                batch, scores = item
                on_batch(batch, scores, [pool.done[questions[j]][:budgets[j]] for j in batch.generate])

        for batch in batches:
            waiting.append((batch, run_batch(runner, fmt, batch, pairs, encoded, questions, budgets, batch_size,
                                             pool, distribution)))
            pool.run_while_full()
            hand_over_finished()
        pool.drain()
        hand_over_finished()
    finally:
        model.train(was_training)


def score_and_generate(model, fmt: ChatFormat, pairs: Sequence[tuple[str, str]], questions: Sequence[str],
                       max_new_tokens: int | Sequence[int] = 200, batch_size: int = 32,
                       score_progress: Callable[[int], None] | None = None,
                       generate_progress: Callable[[int], None] | None = None,
                       distribution: bool = True, generate: Generate | None = None
                       ) -> tuple[list[TokenScores], list[str]]:
    """TokenScores of each (question, answer) pair and the greedy answer to each of ``questions``
    (as ``generation.generate_answers`` gives it; ``max_new_tokens`` is one budget or one per
    question), both in input order, every prompt prefilled once for its answers and its generation.
    ``generate`` (an engine, ``evaluation.engines``) makes the answers instead; the model then scores
    the pairs only.

    Raises ValueError for a pair longer than the format's ``max_length``. ``score_progress(n)`` and
    ``generate_progress(n)`` are called after each batch with its numbers of pairs and questions.
    ``distribution=False`` leaves ``dist_mean``/``dist_std`` None (Min-K%++ alone reads them)."""
    budgets = budgets_for(max_new_tokens, len(questions))
    scores: list[TokenScores | None] = [None] * len(pairs)
    answers: list[str | None] = [None] * len(questions)

    def keep(batch: Batch, batch_scores: list[TokenScores], generations: list[list[int]]) -> None:
        for i, s in zip(batch.pairs, batch_scores):
            scores[i] = s
        for j, tokens in zip(batch.generate, generations):
            answers[j] = answer_text(fmt, tokens)
        if score_progress and batch.pairs:
            score_progress(len(batch.pairs))
        if generate_progress and batch.generate:
            generate_progress(len(batch.generate))

    asked = () if generate is not None else questions
    run_batches(model, fmt, pairs, asked, budgets, batch_size, plan_batches(fmt, pairs, asked, batch_size),
                keep, distribution)
    if generate is not None and questions:
        generated = generate([fmt.prompt_ids(q) for q in questions], budgets, stop_token_ids(fmt))
        answers = [answer_text(fmt, tokens) for tokens in generated]
        if generate_progress:
            generate_progress(len(questions))
    # every index is in exactly one batch: no None is left
    return cast(list[TokenScores], scores), cast(list[str], answers)


def score_pairs(model, fmt: ChatFormat, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
                progress: Callable[[int], None] | None = None, distribution: bool = True) -> list[TokenScores]:
    """TokenScores for each (question, answer) pair, in input order.

    The answers to a question share one prefill of its prompt; ``batch_size`` bounds the prompts
    per prefill and the answers per pass. ``progress(n)`` is called after each batch."""
    return score_and_generate(model, fmt, pairs, (), batch_size=batch_size, score_progress=progress,
                              distribution=distribution)[0]
