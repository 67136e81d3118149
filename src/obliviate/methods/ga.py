"""Gradient ascent on the forget answers.

Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy Risks in Language Models"
(arXiv 2210.01504), the GA baseline of TOFU (Maini et al. 2024, arXiv 2401.06121).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.methods.base import Objective, StepInputs, require_view
from obliviate.methods.common import sequence_logps


@dataclass
class GradientAscent(Objective):
    """Per sample: minus the mean token NLL of the true answer (minimising it raises the NLL)."""

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        sum_logp, n_tokens = sequence_logps(inp.model, require_view(inp.forget, "answer", "ga"))
        return sum_logp / n_tokens
