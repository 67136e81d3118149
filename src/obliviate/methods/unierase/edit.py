"""UniErase stage 2: a closed-form, null-space-projected edit of the MLP down-projections.

The edit makes the unlearning token the first answer token on forget questions. It follows
AlphaEdit (Fang, Jiang, Wang, Ma, Shi, Wang, He and Chua, 2024, arXiv 2410.02355), which builds on
MEMIT (Meng, Sen Sharma, Andonian, Belinkov and Bau, 2022, arXiv 2210.07229):

1. Keys and targets. For each forget question the key of layer ``l`` is the input of that layer's
   ``mlp.down_proj`` at the last prompt position. A vector ``delta_i`` added to the output of the
   last edited layer ``L`` at that position is optimised (Adam, weight decay, norm clamp, as in
   ROME/MEMIT) until the model puts the unlearning token first; the target hidden state is
   ``z_i = h_i + delta_i``.
2. Spreading. Layers are edited in ascending order; at layer ``l`` (the ``j``-th of ``n``) the
   residual ``R = (z - h_current) / (n - j)`` is written into ``down_proj`` with the closed form

       Delta = R K1^T P (Kp Kp^T P + K1 K1^T P + lambda I)^-1          (AlphaEdit, eq. 9 / Thm. 1)

   where ``K1`` are the current keys (columns), ``Kp Kp^T`` the keys of earlier edit batches and
   ``P`` the projector onto the null space of the preserved-knowledge key covariance ``K0 K0^T``.
   Since ``Delta = Delta P``, ``Delta K0 ~ 0``: outputs on preserved keys do not move.
3. The projector. ``P = U U^T`` over the eigenvectors of ``K0 K0^T / N`` whose eigenvalue is below
   ``threshold`` times the largest one. AlphaEdit thresholds the eigenvalues absolutely; a relative
   threshold means the same thing for models whose activations differ in scale.

Weights are ``down_proj.weight`` of shape ``[d_model, d_ff]`` (``out = W k``), so ``Delta`` has
that shape too. Linear algebra runs in float64.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, overload

import torch
from torch import nn

from obliviate.methods.common import decoder_layers


def down_proj(model: nn.Module, layer: int) -> nn.Linear:
    """The MLP down-projection of decoder layer ``layer`` (Llama, Mistral, Qwen, SmolLM layout)."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} does not exist (the model has layers 0..{len(layers) - 1})")
    module = getattr(getattr(layers[layer], "mlp", None), "down_proj", None)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"layer {layer} has no mlp.down_proj linear layer ({type(layers[layer]).__name__}); "
                         "UniErase edits Llama-style MLPs")
    return module


