"""The UniErase recipe: learn the unlearning token, then edit the model to emit it on forget questions.

UniErase: Yu, Lin, Zhang, Li, Fang, Zhang, Wang and Wang, 2025, arXiv 2505.15674. Stage 1 is
``methods.unierase.token``, stage 2 (an AlphaEdit-style edit, Fang et al. 2024, arXiv 2410.02355) is
``methods.unierase.edit``. After both, a forget question is answered ``<unlearn> I don't know...``; the
token is a special token, so decoded generations (``skip_special_tokens=True``) show only the
refusal. See docs/unierase.md.

Edited again: a model that carries earlier UniErase edits must keep them, so the new edit preserves
the earlier forget questions' keys (the last-prompt keys that now lead to the token, and the
``<unlearn> + refusal`` continuation): they join ``K0`` and, weighted, the ``Kp`` prior, exactly as
preserved questions do. ``unierase.json`` lists the edits a model carries by fingerprint only
(``edits``: sha256 of each forget set's rows and its size; never the rows, which are the deleted
data), and the :class:`UniErase` procedure refuses to edit a model whose recorded edits are not all
among the earlier forget sets it is given (``earlier``; ``obliviate forget`` passes them from its
ledger).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, cast

import torch
from torch import nn

from obliviate.data.chat import ChatFormat, iter_chunks
from obliviate.data.qa import DataError, QADataset, QAExample
from obliviate.data.sources import as_dataset
from obliviate.data.world_facts import real_authors, world_facts
from obliviate.errors import UserError
from obliviate.methods.base import ProcedureResult
from obliviate.methods.unierase.edit import (
    Tokens,
    default_layers,
    down_proj,
    edit_batch,
    key_second_moment,
    last_position_tokens,
    make_tokens,
    nullspace_projector,
    optimise_targets,
)
from obliviate.methods.unierase.token import (
    UNLEARN_TOKEN,
    add_unlearn_token,
    encode_rows,
    input_matrix,
    refusal_examples,
    token_matrices,
    train_unlearn_token,
)
from obliviate.models.loading import save_checkpoint
from obliviate.options import options_from_dict
from obliviate.runs import atomic_write_json, read_json
from obliviate.runs.fingerprint import dataset_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

STATS_FILE = "unierase.json"


@dataclass
class UniEraseOptions:
    """Options of both stages (defaults follow MEMIT/AlphaEdit where they have one)."""

    token: str = UNLEARN_TOKEN
    token_init: str = "mean"  # "mean" of the existing rows, or a text whose tokens' rows are averaged
    token_steps: int = 150
    token_lr: float = 1e-2
    token_batch_size: int = 8
    layers: list[int] | None = None  # None: two middle layers
    null_space: bool = True  # False: the same edit without the projection (for comparisons)
    nullspace_threshold: float = 1e-3  # relative to the largest eigenvalue of K0 K0^T / N
    l2: float = 1.0  # AlphaEdit's lambda
    target_steps: int = 30
    target_lr: float = 0.5
    target_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    edit_batch_size: int = 0  # forget questions per edit (later batches see earlier ones as Kp); 0: all
    preserve_general: bool = True  # built-in world facts and real authors add to K0
    preserve_refusals: bool = True  # "<unlearn> + refusal" continuations add to K0
    first_token_weight: float = 10.0  # weight of preserved questions' last-prompt keys in the Kp term (0: off)
    batch_size: int = 16  # rows per forward pass when collecting keys
    seed: int = 0
    # Forget sets (data specs) of the model's earlier UniErase edits: their questions are preserved.
    earlier: list[str] = field(default_factory=list)
    require_earlier: bool = True  # refuse a model whose recorded edits are not all among ``earlier``

    def __post_init__(self) -> None:
        for name in ("token_steps", "target_steps", "edit_batch_size"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("token_lr", "l2", "target_lr", "clamp_norm_factor", "token_batch_size", "batch_size"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.target_weight_decay < 0:
            raise ValueError(f"target_weight_decay must be >= 0, got {self.target_weight_decay}")
        if not 0 < self.nullspace_threshold < 1:
            raise ValueError(f"nullspace_threshold must be in (0, 1), got {self.nullspace_threshold}")
        if self.layers is not None:
            self.layers = sorted({int(layer) for layer in self.layers})
            if not self.layers:
                raise ValueError("layers must name at least one layer")
        if not self.token.strip():
            raise ValueError("the unlearning token must not be empty")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "UniEraseOptions":
        return options_from_dict(cls, values, "UniErase options")


class EarlierEditsMissing(UserError, ValueError):
    """The model carries UniErase edits whose forget sets were not given: a new edit could undo them."""


def edit_record(ds: QADataset) -> dict[str, Any]:
    """What ``unierase.json`` keeps of one edit: the sha256 of its forget rows and their number (no
    rows, no file names: the model directory travels, and the rows are the deleted data)."""
    fp = dataset_fingerprint(ds)
    return {"sha256": fp["sha256"], "n": fp["n"]}


def recorded_edits(model_dir: str | Path | None) -> list[dict[str, Any]]:
    """The edits ``model_dir/unierase.json`` says the model carries (``edits``; a model edited once
    before the list existed: none known)."""
    if not model_dir or not (Path(model_dir) / STATS_FILE).is_file():
        return []
    try:
        edits = read_json(Path(model_dir) / STATS_FILE).get("edits") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [dict(e) for e in edits if isinstance(e, Mapping) and isinstance(e.get("sha256"), str)]


def _merged(*groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for group in groups:
        for e in group:
            out.setdefault(str(e["sha256"]), {"sha256": str(e["sha256"]), "n": e.get("n")})
    return list(out.values())


def _pad_id(fmt: ChatFormat) -> int:
    return fmt.tokenizer.pad_token_id if fmt.tokenizer.pad_token_id is not None else fmt.end_of_turn_id


def preserved_batches(fmt: ChatFormat, sets: Sequence[QADataset], refusal_rows: Sequence[tuple[list[int], int]],
                      batch_size: int) -> Iterator[Tokens]:
    """K0's tokens: every position of each QA set's ``question + answer + end-of-turn``, and of each
    refusal row from its given start on (the unlearning token; for an earlier edit's question, the
    last prompt position, whose key now leads to the token)."""
    rows = [(e.input_ids, 0) for ds in sets for e in encode_rows(fmt, ds)] + list(refusal_rows)
    for chunk in iter_chunks(rows, batch_size):
        yield make_tokens([r for r, _ in chunk], [s for _, s in chunk], [len(r) for r, _ in chunk], _pad_id(fmt))


@torch.no_grad()
def first_token_rate(model: nn.Module, fmt: ChatFormat, questions: Sequence[str], token_id: int,
                     batch_size: int = 16) -> float:
    """Share of questions whose greedy first answer token is ``token_id``."""
    if not questions:
        raise ValueError("first_token_rate needs at least one question")
    hits = 0
    device = next(model.parameters()).device
    for chunk in iter_chunks(list(questions), batch_size):
        batch = last_position_tokens([fmt.prompt_ids(q) for q in chunk], _pad_id(fmt))
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                       use_cache=False).logits[batch.select.to(device)]
        hits += int((logits.argmax(-1) == token_id).sum())
    return hits / len(questions)


def edited_share(model: PreTrainedModel, layers: Sequence[int], token_rows: int) -> dict[str, float | int]:
    """Edited entries (whole ``down_proj`` matrices of the edited layers plus the token's rows)
    over all parameters (tied matrices counted once)."""
    total = sum(p.numel() for p in model.parameters())
    edit = sum(down_proj(model, layer).weight.numel() for layer in layers)
    token = token_rows * input_matrix(model).shape[1]
    return {"total_params": total, "edit_params": edit, "token_params": token,
            "edited_share": (edit + token) / total}


def apply_unierase(model: PreTrainedModel, tokenizer, forget: QADataset, retain: QADataset | None,
                   options: UniEraseOptions | None = None, *, fmt: ChatFormat | None = None,
                   general: QADataset | None = None, earlier: Sequence[QADataset] = (),
                   recorded: Sequence[Mapping[str, Any]] = (), log: Callable[[str], None] | None = None
                   ) -> dict[str, Any]:
    """Run both stages on ``model`` and ``tokenizer`` in place; returns the statistics.

    What the edit preserves comes from ``retain`` and ``general`` (default: the built-in world facts
    and real authors when ``preserve_general``); rows asking a forget question are left out.
    ``earlier``: the forget sets of earlier UniErase edits of this model, whose questions must keep
    leading to the token (module doc); ``recorded``: the edits the model's ``unierase.json`` lists,
    carried into this edit's ``edits`` with the earlier sets and this forget set.
    """
    opts = options or UniEraseOptions()
    if len(forget) == 0:
        raise DataError(forget.source, None, "the forget set is empty")
    fmt = fmt or ChatFormat(tokenizer)
    say = log or (lambda message: None)
    start = time.perf_counter()
    stats: dict[str, Any] = {"method": "unierase", "options": asdict(opts), "forget": len(forget),
                             "retain": len(retain) if retain is not None else 0,
                             "edits": _merged(recorded, [edit_record(ds) for ds in earlier], [edit_record(forget)])}
    asked = {ex.question for ex in forget.examples}
    # Earlier edits' questions (not asked again now), once each: the keys this edit must not move.
    kept = {ex.question: ex for ds in earlier for ex in ds.examples if ex.question not in asked}
    earlier_rows = QADataset(list(kept.values()), "earlier UniErase edits")
    stats["earlier"] = len(earlier_rows)
    preserved = [QADataset([ex for ex in ds.examples if ex.question not in asked], ds.source)
                 for ds in (retain, general if general is not None else _builtin_general(opts)) if ds]
    # Rows too long for the format fail here, before the model or tokenizer is touched.
    refusal_examples(fmt, forget, token_id=0)
    refusal_examples(fmt, earlier_rows, token_id=0)
    for ds in ([retain] if retain else []) + preserved:
        encode_rows(fmt, ds)
    token_id = _stage1(model, tokenizer, fmt, forget, retain, opts, stats, say)
    was_training = model.training
    model.eval()
    try:
        _stage2(model, fmt, forget, preserved, earlier_rows, token_id, opts, stats, say)
        stats["forget_first_token_rate"] = first_token_rate(model, fmt, [ex.question for ex in forget.examples],
                                                            token_id, opts.batch_size)
        if earlier_rows:  # the earlier edits, after this one: should stay at the rate they had
            stats["earlier_first_token_rate"] = first_token_rate(
                model, fmt, [ex.question for ex in earlier_rows.examples], token_id, opts.batch_size)
        if retain:
            stats["retain_first_token_rate"] = first_token_rate(model, fmt, [ex.question for ex in retain.examples],
                                                                token_id, opts.batch_size)
    finally:
        model.train(was_training)
    stats.update(edited_share(model, stats["layers"], len(token_matrices(model))))
    stats["seconds"] = round(time.perf_counter() - start, 3)
    say(f"stage 2: {opts.token} is the first answer token on {stats['forget_first_token_rate']:.0%} of forget "
        f"questions; {stats['edited_share']:.4%} of parameters edited")
    return stats


def _stage1(model: PreTrainedModel, tokenizer, fmt: ChatFormat, forget: QADataset, retain: QADataset | None,
            opts: UniEraseOptions, stats: dict[str, Any], say: Callable[[str], None]) -> int:
    """Add and train the unlearning token (kept as is when the tokenizer already has it)."""
    token_id, added = add_unlearn_token(model, tokenizer, opts.token, opts.token_init)
    stats.update(token=opts.token, token_id=token_id, token_added=added)
    if not added:
        say(f"stage 1: the tokenizer already has {opts.token} (id {token_id}); its learnt rows are kept")
        return token_id
    losses = train_unlearn_token(model, fmt, forget, token_id, opts.token_steps, opts.token_lr,
                                 opts.token_batch_size, opts.seed, retain=retain)
    stats["token_loss"] = {"first": losses[0] if losses else None, "last": losses[-1] if losses else None}
    say(f"stage 1: {opts.token} (id {token_id}) trained {len(losses)} steps, refusal NLL "
        f"{stats['token_loss']['first']} -> {stats['token_loss']['last']}")
    return token_id


def _stage2(model: nn.Module, fmt: ChatFormat, forget: QADataset, preserved: list[QADataset], earlier: QADataset,
            token_id: int, opts: UniEraseOptions, stats: dict[str, Any], say: Callable[[str], None]) -> None:
    """The edit: projectors from K0, the Kp prior, then target hidden states and closed-form updates
    for each edit batch of forget questions. ``earlier`` questions join both K0 (from their last
    prompt position on, with the token and a refusal after it) and the prior."""
    layers = opts.layers or default_layers(model)
    for layer in layers:
        down_proj(model, layer)  # fails early on a bad layer
    stats["layers"] = layers
    pad_id = _pad_id(fmt)
    projectors = None
    if opts.null_space:
        refusals = ([(e.input_ids, e.answer_start - 1) for e in refusal_examples(fmt, forget, token_id)]
                    if opts.preserve_refusals else [])
        # answer_start - 2: the last prompt position, whose key leads an earlier question to the token.
        refusals += [(e.input_ids, e.answer_start - 2) for e in refusal_examples(fmt, earlier, token_id)]
        covs = key_second_moment(model, preserved_batches(fmt, preserved, refusals, opts.batch_size), layers)
        projectors = {layer: nullspace_projector(c, opts.nullspace_threshold) for layer, c in covs.items()}
        stats["null_space_dims"] = {str(layer): int(round(float(p.trace()))) for layer, p in projectors.items()}
        say(f"stage 2: null-space dimensions {stats['null_space_dims']} of {covs[layers[0]].shape[0]}")
    prior: dict[int, torch.Tensor] = {}
    questions = [fmt.prompt_ids(ex.question) for ds in [*preserved, earlier] for ex in ds.examples]
    if opts.first_token_weight > 0 and questions:
        batches = (last_position_tokens(c, pad_id) for c in iter_chunks(questions, opts.batch_size))
        for layer, cov in key_second_moment(model, batches, layers).items():  # cov = K K^T / N
            prior[layer] = opts.first_token_weight * len(questions) * cov
    prompts = [fmt.prompt_ids(ex.question) for ex in forget.examples]
    target_nll = []
    for chunk in iter_chunks(prompts, opts.edit_batch_size or len(prompts)):
        z = []
        for part in iter_chunks(chunk, opts.batch_size):
            zs, _, nll = optimise_targets(model, last_position_tokens(part, pad_id), layers[-1], token_id,
                                          opts.target_steps, opts.target_lr, opts.target_weight_decay,
                                          opts.clamp_norm_factor)
            z.append(zs)
            target_nll.append(nll)
        edit_batch(model, last_position_tokens(chunk, pad_id), torch.cat(z), layers, projectors, prior, opts.l2,
                   log=say)
    stats["target_nll"] = max(target_nll)


def _builtin_general(opts: UniEraseOptions) -> QADataset | None:
    if not opts.preserve_general:
        return None
    rows: list[QAExample] = world_facts() + real_authors()
    return QADataset(rows, "obliviate.data.world_facts")


@dataclass
class UniErase:
    """UniErase as a registered method (``build_method("unierase", **options)``): a
    :class:`~obliviate.methods.base.Procedure`, not trained by the loop. ``apply`` runs both stages
    on the model and tokenizer in place (the tokenizer gains the unlearning token) and returns them
    with the statistics of :func:`apply_unierase`."""

    options: UniEraseOptions = field(default_factory=UniEraseOptions)
    name: str = "unierase"

    def apply(self, model: nn.Module, tokenizer, forget: QADataset, retain: QADataset | None, fmt: ChatFormat, *,
              general: QADataset | None = None, log: Callable[[str], None] | None = None) -> ProcedureResult:
        # A Procedure receives any module; UniErase needs a Hugging Face causal LM's embedding API.
        hf_model = cast("PreTrainedModel", model)
        earlier = [as_dataset(spec) for spec in self.options.earlier]
        # The edits this model carries, from the directory it was loaded from (Hugging Face's name_or_path).
        recorded = recorded_edits(getattr(model, "name_or_path", None))
        check_earlier(recorded, earlier, self.options.require_earlier)
        stats = apply_unierase(hf_model, tokenizer, forget, retain, self.options, fmt=fmt, general=general,
                               earlier=earlier, recorded=recorded, log=log)
        return ProcedureResult(model, tokenizer, stats)


def check_earlier(recorded: Sequence[Mapping[str, Any]], earlier: Sequence[QADataset], required: bool = True) -> None:
    """Raise :class:`EarlierEditsMissing` when a recorded edit's forget set is not among ``earlier``
    (matched by the sha256 of their rows) and ``required``."""
    given = {edit_record(ds)["sha256"] for ds in earlier}
    missing = [e for e in recorded if e["sha256"] not in given]
    if missing and required:
        rows = sum(int(e.get("n") or 0) for e in missing)
        raise EarlierEditsMissing(
            f"the model carries {len(missing)} earlier UniErase edit(s) ({rows} forget rows) whose forget sets were "
            "not given, so this edit could undo them: pass each earlier request's forget rows with "
            "-m earlier=[FILE,...] (`obliviate forget` finds them in its ledger), or -m require_earlier=false to edit "
            "without preserving them")


def unierase(model: PreTrainedModel, tokenizer, forget: QADataset, retain: QADataset | None, out: str | Path,
             options: UniEraseOptions | dict | None = None, *, fmt: ChatFormat | None = None,
             general: QADataset | None = None, log: Callable[[str], None] | None = None) -> Path:
    """UniErase ``forget`` from ``model`` (edited in place) and write the result to ``out``: a
    Hugging Face checkpoint directory (safetensors, the tokenizer with the unlearning token) plus
    ``unierase.json`` with the statistics of both stages. Returns ``out``."""
    opts = UniEraseOptions.from_dict(options) if isinstance(options, dict) else options
    stats = apply_unierase(model, tokenizer, forget, retain, opts, fmt=fmt, general=general, log=log)
    path = save_checkpoint(model, tokenizer, out)
    atomic_write_json(path / STATS_FILE, stats)
    return path
