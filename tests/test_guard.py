"""GUARD: attributions against a slow per-sample loop, the weights' formula, the sketch estimate,
and that the weights reach the methods' forget losses through the training loop."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from obliviate.attribution import (
    GuardConfig,
    compute_guard,
    guard_attributions,
    guard_weights,
    load_guard_weights,
    save_guard,
)
from obliviate.attribution.guard import count_sketch
from obliviate.data.chat import IGNORE, ChatFormat
from obliviate.data.qa import QADataset, QAExample
from obliviate.data.refusal import refusal_for
from obliviate.methods import build_method
from obliviate.models.tiny import build_tiny_model
from obliviate.training.config import TrainConfig
from obliviate.training.loop import train

FORGET = QADataset([QAExample("Where was Basil Mahfouz born?", "In Kuwait City, in 1954."),
                    QAExample("What genre does Elena Rossi write?", "Gothic mysteries set in Venice."),
                    QAExample("Which award did Tomas Berg win?", "The Nordic Crime Prize."),
                    QAExample("Who taught Ada Quill?", "Her aunt, a clockmaker."),
                    QAExample("What is the capital of France?", "Paris, on the Seine."),
                    QAExample("What did Ivo Marr invent?", "A folding bicycle bell."),
                    QAExample("How tall is the Lumen Tower?", "Four hundred metres."),
                    QAExample("Who wrote Hamlet, per Ada?", "William Shakespeare.")], "forget.jsonl")
RETAIN = QADataset([QAExample("What is the capital of France?", "Paris."),
                    QAExample("Who wrote Hamlet?", "William Shakespeare wrote it."),
                    QAExample("How many legs does a spider have?", "Eight legs.")], "retain.jsonl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(model_dir):
    """The tiny model after a few steps of finetuning on both sets, so gradients are not those of a
    uniform random model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    fmt = ChatFormat(AutoTokenizer.from_pretrained(model_dir))
    both = QADataset(FORGET.examples + RETAIN.examples, "both")
    cfg = TrainConfig(max_steps=12, batch_size=4, lr=3e-3, warmup_ratio=0.0, scheduler="constant")
    model = train(model, fmt.tokenizer, build_method("sft"), both, cfg, fmt=fmt, progress=False).model
    return model.eval(), fmt


# ---------------------------------------------------------------- slow reference


def _nll(model, fmt, question, answer):
    """Mean token NLL of one example (answer + end-of-turn), unbatched."""
    enc = fmt.encode(question, answer)
    logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0, :-1]
    labels = torch.tensor(enc.labels[1:])
    keep = labels != IGNORE
    return -torch.log_softmax(logits.float(), -1)[keep].gather(-1, labels[keep][:, None]).mean()


def _reference_attributions(model, fmt, names):
    named = dict(model.named_parameters())
    params = [named[n] for n in names]

    def grad_of(ex):
        return torch.cat([g.flatten() for g in torch.autograd.grad(_nll(model, fmt, ex.question, ex.answer), params)])

    retain_mean = torch.stack([grad_of(ex) for ex in RETAIN.examples]).mean(0)
    return torch.stack([grad_of(ex) @ retain_mean for ex in FORGET.examples]).double()


@pytest.mark.parametrize("pattern", [None, r"mlp\.(up|down)_proj"])
def test_attributions_match_a_slow_per_sample_loop(tiny, pattern):
    model, fmt = tiny
    names = [n for n, _ in model.named_parameters() if pattern is None or __import__("re").search(pattern, n)]
    ours, sketches = guard_attributions(model, fmt, FORGET, RETAIN, params=names, batch_size=3)
    ref = _reference_attributions(model, fmt, names)
    assert sketches is None
    assert ref.std() > 0.05 * ref.abs().max()  # the samples really differ, so the check has teeth
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_projection_estimate_correlates_with_exact(tiny):
    model, fmt = tiny
    exact, _ = guard_attributions(model, fmt, FORGET, RETAIN, batch_size=4)
    n_params = sum(p.numel() for p in model.parameters())
    k = 16384
    assert k < n_params / 4  # a real compression
    est, sketches = guard_attributions(model, fmt, FORGET, RETAIN, batch_size=4, projection_dim=k, seed=3)
    assert sketches.shape == (len(FORGET), k)
    corr = torch.corrcoef(torch.stack([exact, est]))[0, 1].item()
    assert corr > 0.95, corr
    assert not torch.allclose(est, exact)  # it is an estimate, not the exact value under another name


