"""WGA, weighted gradient ascent.

Wang, Zhou, Zhou, Shin, Han and Weinberger 2025, "Rethinking LLM Unlearning Objectives: A Gradient
Perspective and Go Beyond" (ICLR 2025, arXiv 2502.19301). Gradient ascent on each answer token, weighted
by the model's own probability of that token raised to alpha, the weight held fixed (no gradient):

    w_t = stopgrad(p_theta(y_t | x, y_<t))^alpha
    L_i = mean over the label tokens t of sample i of  w_t * log p_theta(y_t | x, y_<t)

Minimising L_i lowers the log-probs as GA does, but a token already unlikely gets a small weight, which
cancels the 1/p factor of GA's gradient with respect to the probability (alpha = 1: the gradient of
p_t itself) and stops the ascent from running on after a token is forgotten. alpha = 0 is plain GA
(``ga``, token-averaged per sample). Default alpha = 1, as in the OpenUnlearning port (which calls it
``beta``). The preset adds the retain NLL like ``graddiff``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.methods.base import Objective, StepInputs, nonnegative, require_view
from obliviate.methods.common import row_means, token_logps


def weighted_ascent(inp: StepInputs, who: str, weight) -> torch.Tensor:
    """Per sample: the mean over its label tokens of ``weight(token_logp.detach()) * token_logp``, the
    loss shared by token-reweighted gradient ascent (WGA, SatImp)."""
    view = require_view(inp.forget, "answer", who)
    token_logp, rows = token_logps(inp.model, view)
    with torch.no_grad():
        w = weight(token_logp.detach())
    return row_means(w * token_logp, rows, view["input_ids"].shape[0])


@dataclass
class WeightedGradientAscent(Objective):
    alpha: float = 1.0

    def __post_init__(self):
        self.alpha = nonnegative("alpha", self.alpha)

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        return weighted_ascent(inp, "wga", lambda logp: (self.alpha * logp).exp())  # p^alpha
