"""SimNPO, reference-free NPO with length normalisation.

Fan, Liu, Lin, Jia, Zhang, Mei and Liu 2024, "Simplicity Prevails: Rethinking Negative Preference
Optimization for LLM Unlearning" (arXiv 2410.07163), eq. of the SimNPO loss:

    L = -2/beta * log sigmoid(-beta/|y| * log pi_theta(y|x) - gamma)

The authors' TOFU runs use beta 2.5 (forget05) or 4.5 (forget10) and gamma 0. Their released code
writes the margin as beta * (NLL/|y| - gamma), i.e. gamma scaled by beta; we follow the paper's
equation (the two agree at the default gamma = 0). |y| counts the label tokens (answer + end-of-turn).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.methods.base import Objective, StepInputs, finite, positive, require_view
from obliviate.methods.common import sequence_logps


@dataclass
class SimNPO(Objective):
    beta: float = 2.5
    gamma: float = 0.0

    def __post_init__(self):
        self.beta = positive("beta", self.beta)
        self.gamma = finite("gamma", self.gamma)

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        sum_logp, n_tokens = sequence_logps(inp.model, require_view(inp.forget, "answer", "simnpo"))
        # -log sigmoid(-x) = softplus(x), with x = beta * mean log-prob + gamma
        return 2.0 / self.beta * F.softplus(self.beta * sum_logp / n_tokens + self.gamma)
