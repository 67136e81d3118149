"""Sharpness-aware and randomized-smoothing unlearning (training.smoothing): the step against a
closed-form toy and a hand-written two-pass update on a tiny LM, rho = 0 equals the plain gradient,
masks and sample weights compose, and methods without separable terms are refused."""

from __future__ import annotations

import contextlib

import pytest
import torch

from obliviate.data.batches import collate, encode_views
from obliviate.data.benchmark import load_benchmark
from obliviate.data.chat import ChatFormat
from obliviate.methods import Composite, StepInputs, build_method, reference_logps_for_rows
from obliviate.methods.nll import NLL
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.training.config import TrainConfig
from obliviate.training.loop import train
from obliviate.training.smoothing import perturbed, sam_perturbation, smoothed_step


def test_sam_perturbation_is_rho_along_the_normalised_gradient():
    eps = sam_perturbation([torch.tensor([3.0]), None, torch.tensor([[4.0]])], rho=0.5)
    assert eps[1] is None
    torch.testing.assert_close(eps[0], torch.tensor([0.3]))  # 0.5 * 3 / 5
    torch.testing.assert_close(eps[2], torch.tensor([[0.4]]))
    assert sam_perturbation([torch.zeros(2)], rho=1.0)[0].tolist() == [0.0, 0.0]  # no direction, no move


def test_perturbed_restores_the_weights_exactly():
    p = torch.nn.Parameter(torch.tensor([0.1, 0.2, 0.3]))
    before = p.detach().clone()
    with perturbed([p], [torch.tensor([1e-3, 7.0, -1e8])]):
        assert not torch.equal(p.detach(), before)
    assert torch.equal(p.detach(), before)


class _Quadratic:
    """A toy split method: forget term 1/2 theta^T A theta, retain term b^T theta."""

    def __init__(self, theta, a, b):
        self.theta, self.a, self.b = theta, a, b

    def forget_term(self, inp):
        value = 0.5 * self.theta @ self.a @ self.theta
        return value, {"forget_loss": value.detach()}

    def retain_term(self, inp):
        value = self.b @ self.theta
        return value, {"retain_loss": value.detach()}


def _toy():
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    a = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]])
    return theta, a, torch.tensor([0.1, 0.2, -0.3])


def _step(method, params, **kwargs):
    return smoothed_step(method, StepInputs(model=torch.nn.Identity(), forget={}, retain={}), params,
                         backward=lambda t: t.backward(), context=lambda last: contextlib.nullcontext(), **kwargs)


def test_sam_step_matches_the_closed_form_on_a_quadratic():
    theta, a, b = _toy()
    logs = _step(_Quadratic(theta, a, b), [theta], rho=0.05)
    t = theta.detach()
    g = a @ t
    expected = a @ (t + 0.05 * g / g.norm()) + b  # grad f(theta + rho g/|g|) + grad r(theta)
    torch.testing.assert_close(theta.grad, expected)
    assert torch.equal(theta.detach(), t)  # weights restored
    torch.testing.assert_close(logs["loss"], 0.5 * t @ a @ t + b @ t)  # logged at the weights themselves


