"""Calibrated unlearning: the distance and gating rules against hand-checked values, a run on a tiny
model that stops inside the band (API and checks.jsonl), gated samples contribute no gradient, a
resumed run with gating and a best checkpoint ends bit-exactly where the uninterrupted one does, and
the CLI refuses --calibrate without a holdout."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from obliviate import api
from obliviate.cli.main import app
from obliviate.data.batches import collate, encode_views
from obliviate.data.benchmark import load_benchmark
from obliviate.data.chat import ChatFormat
from obliviate.data.sources import as_dataset
from obliviate.errors import UserError
from obliviate.evaluation.stopping import CalibratedCheck, gated_rows, normalised_distance, quantile_targets
from obliviate.evaluation.verdict import SAME, ks_call, membership_call
from obliviate.methods import StepInputs, build_method, reference_logps_for_rows
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.runs import RunDir
from obliviate.training.checks import CheckDecision
from obliviate.training.config import TrainConfig
from obliviate.training.loop import CHECKS_LOG, planned_steps, train

FINETUNE = {"epochs": 60, "lr": 5e-3, "batch_size": 4, "warmup_ratio": 0.1}
UNLEARN = {"epochs": 20, "lr": 2e-3, "batch_size": 2, "warmup_ratio": 0.0, "scheduler": "constant", "check_every": 1}


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tiny_model_dir, small_bench):
    """The tiny model finetuned until it has memorised the benchmark's training rows."""
    out = tmp_path_factory.mktemp("memorised") / "target"
    return api.finetune(str(tiny_model_dir), f"{small_bench}:full", out, FINETUNE, progress=False)


# ---------------------------------------------------------------- the rules, by hand


def test_distance_is_at_most_one_exactly_inside_the_band():
    rng = np.random.default_rng(0)
    for i in range(200):
        f, h = rng.normal(rng.uniform(-1, 1), 1, size=rng.integers(3, 12)), rng.normal(0, 1, size=rng.integers(3, 12))
        band = (0.4, 0.6) if i % 3 == 0 else None
        for c in (membership_call(f, h, band=band, n_boot=100), ks_call(f, h, name="knowledge:nll", statistic="KS")):
            assert (normalised_distance(c) <= 1) == (c.call == SAME), (c.name, c.value, c.band, c.p_value)


def test_distance_by_hand():
    inside = membership_call([3.0, 1.0], [2.0, 0.0], band=(0.4, 0.6), n_boot=100)  # AUC 0.75
    assert inside.value == pytest.approx(0.75) and normalised_distance(inside) == pytest.approx(2.5)
    below = membership_call([0.0, 1.0], [2.0, 3.0], band=(0.2, 0.9), n_boot=100)  # AUC 0: (0.5 - 0) / 0.3
    assert normalised_distance(below) == pytest.approx(0.5 / 0.3)
    ks = ks_call([0.0, 1.0, 2.0], [5.0, 6.0, 7.0], name="knowledge:nll", statistic="KS", alpha=0.05)
    assert normalised_distance(ks) == pytest.approx(np.log(ks.p_value) / np.log(0.05))


def test_gating_pairs_ranks_with_holdout_quantiles():
    holdout = [2.0, 4.0, 6.0, 8.0]
    assert quantile_targets(np.array(holdout), 3).tolist() == pytest.approx([3.0, 5.0, 7.0])  # levels 1/6, 1/2, 5/6
    assert gated_rows(np.array([1.0, 5.0, 3.0]), np.array(holdout)) == frozenset()
    assert gated_rows(np.array([4.0, 9.0, 5.5]), np.array(holdout)) == {0, 1, 2}
    assert gated_rows(np.array([3.5, 2.0, 7.0]), np.array(holdout)) == {2}  # at its target counts


# ---------------------------------------------------------------- a calibrated run


