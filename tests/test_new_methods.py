"""UNDIAL, WGA, SatImp, CE-U and PDU: values and gradients against hand derivations on a toy model
whose logits are its parameters, PDU's dual ascent step by step, and what each must do to a tiny model
(the forget answers' probability falls) in a few optimiser steps and through the training loop."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from obliviate.data.chat import ChatFormat
from obliviate.methods import PRESETS, StepInputs, build_method, list_methods, method_options, per_sample_nll
from obliviate.methods.ceu import CrossEntropyUnlearning
from obliviate.methods.ga import GradientAscent
from obliviate.methods.pdu import LogitMarginFlattening, RetainNLLConstraint
from obliviate.methods.satimp import SatImp
from obliviate.methods.undial import UNDIAL
from obliviate.methods.wga import WeightedGradientAscent
from obliviate.models.tiny import build_tiny_model
from test_methods import FORGET_QA, RETAIN_QA, _load, fresh, retain_batch, train_steps, view

NEW = ["undial", "wga", "satimp", "ceu", "pdu"]



# ---------------------------------------------------------------- a toy model: logits are parameters

class ToyLM(nn.Module):
    """Returns its parameter as the logits ``[B, T, V]``, whatever the inputs: the gradient of a loss
    with respect to the logits is the parameter's gradient."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table)


# Row 0 has 3 label tokens (positions 2, 3, 4), row 1 has 2 (positions 3, 4); V = 6.
TOY_LABELS = torch.tensor([[-100, -100, 1, 4, 0], [-100, -100, -100, 2, 5]])
V = 6


def toy_view() -> dict:
    return {"input_ids": torch.zeros_like(TOY_LABELS), "attention_mask": torch.ones_like(TOY_LABELS),
            "labels": TOY_LABELS.clone()}


def toy_logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(2, 5, V, generator=g)


def toy_tokens():
    """(row, position of the predicting logits, true token, the row's label count) per label token."""
    out = []
    for b in range(2):
        n = int((TOY_LABELS[b] != -100).sum())
        out += [(b, t - 1, int(TOY_LABELS[b, t]), n) for t in range(1, 5) if TOY_LABELS[b, t] != -100]
    return out


def toy_value_and_grad(objective, model: ToyLM, ref: ToyLM | None = None):
    inp = StepInputs(model=model, forget={"answer": toy_view()}, retain=None, ref_model=ref)
    model.zero_grad(set_to_none=True)
    value = objective(inp)
    value.sum().backward()
    return value.detach().double(), model.table.grad.double()


def by_hand(token_value, token_grad, logits: torch.Tensor, ref_logits: torch.Tensor | None = None):
    """Per-sample value (the mean of ``token_value`` over the row's label tokens) and the gradient of
    their sum with respect to the logits: ``token_grad / n`` at each predicting position, 0 elsewhere."""
    values = torch.zeros(2, dtype=torch.float64)
    grad = torch.zeros(2, 5, V, dtype=torch.float64)
    for b, pos, y, n in toy_tokens():
        z = logits[b, pos].double()
        z_ref = None if ref_logits is None else ref_logits[b, pos].double()
        values[b] += token_value(z, y, z_ref) / n
        grad[b, pos] = token_grad(z, y, z_ref) / n
    return values, grad


def onehot(y: int) -> torch.Tensor:
    return torch.eye(V, dtype=torch.float64)[y]


# ---------------------------------------------------------------- values and gradients, by hand

