"""Quantisation attack: does rounding the weights bring forgotten knowledge back?

Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", 2024, arXiv 2410.16454,
find that unlearning methods with a utility constraint change the weights so little that
quantising the unlearned model (to 4 bits especially) lands it back near the quantised original,
and much of the forgotten knowledge returns. Evaluate the forget set on the quantised copy and
compare with the unlearned model in full precision.

Two ways in:
- :func:`quantise_model_rtn` fake-quantises every Linear weight with symmetric round-to-nearest
  per group of input columns (or per output channel) and keeps it in the original dtype. It runs on
  any device and needs no extra package; the weights take the values a real RTN kernel would use.
- :func:`load_bnb_quantised` loads a checkpoint with bitsandbytes (LLM.int8 or NF4) on a CUDA GPU,
  the kernels used in deployment.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from obliviate.errors import UserError
from obliviate.models.loading import parse_dtype, resolve_model_path


class BackendUnavailable(UserError, RuntimeError):
    """The asked-for quantisation backend cannot run here (no GPU, package missing)."""


DEFAULT_SKIP = ("lm_head", "embed")  # output head and embeddings stay in full precision, as usual


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")


def quantisation_scale(weight: torch.Tensor, bits: int, group_size: int | None = 128) -> torch.Tensor:
    """Per-group scale max|w| / (2^(bits-1) - 1), shape [out, n_groups, 1] (float32).

    Groups are ``group_size`` consecutive input columns of each output row (the last group of a row
    may be shorter); ``group_size=None`` is one group per output channel. An all-zero group gets
    scale 1 (its weights stay 0).
    """
    _check_bits(bits)
    groups = _groups(weight.detach().float(), group_size)
    scale = groups.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be positive or None, got {group_size}")
    size = w.shape[1] if group_size is None else group_size
    pad = (-w.shape[1]) % size
    # Zero padding leaves each group's max |w| unchanged; the padded columns are cut off afterwards.
    return F.pad(w, (0, pad)).reshape(w.shape[0], -1, size)


def fake_quantise(weight: torch.Tensor, bits: int, group_size: int | None = 128) -> torch.Tensor:
    """Symmetric round-to-nearest: scale * clamp(round(w / scale), -qmax, qmax), qmax = 2^(bits-1) - 1.

    Each group takes at most 2^bits - 1 distinct values and every weight moves by at most scale/2.
    Computed in float32 and returned in ``weight``'s dtype (bf16/fp16 add their own rounding).
    """
    scale = quantisation_scale(weight, bits, group_size)
    qmax = 2 ** (bits - 1) - 1
    groups = _groups(weight.detach().float(), group_size)
    q = torch.clamp(torch.round(groups / scale), -qmax, qmax) * scale
    return q.reshape(weight.shape[0], -1)[:, :weight.shape[1]].to(weight.dtype)


def quantisable_linears(model: nn.Module, skip: Sequence[str] = DEFAULT_SKIP) -> list[str]:
    """Names of the Linear modules :func:`quantise_model_rtn` quantises (name contains no ``skip``)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(s in name for s in skip)]


@torch.no_grad()
def quantise_model_rtn(model: nn.Module, bits: int = 8, group_size: int | None = 128,
                       skip: Sequence[str] = DEFAULT_SKIP) -> nn.Module:
    """A copy of ``model`` with every Linear weight (except names containing ``skip``) fake-quantised.

    The original model is not modified. Biases stay in full precision. With tied embeddings,
    quantising ``lm_head`` (removing it from ``skip``) also quantises the input embedding, as the
    two share one tensor. Merge LoRA adapters first (``merge_and_unload``): the attack is on the
    weights a deployment would quantise.
    """
    _check_bits(bits)
    if hasattr(model, "peft_config"):
        raise ValueError("merge the LoRA adapters first (model.merge_and_unload()), then quantise")
    names = quantisable_linears(model, skip)
    if not names:
        raise ValueError(f"no Linear layers to quantise (skip={tuple(skip)})")
    quantised = copy.deepcopy(model)
    modules = dict(quantised.named_modules())
    for name in names:
        weight = modules[name].weight
        weight.copy_(fake_quantise(weight, bits, group_size))
    return quantised


def load_bnb_quantised(path: str | Path, bits: int, dtype: str | torch.dtype = "bfloat16",
                       quant_type: str = "nf4"):
    """Load a model directory (or hub id) quantised by bitsandbytes on the first CUDA GPU.

    ``bits=8``: LLM.int8 (Dettmers et al. 2022, arXiv 2208.07339); ``bits=4``: 4-bit weights of
    ``quant_type`` (NF4 by default, Dettmers et al. 2023, arXiv 2305.14314) computing in ``dtype``.
    Needs a CUDA GPU and the ``bitsandbytes`` package; use :func:`quantise_model_rtn` elsewhere.
    """
    if bits not in (4, 8):
        raise ValueError(f"bitsandbytes quantises to 4 or 8 bits, got {bits!r}")
    if not torch.cuda.is_available():
        raise BackendUnavailable("bitsandbytes quantisation needs a CUDA GPU and none is available; "
                           "use obliviate.attacks.quantise.quantise_model_rtn, which runs anywhere")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendUnavailable("bitsandbytes is not installed: pip install bitsandbytes "
                           "(or use quantise_model_rtn, which needs no extra package)")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # heavy; only this optional backend needs it

    compute = parse_dtype(dtype)
    if bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                    bnb_4bit_compute_dtype=compute)
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(str(path)), quantization_config=config,
                                                dtype=compute, device_map={"": 0}, use_safetensors=True)