def test_calibrated_unlearning_stops_inside_the_band(memorised, small_bench, tmp_path):
    forget, holdout = f"{small_bench}:forget_perturbed", f"{small_bench}:holdout"  # perturbed answers: truth ratio too
    out = api.unlearn(memorised, forget, f"{small_bench}:retain", tmp_path / "run", method="graddiff", train=UNLEARN,
                      holdout=holdout, calibrate=True, progress=False)
    run = tmp_path / "run"
    stats = json.loads((run / "train_stats.json").read_text())
    checks = [json.loads(line) for line in (run / CHECKS_LOG).read_text().splitlines()]
    assert checks[0]["step"] == 0 and checks[0]["call"] == "under-unlearned"  # the memorised model
    assert stats["stopped_at"] == checks[-1]["step"] and checks[-1]["stop"] and checks[-1]["call"] == SAME
    assert [c["step"] for c in checks] == list(range(stats["stopped_at"] + 1))  # check_every=1
    assert all(c["distance"] > 1 for c in checks[:-1]) and checks[-1]["distance"] <= 1
    assert stats["best_step"] == stats["stopped_at"] == stats["steps"]
    assert stats["steps"] < planned_steps(TrainConfig(**UNLEARN), 6)
    assert checks[-1]["criteria"]["knowledge:truth_ratio"]["call"] == SAME  # measured: both sets have perturbed answers
    config = json.loads((run / "fingerprint.json").read_text())["config"]
    assert config["calibrate"]["alpha"] == 0.05 and config["holdout"].endswith("holdout.jsonl")

    # The saved model is the one judged inside the band.
    tok = load_tokenizer(str(out))
    check = CalibratedCheck(ChatFormat(tok), as_dataset(forget), as_dataset(holdout))
    decision = check(load_model(str(out)), 0)
    assert decision.stop and decision.distance == pytest.approx(checks[-1]["distance"], abs=1e-6)


def test_calibrate_needs_a_holdout(memorised, small_bench, tmp_path):
    with pytest.raises(UserError, match="needs a holdout: records of the same kind .* never saw"):
        api.unlearn(memorised, f"{small_bench}:forget", None, tmp_path / "a", method="ga", calibrate=True)
    with pytest.raises(UserError, match="holdout is used by calibrated unlearning"):
        api.unlearn(memorised, f"{small_bench}:forget", None, tmp_path / "b", method="ga",
                    holdout=f"{small_bench}:holdout")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    runner = CliRunner()
    res = runner.invoke(app, ["unlearn", "--model", str(memorised), "--forget", f"{small_bench}:forget", "--out",
                              str(tmp_path / "c"), "--calibrate"], catch_exceptions=False, env={"COLUMNS": "300"})
    assert res.exit_code == 2 and "needs a holdout" in res.output and "never saw" in res.output
    assert "Traceback" not in res.output


# ---------------------------------------------------------------- gating


def test_a_gated_sample_contributes_no_gradient(tiny_model_dir, small_bench):
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    fmt, forget = ChatFormat(tok), load_benchmark(small_bench).split("forget")
    rows = encode_views(fmt, forget, ("answer",))
    method = build_method("npo_only")
    ref = reference_logps_for_rows(model, rows, tok.pad_token_id, 4)

    def grads(index, weights):
        model.zero_grad()
        batch = collate([rows[i] for i in index], index, tok.pad_token_id, weights, ref)
        method.forget_term(StepInputs(model=model, forget=batch, retain=None))[0].backward()
        return [p.grad.clone() for p in model.parameters()]

    gated = grads([0, 1], torch.tensor([1.0, 0.0] + [1.0] * (len(rows) - 2)))  # row 1 gated
    alone = grads([0], None)
    # the batch mean divides by 2: row 0's gradient, halved, and nothing of row 1 (row 0 runs packed
    # with row 1 in the batch and alone without it, so float rounding differs a little)
    for g, a in zip(gated, alone):
        torch.testing.assert_close(g, a / 2, rtol=1e-5, atol=1e-6)


class _Gate:
    """A check that gates ``gate`` from step 0 on, never stops, and rates each step better than the last
    (so the model returned is the last step's)."""

    def __init__(self, gate):
        self.gate = frozenset(gate)

    def __call__(self, model, step):
        return CheckDecision(stop=False, distance=100.0 - step, gate=self.gate)