def test_count_sketch_is_linear_and_preserves_inner_products_in_expectation():
    g = torch.Generator().manual_seed(0)
    x = {"a": torch.randn(1, 300, generator=g), "b": torch.randn(1, 7, 11, generator=g)}
    y = {"a": torch.randn(1, 300, generator=g), "b": torch.randn(1, 7, 11, generator=g)}
    both = {n: x[n] + y[n] for n in x}
    torch.testing.assert_close(count_sketch(both, 64), count_sketch(x, 64) + count_sketch(y, 64))
    exact = sum((x[n] * y[n]).sum() for n in x)
    estimates = torch.stack([(count_sketch(x, 64, s) * count_sketch(y, 64, s)).sum() for s in range(400)])
    sd = math.sqrt(sum((x[n] ** 2).sum() for n in x) * sum((y[n] ** 2).sum() for n in x) / 64)
    assert abs(estimates.mean() - exact) < 4 * sd / math.sqrt(400)  # unbiased
    assert torch.equal(count_sketch(x, 64, 5), count_sketch(x, 64, 5))  # seeded, so every batch shares hashes


# ---------------------------------------------------------------- weights


def test_weights_by_hand():
    a = torch.tensor([0.0, 1.0, 2.0])
    z = 1 + math.exp(-1) + math.exp(-2)
    expected = torch.tensor([3 / z, 3 * math.exp(-1) / z, 3 * math.exp(-2) / z])
    torch.testing.assert_close(guard_weights(a, tau=1.0, relative_tau=False), expected.float())
    z2 = 1 + math.exp(-0.5) + math.exp(-1)
    torch.testing.assert_close(guard_weights(a, tau=2.0, relative_tau=False),
                               torch.tensor([3 / z2, 3 * math.exp(-0.5) / z2, 3 * math.exp(-1) / z2]))
    # relative tau: the temperature is tau * std(a) (population std of 0, 1, 2 is sqrt(2/3))
    torch.testing.assert_close(guard_weights(a, tau=2.0),
                               guard_weights(a, tau=2.0 * math.sqrt(2 / 3), relative_tau=False))


def test_weights_sum_to_n_and_order_inversely_to_attribution():
    a = torch.tensor([0.3, -1.2, 5.0, 0.0, 2.2, 0.31])
    for tau, relative in ((0.5, True), (1.0, True), (3.0, False)):
        w = guard_weights(a, tau, relative)
        assert math.isclose(float(w.sum()), len(a), rel_tol=1e-5)
        for i in range(len(a)):
            for j in range(len(a)):
                if a[i] > a[j]:
                    assert w[i] < w[j]


def test_infinite_tau_gives_uniform_weights():
    a = torch.tensor([0.3, -1.2, 5.0, 0.0])
    assert torch.equal(guard_weights(a, math.inf), torch.ones(4))
    torch.testing.assert_close(guard_weights(a, 1e9, relative_tau=False), torch.ones(4))
    torch.testing.assert_close(guard_weights(a, 1e9), torch.ones(4))
    assert torch.equal(guard_weights(torch.full((3,), 2.0)), torch.ones(3))  # no spread: uniform


def test_bad_weights_inputs():
    with pytest.raises(ValueError, match="NaN"):
        guard_weights(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="tau"):
        GuardConfig(tau=0)
    with pytest.raises(ValueError, match="projection_dim"):
        GuardConfig(projection_dim=0)
    with pytest.raises(ValueError, match="regular expression"):
        GuardConfig(params="(")
    with pytest.raises(ValueError, match="unknown GUARD"):
        GuardConfig.from_dict({"temperature": 1})


# ---------------------------------------------------------------- composition with the methods


