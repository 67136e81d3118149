"""WAGLE: which weights unlearning may change.

Jia, Liu, Zhang, Ram, Baracaldo and Liu 2024, "WAGLE: Strategic Weight Attribution for Effective and
Modular Unlearning in Large Language Models" (NeurIPS 2024, arXiv 2410.17509). Each weight theta_j is
scored by how much the forget loss would change if that weight were reset, with the retain loss's
optimality kept to first order, approximating the retain-loss Hessian by gamma * I:

    S_j = | (theta_j - g_r,j / gamma) * g_f,j |

g_f is the gradient of the method's own forget objective (``method.forget``: GA's, NPO's, the
refusal NLL on the "idk" view for ``idk_nll``, the DPO loss on both views for ``idk_dpo`` ...), and
g_r the gradient of the retain NLL (mean over all retain answer tokens), each accumulated over one
pass over its whole set at the starting model. The retain NLL is used whatever the method's retain
regulariser: KL- or representation-matching regularisers have zero gradient at the starting model,
so they carry no information about which weights the retain data needs.

The mask keeps the top fraction ``rho`` of the candidate weights by S (ranked over all candidates,
per decoder layer, or per parameter tensor); training (``training.loop``) then changes no other weight,
weight decay included. Candidates are the parameters the method trains (RMU: its three MLPs), with
norms and embeddings included unless excluded by option; every other parameter the method trains
gets an all-False mask, so it is frozen too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from obliviate.data.batches import collate, encode_views, to_device
from obliviate.data.chat import IGNORE, ChatFormat, Encoded
from obliviate.data.qa import QADataset
from obliviate.methods import Composite, StepInputs, reference_logps_for_rows, sequence_logps
from obliviate.options import options_from_dict
from obliviate.runs import atomic_write_bytes

MASK_FORMAT = "obliviate.wagle/1"
SCOPES = ("global", "layer", "tensor")

# (module type, pattern searched in the parameter name); the first match wins.
MODULE_TYPES: tuple[tuple[str, str], ...] = (
    ("q_proj", r"\bq_proj\b|\.query\b"),
    ("k_proj", r"\bk_proj\b|\.key\b"),
    ("v_proj", r"\bv_proj\b|\.value\b"),
    ("o_proj", r"\bo_proj\b|\bout_proj\b|attn\.c_proj\b"),
    ("qkv_proj", r"\bqkv_proj\b|\bc_attn\b|query_key_value"),
    ("gate_proj", r"\bgate_proj\b|\bw1\b"),
    ("up_proj", r"\bup_proj\b|\bc_fc\b|\bw3\b"),
    ("down_proj", r"\bdown_proj\b|mlp\.c_proj\b|\bw2\b"),
    ("embeddings", r"embed|\bwte\b|\bwpe\b"),
    ("lm_head", r"lm_head"),
    ("norm", r"norm|\bln_"),
)
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def module_type(name: str) -> str:
    """The kind of module a parameter belongs to (q_proj, gate_proj, embeddings, norm, ...)."""
    for kind, pattern in MODULE_TYPES:
        if re.search(pattern, name):
            return kind
    return "other"


def layer_of(name: str) -> str:
    """``layer N`` for parameters of decoder block N, else ``non-layer`` (embeddings, final norm, head)."""
    match = _LAYER.search(name)
    return f"layer {int(match.group(1))}" if match else "non-layer"


@dataclass
class WagleConfig:
    rho: float = 0.2  # share of candidate weights the mask lets move
    gamma: float = 1e-6  # Hessian ~ gamma * I; small gamma lets the retain gradient dominate the score
    scope: str = "global"  # rank over all candidates, within each decoder layer, or within each tensor
    include_norms: bool = True
    include_embeddings: bool = True  # embeddings and an untied lm_head
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not (isinstance(self.rho, (int, float)) and 0 < self.rho <= 1):
            raise ValueError(f"wagle rho must be in (0, 1], got {self.rho!r}")
        if not (isinstance(self.gamma, (int, float)) and math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"wagle gamma must be a finite number > 0, got {self.gamma!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"wagle scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.batch_size < 1:
            raise ValueError("wagle batch_size must be >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WagleConfig":
        return options_from_dict(cls, data, "WAGLE options")


@dataclass
class WagleMask:
    masks: dict[str, torch.Tensor]  # parameter name -> bool tensor; False entries never move
    config: WagleConfig
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- gradients


def candidate_params(model: torch.nn.Module, method: Composite, include_norms: bool = True,
                     include_embeddings: bool = True) -> tuple[list[str], list[str]]:
    """``(candidates, excluded)``: parameters the method trains, split by the norm/embedding options."""
    method.bind(model)
    candidates: list[str] = []
    excluded: list[str] = []
    for name, p in model.named_parameters():
        if not p.requires_grad or not method.trainable(name):
            continue
        kind = module_type(name)
        keep = (include_norms or kind != "norm") and (include_embeddings or kind not in ("embeddings", "lm_head"))
        (candidates if keep else excluded).append(name)
    return candidates, excluded


def _label_tokens(rows: list[Encoded]) -> int:
    return sum(sum(1 for t in r.labels if t != IGNORE) for r in rows)


def _accumulate(params: dict[str, torch.nn.Parameter], into: dict[str, torch.Tensor]) -> None:
    """Add each ``.grad`` into a float32 buffer and clear it (bf16 grads summed over batches lose bits)."""
    for name, p in params.items():
        if p.grad is not None:
            into[name] += p.grad.float()
            p.grad = None


def retain_gradient(model, fmt: ChatFormat, retain: QADataset, params: dict[str, torch.nn.Parameter],
                    batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Gradient of the retain NLL: summed over all retain answer tokens, divided by their count
    (``methods.nll.RetainNLL`` over the whole set at once, rather than per batch)."""
    device = next(model.parameters()).device
    rows = encode_views(fmt, retain, ("answer",))
    total = _label_tokens([r["answer"] for r in rows])
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for start in range(0, len(rows), batch_size):
        idx = list(range(start, min(start + batch_size, len(rows))))
        batch = to_device(collate([rows[i] for i in idx], idx, fmt.tokenizer.pad_token_id), device)
        sum_logp, _ = sequence_logps(model, batch["answer"])
        (-sum_logp.sum() / total).backward()
        _accumulate(params, grads)
    return grads


def forget_gradient(model, fmt: ChatFormat, method: Composite, forget: QADataset,
                    params: dict[str, torch.nn.Parameter], batch_size: int = 8,
                    sample_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Gradient of the method's forget objective, the (weighted) mean of its per-sample losses over
    the whole forget set, at the current model (which is also the reference for NPO/DPO)."""
    device = next(model.parameters()).device
    objective = method.forget
    rows = encode_views(fmt, forget, tuple(method.views))
    pad_id = fmt.tokenizer.pad_token_id
    if sample_weights is not None and len(sample_weights) != len(rows):
        raise ValueError(f"{len(sample_weights)} sample weights for {len(rows)} forget examples")
    ref_logps = reference_logps_for_rows(model, rows, pad_id, batch_size) if method.needs_ref_logps else None
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for start in range(0, len(rows), batch_size):
        idx = list(range(start, min(start + batch_size, len(rows))))
        batch = to_device(collate([rows[i] for i in idx], idx, pad_id, sample_weights, ref_logps), device)
        # At the current model the reference model is the model itself (as for ref_logps above).
        per_sample = objective(StepInputs(model=model, forget=batch, retain=None,
                                          ref_model=model if method.needs_ref_model else None))
        ((batch["weight"].to(per_sample) * per_sample).sum() / len(rows)).backward()
        _accumulate(params, grads)
    return grads


class _only_grads_for:
    """Within the block, only ``names`` require grad and the model is in eval mode; restored after."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.model, self.names = model, set(names)

    def __enter__(self) -> dict[str, torch.nn.Parameter]:
        self.flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.training = self.model.training
        self.model.eval()  # no dropout: the score is a function of the weights alone
        params = {}
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in self.names)
            p.grad = None
            if n in self.names:
                params[n] = p
        return params

    def __exit__(self, *exc) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.flags[n])
            p.grad = None
        self.model.train(self.training)


