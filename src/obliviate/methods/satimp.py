"""SatImp, saturation- and importance-reweighted gradient ascent.

Yang, Wang, Huang, Liu, Zhang and Han 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM
Unlearning" (ICML 2025, arXiv 2505.11953). Gradient ascent on each answer token with a fixed (no
gradient) weight that multiplies a saturation term, p^beta1 (tokens not yet unlearnt, i.e. still
likely, weigh more: WGA's weight), and an importance term, (1 - p)^beta2 (the paper finds that
importance-based weights favour the less likely tokens, the opposite of saturation):

    p_t = stopgrad(p_theta(y_t | x, y_<t)),   w_t = p_t^beta1 * (1 - p_t)^beta2
    L_i = mean over the label tokens t of sample i of  w_t * log p_theta(y_t | x, y_<t)

as in the authors' code (tmlr-group/SatImp, ``satimp``). beta2 = 0 is WGA with alpha = beta1; beta1 =
beta2 = 0 is plain GA. Defaults beta1 = 5, beta2 = 1, the OpenUnlearning port's settings for TOFU. The
authors average over all label tokens of the batch; here over each sample's tokens, so that samples
can be weighted (``Composite``). The preset adds the retain NLL; ``forget_weight`` and ``retain_weight``
set the balance, which the authors tune per benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.methods.base import Objective, StepInputs, nonnegative
from obliviate.methods.wga import weighted_ascent


@dataclass
class SatImp(Objective):
    beta1: float = 5.0
    beta2: float = 1.0

    def __post_init__(self):
        self.beta1 = nonnegative("beta1", self.beta1)
        self.beta2 = nonnegative("beta2", self.beta2)

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        # 1 - p = -expm1(log p): exact for p near 1, where 1 - exp(log p) loses every digit
        return weighted_ascent(inp, "satimp",
                               lambda logp: (self.beta1 * logp).exp() * (-torch.expm1(logp)) ** self.beta2)
