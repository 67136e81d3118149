"""Smoothing the forget objective over the weights: sharpness-aware unlearning and randomized smoothing.

Fan, Jia, Zhang, Ramakrishna, Hong and Liu, "Towards LLM Unlearning Resilient to Relearning Attacks: A
Sharpness-Aware Minimization Perspective and Beyond" (ICML 2025, arXiv 2502.05374): a relearning
attack is a small finetuning step on the weights, so unlearning that holds against it minimises the
forget loss in the worst case over a neighbourhood of the weights,

    min_theta  max_{||delta|| <= rho}  l_f(theta + delta)  +  l_r(theta),

which is sharpness-aware minimisation (SAM, Foret et al. 2021, arXiv 2010.01412) of the forget loss
l_f alone; the retain loss l_r is taken at the weights themselves. One SAM step (first order):

    g = grad l_f(theta),   delta = rho * g / ||g||_2,   gradient = grad l_f(theta + delta) + grad l_r(theta)

(||g|| over every trainable weight: the authors' code). Among the paper's other smoothing strategies,
randomized smoothing replaces l_f by its average under Gaussian weight noise,
E_{delta ~ N(0, sigma^2 I)} l_f(theta + delta), estimated with ``samples`` draws per micro-batch.

Both compose with every :class:`~obliviate.methods.base.SplitMethod` (every composite method), with
GUARD weights and gating (they live in the forget term) and with WAGLE masks: the mask hooks act on the
gradient that sets SAM's direction, and randomized smoothing's noise is masked, so only weights that
may move are perturbed. The weights are restored exactly (a saved copy, not a subtraction).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import ContextManager

import torch

from obliviate.methods import StepInputs
from obliviate.methods.base import SplitMethod


def sam_perturbation(grads: Sequence[torch.Tensor | None], rho: float) -> list[torch.Tensor | None]:
    """delta = rho * g / ||g||_2, ||g|| the norm over all the tensors; None stays None (a weight the
    forget loss does not reach). A zero gradient gives no perturbation."""
    present = [g for g in grads if g is not None]
    if not present:
        return [None] * len(grads)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in present]))
    # No host sync: a zero norm scales by 0 instead of branching on it.
    scale = torch.where(norm > 0, rho / norm.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(norm))
    return [None if g is None else (g.float() * scale).to(g.dtype) for g in grads]


@contextlib.contextmanager
def perturbed(params: Sequence[torch.nn.Parameter], deltas: Sequence[torch.Tensor | None]) -> Iterator[None]:
    """The weights moved by ``deltas`` inside the block, restored exactly after it."""
    saved = [p.detach().clone() if d is not None else None for p, d in zip(params, deltas)]
    try:
        with torch.no_grad():
            for p, d in zip(params, deltas):
                if d is not None:
                    p.add_(d)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                if s is not None:
                    p.copy_(s)


def _gradient(params: Sequence[torch.nn.Parameter], loss: torch.Tensor,
              backward: Callable[[torch.Tensor], None]) -> list[torch.Tensor | None]:
    """The gradient of ``loss`` alone, leaving the accumulated ``.grad`` as it was. Through backward,
    not ``torch.autograd.grad``: reentrant activation checkpointing only supports the former, and the
    weight masks' gradient hooks apply either way."""
    stash = [p.grad for p in params]
    for p in params:
        p.grad = None
    backward(loss)
    grads = [p.grad for p in params]
    for p, g in zip(params, stash):
        p.grad = g
    return grads


def smoothed_step(method: SplitMethod, inp: StepInputs, params: Sequence[torch.nn.Parameter], *,
                  backward: Callable[[torch.Tensor], None], context: Callable[[bool], ContextManager],
                  rho: float = 0.0, sigma: float = 0.0, samples: int = 1,
                  masks: Sequence[torch.Tensor | None] | None = None,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch's gradient, accumulated into ``.grad`` by ``backward``, with the forget term
    smoothed: SAM with radius ``rho`` (``rho=0`` takes the forget gradient at the weights themselves:
    the plain gradient, in two passes), else randomized smoothing with ``sigma`` and ``samples`` draws
    of ``generator``. ``context(last)`` wraps each pass (``last``: the pass whose backward must
    synchronise data-parallel gradients). Returns the step's logs (device tensors): for SAM the losses
    at the weights themselves, for randomized smoothing the forget loss averaged over the draws."""
    with context(False):
        retain, logs = method.retain_term(inp)
        if retain is not None:
            backward(retain)
    if sigma > 0:
        forget_logs: dict[str, torch.Tensor] = {}
        total = None
        for i in range(samples):
            noise = [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * sigma
                     for p in params]
            if masks is not None:
                noise = [n if m is None else n * m for n, m in zip(noise, masks)]
            with perturbed(params, noise), context(i == samples - 1):
                forget, draw_logs = method.forget_term(inp)
                backward(forget / samples)
            total = forget.detach() / samples if total is None else total + forget.detach() / samples
            for k, v in draw_logs.items():
                forget_logs[k] = forget_logs.get(k, 0) + v / samples
        assert total is not None  # samples >= 1
    else:
        with context(False):
            forget, forget_logs = method.forget_term(inp)
            grads = _gradient(params, forget, backward)
        total = forget.detach()
        with perturbed(params, sam_perturbation(grads, rho)), context(True):
            backward(method.forget_term(inp)[0])
    loss = total if retain is None else total + retain.detach()
    return {"loss": loss, **forget_logs, **logs}