def test_gated_rows_leave_the_weights_alone(tiny_model_dir, small_bench):
    """Gradient ascent alone, plain SGD: with every row gated the forget loss has no gradient, so no
    weight moves at all; gating none, they do."""
    forget = load_benchmark(small_bench).split("forget")
    tok = load_tokenizer(str(tiny_model_dir))
    cfg = TrainConfig(max_steps=4, lr=1e-2, batch_size=2, optimizer="sgd", weight_decay=0, max_grad_norm=0,
                      warmup_ratio=0, check_every=1)
    before = [p.detach().clone() for p in load_model(str(tiny_model_dir)).parameters()]
    for gate, moved in ((range(len(forget)), False), ((), True)):
        res = train(load_model(str(tiny_model_dir)), tok, build_method("ga"), forget, cfg, on_check=_Gate(gate),
                    progress=False)
        same = all(torch.equal(a, b) for a, b in zip(before, res.model.parameters()))
        assert same != moved
        assert [c["gated"] for c in res.checks] == [len(gate)] * 5  # step 0 and each of the 4 steps


# ---------------------------------------------------------------- resume


class Interrupt(Exception):
    pass


class _Stub:
    """A deterministic check: gates every row but one that changes with the step (so every batch after a
    check has gated rows), rates the model by ``rate(step)``, logs a fingerprint of the weights, and raises
    at ``fail_at`` (an interruption)."""

    def __init__(self, n, rate, fail_at=None):
        self.n, self.rate, self.fail_at = n, rate, fail_at

    def __call__(self, model, step):
        if step == self.fail_at:
            raise Interrupt
        weights = float(sum(p.detach().double().sum() for p in model.parameters()))
        return CheckDecision(stop=False, distance=self.rate(step), gate=frozenset(range(self.n)) - {step % self.n},
                             criteria={"weights": weights})


@pytest.mark.parametrize("rate", [lambda s: abs(s - 3) + 0.5, lambda s: 100.0 - s], ids=["best-mid-run", "best-last"])
def test_resume_with_gating_and_a_best_checkpoint_is_bit_exact(tiny_model_dir, small_bench, tmp_path, rate):
    bench = load_benchmark(small_bench)
    forget, retain = bench.split("forget"), bench.split("retain")
    tok = load_tokenizer(str(tiny_model_dir))
    cfg = TrainConfig(max_steps=8, lr=3e-3, batch_size=2, save_every=2, check_every=1, seed=3)

    def run(path, check, resume=False):
        return train(load_model(str(tiny_model_dir)), tok, build_method("npo"), forget, cfg, retain=retain,
                     run=RunDir.open(path, kind="train", resume=resume), resume=resume, on_check=check, progress=False)

    full = run(tmp_path / "a", _Stub(len(forget), rate))
    with pytest.raises(Interrupt):
        run(tmp_path / "b", _Stub(len(forget), rate, fail_at=5))
    assert (tmp_path / "b" / "checkpoints" / "step-4" / "best.safetensors").exists()
    resumed = run(tmp_path / "b", _Stub(len(forget), rate), resume=True)
    assert resumed.best_step == full.best_step == (3 if rate(0) < 10 else 8)
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n
    assert RunDir(tmp_path / "b").read_log(CHECKS_LOG) == RunDir(tmp_path / "a").read_log(CHECKS_LOG)
    def losses(path):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in RunDir(path).read_log()]

    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_the_pipeline_calibrates_on_the_forget_rows_with_their_perturbed_answers(small_bench, tiny_model_dir):
    """The pipeline's calibrated stopping reads the forget rows with their paraphrased and perturbed
    answers (the evaluation copy of the same rows), so its truth-ratio test is measured, as the final
    verdict's is; training sees the same questions and answers."""
    from obliviate.data.benchmark import load_benchmark
    from obliviate.pipeline import calibration_forget

    bench = load_benchmark(small_bench)
    rows = calibration_forget(bench)
    assert [(e.question, e.answer) for e in rows] == [(e.question, e.answer) for e in bench.split("forget")]
    assert all(e.perturbed_answers for e in rows) and not any(e.perturbed_answers for e in bench.split("forget"))
    check = CalibratedCheck(ChatFormat(load_tokenizer(str(tiny_model_dir))), rows, bench.split("holdout"))
    calls = {c.name: c for c in check.criteria(load_model(str(tiny_model_dir)))[0]}
    assert calls["knowledge:truth_ratio"].measured


# ---------------------------------------------------------------- scores shared within a step


