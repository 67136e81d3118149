"""PDU, constrained entropic unlearning solved by a primal-dual method.

Entesari, Hatami, Khaziev, Ramakrishna and Fazlyab 2025, "Constrained Entropic Unlearning: A
Primal-Dual Framework for Large Language Models" (arXiv 2506.05314). Unlearning as a constrained problem:

    min_theta  L_fgt(theta)   subject to   L_rtn(theta) <= epsilon

- ``LogitMarginFlattening`` (forget part ``lmf``): the logit-margin flattening loss, per label position
  the squared gap between the largest logit and the mean logit, which is 0 exactly when the
  next-token distribution is uniform (softmax-free, so its gradient does not vanish near uniform):

      L_i = mean over the label tokens t of sample i of  (max_v z_t(v) - mean_v z_t(v))^2

- ``RetainNLLConstraint`` (retain part ``nll_constraint``): the constraint's Lagrangian term
  lambda * (NLL_retain - epsilon), NLL_retain the retain answers' token-averaged NLL, with the dual
  variable lambda >= 0 updated by projected dual ascent after each training call:

      lambda <- max(0, lambda + dual_step * (NLL_retain - epsilon))

  so lambda grows while the constraint is violated and shrinks to 0 while it holds with room to spare.
  lambda starts at ``dual_init`` and stays there for the first ``dual_warmup_steps`` optimizer steps.

What is assumed where the paper leaves it to the implementation (as the authors' OpenUnlearning port
does it): the dual update happens at every call of the objective (every micro-batch) using that batch's
retain NLL; the loss value includes -lambda * epsilon (no effect on the gradient). The port's TOFU
settings are the defaults: epsilon = 0.3, lambda_0 = 100, dual step 5; its warm-up is 5 of 10 epochs,
given here in optimizer steps (default 0). epsilon must sit above the starting model's retain NLL
(the paper suggests (1 + a small tolerance) times it): check ``retain_loss`` at step 1 and set it.
Unlike the port, the forget loss uses the positions that predict the label tokens (the port's mask is
shifted by one position).

State: lambda lives in the objective. Only calls with gradients enabled update it; under several
processes the retain NLL is averaged over them first, so every process holds the same lambda. A resumed
run restarts lambda from ``dual_init`` (the loop's checkpoint does not hold method state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.methods.base import Objective, StepInputs, nonnegative, positive, require_view
from obliviate.methods.common import label_logits, row_means, sequence_logps


@dataclass
class LogitMarginFlattening(Objective):
    def __call__(self, inp: StepInputs) -> torch.Tensor:
        view = require_view(inp.forget, "answer", "lmf")
        logits, _, rows = label_logits(inp.model, view)
        margin = logits.max(-1).values - logits.mean(-1)
        return row_means(margin.square(), rows, view["input_ids"].shape[0])


def _steps(name: str, value) -> int:
    x = nonnegative(name, value)
    if isinstance(value, bool) or not x.is_integer():
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    return int(x)


def _mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    x = x.clone()
    dist.all_reduce(x)  # SUM: every backend has it (AVG is NCCL-only)
    return x / dist.get_world_size()


@dataclass
class RetainNLLConstraint(Objective):
    epsilon: float = 0.3
    dual_init: float = 100.0
    dual_step: float = 5.0
    dual_warmup_steps: int = 0

    def __post_init__(self) -> None:
        self.epsilon = positive("epsilon", self.epsilon)
        self.dual_init = nonnegative("dual_init", self.dual_init)
        self.dual_step = nonnegative("dual_step", self.dual_step)
        self.dual_warmup_steps = _steps("dual_warmup_steps", self.dual_warmup_steps)
        self._dual: torch.Tensor | None = None  # lambda, a 0-dim tensor on the loss's device: no sync

    @property
    def dual(self) -> float:
        """The current dual variable lambda."""
        return self.dual_init if self._dual is None else float(self._dual)

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        sum_logp, n_tokens = sequence_logps(inp.model, require_view(inp.retain, "answer", "nll_constraint"))
        nll = -sum_logp.sum() / n_tokens.sum()
        if self._dual is None:
            self._dual = torch.tensor(self.dual_init, dtype=torch.float32)
        dual = self._dual.to(nll.device)
        term = dual * (nll - self.epsilon)
        if torch.is_grad_enabled() and inp.step >= self.dual_warmup_steps:
            violation = _mean_over_processes(nll.detach() - self.epsilon)
            self._dual = (dual + self.dual_step * violation).clamp_min(0.0)
        return term