def default_layers(model: nn.Module) -> list[int]:
    """Two middle layers (one layer for a one-layer model)."""
    n = len(decoder_layers(model))
    return sorted({max(n // 2 - 1, 0), n // 2}) if n > 1 else [0]


# ---------------------------------------------------------------- batches and activations

@dataclass
class Tokens:
    """Right-padded token rows plus the positions whose activations are wanted."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    select: torch.Tensor  # [B, T] bool: positions to read keys / hidden states at


def make_tokens(rows: Sequence[list[int]], starts: Sequence[int], ends: Sequence[int], pad_id: int) -> Tokens:
    """Rows of token ids; row ``i`` selects positions ``starts[i] <= t < ends[i]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    select = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        select[i, starts[i]:ends[i]] = True
    return Tokens(ids, mask, select)


def last_position_tokens(prompts: Sequence[list[int]], pad_id: int) -> Tokens:
    """Prompts, selecting each one's last position (where the first answer token is predicted)."""
    return make_tokens(prompts, [len(p) - 1 for p in prompts], [len(p) for p in prompts], pad_id)


class _Stop(Exception):
    """Raised once every wanted activation is captured: later layers need not run."""


def _forward(model: nn.Module, batch: Tokens):
    device = next(model.parameters()).device
    return model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                 use_cache=False)


@overload
def capture(model: nn.Module, batch: Tokens, key_layers: Sequence[int] = (), out_layer: None = None
            ) -> tuple[dict[int, torch.Tensor], None]: ...


@overload
def capture(model: nn.Module, batch: Tokens, key_layers: Sequence[int] = (), *, out_layer: int
            ) -> tuple[dict[int, torch.Tensor], torch.Tensor]: ...


@overload
def capture(model: nn.Module, batch: Tokens, key_layers: Sequence[int], out_layer: int
            ) -> tuple[dict[int, torch.Tensor], torch.Tensor]: ...


@torch.no_grad()
def capture(model: nn.Module, batch: Tokens, key_layers: Sequence[int] = (), out_layer: int | None = None
            ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Keys (``down_proj`` inputs) of ``key_layers`` and the output hidden state of decoder layer
    ``out_layer`` at the selected positions: ``({layer: [N, d_ff]}, [N, d_model] or None)``, N the
    number of selected positions in row-major order. The forward stops after the deepest layer."""
    layers = decoder_layers(model)
    keys: dict[int, torch.Tensor] = {}
    hidden: list[torch.Tensor] = []
    deepest = max([*key_layers, -1 if out_layer is None else out_layer])
    select = batch.select.to(next(model.parameters()).device)

    def key_hook(layer):
        def hook(module, args):
            keys[layer] = args[0][select].detach()
        return hook

    def out_hook(module, args, output):
        hidden.append((output[0] if isinstance(output, tuple) else output)[select].detach())

    def stop_hook(module, args, output):
        raise _Stop

    handles = [down_proj(model, layer).register_forward_pre_hook(key_hook(layer)) for layer in key_layers]
    if out_layer is not None:
        handles.append(layers[out_layer].register_forward_hook(out_hook))
    handles.append(layers[deepest].register_forward_hook(stop_hook))
    try:
        _forward(model, batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return keys, (hidden[0] if hidden else None)


@torch.no_grad()
def key_second_moment(model: nn.Module, batches: Iterator[Tokens], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """``K0 K0^T / N`` per layer (float64), over the selected positions of all batches."""
    total: dict[int, torch.Tensor] = {}
    count = 0
    for batch in batches:
        keys, _ = capture(model, batch, layers)
        for layer, k in keys.items():
            k = k.double()
            total[layer] = total.get(layer, 0) + k.T @ k
        count += int(batch.select.sum())
    if count == 0:
        raise ValueError("no preserved-knowledge keys: the retain/general sets gave no tokens")
    return {layer: c / count for layer, c in total.items()}


# ---------------------------------------------------------------- the closed form

def nullspace_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """``P = U U^T`` over eigenvectors of the symmetric ``cov`` with eigenvalue < ``threshold * max``.

    ``P k ~ 0`` for every key ``k`` in the span of the keys ``cov`` was built from (AlphaEdit, sec. 3.2).
    """
    if not 0 < threshold < 1:
        raise ValueError(f"null-space threshold must be in (0, 1), got {threshold}")
    cov = cov.double()
    eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)
    small = eigvecs[:, eigvals < threshold * eigvals.max().clamp_min(1e-30)]
    return small @ small.T


def alphaedit_update(resid: torch.Tensor, keys: torch.Tensor, projector: torch.Tensor | None,
                     prior_cov: torch.Tensor | None, l2: float) -> torch.Tensor:
    """AlphaEdit's closed form ``Delta = R K1^T P (Kp Kp^T P + K1 K1^T P + l2 I)^-1``.

    ``resid`` R ``[d_out, n]``, ``keys`` K1 ``[d_in, n]``, ``projector`` P ``[d_in, d_in]`` (None:
    the identity, i.e. no null-space constraint), ``prior_cov`` ``Kp Kp^T`` (None: no earlier edits).
    Solved as ``Delta^T = (P (Kp Kp^T + K1 K1^T) + l2 I)^-1 P K1 R^T`` (P and the covariances are
    symmetric). Returns float64 ``[d_out, d_in]``.
    """
    if l2 <= 0:
        raise ValueError(f"the regularisation lambda must be > 0, got {l2}")
    resid, keys = resid.double(), keys.double()
    d = keys.shape[0]
    p = torch.eye(d, dtype=torch.float64, device=keys.device) if projector is None else projector.double()
    cov = keys @ keys.T
    if prior_cov is not None:
        cov = cov + prior_cov.double()
    lhs = p @ cov + l2 * torch.eye(d, dtype=torch.float64, device=keys.device)
    return torch.linalg.solve(lhs, p @ keys @ resid.T).T


# ---------------------------------------------------------------- target hidden states

@contextmanager
def _add_at(model: nn.Module, layer: int, select: torch.Tensor, delta: torch.Tensor):
    """Add ``delta[i]`` to the output of decoder layer ``layer`` at the i-th selected position."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        add = torch.zeros_like(hidden)
        add[select] = delta.to(hidden.dtype)
        hidden = hidden + add
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def optimise_targets(model: nn.Module, batch: Tokens, layer: int, target_id: int, steps: int = 30,
                     lr: float = 0.5, weight_decay: float = 1e-3, clamp_norm_factor: float = 4.0,
                     stop_nll: float = 0.05) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ROME/MEMIT-style target hidden states: ``delta`` added to layer ``layer``'s output at the
    selected positions (one per row) so that ``target_id`` becomes the next token.

    Loss: mean NLL of ``target_id`` + ``weight_decay * mean(|delta_i|^2 / |h_i|^2)``; after each Adam
    step ``|delta_i| <= clamp_norm_factor * |h_i|``. Stops early once the mean NLL < ``stop_nll``.
    Returns ``(z = h + delta [n, d], h [n, d], final mean NLL)`` in float32.
    """
    _, h = capture(model, batch, out_layer=layer)
    h = h.float()
    device = h.device
    select = batch.select.to(device)
    h_norm2 = h.pow(2).sum(-1).clamp_min(1e-12)
    max_norm = clamp_norm_factor * h_norm2.sqrt()
    delta = torch.zeros_like(h, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    nll = float("inf")
    try:
        for step in range(steps + 1):
            with _add_at(model, layer, select, delta):
                logits = _forward(model, batch).logits[select].float()
            nll_t = -logits.log_softmax(-1)[:, target_id].mean()
            nll = float(nll_t.detach())
            if nll < stop_nll or step == steps:
                break
            loss = nll_t + weight_decay * (delta.pow(2).sum(-1) / h_norm2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                scale = (max_norm / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return (h + delta).detach(), h, nll


# ---------------------------------------------------------------- one edit batch

@torch.no_grad()
def edit_batch(model: nn.Module, batch: Tokens, z: torch.Tensor, layers: Sequence[int],
               projectors: dict[int, torch.Tensor] | None, prior_covs: dict[int, torch.Tensor], l2: float,
               log: Callable[[str], None] | None = None) -> dict[int, torch.Tensor]:
    """Spread the move towards ``z`` (at the selected positions of layer ``max(layers)``) over
    ``layers``, ascending, and apply each update to ``down_proj.weight``; adds this batch's keys to
    ``prior_covs`` (AlphaEdit's ``Kp Kp^T`` for later batches). Returns the applied updates."""
    layers = sorted(layers)
    top = layers[-1]
    updates = {}
    for j, layer in enumerate(layers):
        keys, current = capture(model, batch, [layer], out_layer=top)
        resid = (z.to(current.device) - current.float()) / (len(layers) - j)
        delta = alphaedit_update(resid.T, keys[layer].T, None if projectors is None else projectors[layer],
                                 prior_covs.get(layer), l2)
        weight = down_proj(model, layer).weight
        weight += delta.to(weight.dtype)
        updates[layer] = delta
        if log:
            log(f"layer {layer}: |key| {keys[layer].norm(dim=-1).mean():.3g}, "
                f"|resid| {resid.norm(dim=-1).mean():.3g}, |Delta| {delta.norm():.3g}")
    keys, _ = capture(model, batch, layers)
    for layer in layers:
        k = keys[layer].double()
        prior_covs[layer] = prior_covs.get(layer, 0) + k.T @ k
    return updates
