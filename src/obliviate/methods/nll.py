"""Negative log-likelihood terms: finetuning, refusal targets, and the retain regulariser.

- ``NLL``: per-sample mean token NLL of the forget batch's true answers (``sft`` finetuning).
- ``IdkNLL``: the same on the "idk" view, i.e. training refusals as the answers to the forget
  questions (IdkNLL of TOFU, Maini et al. 2024, arXiv 2401.06121).
- ``RetainNLL``: NLL of the retain answers, averaged over all their tokens (the "gradient
  difference" regulariser, Liu et al. 2022, "Continual Learning and Private Unlearning",
  arXiv 2203.12817; used with GA in TOFU and with NPO as NPO+RT in Zhang et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.methods.base import Objective, StepInputs, require_view
from obliviate.methods.common import per_sample_nll, sequence_logps


@dataclass
class NLL(Objective):
    """Per sample: mean token NLL of the view named in ``views``."""

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        view = self.views[0]
        return per_sample_nll(inp.model, require_view(inp.forget, view, f"{type(self).__name__}"))


@dataclass
class IdkNLL(NLL):
    views = ("idk",)


@dataclass
class RetainNLL(Objective):
    """Scalar: retain NLL summed over all label tokens of the batch and divided by their count."""

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        sum_logp, n_tokens = sequence_logps(inp.model, require_view(inp.retain, "answer", "retain nll"))
        return -sum_logp.sum() / n_tokens.sum()
