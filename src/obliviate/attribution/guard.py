"""GUARD: unlearn gently the forget samples that retained knowledge leans on.

Niu et al. 2025, "GUARD: Guided Unlearning and Retention via Data Attribution for Large Language
Models" (arXiv 2506.10946). Each forget sample i gets a retain-aware attribution

    a_i = < grad NLL(f_i), mean_j grad NLL(r_j) >

the inner product of its gradient with the mean gradient of the retain samples, where NLL is the
mean token negative log-likelihood of the true answer (the model's own training loss, for every
method: the attribution asks how much forgetting sample i also moves the retain answers, which
does not depend on the unlearning objective). The gradient is over a parameter subset (default
every trainable parameter) at the starting model. Samples with large a_i (unlearning them by
gradient ascent would raise the retain loss most) get small weights:

    w_i = n * softmax(-a_i / tau)_i            (mean 1, sum n)

and the unlearning objective becomes mean_i w_i * forget_i (``methods.Composite`` reads the weights
from ``batch["weight"]``). By default tau is relative (``relative_tau=True``): it is multiplied by the
standard deviation of the a_i over the forget set, so tau = 1 means "one standard deviation of
attribution changes the weight by a factor e" whatever the model's gradient scale; with
``relative_tau=False`` the formula above is used with tau as given.

Per-sample gradients come from ``torch.func``: ``vmap(grad(...))`` over ``functional_call`` of the
model, ``batch_size`` samples per call (memory: batch_size x attributed parameters; 1 gives one
sample at a time, the lowest). The forward runs without an attention mask: batches are right
padded, so with causal attention no real token sees a pad token and the logits are exactly those
of the masked forward (and the mask's data-dependent checks cannot run under vmap).

Two estimators of a_i:

- exact (default): each per-sample gradient is dotted with the retain direction, parameter by
  parameter. With one retain direction this costs O(parameters) per sample, as any sketch does.
- ``projection_dim=k``: a CountSketch (Charikar, Chen and Farach-Colton 2002), i.e. a sparse
  Rademacher projection: coordinate j of each parameter goes to bucket h(j) in [0, k) with sign
  s(j), drawn from a seeded generator per parameter chunk (never stored whole). <S g_i, S g_r> is an
  unbiased estimate of a_i with standard deviation about |g_i| |g_r| / sqrt(k). It does not make
  the computation cheaper here; it yields k-dimensional gradient sketches (``GuardResult.sketches``)
  that can be kept and re-scored against other retain directions, as sketch-based attribution
  (TRAK, Park et al. 2023, arXiv 2303.14186) does. For large models the memory knobs are
  ``batch_size`` and ``params`` (a regex restricting the attributed parameters), not the sketch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call, grad, vmap

from obliviate.data.batches import collate, encode_views, to_device
from obliviate.data.chat import IGNORE, ChatFormat, pad_batch
from obliviate.data.qa import QADataset
from obliviate.methods import per_sample_nll
from obliviate.options import ALLOW_INF, options_from_dict
from obliviate.runs import atomic_write_json

WEIGHTS_FORMAT = "obliviate.guard/1"
SKETCH_CHUNK = 1 << 22  # coordinates hashed per generator call: bounds the hash arrays' memory


@dataclass
class GuardConfig:
    tau: float = field(default=1.0, metadata={ALLOW_INF: True})  # inf: uniform weights
    relative_tau: bool = True  # tau in units of the attributions' standard deviation
    projection_dim: int | None = None  # None: exact inner products; k: CountSketch of dimension k
    seed: int = 0  # the sketch's hash functions
    batch_size: int = 8  # samples per vmap call (and per retain batch)
    params: str | None = None  # regex searched in parameter names; None: every trainable parameter

    def __post_init__(self) -> None:
        if not (isinstance(self.tau, (int, float)) and self.tau > 0):
            raise ValueError(f"guard tau must be a number > 0 (math.inf for uniform weights), got {self.tau!r}")
        if self.projection_dim is not None and (not isinstance(self.projection_dim, int) or self.projection_dim < 1):
            raise ValueError(f"guard projection_dim must be a positive integer or None, got {self.projection_dim!r}")
        if self.batch_size < 1:
            raise ValueError("guard batch_size must be >= 1")
        if self.params is not None:
            try:
                re.compile(self.params)
            except (re.error, OverflowError, RecursionError) as exc:  # a{10**12}, "(" * 5000: not usable either
                raise ValueError(f"guard params is not a valid regular expression: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GuardConfig":
        return options_from_dict(cls, data, "GUARD options")


@dataclass
class GuardResult:
    attributions: torch.Tensor  # [n] float64, a_i in forget-set order
    weights: torch.Tensor  # [n] float32, sum n
    config: GuardConfig
    params: list[str]  # the attributed parameters
    sketches: torch.Tensor | None = None  # [n, k] with projection_dim=k


def attributed_params(model: torch.nn.Module, pattern: str | None = None) -> list[str]:
    """Trainable parameters whose name matches ``pattern`` (all trainable ones when None)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and (pattern is None or re.search(pattern, n))]
    if not names:
        raise ValueError(f"GUARD: no trainable parameter matches {pattern!r}" if pattern else
                         "GUARD: the model has no trainable parameters")
    return names


# ---------------------------------------------------------------------------------------------- gradients


def retain_direction(model, fmt: ChatFormat, retain: QADataset, names: list[str],
                     batch_size: int = 8) -> dict[str, torch.Tensor]:
    """mean_j grad NLL(r_j): the gradient of the mean over retain samples of each one's mean token NLL."""
    if len(retain) == 0:
        raise ValueError("GUARD needs a non-empty retain set")
    device = next(model.parameters()).device
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    rows = encode_views(fmt, retain, ("answer",))
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for start in range(0, len(rows), batch_size):
        idx = list(range(start, min(start + batch_size, len(rows))))
        batch = to_device(collate([rows[i] for i in idx], idx, fmt.tokenizer.pad_token_id), device)
        loss = per_sample_nll(model, batch["answer"]).sum() / len(rows)
        for acc, g in zip(total, torch.autograd.grad(loss, params)):
            acc += g.float()
    return dict(zip(names, total))


def _check_right_padded(mask: torch.Tensor) -> None:
    # A row must be ones then zeros: then dropping the mask changes no real token's logits.
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("GUARD per-sample gradients need right-padded batches")


def per_sample_gradients(model, names: list[str], input_ids: torch.Tensor,
                         labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}``: gradient of each row's mean answer-token NLL, via vmap(grad). The NLL
    is written out here rather than taken from ``methods.per_sample_nll``: under vmap each row is one
    sample without a batch dimension, and the label selection must be a multiply, not indexing."""
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in names}

    def sample_nll(p: dict[str, torch.Tensor], ids: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (), {"input_ids": ids[None], "use_cache": False}).logits[0, :-1].float()
        target = lab[1:]
        keep = target != IGNORE
        logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[:, None])[:, 0]
        return -(logp * keep).sum() / keep.sum()

    with warnings.catch_warnings(), torch.no_grad():  # no_grad: only grad()'s own inputs are tracked
        warnings.filterwarnings("ignore", message=".*batching rule.*")  # sdpa backward falls back to a loop
        return vmap(grad(sample_nll), in_dims=(None, 0, 0))(params, input_ids, labels)


def _seed_for(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def count_sketch(grads: dict[str, torch.Tensor], k: int, seed: int = 0) -> torch.Tensor:
    """``[B, k]`` CountSketch of a batch of gradients ``{name: [B, *shape]}``: coordinate j of
    parameter ``name`` is added, times a random sign, to a random bucket; hashes depend only on
    (seed, name, chunk), so every batch and the retain direction share them."""
    first = next(iter(grads.values()))
    out = torch.zeros(first.shape[0], k, dtype=torch.float32, device=first.device)
    for name in sorted(grads):
        flat = grads[name].reshape(first.shape[0], -1).float()
        for c, start in enumerate(range(0, flat.shape[1], SKETCH_CHUNK)):
            part = flat[:, start:start + SKETCH_CHUNK]
            gen = torch.Generator().manual_seed(_seed_for(seed, name, c))
            bucket = torch.randint(k, (part.shape[1],), generator=gen).to(part.device)
            sign = (torch.randint(2, (part.shape[1],), generator=gen) * 2 - 1).to(part)
            out.index_add_(1, bucket, part * sign)
    return out


def guard_attributions(model, fmt: ChatFormat, forget: QADataset, retain: QADataset, *,
                       params: list[str] | None = None, batch_size: int = 8, projection_dim: int | None = None,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(a [n] float64, sketches [n, k] or None)``: a_i = <grad NLL(f_i), mean_j grad NLL(r_j)>,
    exact, or estimated from CountSketches of dimension ``projection_dim``."""
    if len(forget) == 0:
        raise ValueError("GUARD needs a non-empty forget set")
    names = params if params is not None else attributed_params(model)
    training = model.training
    model.eval()  # no dropout: the attribution is a function of the weights
    try:
        direction = retain_direction(model, fmt, retain, names, batch_size)
        rows = [r["answer"] for r in encode_views(fmt, forget, ("answer",))]
        device = next(model.parameters()).device
        pad_id = fmt.tokenizer.pad_token_id
        out = torch.zeros(len(rows), dtype=torch.float64)
        sketches = None
        if projection_dim is not None:
            d_sketch = count_sketch({n: g[None] for n, g in direction.items()}, projection_dim, seed)[0]
            sketches = torch.zeros(len(rows), projection_dim, dtype=torch.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths: less padding
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            view = pad_batch([rows[i] for i in idx], pad_id)
            _check_right_padded(view["attention_mask"])
            grads = per_sample_gradients(model, names, view["input_ids"].to(device), view["labels"].to(device))
            if projection_dim is None or sketches is None:  # (both or neither)
                a = sum(g.reshape(len(idx), -1).float() @ direction[n].reshape(-1) for n, g in grads.items())
                assert isinstance(a, torch.Tensor)  # at least one parameter (attributed_params), so not the start 0
            else:
                s = count_sketch(grads, projection_dim, seed)
                sketches[idx] = s.cpu()
                a = s @ d_sketch
            out[idx] = a.double().cpu()
    finally:
        model.train(training)
    return out, sketches


def guard_weights(attributions: torch.Tensor, tau: float = 1.0, relative_tau: bool = True) -> torch.Tensor:
    """w_i = n * softmax(-a_i / T), T = tau * std(a) with ``relative_tau`` (uniform if std is 0), else tau.
    float32, sum n; tau = inf gives ones."""
    a = torch.as_tensor(attributions, dtype=torch.float64).reshape(-1)
    n = a.numel()
    if n == 0:
        raise ValueError("no attributions to weight")
    if not bool(torch.isfinite(a).all()):
        raise ValueError("GUARD attributions contain NaN or infinite values")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    scale = tau * (a.std(unbiased=False).item() if relative_tau else 1.0)
    if math.isinf(scale) or scale == 0 or n == 1:
        return torch.ones(n, dtype=torch.float32)
    return (n * torch.softmax(-a / scale, dim=0)).float()


def compute_guard(model, fmt: ChatFormat, forget: QADataset, retain: QADataset,
                  config: GuardConfig | None = None) -> GuardResult:
    config = config or GuardConfig()
    names = attributed_params(model, config.params)
    a, sketches = guard_attributions(model, fmt, forget, retain, params=names, batch_size=config.batch_size,
                                     projection_dim=config.projection_dim, seed=config.seed)
    return GuardResult(a, guard_weights(a, config.tau, config.relative_tau), config, names, sketches)


# ---------------------------------------------------------------------------------------------- files


def save_guard(path: str | Path, result: GuardResult, forget: QADataset | None = None,
               extra: dict[str, Any] | None = None) -> Path:
    """Weights, attributions and options as JSON (written atomically)."""
    config = asdict(result.config)
    if math.isinf(config["tau"]):
        config["tau"] = "inf"
    data = {"format": WEIGHTS_FORMAT, "config": config, "n": int(result.weights.numel()),
            "weights": result.weights.tolist(), "attributions": result.attributions.tolist(),
            "n_params": len(result.params), **(extra or {})}
    if forget is not None:
        data["questions"] = [ex.question for ex in forget.examples]
    return atomic_write_json(path, data)


def load_guard_weights(path: str | Path, n: int | None = None) -> torch.Tensor:
    """The weights of a file written by :func:`save_guard` (or any JSON with a ``weights`` list),
    checked: finite, >= 0, and ``n`` of them when ``n`` is given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GUARD weights file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    weights = data.get("weights") if isinstance(data, dict) else data
    if not isinstance(weights, list) or not weights:
        raise ValueError(f"{path}: expected a non-empty 'weights' list")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{path}: weights[{i}] = {w!r} is not a finite number >= 0")
    if n is not None and len(weights) != n:
        raise ValueError(f"{path}: {len(weights)} weights for a forget set of {n} examples")
    return torch.tensor(weights, dtype=torch.float32)
