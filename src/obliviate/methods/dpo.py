"""DPO towards refusals: prefer the "idk" answer to the true one.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model" (arXiv 2305.18290), used for unlearning with refusal answers as the preferred responses
(IdkDPO, Maini et al. 2024, arXiv 2401.06121; Zhang et al. 2024, arXiv 2404.05868):

    L = -log sigmoid(beta * [(log pi(idk) - log pi_ref(idk)) - (log pi(y) - log pi_ref(y))])

with summed log-probs of each answer; the reference log-probs are precomputed before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.methods.base import Objective, StepInputs, positive, require_ref_logp, require_view
from obliviate.methods.common import sequence_logps


@dataclass
class IdkDPO(Objective):
    needs_ref_logps = True
    views = ("answer", "idk")
    beta: float = 0.1

    def __post_init__(self):
        self.beta = positive("beta", self.beta)

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        model, batch = inp.model, inp.forget
        chosen, _ = sequence_logps(model, require_view(batch, "idk", "idk_dpo"))
        rejected, _ = sequence_logps(model, require_view(batch, "answer", "idk_dpo"))
        margin = ((chosen - require_ref_logp(batch, "idk", "idk_dpo").to(chosen))
                  - (rejected - require_ref_logp(batch, "answer", "idk_dpo").to(rejected)))
        return F.softplus(-self.beta * margin)  # -log sigmoid(beta * margin)
