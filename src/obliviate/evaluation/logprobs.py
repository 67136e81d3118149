"""Per-token log-probabilities of answers, computed once per (question, answer) pair.

Every likelihood metric (probability, truth ratio, memorisation, membership inference, exposure)
is a function of these arrays, so each evaluation runs one teacher-forced forward pass per answer
and keeps, for each answer token: its log-prob, whether it is the argmax, and the mean and standard
deviation of log-probs under the model's own next-token distribution (needed by Min-K%++).
Only the answer's tokens are scored (the closing end-of-turn is not), as in
../shared/docs/metrics-reference.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, cast

import numpy as np
import torch

from obliviate.data.chat import ChatFormat, length_grouped_batches, pad_batch


@dataclass
class TokenScores:
    """Scores of one answer's tokens (all arrays have the answer's length)."""

    logprobs: np.ndarray  # log p(token | prefix)
    argmax_match: np.ndarray  # bool: the model's argmax equals the token
    dist_mean: np.ndarray  # E_{z~p}[log p(z)] at that position
    dist_std: np.ndarray  # Std_{z~p}[log p(z)]
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


@torch.no_grad()
def score_views(model, batch: dict[str, torch.Tensor]) -> list[TokenScores]:
    """Score the answer tokens (excluding end-of-turn) of one padded batch from ``pad_batch``."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
    out = []
    for i in range(ids.shape[0]):
        start, n = int(batch["answer_start"][i]), int(batch["answer_len"][i])
        # logits at position t predict token t+1
        row = logits[i, start - 1:start - 1 + n].float()
        logp = torch.log_softmax(row, dim=-1)
        target = ids[i, start:start + n]
        tok_lp = logp.gather(-1, target[:, None]).squeeze(-1)
        p = logp.exp()
        mean = (p * logp).sum(-1)
        var = (p * (logp - mean[:, None]).pow(2)).sum(-1)  # centred: no cancellation on flat rows
        out.append(TokenScores(
            logprobs=tok_lp.cpu().numpy(),
            argmax_match=(logp.argmax(-1) == target).cpu().numpy(),
            dist_mean=mean.cpu().numpy(),
            dist_std=var.clamp_min(0).sqrt().cpu().numpy(),
            token_ids=target.cpu().numpy(),
        ))
    return out


def score_pairs(model, fmt: ChatFormat, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
                progress: Callable[[int], None] | None = None) -> list[TokenScores]:
    """TokenScores for each (question, answer) pair, in input order.

    Pairs are batched by length to cut padding; ``progress(n)`` is called after each batch.
    """
    was_training = model.training
    model.eval()
    encoded = [fmt.encode(q, a, close=False) for q, a in pairs]
    results: list[TokenScores | None] = [None] * len(encoded)
    pad_id = fmt.tokenizer.pad_token_id
    for idx in length_grouped_batches([len(e) for e in encoded], batch_size, shuffle=False):
        for i, s in zip(idx, score_views(model, pad_batch([encoded[i] for i in idx], pad_id))):
            results[i] = s
        if progress:
            progress(len(idx))
    model.train(was_training)
    return cast(list[TokenScores], results)  # every index is in one batch: no None is left
