"""UNDIAL, self-distillation towards adjusted logits.

Dong, Lin, Belkin, Huerta and Vulić 2025, "UNDIAL: Self-Distillation with Adjusted Logits for Robust
Unlearning in Large Language Models" (NAACL 2025, arXiv 2402.10052). The frozen starting model is the
teacher: at each label position t its logits z_ref,t, with the true token's logit lowered by a strength
gamma, give a fixed target distribution that the model is trained towards by cross-entropy:

    q_t = softmax(z_ref,t - gamma * e_{y_t})
    L_i = mean over the label tokens t of sample i of  -sum_v q_t(v) log p_theta(v | x, y_<t)

Only the true token's share of the teacher's distribution changes (multiplied by exp(-gamma), then
renormalised), so the rest of what the teacher predicts is kept; and the loss is minimised towards a
fixed target (its minimum is the target's entropy), never an unbounded ascent, which is what keeps it
from collapsing. Its gradient with respect to the logits is p_theta - q_t.

The strength is suggested in {3, 10, 30}; default 10, as in the OpenUnlearning port (which calls it
``beta``). The paper trains on the forget set alone; the ``undial`` preset adds the retain NLL like the
other presets (``custom`` with ``forget=undial retain=none`` for the paper's setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.methods.base import Objective, StepInputs, positive, require_ref_model, require_view
from obliviate.methods.common import label_logits, row_means, soft_cross_entropy


@dataclass
class UNDIAL(Objective):
    needs_ref_model = True  # the teacher's full next-token distributions: too large to precompute
    gamma: float = 10.0

    def __post_init__(self):
        self.gamma = positive("gamma", self.gamma)

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        view = require_view(inp.forget, "answer", "undial")
        logits, targets, rows = label_logits(inp.model, view)
        with torch.no_grad():
            ref, _, _ = label_logits(require_ref_model(inp, "undial"), view)
            ref = ref.to(logits.device)
            true = targets[:, None]
            target = ref.scatter(-1, true, ref.gather(-1, true) - self.gamma).softmax(-1)
        return row_means(soft_cross_entropy(logits, target), rows, view["input_ids"].shape[0])