def wagle_scores(model, fmt: ChatFormat, method: Composite, forget: QADataset, retain: QADataset, *,
                 gamma: float = 1e-6, params: list[str] | None = None, batch_size: int = 8,
                 sample_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """S = |(theta - g_r / gamma) * g_f| for each parameter in ``params`` (default: every parameter the
    method trains), float32 on the CPU."""
    if len(forget) == 0 or len(retain) == 0:
        raise ValueError("WAGLE needs a non-empty forget set and a non-empty retain set")
    names = params if params is not None else candidate_params(model, method)[0]
    if not names:
        raise ValueError("WAGLE: no parameters to score")
    with _only_grads_for(model, names) as tracked:
        g_r = retain_gradient(model, fmt, retain, tracked, batch_size)
        g_f = forget_gradient(model, fmt, method, forget, tracked, batch_size, sample_weights)
        scores = {}
        with torch.no_grad():
            for n, p in tracked.items():
                scores[n] = ((p.float() - g_r.pop(n) / gamma) * g_f.pop(n)).abs().cpu()
    return scores


# ---------------------------------------------------------------------------------------------- selection


def _group(name: str, scope: str) -> str:
    return "all" if scope == "global" else layer_of(name) if scope == "layer" else name


def select_top(scores: dict[str, torch.Tensor], rho: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Boolean masks keeping the ``round(rho * n)`` highest scores of each group (``scope``: one group
    of all weights, one per decoder layer, or one per tensor). Ties at the cut go to whichever
    ``torch.topk`` returns."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    groups: dict[str, list[str]] = {}
    for name in scores:
        groups.setdefault(_group(name, scope), []).append(name)
    masks = {}
    for names in groups.values():
        flat = torch.cat([scores[n].reshape(-1).float() for n in names])
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        k = int(round(rho * flat.numel()))
        if k > 0:
            # nan_to_num: a NaN score (overflowing gradient) must not win or break the ranking
            keep[torch.topk(torch.nan_to_num(flat, nan=-1.0), k, sorted=False).indices] = True
        for n, part in zip(names, keep.split([scores[n].numel() for n in names])):
            masks[n] = part.view(scores[n].shape)
    return masks


def mask_report(masks: dict[str, torch.Tensor], candidates: list[str] | None = None) -> dict[str, Any]:
    """Shares of weights selected, overall, per module type and per decoder layer.

    ``share`` is selected / weights of that kind; ``of_mask`` is that kind's part of all selected weights.
    Parameters not in ``candidates`` (frozen by option) are listed but not counted as candidates.
    """
    candidates = list(masks) if candidates is None else candidates
    cand = set(candidates)

    def table(key) -> dict[str, dict[str, float | int]]:
        out: dict[str, dict[str, Any]] = {}
        for name, m in masks.items():
            if name not in cand:
                continue
            row = out.setdefault(key(name), {"weights": 0, "selected": 0})
            row["weights"] += m.numel()
            row["selected"] += int(m.sum())
        return out

    total = sum(masks[n].numel() for n in candidates)
    selected = sum(int(masks[n].sum()) for n in candidates)
    by_type, by_layer = table(module_type), table(layer_of)
    for rows in (by_type, by_layer):
        for row in rows.values():
            row["share"] = row["selected"] / row["weights"] if row["weights"] else 0.0
            row["of_mask"] = row["selected"] / selected if selected else 0.0
    return {"candidates": total, "selected": selected, "share": selected / total if total else 0.0,
            "frozen_parameters": sorted(set(masks) - cand), "by_module_type": by_type,
            "by_layer": dict(sorted(by_layer.items(), key=lambda kv: _layer_key(kv[0])))}


def _layer_key(label: str) -> tuple[int, int]:
    return (1, 0) if label == "non-layer" else (0, int(label.split()[1]))


def compute_wagle_mask(model, fmt: ChatFormat, method: Composite, forget: QADataset, retain: QADataset,
                       config: WagleConfig | None = None, sample_weights: torch.Tensor | None = None) -> WagleMask:
    """Scores, then the top-``rho`` mask over the candidates; parameters the method trains but the
    options exclude (norms, embeddings) get all-False masks."""
    config = config or WagleConfig()
    candidates, excluded = candidate_params(model, method, config.include_norms, config.include_embeddings)
    if not candidates:
        raise ValueError("WAGLE: no candidate parameters (every trainable parameter is excluded by the options)")
    scores = wagle_scores(model, fmt, method, forget, retain, gamma=config.gamma, params=candidates,
                          batch_size=config.batch_size, sample_weights=sample_weights)
    masks = select_top(scores, config.rho, config.scope)
    named = dict(model.named_parameters())
    for name in excluded:
        masks[name] = torch.zeros(named[name].shape, dtype=torch.bool)
    report = {"rho": config.rho, "gamma": config.gamma, "scope": config.scope, **mask_report(masks, candidates)}
    return WagleMask(masks, config, report)


# ---------------------------------------------------------------------------------------------- files


def save_mask(path: str | Path, mask: WagleMask, extra: dict[str, str] | None = None) -> Path:
    """Write the masks (bool tensors keyed by parameter name) as safetensors, atomically; the
    metadata (strings) holds the format tag, rho, gamma, scope, the other options and the report as JSON."""
    meta = {"format": MASK_FORMAT, **{k: str(v) for k, v in asdict(mask.config).items()},
            "report": json.dumps(mask.report), **(extra or {})}
    tensors = {n: m.to(torch.bool).contiguous().cpu() for n, m in mask.masks.items()}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def load_mask(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(masks, metadata)`` from a file written by :func:`save_mask` (uint8 0/1 tensors accepted too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: WAGLE mask file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    if not tensors:
        raise ValueError(f"{path}: the mask file holds no tensors")
    masks = {}
    for name, t in tensors.items():
        if t.dtype == torch.bool:
            masks[name] = t
        elif t.dtype == torch.uint8 and bool(((t == 0) | (t == 1)).all()):
            masks[name] = t.bool()
        else:
            raise ValueError(f"{path}: mask '{name}' must be bool (or uint8 0/1), got {t.dtype}")
    return masks, meta


def check_masks(masks: dict[str, torch.Tensor], model: torch.nn.Module, source: str = "mask") -> None:
    """Every mask names a parameter of ``model`` and has its shape."""
    named = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in named:
            raise ValueError(f"{source}: '{name}' is not a parameter of the model")
        if tuple(m.shape) != tuple(named[name].shape):
            raise ValueError(f"{source}: '{name}' has shape {tuple(m.shape)}, the parameter {tuple(named[name].shape)}")