def test_a_step_scores_each_pair_once_for_the_check_and_the_trajectory(tiny_model_dir, small_bench):
    """The calibrated check and a trajectory point at the same step read one set of scores: the check
    at step 0 reads a seed holding its pairs (the target's evaluation) and scores none; a trajectory
    point after a check scores only the pairs the check did not, with the numbers it gets alone; a
    new step, or another prompt layout, starts afresh; a held score without the distribution
    statistics is scored again when they are needed."""
    from obliviate.evaluation.evaluate import eval_sets_from_benchmark, evaluate_likelihoods, evaluate_with_scores
    from obliviate.evaluation.scores import ModelScores, StepScores
    from obliviate.pipeline import calibration_forget

    bench = load_benchmark(small_bench)
    model, tok = load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    fmt = ChatFormat(tok)
    holdout = bench.split("holdout")
    alone = CalibratedCheck(fmt, calibration_forget(bench), holdout)
    shared = StepScores()
    check = CalibratedCheck(fmt, calibration_forget(bench), holdout, step_scores=shared)
    sets = eval_sets_from_benchmark(bench)
    seed = evaluate_with_scores(model, tok, sets, fmt, max_new_tokens=2, progress=False,
                                extra_pairs=check.pairs).scores
    held = len(seed)
    shared.seed(0, seed)
    decision, fresh = check(model, 0), alone(model, 0)
    assert shared.at(0, fmt).scored == 0 and len(seed) == held  # nothing scored; the seed itself untouched
    assert decision.distance == pytest.approx(fresh.distance, rel=1e-6) and decision.gate == fresh.gate

    check(model, 3)
    at3 = shared.at(3, fmt)
    assert at3.scored == len(check.pairs)  # a new step: the check's pairs, each once
    row = evaluate_likelihoods(model, sets, fmt, scores_held=at3)
    assert at3.scored == held  # the trajectory added only the others: the sets' pairs and the check's, once
    alone_row = evaluate_likelihoods(model, sets, fmt)
    assert row.keys() == alone_row.keys()
    for key, value in alone_row.items():
        assert (value is None and row[key] is None) or row[key] == pytest.approx(value, abs=1e-6), key

    other = ChatFormat(tok, system_prompt="Another system prompt.")
    assert shared.at(3, other) is not at3 and len(shared.at(3, other)) == 0
    lean = ModelScores.empty(fmt)
    lean.ensure(model, fmt, check.pairs[:2], distribution=False)
    assert all(s.dist_mean is None for s in lean.pairs.values())
    lean.ensure(model, fmt, check.pairs[:2])
    assert lean.scored == 4 and all(s.dist_mean is not None for s in lean.pairs.values())


def test_the_pipeline_shares_its_scores_between_checks_trajectory_and_the_target_evaluation(
        tiny_model_dir, small_bench, tmp_path, monkeypatch):
    """In a calibrated pipeline run with trajectory points, the check at step 0 reads the target's
    evaluation (it scores nothing), and each step's check and trajectory point use one set of scores."""
    import obliviate.pipeline as pipeline
    from obliviate.evaluation.scores import StepScores

    handed: list[tuple[int, object]] = []

    class Recording(StepScores):
        def at(self, step, fmt):
            scores = super().at(step, fmt)
            handed.append((step, scores))
            return scores

    monkeypatch.setattr(pipeline, "StepScores", Recording)
    cfg = pipeline.PipelineConfig(model=str(tiny_model_dir), method="ga", calibrate=True, max_new_tokens=2,
                                  finetune=FINETUNE,  # memorised: the check at step 0 does not stop the run
                                  unlearn={**UNLEARN, "epochs": 2, "lr": 1e-4, "eval_every": 1})
    pipeline.run_pipeline(small_bench, tmp_path / "run", cfg, progress=False, echo=lambda *a: None)
    zero = [scores for step, scores in handed if step == 0]
    assert zero and all(s.scored == 0 for s in zero)  # the target's evaluation held every pair
    calls = Counter(step for step, _ in handed)
    shared = [step for step in calls if step > 0 and calls[step] > 1]  # a check and a trajectory point
    assert shared and all(len({id(s) for t, s in handed if t == step}) == 1 for step in shared)
