"""Attention masks given as they are: which keys each query may see, ``[R, Q, K]`` boolean, in the
form the model's attention implementation takes (transformers passes a 4D mask through unchanged).

Layouts that are not "one causal row per sequence" need them: answer trees after a prompt's cache
(evaluation) and several rows packed behind one shared prompt start (training)."""

from __future__ import annotations

import torch
from torch import nn


def _attention(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def takes_4d_mask(model: nn.Module) -> bool:
    """Whether ``model`` (unwrapped) takes a 4D attention mask as it is: transformers' SDPA attention
    takes a boolean one, eager attention an additive one; flash attention takes none. Only models
    whose every layer is full attention: a mask given as it is replaces the model's own, so a
    sliding-window layer would see past its window, and a recurrent layer (Mamba, linear attention)
    reads none and would carry one row's state into the next; a model without SDPA support (Mamba
    itself reports eager attention) is not taken either."""
    config = getattr(model, "config", None)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    return (_attention(model) in ("sdpa", "eager") and bool(getattr(type(model), "_supports_sdpa", False))
            and kinds == {"full_attention"} and getattr(config, "sliding_window", None) is None)


def mask_4d(model: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """``allowed [R, Q, K]`` (query q may see key k) as ``model``'s 4D mask ``[R, 1, Q, K]``: boolean
    for SDPA (any query dtype, autocast too), additive in the weights' dtype for eager attention."""
    mask = allowed[:, None]
    if _attention(model) == "eager":  # eager attention adds its mask to the scores
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask
