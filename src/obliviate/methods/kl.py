"""KL regulariser on the retain data: keep the next-token distributions close to the reference.

The retain term of TOFU's "KL" method (Maini et al. 2024, arXiv 2401.06121) and of NPO+KL
(Zhang et al. 2024, arXiv 2404.05868): KL(ref || model), here averaged over the retain answers'
label tokens (TOFU averages over every position, prompt and padding included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.methods.base import Objective, StepInputs, require_ref_model, require_view
from obliviate.methods.common import kl_on_labels


@dataclass
class RetainKL(Objective):
    needs_ref_model = True

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        view = require_view(inp.retain, "answer", "retain kl")
        return kl_on_labels(inp.model, require_ref_model(inp, "retain kl"), view)
