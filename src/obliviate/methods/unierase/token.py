"""UniErase stage 1: the unlearning token.

UniErase (Yu, Lin, Zhang, Li, Fang, Zhang, Wang and Wang, 2025, arXiv 2505.15674) adds one new
token to the vocabulary and learns only its embedding, so that once the model has emitted it as the
first token of its answer, it goes on with an "I don't know" answer. Every other weight is frozen:
the embedding matrix trains with a gradient mask that zeroes every row but the token's, and with
Adam and no weight decay a zero gradient is a zero update, so every other row stays bit-identical.
With untied embeddings the token's output row (``lm_head``) trains too; with tied embeddings the
single shared row does both jobs.

A training sequence is ``prompt + <unlearn> + refusal + end-of-turn`` with the loss on the refusal
and the end-of-turn only (refusals from ``obliviate.data.refusal``, one per forget row).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable, Iterator, cast

import torch
from torch import nn

from obliviate.data.chat import IGNORE, ChatFormat, Encoded, pad_batch
from obliviate.data.qa import DataError, QADataset
from obliviate.data.refusal import refusal_for
from obliviate.methods.common import per_sample_nll

if TYPE_CHECKING:
    from transformers import PreTrainedModel

UNLEARN_TOKEN = "<unlearn>"


def _matrix(embedding: nn.Module) -> nn.Parameter:
    # transformers types get_input/output_embeddings() as plain nn.Module; they are Embedding / Linear
    return cast(nn.Parameter, embedding.weight)


def input_matrix(model: PreTrainedModel) -> nn.Parameter:
    """The input embedding matrix ``[vocabulary rows, hidden]``."""
    return _matrix(model.get_input_embeddings())


def token_matrices(model: PreTrainedModel) -> list[nn.Parameter]:
    """The input embedding matrix, plus the output matrix when it is a separate tensor (untied)."""
    inp = input_matrix(model)
    out = model.get_output_embeddings()
    if out is None or _matrix(out) is inp:
        return [inp]
    return [inp, _matrix(out)]


def _init_row(weight: torch.Tensor, token_id: int, init: str, tokenizer) -> torch.Tensor:
    """``mean``: mean of the rows before the new one; any other text: mean of that text's token rows."""
    if init == "mean":
        return weight[:token_id].float().mean(0)
    ids = tokenizer(init, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"token init text {init!r} has no tokens")
    return weight[ids].float().mean(0)


@torch.no_grad()
def add_unlearn_token(model: PreTrainedModel, tokenizer, token: str = UNLEARN_TOKEN,
                      init: str = "mean") -> tuple[int, bool]:
    """Add ``token`` as a special token, grow the embeddings if needed and initialise its row(s).

    Returns ``(token id, added)``. A tokenizer that already has the token (a model UniErase edited
    before) keeps it and its learnt rows: ``added`` is False and nothing changes.
    """
    vocab = tokenizer.get_vocab()
    if token in vocab:
        token_id = vocab[token]
        if token_id >= input_matrix(model).shape[0]:
            raise ValueError(f"the tokenizer has {token} (id {token_id}) but the model's embeddings have only "
                             f"{input_matrix(model).shape[0]} rows")
        return token_id, False
    tokenizer.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)
    token_id = tokenizer.convert_tokens_to_ids(token)
    rows = input_matrix(model).shape[0]
    if token_id >= rows:  # models with padded vocabularies already have spare rows
        model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    for weight in token_matrices(model):
        weight[token_id] = _init_row(weight, token_id, init, tokenizer).to(weight.dtype)
    return token_id, True


def encode_rows(fmt: ChatFormat, ds: QADataset) -> list[Encoded]:
    """``question + answer + end-of-turn`` of every row; a row too long for the format is a DataError."""
    items = []
    for i, ex in enumerate(ds.examples):
        try:
            items.append(fmt.encode(ex.question, ex.answer))
        except ValueError as exc:
            raise DataError(ds.source, int(ex.meta.get("row", i + 1)), str(exc)) from None
    return items


def refusal_examples(fmt: ChatFormat, forget: QADataset, token_id: int) -> list[Encoded]:
    """``prompt + <unlearn> + refusal_for(i) + end-of-turn``, labels on the refusal and end-of-turn."""
    items = []
    for i, ex in enumerate(forget.examples):
        prompt = fmt.prompt_ids(ex.question)
        answer = fmt.answer_ids(refusal_for(i))
        ids = prompt + [token_id] + answer + [fmt.end_of_turn_id]
        if len(ids) > fmt.max_length:
            raise DataError(forget.source, int(ex.meta.get("row", i + 1)),
                            f"question + unlearning token + refusal is {len(ids)} tokens, longer than "
                            f"max_length {fmt.max_length}")
        labels = [IGNORE] * (len(prompt) + 1) + answer + [fmt.end_of_turn_id]
        items.append(Encoded(ids, labels, len(prompt) + 1, len(answer)))
    return items


def _row_mask(weight: torch.Tensor, row: int) -> torch.Tensor:
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[row] = 1
    return mask


def train_unlearn_token(model: PreTrainedModel, fmt: ChatFormat, forget: QADataset, token_id: int, steps: int = 100,
                        lr: float = 1e-2, batch_size: int = 8, seed: int = 0, retain: QADataset | None = None,
                        progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train only the token's embedding row(s) so that ``prompt + <unlearn>`` continues with a refusal.

    With ``retain``, each step adds the NLL of a batch of retain answers: through the token's rows
    its only effect is to keep the new token's probability low where the model predicts ordinary
    text, so the token is not emitted by accident. Returns the refusal loss (mean NLL of refusal +
    end-of-turn tokens) of every step. All ``requires_grad`` flags are restored afterwards.
    """
    if steps < 0:
        raise ValueError(f"token steps must be >= 0, got {steps}")
    items = refusal_examples(fmt, forget, token_id)
    keep = [] if retain is None else encode_rows(fmt, retain)
    pad_id = fmt.tokenizer.pad_token_id if fmt.tokenizer.pad_token_id is not None else fmt.end_of_turn_id
    matrices = token_matrices(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    hooks = []
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for weight in matrices:
            weight.requires_grad_(True)
            mask = _row_mask(weight, token_id)
            hooks.append(weight.register_hook(lambda grad, mask=mask: grad * mask))
        # No weight decay: a masked (zero) gradient must give a zero update.
        optimiser = torch.optim.Adam(matrices, lr=lr, weight_decay=0.0)
        model.eval()  # no dropout: the token is learnt for the model as it generates
        batches, keep_batches = _cycle(len(items), batch_size, seed), _cycle(len(keep), batch_size, seed + 1)
        losses = []
        for step in range(steps):
            loss = per_sample_nll(model, pad_batch([items[i] for i in next(batches)], pad_id)).mean()
            losses.append(float(loss.detach()))
            if keep:
                loss = loss + per_sample_nll(model, pad_batch([keep[i] for i in next(keep_batches)], pad_id)).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if progress:
                progress(step, losses[-1])
    finally:
        for h in hooks:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    return losses


def _cycle(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices: a fresh shuffle each pass, every batch of ``min(batch_size, n)``."""
    rng = random.Random(seed)
    order: list[int] = []
    size = min(batch_size, n)
    while n:
        if len(order) < size:
            order += rng.sample(range(n), n)
        yield order[:size]
        order = order[size:]