def test_randomized_smoothing_matches_the_closed_form_on_a_quadratic():
    theta, a, b = _toy()
    mask = torch.tensor([1.0, 0.0, 1.0])
    _step(_Quadratic(theta, a, b), [theta], sigma=0.1, samples=3, masks=[mask],
          generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    noise = [torch.randn(3, generator=gen) * 0.1 * mask for _ in range(3)]
    expected = sum(a @ (theta.detach() + n) for n in noise) / 3 + b
    torch.testing.assert_close(theta.grad, expected)


@pytest.fixture()
def lm(tiny_model_dir, small_bench):
    bench = load_benchmark(small_bench)
    tok = load_tokenizer(str(tiny_model_dir))
    return tiny_model_dir, tok, bench.split("forget"), bench.split("retain")[:6]


def _batches(model, tok, method, forget, retain):
    """The loop's batches at batch size = every row (one batch each, so their order does not matter)."""
    fmt = ChatFormat(tok)
    rows = encode_views(fmt, forget, tuple(method.views))
    ref = reference_logps_for_rows(model, rows, tok.pad_token_id, 8) if method.needs_ref_logps else None
    f = collate(rows, list(range(len(rows))), tok.pad_token_id, None, ref)
    rrows = encode_views(fmt, retain, ("answer",))
    return f, collate(rrows, list(range(len(rrows))), tok.pad_token_id)


def test_sam_step_in_the_loop_is_the_two_pass_update(lm):
    """One loop step with sam_rho (plain SGD) against the update written out by hand:
    theta - lr * (grad f(theta + rho g/|g|) + grad r(theta)), g = grad f(theta)."""
    model_dir, tok, forget, retain = lm
    rho, lr = 0.05, 0.1
    cfg = TrainConfig(max_steps=1, batch_size=len(forget), lr=lr, optimizer="sgd", weight_decay=0, max_grad_norm=0,
                      warmup_ratio=0, sam_rho=rho)
    stepped = train(load_model(str(model_dir)), tok, build_method("npo"), forget, cfg, retain=retain,
                    progress=False).model

    model = load_model(str(model_dir)).train()
    method = build_method("npo")
    f, r = _batches(model, tok, method, forget, retain)
    inp = StepInputs(model=model, forget=f, retain=r)
    params = list(model.parameters())
    g = torch.autograd.grad(method.forget_term(inp)[0], params)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    theta = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, x in zip(params, g):
            p.add_(rho * x / norm)
    g_sharp = torch.autograd.grad(method.forget_term(inp)[0], params)
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)
    g_retain = torch.autograd.grad(method.retain_term(inp)[0], params)
    for (name, p), t, a, c in zip(stepped.named_parameters(), theta, g_sharp, g_retain):
        torch.testing.assert_close(p.detach(), t - lr * (a + c), rtol=1e-5, atol=1e-6, msg=name)
    plain = train(load_model(str(model_dir)), tok, build_method("npo"), forget,
                  TrainConfig(**{**cfg.to_dict(), "sam_rho": 0.0}), retain=retain, progress=False).model
    assert any(not torch.allclose(p, q, atol=1e-6) for p, q in zip(plain.parameters(), stepped.parameters()))


@pytest.mark.parametrize("name", ["npo", "graddiff", "ga"])
def test_sam_with_rho_zero_is_the_plain_gradient(lm, name):
    model_dir, tok, forget, retain = lm
    method = build_method(name)
    grads = []
    for smoothed in (False, True):
        model = load_model(str(model_dir)).train()
        f, r = _batches(model, tok, method, forget, retain)
        inp = StepInputs(model=model, forget=f, retain=r if method.uses_retain else None)
        if smoothed:
            smoothed_step(method, inp, list(model.parameters()), backward=lambda t: t.backward(),
                          context=lambda last: contextlib.nullcontext(), rho=0.0)
        else:
            method(inp)[0].backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("smoothing", [{"sam_rho": 0.05}, {"smooth_sigma": 1e-3, "smooth_samples": 2}])
def test_smoothing_composes_with_masks_and_sample_weights(lm, smoothing):
    model_dir, tok, forget, retain = lm
    model = load_model(str(model_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.3
             for i, (n, p) in enumerate(model.named_parameters())}
    weights = torch.linspace(0.5, 1.5, len(forget))
    res = train(model, tok, build_method("npo"), forget, TrainConfig(max_steps=3, lr=1e-2, batch_size=2,
                **smoothing), retain=retain, param_masks=masks, sample_weights=weights, progress=False)
    moved = 0
    for n, p in res.model.named_parameters():
        assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]]), n
        moved += int((p.detach()[masks[n]] != before[n][masks[n]]).sum())
    assert moved > 0 and all(r["loss"] == r["loss"] for r in res.history)


def test_randomized_smoothing_is_reproducible(lm):
    model_dir, tok, forget, retain = lm
    cfg = TrainConfig(max_steps=2, lr=1e-2, batch_size=2, smooth_sigma=1e-2, smooth_samples=2)
    a, b = (train(load_model(str(model_dir)), tok, build_method("graddiff"), forget, cfg, retain=retain,
                  progress=False).model for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


class _Whole:
    """A method without separate forget and retain terms."""

    name, views, needs_ref_model, needs_ref_logps, uses_retain = "whole", ("answer",), False, False, False

    def __init__(self):
        self.inner = Composite(NLL(), name="whole")

    def trainable(self, name):
        return True

    def bind(self, model):
        pass

    def __call__(self, inp):
        return self.inner(inp)


def test_smoothing_needs_a_split_method(lm):
    model_dir, tok, forget, _ = lm
    with pytest.raises(ValueError, match="smooth the forget term alone"):
        train(load_model(str(model_dir)), tok, _Whole(), forget, TrainConfig(max_steps=1, sam_rho=0.1),
              progress=False)
    with pytest.raises(ValueError, match="set one of them"):
        TrainConfig(sam_rho=0.1, smooth_sigma=0.1)
