"""RMU, Representation Misdirection for Unlearning.

Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning"
(arXiv 2403.03218). At one decoder layer L, the forget tokens' hidden states are pushed towards a
fixed random direction scaled by a steering coefficient, and the retain tokens' hidden states are
kept at the frozen reference model's:

    forget: mean over tokens of ||h_L(x_f) - c * u||^2 / d     (u: a random unit vector, fixed by a seed)
    retain: mean over tokens of ||h_L(x_r) - h_L^ref(x_r)||^2 / d   (weighted by alpha = retain_weight)

and only the MLPs of layers L-2, L-1, L are updated. u is drawn uniform on [0, 1)^d and normalised,
as in the paper's code. The paper's Zephyr-7B settings are c = 6.5, alpha = 1200 at layer 7 of 32;
both depend on the model's activation scale and on how alike forget and retain text are, so tune
them per model. Defaults here: c = 6.5, alpha (``retain_weight``) = 1, the middle layer. The loss
uses the answer tokens (``tokens="answer"``) by default; ``tokens="all"`` uses every non-padding
token, as the paper does for plain-text corpora. The paper's code updates only the down projections
of those MLPs; here every MLP weight of the three layers trains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from obliviate.methods.base import Objective, StepInputs, positive, require_ref_model, require_view
from obliviate.methods.common import decoder_layers, hidden_states_at, token_mask

_MLP_PARAM = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.mlp\.")
TOKENS = ("answer", "all")


def _check_layer(layer) -> int | None:
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, (int, str)) or not str(layer).isdigit():
        raise ValueError(f"layer must be a non-negative integer, got {layer!r}")
    return int(layer)


def _check_tokens(tokens) -> str:
    if tokens not in TOKENS:
        raise ValueError(f"tokens must be one of {TOKENS}, got {tokens!r}")
    return tokens


def _resolve_layer(model: torch.nn.Module, layer: int | None) -> int:
    """``layer``, or the middle layer when None; checked against the model's depth."""
    n = len(decoder_layers(model))
    if layer is None:
        return n // 2
    if layer >= n:
        raise ValueError(f"rmu layer {layer} does not exist: the model has {n} decoder layers (0..{n - 1})")
    return layer


@dataclass
class RMUForget(Objective):
    """Per sample: mean squared distance of layer-L hidden states to c * u over the chosen tokens."""

    layer: int | None = None  # None: the middle layer, chosen at bind()
    steering_coeff: float = 6.5
    seed: int = 0
    tokens: str = "answer"

    def __post_init__(self):
        self.layer = _check_layer(self.layer)
        self.tokens = _check_tokens(self.tokens)
        self.steering_coeff = positive("steering_coeff", self.steering_coeff)
        self.seed = int(self.seed)
        self._target: torch.Tensor | None = None

    def bind(self, model: torch.nn.Module) -> None:
        self.layer = _resolve_layer(model, self.layer)

    def trainable(self, name: str) -> bool:
        if self.layer is None:
            raise RuntimeError("rmu: the default layer depends on the model; call method.bind(model) before "
                               "method.trainable(name), or pass layer=")
        match = _MLP_PARAM.search(name)
        return match is not None and self.layer - 2 <= int(match.group(1)) <= self.layer

    def target(self, hidden_size: int, device: torch.device) -> torch.Tensor:
        """c * u, the same for every call and every device (drawn on the CPU from ``seed``)."""
        if self._target is None or self._target.shape[0] != hidden_size:
            u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(self.seed))
            self._target = self.steering_coeff * u / u.norm()
        return self._target.to(device)

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        self.layer = layer = _resolve_layer(inp.model, self.layer)  # bind(inp.model)
        view = require_view(inp.forget, "answer", "rmu")
        hidden = hidden_states_at(inp.model, layer, view).float()
        mask = token_mask(view, self.tokens).to(hidden.device)
        sq = (hidden - self.target(hidden.shape[-1], hidden.device)).pow(2).mean(-1)
        return (sq * mask).sum(1) / mask.sum(1)


@dataclass
class RMURetain(Objective):
    """Scalar: mean squared distance of layer-L hidden states to the frozen reference's, retain tokens."""

    needs_ref_model = True
    layer: int | None = None
    tokens: str = "answer"

    def __post_init__(self):
        self.layer = _check_layer(self.layer)
        self.tokens = _check_tokens(self.tokens)

    def bind(self, model: torch.nn.Module) -> None:
        self.layer = _resolve_layer(model, self.layer)

    def __call__(self, inp: StepInputs) -> torch.Tensor:
        self.layer = layer = _resolve_layer(inp.model, self.layer)  # bind(inp.model)
        view = require_view(inp.retain, "answer", "rmu retain")
        hidden = hidden_states_at(inp.model, layer, view).float()
        with torch.no_grad():
            ref = hidden_states_at(require_ref_model(inp, "rmu retain"), layer, view).float().to(hidden.device)
        mask = token_mask(view, self.tokens).to(hidden.device)
        return ((hidden - ref).pow(2).mean(-1) * mask).sum() / mask.sum()
