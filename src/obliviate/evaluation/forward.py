"""How evaluation runs the model: the output layer only where it is read, prompts prefilled once.

Scoring and generation read the model's next-token distribution at a few positions (the scored
answer tokens, the last position while decoding), while the output layer (hidden size x vocabulary,
a fifth of a small model's work per token) would run at every position of every row in a plain
``model(...).logits`` call. :class:`Runner` runs the decoder alone for final hidden states and applies
the output layer to the rows that are read, when the model's logits are exactly
``get_output_embeddings()(get_decoder()(...))``; it checks that once per model on two tokens, and falls
back to the full model (logits everywhere) for models that post-process logits (soft-capping, scaling)
or have no such split.

:func:`prefill` runs left-padded prompts once and keeps their KV cache; :func:`select_rows` gives a
new cache with chosen rows (a row may repeat), so every answer to a question, and its greedy
generation, continue from the one prefill of its prompt. Position ids count real tokens only, so
padding changes no row's numbers beyond float rounding.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from obliviate.data.chat import common_start, left_pad_prompts

# Rows of logits materialised at a time when statistics over the vocabulary are computed: at most
# about 64 MiB of float32 at any vocabulary size, instead of a [tokens x vocab] tensor for the batch.
LOGIT_BYTES_PER_CHUNK = 64 * 2**20
# On a CPU the log-softmax statistics run over a few rows at a time, which stay in the cache: measured
# on SmolLM2's 49,152-token vocabulary, 8-row pieces run the element-wise passes about 4x faster than
# 341-row ones. The output-layer product itself takes as many rows as the bound allows: its weight is
# read from memory once per product, so on 2 CPU cores 341 rows cost 0.6 ms each and 64 rows 1.1 ms.
CPU_STATS_ROWS = 8

_SPLIT_IS_EXACT: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def cache_argument(module) -> str:
    """The KV-cache keyword of ``module.forward``: ``cache`` in recent transformers, where
    ``past_key_values`` is a deprecated alias; ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _split(model) -> tuple[Any, torch.nn.Module] | None:
    """(decoder, output layer) of a causal LM, or None when it has no such pair."""
    try:
        body, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if body is None or body is model or not isinstance(head, torch.nn.Module):
        return None
    return body, head


@torch.no_grad()
def _split_is_exact(model, body, head) -> bool:
    """Whether ``head(body(ids).last_hidden_state)`` is ``model(ids).logits`` (checked on two tokens)."""
    if model not in _SPLIT_IS_EXACT:
        device = next(model.parameters()).device
        ids = torch.tensor([[0, 1]], device=device)
        try:
            full = model(input_ids=ids).logits
            hidden = body(input_ids=ids).last_hidden_state
            parts = head(hidden)
            exact = full.shape == parts.shape and bool(torch.allclose(full.float(), parts.float(), rtol=1e-4,
                                                                      atol=1e-5))
        except (AttributeError, TypeError, ValueError, RuntimeError):
            exact = False
        _SPLIT_IS_EXACT[model] = exact
    return _SPLIT_IS_EXACT[model]


