"""Shared pieces of the losses: log-probs of label tokens, KL on label tokens, hidden states.

Label tokens are those whose label is not -100 (the answer and its closing end-of-turn, see
``data.chat``); the logits at position t predict token t+1, so logits and labels are shifted by one.

The output layer runs only where it is read: the model is asked for the logits of the label
positions alone (``logits_to_keep``, transformers' slicing of the hidden states before the LM head,
where the model supports it), so the prompt's positions never reach the [tokens x vocab] projection.
Where a label token sits is computed once per batch on the host (:func:`index_labels`, which the
training loop calls before a batch moves to the device), so no step waits for the device to find
them. Per-token log-probs take the log-softmax over the vocabulary in chunks of rows
(:func:`target_logps`): no [tokens x vocab] float32 copy is kept for backward, the same numbers.
Rows run packed behind the prompt start they share where that runs fewer positions
(:func:`pack_rows`, planned on the host with the label index): the shared start once, no padding.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from obliviate.data.chat import IGNORE, Encoded, common_start, pad_batch
from obliviate.models.attention import mask_4d, takes_4d_mask

_LAYER_LISTS = ("layers", "h")  # Llama/Mistral/Qwen/SmolLM ("layers"), GPT-2 style ("h")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: nn.Module, view: dict, **kwargs):
    device = _device(model)
    return model(input_ids=view["input_ids"].to(device), attention_mask=view["attention_mask"].to(device),
                 use_cache=False, **kwargs)


LABEL_INDEX = ("label_pos", "label_flat", "label_rows", "label_count")
LOGPROB_CHUNK = 1024  # label tokens per chunk of the vocabulary log-softmax
PACKED = ("pack_ids", "pack_positions", "pack_allowed", "pack_keep", "pack_pick")
# The longest packed row: attention over a packed row is quadratic in its length, so longer rows
# would spend on attention what packing saves in the linear layers (at 512 tokens on SmolLM2-135M,
# attention is about 15% of a token's work, against about 2% in a 64-token row).
PACK_TOKENS = 512


def label_index(view: dict) -> dict[str, torch.Tensor]:
    """Where a view's label tokens are: ``label_pos [B, K]`` the positions whose logits predict them
    (K = the most label tokens of a row; a shorter row's extra entries point at prompt positions and
    are never read), ``label_flat [N]`` the entries of the B x K grid that are label tokens (row-major,
    so each row's tokens in order), ``label_rows [N]`` their row, ``label_count [B]`` tokens per row.

    Read from the view when :func:`index_labels` put them there; computed from ``labels`` otherwise
    (on the labels' device: a host sync when that is an accelerator)."""
    if all(k in view for k in LABEL_INDEX):
        return {k: view[k] for k in LABEL_INDEX}
    mask = view["labels"][:, 1:] != IGNORE
    counts = mask.sum(1)
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} of the batch have no label tokens (labels are all -100)")
    k = int(counts.max())
    # A stable sort puts each row's label positions first, in order.
    pos = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
    valid = torch.arange(k, device=mask.device)[None, :] < counts[:, None]
    flat = valid.reshape(-1).nonzero().squeeze(1)
    return {"label_pos": pos, "label_flat": flat, "label_rows": torch.div(flat, k, rounding_mode="floor"),
            "label_count": counts}


def pack_rows(view: dict, max_tokens: int = PACK_TOKENS) -> dict[str, torch.Tensor]:
    """The rows of a right-padded view packed behind the start they share, ``{}`` where that does not
    run fewer token positions than the padded rows.

    A batch's prompts usually share their start (the chat template's system turn: 14 of the 41-51
    tokens of the demo's rows). Packed, the shared start runs once and each row's own tokens follow
    it in the same sequence, with no padding between; a row's tokens see the shared start and their
    own row's earlier tokens only, at the positions they have in their own row, so every logit is
    the one the row gets alone (up to float rounding). Rows are packed in order into packed rows of
    at most ``max_tokens`` (a row longer than that is a packed row of its own); packed rows are padded
    to the longest, and a padding position sees only itself. Returns ``pack_ids``/``pack_positions``
    ``[P, L]``, ``pack_allowed [P, L, L]`` (which positions each one sees), ``pack_keep [P, M]`` (the
    positions whose logits predict label tokens, M the most of a packed row) and ``pack_pick [N]``
    (which of the ``P x M`` logits is each label token of :func:`label_index`, in its order)."""
    ids, mask = view["input_ids"], view["attention_mask"]
    rows, width = ids.shape
    lengths = mask.sum(1)
    if not torch.equal(mask.bool(), torch.arange(width)[None, :] < lengths[:, None]) or int(lengths.min()) < 1:
        return {}  # not right-padded, or an empty row
    shared = common_start([ids[r, :n].tolist() for r, n in enumerate(lengths.tolist())])
    own = (lengths - shared).tolist()
    packs: list[list[int]] = [[]]
    for r in range(rows):
        if packs[-1] and shared + sum(own[i] for i in packs[-1]) + own[r] > max_tokens:
            packs.append([])
        packs[-1].append(r)
    size = max(shared + sum(own[i] for i in pack) for pack in packs)
    if len(packs) * size >= rows * width:
        return {}
    idx = label_index(view)
    pos, count = idx["label_pos"], idx["label_count"].tolist()
    keep: list[list[int]] = [[] for _ in packs]
    picks = []  # (packed row, index in its keep list) of each label token, in label_index's order
    pack_ids = torch.zeros(len(packs), size, dtype=torch.long)
    positions = torch.zeros(len(packs), size, dtype=torch.long)
    segment = torch.full((len(packs), size), -2)  # -1: the shared start; -2: padding; else the row
    for p, pack in enumerate(packs):
        pack_ids[p, :shared], positions[p, :shared], segment[p, :shared] = ids[0, :shared], torch.arange(shared), -1
        base = shared
        for r in pack:
            pack_ids[p, base:base + own[r]] = ids[r, shared:lengths[r]]
            positions[p, base:base + own[r]] = torch.arange(shared, int(lengths[r]))
            segment[p, base:base + own[r]] = r
            for t in pos[r, :count[r]].tolist():
                picks.append((p, len(keep[p])))
                keep[p].append(t if t < shared else base + t - shared)  # a shared position is the same in all
            base += own[r]
    most = max(len(k) for k in keep)
    pack_keep = torch.zeros(len(packs), most, dtype=torch.long)
    for p, kept in enumerate(keep):
        pack_keep[p, :len(kept)] = torch.tensor(kept, dtype=torch.long)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(size, size, dtype=torch.bool).tril()
    allowed = causal & ((key == query) | (key == -1)) & (query != -2) | torch.eye(size, dtype=torch.bool)
    return {"pack_ids": pack_ids, "pack_positions": positions, "pack_allowed": allowed, "pack_keep": pack_keep,
            "pack_pick": torch.tensor([p * most + j for p, j in picks], dtype=torch.long)}


def index_labels(batch: dict) -> dict:
    """``batch`` with :func:`label_index` and :func:`pack_rows` added to each of its views, computed
    where the batch is (the loop calls it on the host before the batch moves to the device)."""
    def indexed(view: dict) -> dict:
        view = {**view, **label_index(view)}
        return {**view, **pack_rows(view)}  # pack_rows reads the index just made

    return {k: indexed(v) if isinstance(v, dict) and "labels" in v else v for k, v in batch.items()}


@functools.cache
def _slices_logits(cls: type) -> bool:
    """Whether ``cls.forward`` takes ``logits_to_keep`` as positions per row (transformers' 2D form)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401  (the 2D form's helper)
    except ImportError:
        return False
    forward = getattr(cls, "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters


def _base_model(model: nn.Module) -> nn.Module:
    """The model under DDP/FSDP (``module``) and peft (``get_base_model``) wrappers."""
    while True:
        unwrap = getattr(model, "get_base_model", None)
        inner = unwrap() if callable(unwrap) else getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _label_logits(model: nn.Module, view: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the label positions in the model's dtype, ``[N, V]``, their targets ``[N]``, rows
    ``[N]`` and the label tokens per row ``[B]``; through the (wrapped) model's own forward, so
    DDP/FSDP hooks run."""
    idx = label_index(view)
    if "label_pos" in view:  # where the label index was made (the host, index_labels), so was the packing, or not
        packed = {k: view[k] for k in PACKED if k in view}
    else:  # a bare view: packed here if that needs no wait for an accelerator
        packed = pack_rows({**view, **idx}) if view["input_ids"].device.type == "cpu" else {}
    device = _device(model)
    base = _base_model(model)
    pos = idx["label_pos"].to(device)
    flat = idx["label_flat"].to(device)
    targets = view["labels"][:, 1:].to(device).gather(1, pos).reshape(-1).index_select(0, flat)
    if not _slices_logits(type(base)):  # type: ignore[arg-type]  # classes are hashable
        full = _forward(model, view).logits
        logits = full.gather(1, pos[..., None].expand(-1, -1, full.shape[-1]))
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, flat)
    elif packed and takes_4d_mask(base):
        logits = model(input_ids=packed["pack_ids"].to(device), position_ids=packed["pack_positions"].to(device),
                       attention_mask=mask_4d(base, packed["pack_allowed"].to(device)), use_cache=False,
                       logits_to_keep=packed["pack_keep"].to(device)).logits
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, packed["pack_pick"].to(device))
    else:
        logits = _forward(model, view, logits_to_keep=pos).logits  # [B, K, V]: only the label positions
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, flat)
    return logits, targets, idx["label_rows"].to(device), idx["label_count"].to(device)


