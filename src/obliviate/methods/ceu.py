"""CE-U, cross-entropy unlearning.

Bo Yang 2025, "CE-U: Cross Entropy Unlearning" (arXiv 2503.01224). At each label position the target is
the model's own next-token distribution with the true token removed (its logit set to -inf), held
fixed (no gradient through it), and the model is trained towards it by cross-entropy:

    q_t = softmax(stopgrad(z_t) with z_t(y_t) = -inf),  i.e. q_t(v) = p(v) / (1 - p(y_t)) for v != y_t, 0 for y_t
    L_i = mean over the label tokens t of sample i of  -sum_v q_t(v) log p_theta(v | x, y_<t)

The gradient with respect to the logits is p - q_t: p(y_t) on the true token, which falls to 0 as the
token is forgotten, where gradient ascent's stays at 1 - p(y_t) -> 1 and keeps pushing the true logit
towards -inf. It needs neither a reference model nor retain data; the ``ceu`` preset adds the retain NLL
like the other presets.

Not implemented: the OpenUnlearning port leaves the first answer token out of the loss (a footnote of
the paper's training settings); every label token counts here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.methods.base import Objective, StepInputs, require_view
from obliviate.methods.common import label_logits, row_means, soft_cross_entropy


@dataclass
class CrossEntropyUnlearning(Objective):
    def __call__(self, inp: StepInputs) -> torch.Tensor:
        view = require_view(inp.forget, "answer", "ceu")
        logits, targets, rows = label_logits(inp.model, view)
        with torch.no_grad():
            target = logits.scatter(-1, targets[:, None], float("-inf")).softmax(-1)
        return row_means(soft_cross_entropy(logits, target), rows, view["input_ids"].shape[0])
