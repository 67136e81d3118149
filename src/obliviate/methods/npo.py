"""Negative Preference Optimization.

Zhang, Lin, Bai and Mei 2024, "Negative Preference Optimization: From Catastrophic Collapse to
Effective Unlearning" (arXiv 2404.05868). With pi(y|x) the probability of the whole answer:

    L = 2/beta * log(1 + (pi_theta(y|x) / pi_ref(y|x))^beta)

Its gradient is GA's (of the summed log-prob) times 2 * sigmoid(beta * log(pi_theta / pi_ref)),
a weight that falls to 0 as the answer is unlearnt, which is what slows the collapse GA suffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.methods.base import Objective, StepInputs, positive, require_ref_logp, require_view
from obliviate.methods.common import sequence_logps


@dataclass
class NPO(Objective):
    needs_ref_logps = True
    beta: float = 0.1

    def __post_init__(self):
        self.beta = positive("beta", self.beta)

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        logp, _ = sequence_logps(inp.model, require_view(inp.forget, "answer", "npo"))
        ref = require_ref_logp(inp.forget, "answer", "npo").to(logp)
        # log(1 + exp(z)) = softplus(z), stable for large log-ratios
        return 2.0 / self.beta * F.softplus(self.beta * (logp - ref))