def label_logits(model: nn.Module, view: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits at the label positions of a view.

    Returns ``(logits [N, V], targets [N], rows [N])`` where N counts the label tokens of the whole
    batch in row-major order and ``rows`` says which batch row each one belongs to.
    """
    logits, targets, rows, _ = _label_logits(model, view)
    return logits.float(), targets, rows


class _TargetLogProb(torch.autograd.Function):
    """log_softmax(logits)[i, targets[i]] in chunks of rows; backward recomputes each chunk's softmax
    from the saved logits (in their own dtype), so no [N, V] float32 tensor outlives a chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        out = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
        lse = torch.empty_like(out)
        for s in range(0, logits.shape[0], chunk):
            z = logits[s:s + chunk].float()
            lse[s:s + chunk] = z.logsumexp(-1)
            out[s:s + chunk] = z.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            g = grad[s:s + ctx.chunk, None].float()
            # d/dz_j (z_t - logsumexp z) = 1[j = t] - softmax(z)_j
            dz = (logits[s:s + ctx.chunk].float() - lse[s:s + ctx.chunk, None]).exp().mul_(-g)
            dz.scatter_add_(-1, targets[s:s + ctx.chunk, None], g)
            grad_logits[s:s + ctx.chunk] = dz.to(logits.dtype)
        return grad_logits, None, None


def target_logps(logits: torch.Tensor, targets: torch.Tensor, chunk: int = LOGPROB_CHUNK) -> torch.Tensor:
    """``log softmax(logits)[i, targets[i]]`` in float32, ``[N]``, the softmax taken ``chunk`` rows at a
    time (see :class:`_TargetLogProb`); equal to ``logits.float().log_softmax(-1).gather(...)``."""
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.float32)
    return _TargetLogProb.apply(logits, targets, chunk)


