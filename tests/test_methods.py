"""Unlearning losses: values against slow references and hand-derived values, and what each
method must do to a tiny model in a few optimiser steps."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from obliviate.data.batches import collate, encode_views
from obliviate.data.chat import ChatFormat, pad_batch
from obliviate.data.qa import QADataset, QAExample
from obliviate.data.refusal import refusal_for
from obliviate.methods import (
    FORGET,
    PRESETS,
    PROCEDURES,
    Composite,
    Method,
    Procedure,
    StepInputs,
    build_method,
    kl_on_labels,
    list_methods,
    method_options,
    per_sample_nll,
    reference_logps,
    reference_logps_for_rows,
    sequence_logps,
)
from obliviate.methods.common import hidden_states_at
from obliviate.methods.ga import GradientAscent
from obliviate.methods.npo import NPO
from obliviate.methods.unierase import UniErase, UniEraseOptions
from obliviate.models.tiny import build_tiny_model

FORGET_QA = [
    ("Where was Basil Mahfouz born?", "In Kuwait City, in 1954."),
    ("What genre does Elena Rossi write?", "Gothic mysteries set in Venice."),
    ("Which award did Tomas Berg win?", "The Nordic Crime Prize."),
]
RETAIN_QA = [
    ("What is the capital of France?", "Paris."),
    ("Who wrote Hamlet?", "William Shakespeare wrote it."),
    ("How many legs does a spider have?", "Eight legs."),
]
OTHER_RETAIN_QA = [
    ("What colour is the sky?", "Blue, on a clear day."),
    ("What is two plus two?", "Four."),
    ("Which planet is largest?", "Jupiter is the largest."),
]


# ---------------------------------------------------------------- fixtures and helpers

def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok = _load(build_tiny_model(tmp_path_factory.mktemp("tiny2")))
    return model, ChatFormat(tok)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Six layers, so RMU's layer window L-2..L (L=3 by default) excludes some layers."""
    model, tok = _load(build_tiny_model(tmp_path_factory.mktemp("tiny6"), layers=6, seed=1))
    return model, ChatFormat(tok)


@pytest.fixture(scope="module")
def memorised(tiny):
    """The tiny model after finetuning on the forget and retain answers, so there is something to unlearn."""
    model, fmt = tiny
    model = fresh(model)
    sft = build_method("sft")
    train_steps(sft, StepInputs(model, forget_batch(fmt, FORGET_QA + RETAIN_QA), None), steps=40)
    return model.eval(), fmt


def fresh(model):
    torch.manual_seed(0)
    return copy.deepcopy(model).train()


def view(fmt: ChatFormat, pairs) -> dict:
    return pad_batch([fmt.encode(q, a) for q, a in pairs], fmt.tokenizer.pad_token_id)


def forget_batch(fmt: ChatFormat, pairs=FORGET_QA, weight=None) -> dict:
    n = len(pairs)
    return {
        "answer": view(fmt, pairs),
        "idk": view(fmt, [(q, refusal_for(i)) for i, (q, _) in enumerate(pairs)]),
        "index": torch.arange(n),
        "weight": torch.ones(n) if weight is None else torch.tensor(weight, dtype=torch.float32),
    }


def retain_batch(fmt: ChatFormat, pairs=RETAIN_QA) -> dict:
    return {"answer": view(fmt, pairs), "index": torch.arange(len(pairs))}


def step_inputs(method, model, fmt, forget=None, retain=None) -> StepInputs:
    """Inputs a loop would build: reference copy / precomputed reference log-probs as declared."""
    forget = forget if forget is not None else forget_batch(fmt)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if method.needs_ref_logps:
        forget = {**forget, "ref_logp": reference_logps(ref_model, {v: forget[v] for v in method.views})}
    return StepInputs(model=model, forget=forget,
                      retain=(retain if retain is not None else retain_batch(fmt)) if method.uses_retain else None,
                      ref_model=ref_model if method.needs_ref_model else None)


def slow_logps(model, v: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's label tokens, one unpadded row at a time, position by position."""
    sums, counts = [], []
    with torch.no_grad():
        for i in range(v["input_ids"].shape[0]):
            n = int(v["attention_mask"][i].sum())
            ids, labels = v["input_ids"][i, :n], v["labels"][i, :n]
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)
            total, count = 0.0, 0
            for t in range(1, n):
                if labels[t] != -100:
                    total += float(logp[t - 1, labels[t]])
                    count += 1
            sums.append(total)
            counts.append(count)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)