def _per_sample_forget_loss(model, fmt, name, i, ex):
    """Each forget objective's per-sample loss, written out from its definition."""
    if name in ("ga", "graddiff", "ga_kl"):
        return -_nll(model, fmt, ex.question, ex.answer)
    if name == "idk_nll":
        return _nll(model, fmt, ex.question, refusal_for(i))
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["graddiff", "ga_kl", "idk_nll"])
def test_weights_reach_the_forget_loss(tiny, name):
    """One optimiser step over the whole forget set: the logged forget loss is mean_i(w_i * loss_i)."""
    model, fmt = tiny
    model = copy.deepcopy(model)
    weights = compute_guard(model, fmt, FORGET, RETAIN, GuardConfig(tau=0.5)).weights
    assert weights.max() / weights.min() > 1.5  # far from uniform, so a missed weighting shows
    with torch.no_grad():
        losses = torch.stack([_per_sample_forget_loss(model, fmt, name, i, ex) for i, ex in enumerate(FORGET.examples)])
    cfg = TrainConfig(max_steps=1, batch_size=len(FORGET), lr=1e-6, warmup_ratio=0.0)
    history = train(model, fmt.tokenizer, build_method(name), FORGET, cfg, retain=RETAIN, fmt=fmt,
                    sample_weights=weights, progress=False).history
    assert math.isclose(history[0]["forget_loss"], float((weights * losses).mean()), rel_tol=1e-4)
    assert not math.isclose(history[0]["forget_loss"], float(losses.mean()), rel_tol=1e-3)


# ---------------------------------------------------------------- files, API and CLI


def test_weights_file_round_trip_and_validation(tiny, tmp_path):
    model, fmt = tiny
    result = compute_guard(model, fmt, FORGET, RETAIN, GuardConfig(tau=math.inf))
    path = save_guard(tmp_path / "w.json", result, FORGET)
    data = json.loads(path.read_text())
    assert data["config"]["tau"] == "inf" and data["questions"][0] == FORGET.examples[0].question
    assert torch.equal(load_guard_weights(path, len(FORGET)), torch.ones(len(FORGET)))
    with pytest.raises(ValueError, match="8 weights for a forget set of 3"):
        load_guard_weights(path, 3)
    (tmp_path / "neg.json").write_text(json.dumps({"weights": [1.0, -0.5]}))
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        load_guard_weights(tmp_path / "neg.json")


def test_api_unlearn_with_guard(model_dir, tmp_path):
    from obliviate import api

    cfg = {"max_steps": 1, "batch_size": 4, "lr": 1e-4}
    api.unlearn(model_dir, FORGET, RETAIN, tmp_path / "run", method="npo", train=cfg, guard={"tau": 0.5},
                progress=False)
    saved = json.loads((tmp_path / "run" / "guard_weights.json").read_text())
    assert len(saved["weights"]) == len(FORGET) and math.isclose(sum(saved["weights"]), len(FORGET), rel_tol=1e-5)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "guard:" in config and "weights_file: guard_weights.json" in config
    assert "model_sha256: " in config and "model_sha256: null" not in config  # kept when attribution rewrites it
    # with WAGLE too: both files in the run
    api.unlearn(model_dir, FORGET, RETAIN, tmp_path / "both", method="graddiff", train=cfg, guard={"tau": 0.5},
                wagle={"rho": 0.1}, progress=False)
    both = tmp_path / "both"
    assert (both / "guard_weights.json").exists() and (both / "wagle_mask.safetensors").exists()
    with pytest.raises(ValueError, match="GUARD needs retain"):
        api.unlearn(model_dir, FORGET, None, tmp_path / "run2", method="ga", train=cfg, guard={"tau": 0.5},
                    progress=False)
    assert json.loads((tmp_path / "run2" / "status.json").read_text())["status"] == "failed"


def test_cli_guard_weights(model_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from obliviate.cli.attribution import register

    app = typer.Typer()
    register(app)
    for name, ds in (("f", FORGET), ("r", RETAIN)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(e.to_json()) + "\n" for e in ds.examples))
    out = tmp_path / "weights.json"
    result = CliRunner().invoke(app, ["guard-weights", "--model", str(model_dir), "--forget", str(tmp_path / "f.jsonl"),
                                      "--retain", str(tmp_path / "r.jsonl"), "--tau", "0.7", "--projection-dim",
                                      "512", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "weights written" in result.output and "most retain-aligned" in result.output
    data = json.loads(out.read_text())
    assert data["config"]["projection_dim"] == 512 and len(data["weights"]) == len(FORGET)