@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.5])
def test_wga_value_and_gradient_by_hand(alpha):
    """L = mean_t p_y^alpha log p_y with the weight fixed: dL/dz = p_y^alpha (e_y - p) / n."""
    logits = toy_logits(0)
    got, grad = toy_value_and_grad(WeightedGradientAscent(alpha=alpha), ToyLM(logits))

    def value(z, y, _):
        p = z.softmax(-1)
        return p[y] ** alpha * math.log(p[y])

    def dz(z, y, _):
        p = z.softmax(-1)
        return p[y] ** alpha * (onehot(y) - p)

    want, want_grad = by_hand(value, dz, logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta1,beta2", [(5.0, 1.0), (1.0, 3.0), (0.0, 0.5)])
def test_satimp_value_and_gradient_by_hand(beta1, beta2):
    """w = p_y^beta1 (1 - p_y)^beta2, fixed; L = mean_t w log p_y, dL/dz = w (e_y - p) / n."""
    logits = toy_logits(1)
    got, grad = toy_value_and_grad(SatImp(beta1=beta1, beta2=beta2), ToyLM(logits))

    def weight(z, y):
        p = z.softmax(-1)[y]
        return p ** beta1 * (1 - p) ** beta2

    want, want_grad = by_hand(lambda z, y, _: weight(z, y) * z.log_softmax(-1)[y],
                              lambda z, y, _: weight(z, y) * (onehot(y) - z.softmax(-1)), logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_ceu_value_and_gradient_by_hand():
    """q = p without the true token, renormalised: q_v = p_v / (1 - p_y), q_y = 0. L = -sum_v q_v log p_v
    and dL/dz = p - q, so the true logit is pushed down by p_y only: the push fades as p_y -> 0."""
    logits = toy_logits(2)
    got, grad = toy_value_and_grad(CrossEntropyUnlearning(), ToyLM(logits))

    def q(z, y):
        p = z.softmax(-1)
        out = p / (1 - p[y])
        out[y] = 0.0
        return out

    want, want_grad = by_hand(lambda z, y, _: -(q(z, y) * z.log_softmax(-1)).sum(),
                              lambda z, y, _: z.softmax(-1) - q(z, y), logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    for b, pos, y, n in toy_tokens():  # on the true token: exactly p_y / n
        assert float(grad[b, pos, y]) == pytest.approx(float(logits[b, pos].double().softmax(-1)[y]) / n, rel=1e-5)


@pytest.mark.parametrize("gamma", [0.5, 10.0])
def test_undial_value_and_gradient_by_hand(gamma):
    """q = softmax(z_ref - gamma e_y): the teacher with the true token's probability scaled by
    exp(-gamma) and renormalised. L = -sum_v q_v log p_v, dL/dz = p - q; nothing flows to the teacher."""
    logits, ref_logits = toy_logits(3), toy_logits(4)
    ref = ToyLM(ref_logits)
    got, grad = toy_value_and_grad(UNDIAL(gamma=gamma), ToyLM(logits), ref)

    def q(z_ref, y):
        p_ref = z_ref.softmax(-1)
        scaled = p_ref * torch.where(onehot(y) > 0, math.exp(-gamma), 1.0)
        return scaled / scaled.sum()

    want, want_grad = by_hand(lambda z, y, zr: -(q(zr, y) * z.log_softmax(-1)).sum(),
                              lambda z, y, zr: z.softmax(-1) - q(zr, y), logits, ref_logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    assert ref.table.grad is None


def test_undial_target_is_the_teacher_apart_from_the_true_token():
    """At the teacher itself the true token's gradient is p_y - q_y = p_y (1 - p_y) (1 - e^-gamma) / D / n > 0,
    D = 1 - p_y + p_y e^-gamma,
    and every other token's share of the remaining mass is kept (their gradient is negative)."""
    logits = toy_logits(5)
    gamma = 2.0
    _, grad = toy_value_and_grad(UNDIAL(gamma=gamma), ToyLM(logits), ToyLM(logits))
    for b, pos, y, n in toy_tokens():
        p = logits[b, pos].double().softmax(-1)
        expected = p[y] * (1 - p[y]) * (1 - math.exp(-gamma)) / (1 - p[y] + p[y] * math.exp(-gamma)) / n
        assert float(grad[b, pos, y]) == pytest.approx(float(expected), rel=1e-5)
        others = [v for v in range(V) if v != y]
        assert (grad[b, pos, others] < 0).all()


def test_logit_margin_flattening_value_and_gradient_by_hand():
    """L = mean_t (max_v z_v - mean_v z_v)^2, dL/dz = 2 (max - mean) (e_argmax - 1/V) / n; 0 at flat logits."""
    logits = toy_logits(6)
    got, grad = toy_value_and_grad(LogitMarginFlattening(), ToyLM(logits))

    def dz(z, y, _):
        return 2 * (z.max() - z.mean()) * (onehot(int(z.argmax())) - 1.0 / V)

    want, want_grad = by_hand(lambda z, y, _: (z.max() - z.mean()) ** 2, dz, logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    flat, _ = toy_value_and_grad(LogitMarginFlattening(), ToyLM(torch.full((2, 5, V), 1.7)))
    assert float(flat.abs().max()) < 1e-10


# ---------------------------------------------------------------- the tiny model

def forget_batch(fmt, pairs=FORGET_QA) -> dict:
    return {"answer": view(fmt, pairs), "index": torch.arange(len(pairs)), "weight": torch.ones(len(pairs))}


def step_inputs(method, model, fmt, step: int = 0) -> StepInputs:
    ref = copy.deepcopy(model).eval().requires_grad_(False) if method.needs_ref_model else None
    return StepInputs(model, forget_batch(fmt), retain_batch(fmt) if method.uses_retain else None, ref, step)


def nll_of(model, v) -> torch.Tensor:
    with torch.no_grad():
        return per_sample_nll(model, v)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok = _load(build_tiny_model(tmp_path_factory.mktemp("tiny-new")))
    return model, ChatFormat(tok)


@pytest.fixture(scope="module")
def memorised(tiny):
    """The tiny model finetuned on the forget and retain answers, so there is something to unlearn."""
    model, fmt = tiny
    model = fresh(model)
    sft = build_method("sft")
    train_steps(sft, StepInputs(model, forget_batch(fmt, FORGET_QA + RETAIN_QA), None), steps=40)
    return model.eval(), fmt


def test_wga_at_alpha_zero_is_ga_and_satimp_at_beta2_zero_is_wga(tiny):
    model, fmt = tiny
    inp = StepInputs(model, forget_batch(fmt), None)
    with torch.no_grad():
        torch.testing.assert_close(WeightedGradientAscent(alpha=0.0)(inp), GradientAscent()(inp))
        torch.testing.assert_close(SatImp(beta1=2.0, beta2=0.0)(inp), WeightedGradientAscent(alpha=2.0)(inp))


@pytest.mark.parametrize("name", NEW)
def test_new_presets_lower_the_forget_answers_probability(memorised, name):
    model, fmt = memorised
    model = fresh(model)
    method = build_method(name)
    inp = step_inputs(method, model, fmt)
    before = nll_of(model, inp.forget["answer"])
    train_steps(method, inp)
    after = nll_of(model, inp.forget["answer"])
    assert torch.isfinite(after).all()
    assert (after > before + 0.5).all(), (before, after)


def test_declared_needs_and_listing():
    flags = {n: (m.needs_ref_model, m.needs_ref_logps, m.uses_retain, m.views)
             for n, m in ((n, build_method(n)) for n in NEW)}
    assert flags["undial"] == (True, False, True, ("answer",))
    for name in ("wga", "satimp", "ceu", "pdu"):
        assert flags[name] == (False, False, True, ("answer",))
    listed = list_methods()
    for name in NEW:
        assert name in PRESETS and name in listed and "arXiv" in listed[name]
    assert method_options("undial") == {"forget_weight": 1.0, "retain_weight": 1.0, "gamma": 10.0}
    assert method_options("satimp") == {"forget_weight": 1.0, "retain_weight": 1.0, "beta1": 5.0, "beta2": 1.0}
    assert set(method_options("pdu")) == {"forget_weight", "retain_weight", "epsilon", "dual_init", "dual_step",
                                          "dual_warmup_steps"}
    custom = build_method("custom", forget="lmf", retain="nll", retain_weight=2.0)  # PDU's loss, scalarised
    assert isinstance(custom.forget, LogitMarginFlattening) and custom.retain_weight == 2.0


@pytest.mark.parametrize("name,options,match", [
    ("undial", {"gamma": 0}, "gamma"), ("undial", {"gamma": -1.0}, "gamma"),
    ("wga", {"alpha": -0.5}, "alpha"), ("wga", {"alpha": "many"}, "alpha"),
    ("satimp", {"beta1": -1}, "beta1"), ("satimp", {"beta2": float("nan")}, "beta2"),
    ("pdu", {"epsilon": 0}, "epsilon"), ("pdu", {"dual_init": -1}, "dual_init"),
    ("pdu", {"dual_step": -2}, "dual_step"),
    ("pdu", {"dual_warmup_steps": 1.5}, "dual_warmup_steps"), ("pdu", {"dual_warmup_steps": True}, "dual_warmup_steps"),
    ("ceu", {"beta": 1.0}, "does not take beta"),
])
def test_bad_hyperparameters_are_refused(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_method(name, **options)


# ---------------------------------------------------------------- PDU's dual variable

def retain_nll(model, fmt) -> float:
    """The retain batch's token-averaged NLL, one row at a time (a slow reference)."""
    total, count = 0.0, 0
    for q, a in RETAIN_QA:
        v = view(fmt, [(q, a)])
        with torch.no_grad():
            nll = float(per_sample_nll(model, v)[0])
        n = int((v["labels"][0, 1:] != -100).sum())
        total, count = total + nll * n, count + n
    return total / count


@pytest.mark.parametrize("above", [True, False])
def test_pdu_dual_ascent_step_by_step(tiny, above):
    """With the weights fixed the retain NLL c is constant, so lambda_k = max(0, lambda_0 + k eta (c - eps))
    from the end of the warm-up on; the loss is forget + lambda_k (c - eps) with the lambda before the update."""
    model, fmt = tiny
    c = retain_nll(model, fmt)
    eps = c - 0.4 if above else c + 0.3  # violated (lambda grows) or satisfied (lambda falls to 0)
    lam0, eta, warmup = 2.0, 1.5, 2
    method = build_method("pdu", epsilon=eps, dual_init=lam0, dual_step=eta, dual_warmup_steps=warmup)
    lam = lam0
    for step in range(8):
        inp = step_inputs(method, model, fmt, step=step)
        loss, logs = method(inp)
        assert logs["retain_loss"] == pytest.approx(lam * (c - eps), rel=1e-4, abs=1e-5)
        assert logs["loss"] == pytest.approx(logs["forget_loss"] + lam * (c - eps), rel=1e-4, abs=1e-5)
        if step >= warmup:
            lam = max(0.0, lam + eta * (c - eps))
        assert method.retain.dual == pytest.approx(lam, rel=1e-5, abs=1e-6)
    assert (lam > lam0 + 3) if above else lam == 0.0
    with torch.no_grad():  # an evaluation-style call does not move lambda
        method(step_inputs(method, model, fmt, step=99))
    assert method.retain.dual == pytest.approx(lam, rel=1e-5, abs=1e-6)


def test_pdu_retain_gradient_is_lambda_times_the_nll_gradient(tiny):
    model, fmt = tiny
    model = fresh(model)
    lam = 3.0
    constraint = RetainNLLConstraint(epsilon=0.1, dual_init=lam, dual_step=1.0)
    inp = StepInputs(model, None, retain_batch(fmt))
    model.zero_grad(set_to_none=True)
    constraint(inp).backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    nll = build_method("custom", forget="nll", retain="nll").retain
    nll(inp).backward()
    want = lam * torch.cat([p.grad.flatten() for p in model.parameters()])
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- through the training loop

@pytest.fixture()
def parts(tiny_model_dir, small_bench):
    from obliviate.data.benchmark import load_benchmark
    from obliviate.models.loading import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), load_benchmark(small_bench)


def test_undial_and_pdu_through_the_loop(parts):
    """The loop gives UNDIAL its frozen reference copy and PDU its optimizer-step count; PDU's lambda moves."""
    from obliviate.training.config import TrainConfig
    from obliviate.training.loop import train

    model, tok, bench = parts
    forget, retain = bench.split("forget"), bench.split("retain")
    target = train(copy.deepcopy(model), tok, build_method("sft"), bench.split("train"),
                   TrainConfig(epochs=25, lr=1e-2, batch_size=4), progress=False).model
    cfg = TrainConfig(epochs=3, lr=1e-2, batch_size=2, warmup_ratio=0, scheduler="constant")
    fmt = ChatFormat(tok)
    forget_view = view(fmt, [(e.question, e.answer) for e in forget])
    before = nll_of(target, forget_view)
    undial = build_method("custom", forget="undial", retain="none")  # the paper's setting: forget set only
    res = train(copy.deepcopy(target), tok, undial, forget, cfg, progress=False)
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert (nll_of(res.model, forget_view) > before + 0.3).all(), (before, nll_of(res.model, forget_view))

    pdu = build_method("pdu", epsilon=0.5, dual_init=1.0, dual_step=0.5, dual_warmup_steps=2)
    res = train(copy.deepcopy(model), tok, pdu, forget, cfg, retain=retain, progress=False)
    assert res.steps > 2 and all(math.isfinite(h["loss"]) for h in res.history)
    # the random model's retain NLL (several nats) stays far above 0.5: violated, so lambda grows every step
    assert pdu.retain.dual > 1.0 + 0.5 * (res.steps - 2) * 1.0