def sequence_logps(model: nn.Module, view: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's label tokens and their count: ``(sum_logp [B], n_tokens [B])``."""
    logits, targets, rows, n_tokens = _label_logits(model, view)
    token_logp = target_logps(logits, targets)
    batch = view["input_ids"].shape[0]
    sum_logp = torch.zeros(batch, device=token_logp.device, dtype=torch.float32).index_add(0, rows, token_logp)
    return sum_logp, n_tokens


def per_sample_nll(model: nn.Module, view: dict) -> torch.Tensor:
    """Mean negative log-likelihood of each row's label tokens, ``[B]``."""
    sum_logp, n_tokens = sequence_logps(model, view)
    return -sum_logp / n_tokens


def token_logps(model: nn.Module, view: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each label token and the batch row it belongs to: ``(token_logp [N], rows [N])``,
    the terms :func:`sequence_logps` sums (for losses that weight tokens one by one)."""
    logits, targets, rows, _ = _label_logits(model, view)
    return target_logps(logits, targets), rows


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ``-sum_v target(v) log softmax(logits)(v)`` of each row, ``[N]``; ``target`` is a
    distribution over the vocabulary (zeros allowed) and carries no gradient."""
    return -(target * logits.log_softmax(-1)).sum(-1)


def row_means(values: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean of per-label-token ``values [N]`` over each row's label tokens, ``[B]``: token-level losses
    become the per-sample loss a forget objective returns (``label_logits`` refuses rows without any)."""
    sums = torch.zeros(batch, device=values.device, dtype=values.dtype).index_add(0, rows, values)
    counts = torch.zeros_like(sums).index_add(0, rows, torch.ones_like(values))  # bincount would sync on a GPU
    return sums / counts


def kl_on_labels(model: nn.Module, ref_model: nn.Module, view: dict) -> torch.Tensor:
    """KL(ref || model) of the next-token distributions, averaged over the label tokens of the batch.

    KL(p_ref || p) = sum_v p_ref(v) (log p_ref(v) - log p(v)); the reference side carries no gradient.
    """
    logits, _, _ = label_logits(model, view)
    with torch.no_grad():
        ref_logits, _, _ = label_logits(ref_model, view)
    logp = logits.log_softmax(-1)
    ref_logp = ref_logits.to(logp.device).log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()


@torch.no_grad()
def reference_logps(ref_model: nn.Module, views: dict[str, dict]) -> dict[str, torch.Tensor]:
    """``{view name: summed log-prob of its label tokens [B]}`` under the frozen reference model.

    The loop calls this once per forget batch before training and stores the results as
    ``forget["ref_logp"]`` (float32, on the CPU). Run it in the same precision (autocast) as training,
    so that at step 0 the policy/reference log-ratio is zero.
    """
    out = {}
    for name, view in views.items():
        if not isinstance(view, dict) or "input_ids" not in view:
            raise ValueError(f"reference_logps: '{name}' is not a view (a dict with input_ids, labels, ...)")
        out[name] = sequence_logps(ref_model, view)[0].float().cpu()
    return out


def reference_logps_for_rows(ref_model: nn.Module, rows: list[dict[str, Encoded]], pad_id: int,
                             batch_size: int) -> dict[str, torch.Tensor]:
    """:func:`reference_logps` of a whole encoded set (``data.batches.encode_views``), ``batch_size``
    rows at a time in eval mode: ``{view: [len(rows)]}``, row order kept. The loop calls it once
    before training (the model as it is then is the frozen reference), so no reference copy has to
    stay in memory."""
    was_training = ref_model.training
    ref_model.eval()
    views = list(rows[0])
    out = {v: torch.zeros(len(rows)) for v in views}
    try:
        for start in range(0, len(rows), batch_size):
            chunk = list(range(start, min(start + batch_size, len(rows))))
            logps = reference_logps(ref_model, {v: pad_batch([rows[i][v] for i in chunk], pad_id) for v in views})
            for v in views:
                out[v][chunk] = logps[v]
    finally:
        ref_model.train(was_training)
    return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (also found through peft / DDP wrappers)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and name.rsplit(".", 1)[-1] in _LAYER_LISTS:
            return module
    raise ValueError(f"no list of decoder layers (a ModuleList named {' or '.join(_LAYER_LISTS)}) in "
                     f"{type(model).__name__}")


class _Captured(Exception):
    """Raised by the capture hook: layers after the captured one need not run."""


def hidden_states_at(model: nn.Module, layer: int, view: dict) -> torch.Tensor:
    """Output hidden states ``[B, T, d]`` of decoder layer ``layer`` (0-based), keeping the graph.

    A forward hook captures the layer's output and, on one process, stops the forward there, so the
    later layers and the vocabulary projection are never computed. Under several processes the
    forward runs to the end: DDP/FSDP wrappers set up their gradient synchronisation after the
    wrapped forward returns, which an exception would skip. The hook is removed before returning, so
    a gradient-checkpointing recomputation in backward does not trigger it again.
    """
    captured: list[torch.Tensor] = []
    stop_early = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                      and torch.distributed.get_world_size() > 1)

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        if stop_early:
            raise _Captured

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        _forward(model, view)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"decoder layer {layer} did not run in the forward pass")
    return captured[0]


def token_mask(view: dict, tokens: str) -> torch.Tensor:
    """Positions to use, ``[B, T]`` bool: the label (answer) tokens, or every non-padding token."""
    if tokens == "answer":
        mask = view["labels"] != IGNORE
    elif tokens == "all":
        mask = view["attention_mask"].bool()
    else:
        raise ValueError(f"tokens must be 'answer' or 'all', got {tokens!r}")
    if bool((mask.sum(1) == 0).any()):
        raise ValueError(f"rows {(mask.sum(1) == 0).nonzero().flatten().tolist()} of the batch have no {tokens} tokens")
    return mask