class Runner:
    """Forward passes of one model that return *states*: final hidden states when the output layer
    can be applied apart (:meth:`logits` applies it), the logits themselves otherwise."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        split = _split(model)
        if split is not None and _split_is_exact(model, *split):
            self.body, self.head = split
        else:
            self.body, self.head = model, None
        self.cache_arg = cache_argument(self.body)

    @property
    def vocab_size(self) -> int:
        head = self.head if self.head is not None else self.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        return int(weight.shape[0]) if weight is not None else int(self.model.config.vocab_size)

    def states(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None,
               cache=None, keep_cache: bool = False, last_only: bool = False):
        """(states, cache) of a forward pass over ``ids`` after ``cache`` (``mask`` covers both);
        the cache comes back only with ``keep_cache``. ``last_only``: the last column's states only."""
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                                  "use_cache": keep_cache or cache is not None}
        if positions is not None:
            kwargs["position_ids"] = positions
        if cache is not None:
            kwargs[self.cache_arg] = cache
        if self.head is None and last_only:
            kwargs["logits_to_keep"] = 1
        out = self.body(**kwargs)
        states = out.last_hidden_state if self.head is not None else out.logits
        if last_only:
            states = states[:, -1]
        return states, (getattr(out, self.cache_arg) if keep_cache else None)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return self.head(states) if self.head is not None else states

    def chunk_rows(self) -> tuple[int, int]:
        """(rows per output-layer product, rows per pass of the statistics)."""
        rows = max(1, LOGIT_BYTES_PER_CHUNK // (4 * self.vocab_size))
        if self.device.type == "cpu":
            return rows, min(rows, CPU_STATS_ROWS)
        return rows, rows


@dataclass
class Prefill:
    """Prompts run once: the states at each prompt's last token (they predict the first answer
    token), the KV cache, the left-padded attention mask and each prompt's length."""

    last: torch.Tensor  # [B, hidden] (or [B, vocab] without a split)
    cache: Any
    mask: torch.Tensor  # [B, P], zeros on the left padding
    lengths: torch.Tensor  # [B]


@torch.no_grad()
def prefill(runner: Runner, prompts: Sequence[list[int]], pad_id: int) -> Prefill:
    """One forward pass over ``prompts``, keeping the cache. The tokens every prompt starts with (the
    system turn: 14 of the demo's 37 prompt tokens) run once, at batch 1, and the rest of each prompt
    continues from their cache, left-padded after them: the mask has its padding between the two
    parts, which no consumer of a prefill assumes away (positions count real tokens only)."""
    shared = common_start(prompts)
    batch = left_pad_prompts([p[shared:] for p in prompts], pad_id)
    ids = batch["input_ids"].to(runner.device)
    mask = batch["attention_mask"].to(runner.device)
    positions = shared + (mask.cumsum(-1) - 1).clamp_min(0)
    cache = None
    if shared:
        start = torch.tensor([prompts[0][:shared]], device=runner.device)
        _, cache = runner.states(start, torch.ones_like(start), keep_cache=True, last_only=True)
        cache.batch_repeat_interleave(len(prompts))
        mask = torch.cat([torch.ones((len(prompts), shared), dtype=mask.dtype, device=mask.device), mask], dim=1)
    last, cache = runner.states(ids, mask, positions, cache, keep_cache=True, last_only=True)
    return Prefill(last, cache, mask, torch.tensor([len(p) for p in prompts], device=runner.device))


def select_rows(cache, rows: torch.Tensor):
    """A new cache holding ``rows`` of ``cache``'s batch, in that order (a row may repeat);
    ``cache`` itself is left as it is, so several selections can continue from one prefill."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(rows)  # each layer rebinds its tensors: the originals are untouched
    return new


@dataclass
class PositionStats:
    """What scoring keeps at each read position: the log-prob of the wanted token(s), whether the
    model's argmax is it, and the mean and standard deviation of log p under the model's own
    next-token distribution (Min-K%++, Zhang et al. 2024, arXiv 2404.02936)."""

    target_logprob: torch.Tensor  # [M]: log p(target[m] | position owner[m])
    argmax: torch.Tensor  # [N]
    mean: torch.Tensor | None  # [N]; None when not asked for
    std: torch.Tensor | None  # [N]


@torch.no_grad()
def position_stats(runner: Runner, states: torch.Tensor, owner: torch.Tensor, target: torch.Tensor,
                   distribution: bool = True) -> PositionStats:
    """Statistics of the next-token distributions at ``states`` ([N, hidden]), with the log-prob of
    ``target[m]`` at position ``owner[m]`` (a position may be asked for several targets). Without
    ``distribution`` the mean and standard deviation are not computed (None): they are a third of
    this function's time on a CPU, and only Min-K%++ reads them.

    The output layer and the log-softmax run over a bounded number of positions at a time
    (:meth:`Runner.chunk_rows`), so no [N x vocab] float32 tensor is materialised; every number is a
    per-row function, so the result equals the unchunked computation."""
    n = states.shape[0]
    device = states.device
    target_lp = torch.empty(len(owner), dtype=torch.float32, device=device)
    argmax = torch.empty(n, dtype=torch.long, device=device)
    mean = torch.empty(n, dtype=torch.float32, device=device)
    var = torch.empty(n, dtype=torch.float32, device=device)
    head_rows, stats_rows = runner.chunk_rows()
    for a in range(0, n, head_rows):
        logits = runner.logits(states[a:a + head_rows])
        end = a + logits.shape[0]
        for c in range(a, end, stats_rows):
            d = min(c + stats_rows, end)  # a piece never reaches past this product's rows
            logp = torch.log_softmax(logits[c - a:d - a].float(), dim=-1)
            wanted = (owner >= c) & (owner < d)
            target_lp[wanted] = logp[owner[wanted] - c, target[wanted]]
            argmax[c:d] = logp.argmax(-1)
            if not distribution:
                continue
            p = logp.exp()
            m = (p * logp).sum(-1)
            mean[c:d] = m
            var[c:d] = (p * (logp - m[:, None]).pow(2)).sum(-1)  # centred: no cancellation on flat rows
    if not distribution:
        return PositionStats(target_lp, argmax, None, None)
    return PositionStats(target_lp, argmax, mean, var.clamp_min(0).sqrt())