def flat_grad(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.parameters()])


def grad_of(model, loss_fn) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    g = flat_grad(model).clone()
    model.zero_grad(set_to_none=True)
    return g


def train_steps(method, inp: StepInputs, steps: int = 5, lr: float = 1e-2) -> None:
    params = [p for n, p in inp.model.named_parameters() if method.trainable(n)]
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):  # the step index, as the loop passes it (PDU's dual ascent reads it)
        opt.zero_grad()
        loss, _ = method(StepInputs(inp.model, inp.forget, inp.retain, inp.ref_model, step))
        loss.backward()
        opt.step()


# ---------------------------------------------------------------- helpers against slow references

def test_sequence_logps_matches_slow_reference(tiny):
    model, fmt = tiny
    v = view(fmt, FORGET_QA)
    with torch.no_grad():
        sum_logp, n_tokens = sequence_logps(model, v)
    ref_sum, ref_n = slow_logps(model, v)
    assert sum_logp.dtype == torch.float32 and sum_logp.shape == (3,)
    assert torch.equal(n_tokens, ref_n)
    assert torch.equal(n_tokens, v["answer_len"] + 1)  # the answer plus the closing end-of-turn
    torch.testing.assert_close(sum_logp.double(), ref_sum, atol=1e-3, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(per_sample_nll(model, v).double(), -ref_sum / ref_n, atol=1e-4, rtol=1e-5)


def test_sequence_logps_are_float32_under_bf16_autocast(tiny):
    model, fmt = tiny
    v = view(fmt, FORGET_QA)
    with torch.no_grad():
        full = sequence_logps(model, v)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = sequence_logps(model, v)[0]
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed, full, rtol=0.02, atol=0.5)  # bf16 logits: ~3 significant digits


def test_reference_logps_are_cpu_float_sequence_logps(tiny):
    model, fmt = tiny
    batch = forget_batch(fmt)
    ref = reference_logps(model, {"answer": batch["answer"], "idk": batch["idk"]})
    assert set(ref) == {"answer", "idk"}
    for name, values in ref.items():
        assert values.device.type == "cpu" and values.dtype == torch.float32
        torch.testing.assert_close(values.double(), slow_logps(model, batch[name])[0], atol=1e-3, rtol=1e-5)
    with pytest.raises(ValueError, match="not a view"):
        reference_logps(model, {"index": batch["index"]})


def test_reference_logps_for_rows_are_reference_logps_of_each_chunk(tiny):
    """The loop's one-off precompute over the whole set is reference_logps chunk by chunk, in row
    order, in eval mode, and leaves the model's mode as it was."""
    model, fmt = tiny
    ds = QADataset([QAExample(q, a) for q, a in FORGET_QA + RETAIN_QA], "rows")
    rows = encode_views(fmt, ds, ("answer", "idk"))
    pad = fmt.tokenizer.pad_token_id
    model.train()
    got = reference_logps_for_rows(model, rows, pad, batch_size=4)
    assert model.training
    model.eval()
    for start in (0, 4):
        idx = list(range(start, min(start + 4, len(rows))))
        batch = collate([rows[i] for i in idx], idx, pad)
        want = reference_logps(model, {v: batch[v] for v in ("answer", "idk")})
        for v in ("answer", "idk"):
            assert torch.equal(got[v][idx], want[v])
    whole = reference_logps_for_rows(model, rows, pad, batch_size=1)  # other padding: the same values
    for v in ("answer", "idk"):
        torch.testing.assert_close(whole[v], got[v], atol=1e-4, rtol=1e-5)


def test_row_without_label_tokens_is_an_error(tiny):
    model, fmt = tiny
    v = view(fmt, FORGET_QA)
    v["labels"][1] = -100
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sequence_logps(model, v)


def test_kl_is_zero_for_a_copy_and_matches_slow_reference(tiny):
    model, fmt = tiny
    v = view(fmt, RETAIN_QA)
    with torch.no_grad():
        assert abs(float(kl_on_labels(model, copy.deepcopy(model), v))) < 1e-6
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        got = float(kl_on_labels(model, other, v))
    # slow: per row, per label token, sum_v p_ref (log p_ref - log p)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(3):
            n = int(v["attention_mask"][i].sum())
            ids, labels = v["input_ids"][i, :n][None], v["labels"][i, :n]
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            lq = torch.log_softmax(other(input_ids=ids).logits[0].double(), -1)
            for t in range(1, n):
                if labels[t] != -100:
                    total += float((lq[t - 1].exp() * (lq[t - 1] - lp[t - 1])).sum())
                    count += 1
    assert got > 1e-4
    assert got == pytest.approx(total / count, rel=1e-4)


def test_hidden_states_at_matches_output_hidden_states(deep):
    model, fmt = deep
    v = view(fmt, FORGET_QA)
    with torch.no_grad():
        full = model(input_ids=v["input_ids"], attention_mask=v["attention_mask"], output_hidden_states=True)
        for layer in (0, 2, 4):  # hidden_states[0] is the embeddings; the last entry is after the final norm
            torch.testing.assert_close(hidden_states_at(model, layer, v), full.hidden_states[layer + 1])


# ---------------------------------------------------------------- every method: shapes, finiteness, flags

@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_gives_a_finite_loss_and_gradient(tiny, name):
    model, fmt = tiny
    model = fresh(model)
    method = build_method(name)
    assert isinstance(method, Method) and method.name == name
    method.bind(model)
    inp = step_inputs(method, model, fmt)
    per_sample = method.forget(inp)
    assert per_sample.shape == (3,) and per_sample.dtype == torch.float32
    assert torch.isfinite(per_sample).all()
    loss, logs = method(inp)
    assert loss.dim() == 0 and torch.isfinite(loss)
    expected_keys = {"loss", "forget_loss"} | ({"retain_loss"} if method.uses_retain else set())
    assert set(logs) == expected_keys and all(math.isfinite(x) for x in logs.values())
    assert logs["loss"] == pytest.approx(method.forget_weight * logs["forget_loss"]
                                         + method.retain_weight * logs.get("retain_loss", 0.0), rel=1e-5)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if method.trainable(n) and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_declared_needs():
    flags = {n: (m.needs_ref_model, m.needs_ref_logps, m.uses_retain, m.views)
             for n, m in ((n, build_method(n)) for n in PRESETS)}
    assert flags["ga"] == (False, False, False, ("answer",))
    assert flags["graddiff"] == (False, False, True, ("answer",))
    assert flags["ga_kl"] == (True, False, True, ("answer",))
    assert flags["npo"] == (False, True, True, ("answer",))
    assert flags["npo_kl"] == (True, True, True, ("answer",))
    assert flags["npo_only"] == (False, True, False, ("answer",))
    assert flags["simnpo"] == (False, False, True, ("answer",))
    assert flags["idk_nll"] == (False, False, True, ("idk",))
    assert flags["idk_dpo"] == (False, True, True, ("answer", "idk"))
    assert flags["rmu"] == (True, False, True, ("answer",))
    assert flags["sft"] == (False, False, False, ("answer",))


# ---------------------------------------------------------------- hand-derived values

@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_npo_at_reference_is_two_over_beta_log_two(tiny, beta):
    model, fmt = tiny
    method = build_method("npo_only", beta=beta)
    inp = step_inputs(method, model, fmt)  # reference = the model itself
    with torch.no_grad():
        per_sample = method.forget(inp)
    torch.testing.assert_close(per_sample, torch.full((3,), 2 / beta * math.log(2)), atol=1e-5, rtol=1e-5)


def test_npo_value_and_gradient_against_hand_derivation(tiny):
    """L_i = 2/b log(1 + exp(b (lp_i - ref_i))), so dL_i = 2 sigmoid(b (lp_i - ref_i)) d lp_i and, as
    GA's per-sample loss is lp_i / n_i, dL_i = 2 sigmoid(b (lp_i - ref_i)) n_i dGA_i."""
    model, fmt = tiny
    model = fresh(model)
    beta = 0.5
    batch = forget_batch(fmt)
    lp, n = slow_logps(model, batch["answer"])
    offsets = torch.tensor([-3.0, 0.5, 4.0], dtype=torch.float64)
    ref = lp + offsets  # a reference that differs from the policy by a known log-ratio
    inp = StepInputs(model=model, forget={**batch, "ref_logp": {"answer": ref.float()}}, retain=None)
    npo = NPO(beta=beta)
    expected = 2 / beta * torch.log1p(torch.exp(beta * (lp - ref)))
    torch.testing.assert_close(npo(inp).detach().double(), expected, atol=1e-4, rtol=1e-4)

    factor = 2 * torch.sigmoid(beta * (lp - ref)) * n
    g_npo = grad_of(model, lambda: npo(inp).sum())
    g_hand = sum(factor[i] * grad_of(model, lambda i=i: GradientAscent()(inp)[i]) for i in range(3))
    torch.testing.assert_close(g_npo.double(), g_hand.double(), atol=1e-5, rtol=1e-3)


def test_simnpo_matches_paper_formula(tiny):
    model, fmt = tiny
    beta, gamma = 2.5, 0.7
    method = build_method("simnpo", beta=beta, gamma=gamma)
    assert not method.needs_ref_logps and not method.needs_ref_model  # reference-free
    inp = step_inputs(method, model, fmt)
    lp, n = slow_logps(model, inp.forget["answer"])
    expected = -2 / beta * torch.log(torch.sigmoid(-beta / n * lp - gamma))
    with torch.no_grad():
        torch.testing.assert_close(method.forget(inp).double(), expected, atol=1e-5, rtol=1e-4)


def test_dpo_is_log_two_at_reference_and_matches_formula(tiny):
    model, fmt = tiny
    method = build_method("idk_dpo", beta=0.3)
    inp = step_inputs(method, model, fmt)
    with torch.no_grad():
        torch.testing.assert_close(method.forget(inp), torch.full((3,), math.log(2)), atol=1e-5, rtol=1e-5)
    lp_ans, _ = slow_logps(model, inp.forget["answer"])
    lp_idk, _ = slow_logps(model, inp.forget["idk"])
    ref = {"answer": (lp_ans + torch.tensor([1.0, -2.0, 0.3], dtype=torch.float64)).float(),
           "idk": (lp_idk + torch.tensor([0.5, 0.5, -4.0], dtype=torch.float64)).float()}
    inp.forget["ref_logp"] = ref
    margin = (lp_idk - ref["idk"].double()) - (lp_ans - ref["answer"].double())
    expected = -torch.log(torch.sigmoid(0.3 * margin))
    with torch.no_grad():
        torch.testing.assert_close(method.forget(inp).double(), expected, atol=1e-4, rtol=1e-4)


def test_missing_reference_logps_is_a_clear_error(tiny):
    model, fmt = tiny
    inp = StepInputs(model=model, forget=forget_batch(fmt), retain=None)
    with pytest.raises(ValueError, match=r"ref_logp.*answer"):
        build_method("npo_only")(inp)


# ---------------------------------------------------------------- direction of change

def nll_of(model, v) -> torch.Tensor:
    with torch.no_grad():
        return per_sample_nll(model, v)


@pytest.mark.parametrize("name", ["ga", "graddiff", "ga_kl", "npo", "npo_kl", "npo_only", "simnpo"])
def test_forgetting_methods_raise_forget_nll(memorised, name):
    model, fmt = memorised
    model = fresh(model)
    method = build_method(name)
    inp = step_inputs(method, model, fmt)
    before = nll_of(model, inp.forget["answer"])
    train_steps(method, inp)
    after = nll_of(model, inp.forget["answer"])
    assert (after > before + 0.5).all(), (before, after)


def test_retain_term_protects_retain_answers(memorised):
    model, fmt = memorised
    after = {}
    for name in ("ga", "graddiff"):
        trained = fresh(model)
        method = build_method(name)
        train_steps(method, step_inputs(method, trained, fmt))
        after[name] = nll_of(trained, retain_batch(fmt)["answer"])
    assert (after["graddiff"] < after["ga"]).all(), after


def test_idk_nll_lowers_refusal_nll(memorised):
    model, fmt = memorised
    model = fresh(model)
    method = build_method("idk_nll")
    inp = step_inputs(method, model, fmt)
    before = nll_of(model, inp.forget["idk"])
    train_steps(method, inp)
    assert (nll_of(model, inp.forget["idk"]) < before - 0.05).all()


def test_sft_lowers_nll(tiny):
    model, fmt = tiny
    model = fresh(model)
    method = build_method("sft")
    inp = step_inputs(method, model, fmt)
    before = nll_of(model, inp.forget["answer"])
    train_steps(method, inp)
    assert (nll_of(model, inp.forget["answer"]) < before - 0.05).all()


def test_idk_dpo_raises_refusal_over_answer_margin(memorised):
    model, fmt = memorised
    model = fresh(model)
    method = build_method("idk_dpo")
    inp = step_inputs(method, model, fmt)

    def margin():
        with torch.no_grad():
            return sequence_logps(model, inp.forget["idk"])[0] - sequence_logps(model, inp.forget["answer"])[0]

    before = margin()
    train_steps(method, inp)
    assert (margin() > before + 0.5).all()


# ---------------------------------------------------------------- RMU

def rmu_distance(model, method, v) -> torch.Tensor:
    """Slow reference of RMU's forget loss: mean over answer tokens of ||h - c u||^2 / d, per row."""
    rmu = method.forget
    with torch.no_grad():
        h = model(input_ids=v["input_ids"], attention_mask=v["attention_mask"],
                  output_hidden_states=True).hidden_states[rmu.layer + 1]
    u = torch.rand(h.shape[-1], generator=torch.Generator().manual_seed(rmu.seed))
    target = rmu.steering_coeff * u / u.norm()
    out = []
    for i in range(h.shape[0]):
        rows = [((h[i, t] - target) ** 2).mean() for t in range(h.shape[1]) if v["labels"][i, t] != -100]
        out.append(torch.stack(rows).mean())
    return torch.stack(out)


def test_rmu_trainable_is_the_mlps_of_layers_l_minus_2_to_l(deep):
    model, _ = deep
    method = build_method("rmu")
    with pytest.raises(RuntimeError, match="bind"):
        method.trainable("model.layers.3.mlp.down_proj.weight")
    method.bind(model)
    assert method.forget.layer == 3  # the middle of 6 layers
    chosen = {n for n, _ in model.named_parameters() if method.trainable(n)}
    expected = {f"model.layers.{i}.mlp.{m}.weight" for i in (1, 2, 3) for m in ("gate_proj", "up_proj", "down_proj")}
    assert chosen == expected
    # peft-style names
    assert method.trainable("base_model.model.model.layers.2.mlp.down_proj.lora_A.default.weight")
    assert not method.trainable("base_model.model.model.layers.4.mlp.down_proj.lora_A.default.weight")
    assert not method.trainable("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight")
    assert build_method("rmu", layer=5).trainable("model.layers.5.mlp.up_proj.weight")


def test_rmu_forget_loss_matches_slow_reference_and_moves_toward_target(deep):
    model, fmt = deep
    model = fresh(model)
    method = build_method("rmu", steering_coeff=4.0, seed=3)
    method.bind(model)
    inp = step_inputs(method, model, fmt)
    v = inp.forget["answer"]
    before = rmu_distance(model, method, v)
    with torch.no_grad():
        torch.testing.assert_close(method.forget(inp), before, atol=1e-5, rtol=1e-5)
        _, logs = method(inp)
    assert logs["retain_loss"] == pytest.approx(0.0, abs=1e-10)  # reference = the model at the start
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not method.trainable(n)}
    train_steps(method, inp, steps=8)
    after = rmu_distance(model, method, v)
    assert (after < 0.8 * before).all(), (before, after)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    _, logs = method(inp)
    assert logs["retain_loss"] > 0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecation inside forward
@pytest.mark.parametrize("reentrant", [True, False])
def test_rmu_gradient_unchanged_by_activation_checkpointing(deep, reentrant):
    """The capture hook stops the forward early; checkpoint recomputation must still give the same gradient."""
    model, fmt = deep
    method = build_method("rmu")
    method.bind(model)
    plain = fresh(model)
    inp = step_inputs(method, plain, fmt)
    expected = grad_of(plain, lambda: method(inp)[0])
    ckpt = fresh(model)
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    got = grad_of(ckpt, lambda: method(StepInputs(ckpt, inp.forget, inp.retain, inp.ref_model))[0])
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers property
def test_methods_run_on_a_lora_model(deep):
    from obliviate.models.loading import apply_lora

    model, fmt = deep
    lora = apply_lora(fresh(model), r=4, alpha=8)
    rmu = build_method("rmu")
    rmu.bind(lora)
    assert rmu.forget.layer == 3
    chosen = {n for n, p in lora.named_parameters() if p.requires_grad and rmu.trainable(n)}
    assert chosen and all(".mlp." in n and "lora_" in n and int(n.split(".layers.")[1].split(".")[0]) in (1, 2, 3)
                          for n in chosen)
    for name in ("rmu", "npo", "ga_kl"):
        method = build_method(name)
        loss, _ = method(step_inputs(method, lora, fmt))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in lora.parameters() if p.grad is not None)


def test_rmu_bad_layer(deep):
    model, fmt = deep
    method = build_method("rmu", layer=6)
    with pytest.raises(ValueError, match="6 decoder layers"):
        method.bind(model)


# ---------------------------------------------------------------- retain data, weights

@pytest.mark.parametrize("name", ["graddiff", "ga_kl", "npo", "simnpo", "idk_dpo", "rmu"])
def test_retain_term_reads_retain_data_only(tiny, name):
    model, fmt = tiny
    model = fresh(model)
    with torch.no_grad():  # move away from the reference so that KL / RMU retain terms are not 0
        method = build_method(name)
        inp = step_inputs(method, model, fmt)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        _, a = method(inp)
        _, b = method(StepInputs(model, inp.forget, retain_batch(fmt, OTHER_RETAIN_QA), inp.ref_model))
        other_forget = {**forget_batch(fmt, FORGET_QA[::-1]), "ref_logp": inp.forget.get("ref_logp")}
        if other_forget["ref_logp"] is not None:
            other_forget["ref_logp"] = {k: v.flip(0) for k, v in other_forget["ref_logp"].items()}
        _, c = method(StepInputs(model, other_forget, inp.retain, inp.ref_model))
    assert a["retain_loss"] != pytest.approx(b["retain_loss"], rel=1e-4)
    assert a["forget_loss"] == pytest.approx(b["forget_loss"], rel=1e-6)
    assert a["retain_loss"] == pytest.approx(c["retain_loss"], rel=1e-6)
    with pytest.raises(ValueError, match="retain"):
        method(StepInputs(model, inp.forget, None, inp.ref_model))


def test_missing_reference_model_is_a_clear_error(tiny):
    model, fmt = tiny
    with pytest.raises(ValueError, match="reference model"):
        build_method("ga_kl")(StepInputs(model, forget_batch(fmt), retain_batch(fmt), None))


def test_weight_zero_sample_contributes_no_gradient(tiny):
    model, fmt = tiny
    model = fresh(model)
    method = build_method("ga")
    # same lengths, so padding and row layout are identical
    changed = [FORGET_QA[0], ("What genre does Elena Rossa write?", "Gothic histories set in Venice."),
               FORGET_QA[2]]
    assert [len(fmt.encode(q, a)) for q, a in changed] == [len(fmt.encode(q, a)) for q, a in FORGET_QA]

    def grad(pairs, weight):
        return grad_of(model, lambda: method(StepInputs(model, forget_batch(fmt, pairs, weight), None))[0])

    torch.testing.assert_close(grad(FORGET_QA, [1.5, 0.0, 1.5]), grad(changed, [1.5, 0.0, 1.5]))
    assert not torch.allclose(grad(FORGET_QA, [1.0, 1.0, 1.0]), grad(changed, [1.0, 1.0, 1.0]))
    # the weighted mean, by hand
    with torch.no_grad():
        inp = StepInputs(model, forget_batch(fmt, weight=[0.5, 2.0, 0.5]), None)
        per_sample = method.forget(inp)
        loss, logs = method(inp)
    assert float(loss) == pytest.approx(float((0.5 * per_sample[0] + 2.0 * per_sample[1] + 0.5 * per_sample[2]) / 3))


def test_composite_weights_scale_the_parts(tiny):
    model, fmt = tiny
    inp = step_inputs(build_method("graddiff"), model, fmt)
    with torch.no_grad():
        _, base = build_method("graddiff")(inp)
        loss, logs = build_method("custom", forget="ga", retain="nll", forget_weight=0.5, retain_weight=3.0)(inp)
    assert logs["forget_loss"] == pytest.approx(base["forget_loss"])
    assert float(loss) == pytest.approx(0.5 * base["forget_loss"] + 3.0 * base["retain_loss"], rel=1e-5)


# ---------------------------------------------------------------- building by name

def test_list_methods_names_every_preset_custom_and_procedure():
    names = list_methods()
    assert set(names) == set(PRESETS) | {"custom"} | set(PROCEDURES)
    assert "unierase" in names and "2505.15674" in names["unierase"]
    assert all(isinstance(d, str) and d for d in names.values())
    for part in FORGET:
        assert part in names["custom"]


@pytest.mark.parametrize("name", [n for n in list_methods() if n != "custom"])
def test_every_method_is_a_method_or_a_procedure_with_its_listed_options(name):
    """Built with the options ``method_options`` lists (``obliviate methods`` prints them), every
    named method is exactly one of the two protocols, with every attribute its caller reads."""
    options = method_options(name)
    built = build_method(name, **options)
    assert isinstance(built, Method) != isinstance(built, Procedure)
    assert built.name == name
    if isinstance(built, Method):
        assert isinstance(built.views, tuple) and built.views
        assert {type(built.needs_ref_model), type(built.needs_ref_logps), type(built.uses_retain)} == {bool}
        assert callable(built.trainable) and callable(built.bind)
    else:
        assert callable(built.apply)
    assert method_options("custom") is None


def test_unierase_is_registered_with_its_options():
    assert method_options("npo") == {"forget_weight": 1.0, "retain_weight": 1.0, "beta": 0.1}
    assert method_options("unierase") == dataclasses.asdict(UniEraseOptions())
    m = build_method("unierase", layers=[1], token_steps=3)
    assert isinstance(m, UniErase) and isinstance(m, Procedure) and not isinstance(m, Method)
    assert (m.options.layers, m.options.token_steps) == ([1], 3)


def test_custom_builds_any_pair():
    m = build_method("custom", forget="npo", retain="kl", beta=0.05, forget_weight=2, retain_weight=0.5)
    assert isinstance(m, Composite)
    assert (m.forget.beta, m.forget_weight, m.retain_weight) == (0.05, 2.0, 0.5)
    assert m.needs_ref_model and m.needs_ref_logps and m.uses_retain
    plain = build_method("custom", forget="simnpo", retain="none")
    assert not plain.uses_retain


@pytest.mark.parametrize("name, hparams, message", [
    ("nope", {}, "unknown method 'nope'; valid: ga, graddiff"),
    ("npo", {"gamma": 1.0}, "does not take gamma; valid options: forget_weight, retain_weight, beta"),
    ("ga", {"retain_weight": 1.0}, "does not take retain_weight"),
    ("npo", {"beta": -1}, "beta must be a finite number > 0"),
    ("simnpo", {"beta": "abc"}, "beta must be a number"),
    ("simnpo", {"gamma": float("nan")}, "gamma must be finite"),
    ("graddiff", {"retain_weight": -2}, "retain_weight must be a finite number >= 0"),
    ("npo", {"forget": "ga"}, "'forget' is an option of 'custom'"),
    ("custom", {}, "custom needs forget="),
    ("custom", {"forget": "xx"}, "unknown forget objective 'xx'; valid: ga, nll"),
    ("custom", {"forget": "ga", "retain": "yy"}, "unknown retain objective 'yy'; valid: nll, kl, rmu"),
    ("rmu", {"layer": -1}, "layer must be a non-negative integer"),
    ("rmu", {"layer": 2.5}, "layer must be a non-negative integer"),
    ("rmu", {"tokens": "some"}, "tokens must be one of"),
    ("rmu", {"steering_coeff": 0}, "steering_coeff must be a finite number > 0"),
    ("unierase", {"bogus": 1}, "method 'unierase' does not take bogus; valid options: token, token_init"),
    ("unierase", {"l2": 0}, "l2 must be > 0"),
])
def test_build_method_errors(name, hparams, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_method(name, **hparams)
