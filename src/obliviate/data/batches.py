"""Views of QA rows and the batches built from them (what a method sees, docs/ARCHITECTURE.md).

A *view* is one way to turn a QA row into a prompt + answer pair to train or score on: ``answer``
(the true answer) or ``idk`` (a refusal, ``data.refusal``). ``encode_views`` encodes each row once
per view; ``collate`` pads the chosen rows of every view into a batch
``{view: padded view, "index", "weight", "ref_logp"?}``. The reference model's summed log-probs of a
view (``ref_logp``) are computed by ``methods.common.reference_logps``: computing them runs a model,
which belongs to the methods layer, not to data.
"""

from __future__ import annotations

from typing import Callable

import torch

from obliviate.data.chat import ChatFormat, Encoded, pad_batch
from obliviate.data.qa import DataError, QADataset, QAExample
from obliviate.data.refusal import refusal_for

# view name -> the answer it pairs with the row's question (row index, row)
VIEWS: dict[str, Callable[[int, QAExample], str]] = {
    "answer": lambda i, ex: ex.answer,
    "idk": lambda i, ex: refusal_for(i),
}


def encode_views(fmt: ChatFormat, ds: QADataset, views: tuple[str, ...]) -> list[dict[str, Encoded]]:
    """Encode each example once per view; a row that cannot be encoded is a located DataError."""
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown view(s) {', '.join(unknown)}; known views: {', '.join(VIEWS)}")
    out = []
    for i, ex in enumerate(ds.examples):
        row = {}
        for view in views:
            if view != "answer" and not ex.question:
                raise DataError(ds.source, ex.meta.get("row", i + 1), f"this method's '{view}' view needs questions; "
                                "the row is a plain-text document (use ga, graddiff, npo, simnpo or rmu)")
            try:
                row[view] = fmt.encode(ex.question, VIEWS[view](i, ex))
            except ValueError as exc:
                raise DataError(ds.source, ex.meta.get("row", i + 1), str(exc)) from None
        out.append(row)
    return out


def view_lengths(rows: list[dict[str, Encoded]]) -> list[int]:
    """Each row's token count in its ``answer`` view (its first view when it has none): what
    length-grouped batching sorts by."""
    return [len(r["answer"] if "answer" in r else next(iter(r.values()))) for r in rows]


def collate(rows: list[dict[str, Encoded]], index: list[int], pad_id: int,
            weights: torch.Tensor | None = None, ref_logps: dict[str, torch.Tensor] | None = None) -> dict:
    """A batch of ``rows`` (the set's rows at ``index``): one padded view per view name, ``index``,
    ``weight`` (ones without ``weights``) and, given ``ref_logps``, ``ref_logp`` {view: [B]}."""
    batch: dict = {view: pad_batch([r[view] for r in rows], pad_id) for view in rows[0]}
    idx = torch.tensor(index, dtype=torch.long)
    batch["index"] = idx
    batch["weight"] = weights[idx] if weights is not None else torch.ones(len(index))
    if ref_logps:
        batch["ref_logp"] = {view: values[idx] for view, values in ref_logps.items()}
    return batch


def batch_tokens(batch: dict | None) -> int:
    """Non-padding tokens over every view of a (CPU) batch: counted before it moves to the device,
    so counting never waits for the accelerator."""
    if batch is None:
        return 0
    return int(sum(v["attention_mask"].sum() for v in batch.values() if isinstance(v, dict) and "attention_mask" in v))


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch
