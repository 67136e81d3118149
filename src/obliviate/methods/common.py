"""Shared pieces of the losses: log-probs of label tokens, KL on label tokens, hidden states.

Label tokens are those whose label is not -100 (the answer and its closing end-of-turn, see
``data.chat``); the logits at position t predict token t+1, so logits and labels are shifted by one.
Only the label positions' logits are cast to float32, which keeps the [tokens, vocab] float32 copy
small (answers are a fraction of each row).
"""

from __future__ import annotations

import torch
from torch import nn

from obliviate.data.chat import IGNORE, Encoded, pad_batch

_LAYER_LISTS = ("layers", "h")  # Llama/Mistral/Qwen/SmolLM ("layers"), GPT-2 style ("h")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: nn.Module, view: dict, **kwargs):
    device = _device(model)
    return model(input_ids=view["input_ids"].to(device), attention_mask=view["attention_mask"].to(device),
                 use_cache=False, **kwargs)


def label_logits(model: nn.Module, view: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits at the label positions of a view.

    Returns ``(logits [N, V], targets [N], rows [N])`` where N counts the label tokens of the whole
    batch in row-major order and ``rows`` says which batch row each one belongs to.
    """
    labels = view["labels"][:, 1:]
    n_tokens = (labels != IGNORE).sum(1)
    if bool((n_tokens == 0).any()):
        empty = (n_tokens == 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} of the batch have no label tokens (labels are all -100)")
    logits = _forward(model, view).logits[:, :-1]
    labels = labels.to(logits.device)
    mask = labels != IGNORE
    rows = mask.nonzero(as_tuple=True)[0]
    return logits[mask].float(), labels[mask], rows


def sequence_logps(model: nn.Module, view: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's label tokens and their count: ``(sum_logp [B], n_tokens [B])``."""
    logits, targets, rows = label_logits(model, view)
    # log_softmax gathered at the target, without materialising a second [N, V] tensor
    token_logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    batch = view["input_ids"].shape[0]
    sum_logp = torch.zeros(batch, device=token_logp.device, dtype=torch.float32).index_add(0, rows, token_logp)
    n_tokens = torch.bincount(rows, minlength=batch)
    return sum_logp, n_tokens


def per_sample_nll(model: nn.Module, view: dict) -> torch.Tensor:
    """Mean negative log-likelihood of each row's label tokens, ``[B]``."""
    sum_logp, n_tokens = sequence_logps(model, view)
    return -sum_logp / n_tokens


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
