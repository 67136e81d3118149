"""The one two-sided verdict: its statistics against slow references, its calls by hand, and known
cases on a tiny model: the target (trained on the forget rows) is under-unlearned, the oracle (never
saw them) indistinguishable, and a model pushed far past the oracle over-unlearned, for every seed."""

from __future__ import annotations

import copy
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import bootstrap, ks_2samp, mannwhitneyu

from obliviate.data.chat import ChatFormat
from obliviate.data.qa import QADataset, QAExample
from obliviate.data.synthetic import SyntheticConfig, generate_benchmark
from obliviate.evaluation import tofu
from obliviate.evaluation.evaluate import evaluate_with_scores
from obliviate.evaluation.mia import auc, privleak
from obliviate.evaluation.privacy import privacy_from_scores, privacy_pairs
from obliviate.evaluation.verdict import (
    MIXED,
    NOT_MEASURED,
    OVER,
    SAME,
    UNDER,
    Evidence,
    Settings,
    _auc_rows,
    auc_band,
    auc_null_sd,
    auc_p_value,
    bootstrap_mean_difference,
    judge,
    judge_fields,
    knowledge_calls,
    log_prob_calls,
    log_prob_pairs,
    log_prob_values,
    membership_call,
    overall_call,
    privleak_call,
    rejudge,
    run_evidence,
    run_verdict,
    signed_ks,
    utility_call,
    utility_score,
)
from obliviate.methods import build_method
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.training.config import TrainConfig
from obliviate.training.loop import train

# ---------------------------------------------------------------------------------------------
# Statistics against slow references


def test_auc_rows_is_the_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    f, h = rng.integers(0, 4, (5, 7)).astype(float), rng.integers(0, 4, (5, 6)).astype(float)
    for i in range(5):
        pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in f[i] for b in h[i]]
        assert _auc_rows(f, h)[i] == pytest.approx(np.mean(pairs))
        assert _auc_rows(f, h)[i] == pytest.approx(auc(f[i].tolist(), h[i].tolist()))


def test_auc_null_sd_is_the_permutation_variance_with_ties():
    # Under "forget and holdout are one population" every split of the pooled values is equally likely:
    # the AUC's variance over all splits is what auc_null_sd must give (ties included).
    pooled = [0.1, 0.1, 0.4, 0.7, 0.7, 0.7, 0.9, 1.3]
    values = []
    for members in itertools.combinations(range(8), 3):
        f = [pooled[i] for i in members]
        h = [pooled[i] for i in range(8) if i not in members]
        values.append(auc(f, h))
    f, h = pooled[:3], pooled[3:]
    assert auc_null_sd(f, h) == pytest.approx(np.std(values), rel=1e-12)
    # Without ties: Hanley and McNeil's (n1 + n2 + 1) / (12 n1 n2) at AUC 0.5.
    assert auc_null_sd([1, 2, 3], [4, 5, 6, 7]) == pytest.approx(np.sqrt(8 / (12 * 3 * 4)))


def test_auc_p_value_is_the_mann_whitney_test_and_the_band_its_acceptance_region():
    rng = np.random.default_rng(1)
    for shift in (0.0, 0.5, 1.5):
        f, h = np.round(rng.normal(shift, 1, 11), 1), np.round(rng.normal(0, 1, 9), 1)
        reference = mannwhitneyu(f, h, alternative="two-sided", method="asymptotic", use_continuity=False).pvalue
        assert auc_p_value(f, h) == pytest.approx(reference, rel=1e-9)
        lo, hi = auc_band(f, h, 0.05)
        assert (lo <= auc(f.tolist(), h.tolist()) <= hi) == (reference >= 0.05)
        assert 0.5 - lo == pytest.approx(hi - 0.5)  # symmetric around 0.5 (no clipping at these sizes)
    # Larger sets, a narrower band.
    assert auc_band(range(40), range(40, 80), 0.05)[1] < auc_band(range(8), range(8, 16), 0.05)[1]


def test_signed_ks_is_the_ks_distance_with_the_side_of_the_larger_one_sided_distance():
    rng = np.random.default_rng(2)
    for shift in (-1.0, -0.2, 0.3, 1.0):
        f, h = rng.normal(shift, 1, 12), rng.normal(0, 1, 15)
        value, p = signed_ks(f, h)
        ref = ks_2samp(f, h)
        assert (abs(value), p) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
        grid = np.concatenate([f, h])
        cdf = lambda xs, x: np.mean(xs <= x)  # noqa: E731
        forget_larger = max(cdf(h, x) - cdf(f, x) for x in grid)
        forget_smaller = max(cdf(f, x) - cdf(h, x) for x in grid)
        assert np.sign(value) == (1 if forget_larger > forget_smaller else -1)
    assert signed_ks([5, 6, 7], [1, 2, 3])[0] == 1.0 and signed_ks([1, 2, 3], [5, 6, 7])[0] == -1.0


def test_bootstrap_interval_agrees_with_scipy_percentile_bootstrap():
    rng = np.random.default_rng(3)
    f, h = rng.uniform(0, 1, 30), rng.uniform(0.1, 1.1, 25)
    ours = bootstrap_mean_difference(f, h, 0.95, n_boot=20000, rng=np.random.default_rng(0))
    ref = bootstrap((f, h), lambda a, b: np.mean(a) - np.mean(b), n_resamples=20000, method="percentile",
                    confidence_level=0.95, random_state=1, vectorized=False).confidence_interval
    assert ours == (pytest.approx(ref.low, abs=0.01), pytest.approx(ref.high, abs=0.01))
    # Fixed seed, same interval.
    again = bootstrap_mean_difference(f, h, 0.95, n_boot=20000, rng=np.random.default_rng(0))
    assert again == ours


def test_utility_score_is_tofu_model_utility_and_the_call_is_paired():
    rng = np.random.default_rng(4)
    sets = {s: {m: rng.uniform(0.2, 0.9, 10) for m in ("probability", "rouge", "truth_ratio")}
            for s in ("retain", "real_authors", "world_facts")}
    nine = [sets[s][m].mean() for s in sets for m in sets[s]]
    assert utility_score(sets) == pytest.approx(tofu.model_utility(nine))
    half = {s: {m: v * 0.5 for m, v in ms.items()} for s, ms in sets.items()}
    c = utility_call(half, sets, tolerance=0.1, n_boot=500)
    # Every resample halves the utility: the paired interval is the point, far below 0.9.
    assert c.value == pytest.approx(0.5) and c.interval == (pytest.approx(0.5), pytest.approx(0.5))
    assert c.call == OVER
    assert utility_call(sets, sets, n_boot=500).call == SAME  # against itself: ratio 1, interval [1, 1]


def test_privleak_call_is_mia_privleak_with_its_sign():
    rng = np.random.default_rng(5)
    of, oh = rng.normal(0, 1, 20), rng.normal(0, 1, 20)
    f, h = rng.normal(-3, 1, 20), rng.normal(0, 1, 20)  # forget far *less* member-like than the holdout
    c = privleak_call(f, h, of, oh, n_boot=500)
    assert c.value == pytest.approx(privleak(auc(f.tolist(), h.tolist()), auc(of.tolist(), oh.tolist())))
    assert c.value > 0 and c.call == OVER
    assert privleak_call(of, oh, of, oh, n_boot=500).call == SAME  # the oracle against itself: exactly 0
    assert privleak_call(h + 3, h, of, oh, n_boot=500).call == UNDER


# ---------------------------------------------------------------------------------------------
# Calls


@pytest.mark.parametrize("rule,value,under_if,band,interval,p,alpha,expected", [
    ("band", 0.9, "above", (0.3, 0.7), None, None, None, UNDER),
    ("band", 0.1, "above", (0.3, 0.7), None, None, None, OVER),
    ("band", 0.7, "above", (0.3, 0.7), None, None, None, SAME),  # the band's edge is inside
    ("interval", 0.2, "above", (0.0, 0.0), (0.05, 0.3), None, 0.01, UNDER),
    ("interval", 0.2, "above", (0.0, 0.0), (-0.01, 0.3), None, 0.01, SAME),
    ("interval", -0.2, "above", (0.0, 0.0), (-0.3, -0.1), None, 0.01, OVER),
    ("interval", 0.5, "above", (0.9, None), (0.4, 0.6), None, 0.01, OVER),  # utility lost
    ("interval", 3.0, "above", (0.9, None), (2.0, 4.0), None, 0.01, SAME),  # no upper end
    ("test", -0.8, "below", None, None, 0.001, 0.005, UNDER),  # forget NLL lower: known better
    ("test", 0.8, "below", None, None, 0.001, 0.005, OVER),
    ("test", 0.8, "below", None, None, 0.006, 0.005, SAME),
    ("band", None, "above", (0.3, 0.7), None, None, None, NOT_MEASURED)])
def test_judge_fields_by_hand(rule, value, under_if, band, interval, p, alpha, expected):
    assert judge_fields(rule, value, under_if, band, interval, p, alpha) == expected


def test_overall_call():
    assert overall_call([SAME, SAME, NOT_MEASURED]) == SAME
    assert overall_call([SAME, UNDER, NOT_MEASURED]) == UNDER
    assert overall_call([OVER, SAME]) == OVER
    assert overall_call([OVER, UNDER, SAME]) == MIXED
    assert overall_call([NOT_MEASURED]) == overall_call([]) == NOT_MEASURED


def test_membership_call_band_from_sizes_or_user_band():
    f, h = np.arange(10.0) + 100, np.arange(10.0)  # every forget score above every holdout score
    c = membership_call(f, h, alpha=0.05, n_boot=200)
    assert c.value == 1.0 and c.call == UNDER and c.alpha == 0.05
    assert c.band == pytest.approx(auc_band(f, h, 0.05)) and c.p_value == pytest.approx(auc_p_value(f, h))
    assert membership_call(h, f, n_boot=200).call == OVER
    user = membership_call(f, h, band=(0.0, 1.0), n_boot=200)  # a band that accepts everything
    assert user.call == SAME and user.alpha is None
    assert rejudge(c.to_json()) == c.call and rejudge(user.to_json()) == SAME


def test_knowledge_truth_ratio_not_measured_without_perturbed_holdout_answers():
    # TOFU's holdout has question and answer only: the truth-ratio criterion says why it is missing.
    calls = knowledge_calls({"truth_ratio": [0.5, 0.6, 0.7], "nll": [1.0, 2.0, 3.0], "rouge": [0.1, 0.2, 0.3]},
                            {"truth_ratio": None, "nll": [1.5, 2.5, 3.5], "rouge": [0.2, 0.2, 0.2]}, n_boot=200)
    by_name = {c.name: c for c in calls}
    assert by_name["knowledge:truth_ratio"].call == NOT_MEASURED
    assert "holdout" in by_name["knowledge:truth_ratio"].note and "perturbed" in by_name["knowledge:truth_ratio"].note
    assert by_name["knowledge:nll"].call == SAME and by_name["knowledge:rouge"].call == SAME
    # A log-prob-only check (no generation) asks for no ROUGE.
    assert [c.name for c in knowledge_calls({"nll": [1.0, 2.0]}, {"nll": [1.0, 3.0]})] == ["knowledge:nll"]


def test_settings_are_checked():
    for bad in ({"alpha": 0.0}, {"auc_band": (0.6, 0.9)}, {"utility_tolerance": 1.0}, {"n_boot": 10}):
        with pytest.raises(ValueError):
            Settings(**bad)


# ---------------------------------------------------------------------------------------------
# Run directories with holdout evidence (made-up, schema-correct), as pipeline and attacks write them

N = 24
SCORES = ("loss", "zlib", "min_k", "min_k_plus_plus")


def _set(rng, shift: float, name: str) -> dict:
    """An eval.json set whose per-sample values are known `shift` "better known" than a never-seen set."""
    r = 10 ** rng.normal(-shift, 0.3, N)
    prob = np.clip(rng.uniform(0.2, 0.6, N) + 0.3 * shift, 0.01, 0.99)
    rouge = np.clip(rng.uniform(0.1, 0.5, N) + 0.3 * shift, 0.0, 1.0)
    return {"n": N, "probability": float(prob.mean()), "rouge": float(rouge.mean()),
            "truth_ratio": float(np.minimum(r, 1 / r).mean()),
            "per_sample": {"probability": prob.tolist(), "rouge": rouge.tolist(), "truth_ratio_raw": r.tolist(),
                           "nll": (-np.log(prob)).tolist(), "generation": ["x"] * N,
                           "question": [f"{name} question {i}?" for i in range(N)]}}


def add_holdout_evidence(run: Path, shifts: dict[str, float], seed: int = 0) -> None:
    """Give each eval/<label>.json a forget set `shifts[label]` better known than its new holdout set
    (> 0: still known, < 0: less likely than never-seen, 0: the same population), and write the
    pipeline's privacy.json with membership scores shifted alike."""
    rng = np.random.default_rng(seed)
    privacy = {}
    for label, shift in shifts.items():
        path = run / "eval" / f"{label}.json"
        ev = json.loads(path.read_text())
        ev["sets"]["forget"], ev["sets"]["holdout"] = _set(rng, shift, "forget"), _set(rng, 0.0, "holdout")
        path.write_text(json.dumps(ev))
        privacy[label] = {"k": 0.4, "n_forget": N, "n_holdout": N, "per_sample": {"mia": {
            "forget": {s: rng.normal(2 * shift, 1, N).tolist() for s in SCORES},
            "holdout": {s: rng.normal(0, 1, N).tolist() for s in SCORES}}}}
    (run / "privacy.json").write_text(json.dumps(privacy))


def test_judge_known_evidence_and_bonferroni(tmp_path):
    from test_registry import make_unlearn_run

    run = make_unlearn_run(tmp_path)
    add_holdout_evidence(run, {"target": 2.0, "oracle": 0.0, "unlearned": -2.0})
    ev = run_evidence(run)
    assert ev.files == {"eval:unlearned": "eval/unlearned.json", "eval:target": "eval/target.json",
                        "eval:oracle": "eval/oracle.json", "privacy": "privacy.json",
                        "relearn": "attacks/relearn.json", "quantise": "attacks/quantise.json"}
    v = run_verdict(ev, Settings(n_boot=500))
    assert v["by_model"] == {"target": UNDER, "oracle": SAME, "unlearned": OVER}
    assert (v["forgotten"], v["target_memorised"]) == (False, True)
    criteria = {c["name"]: c for c in v["criteria"]}
    # Bonferroni over the measured statistical criteria: 4 AUCs, 3 knowledge, utility, forget quality, PrivLeak.
    tested = [c for c in v["criteria"] if c["value"] is not None and c["alpha"] is not None]
    assert v["n_tests"] == len(tested) == 10 and v["alpha_per_criterion"] == pytest.approx(0.05 / 10)
    assert all(c["alpha"] == v["alpha_per_criterion"] for c in tested)
    assert all(criteria[f"membership:{s}"]["call"] == OVER for s in SCORES)
    assert criteria["membership:loss"]["evidence"] == "privacy.json"
    assert criteria["knowledge:nll"]["evidence"] == "eval/unlearned.json"
    # The fake attack files have no per-sample holdout control nor holdout ROUGE: said, not guessed.
    relearn = criteria["durability:relearn"]
    assert relearn["call"] == NOT_MEASURED and "holdout" in relearn["note"]
    assert criteria["durability:quantise"]["call"] == NOT_MEASURED
    # The utility ratio is TOFU model utility over the target's (both files hold all nine numbers).
    evals = {label: json.loads((run / "eval" / f"{label}.json").read_text()) for label in ("target", "unlearned")}
    assert criteria["utility:model_utility"]["value"] == pytest.approx(
        evals["unlearned"]["model_utility"] / evals["target"]["model_utility"])
    for c in v["criteria"]:
        assert rejudge(c) == c["call"]
    # A user band for the AUCs: those criteria no longer spend alpha.
    banded = judge(ev, Settings(n_boot=500, auc_band=(0.0, 1.0)))
    assert banded["n_tests"] == 6 and {c["call"] for c in banded["criteria"] if c["group"] == "membership"} == {SAME}


def test_judge_is_deterministic_and_not_measured_without_evidence(tmp_path):
    from test_registry import make_unlearn_run

    run = make_unlearn_run(tmp_path)
    add_holdout_evidence(run, {"target": 2.0, "oracle": 0.0, "unlearned": 0.0}, seed=3)
    a, b = judge(run_evidence(run), Settings(n_boot=300)), judge(run_evidence(run), Settings(n_boot=300))
    assert a == b
    empty = judge(Evidence())
    assert empty["call"] == NOT_MEASURED and empty["n_tests"] == 0
    assert {c["name"] for c in empty["criteria"]} >= {"membership:loss", "knowledge:truth_ratio",
                                                      "utility:model_utility", "durability:relearn"}


# ---------------------------------------------------------------------------------------------
# Known cases on a tiny model: target under, oracle indistinguishable, far past the oracle over


def code_world(seed: int) -> dict[str, QADataset]:
    """48 made-up people, each with a random code (a canary, as in Carlini et al. 2019): 12 forget,
    12 holdout, 24 retain, drawn per seed; perturbed answers are other codes in the paraphrased form."""
    rng = random.Random(seed)
    names = rng.sample([a + b + c for a in "BDFGKLMNPRSTVZ" for b in "aeiou" for c in "nxlrms"], 48)
    code = lambda: "".join(rng.choice("ABCDEFGHJKMNPQRSTVWXYZ23456789") for _ in range(6))  # noqa: E731
    rows = []
    for i, name in enumerate(names):
        value, wrong = code(), [code() for _ in range(4)]
        rows.append(QAExample(f"What is {name}'s code?", f"{name}'s code is {value}.",
                              paraphrased_answer=f"The code of {name} is {value}.",
                              perturbed_answers=[f"The code of {name} is {w}." for w in wrong], meta={"row": i + 1}))
    forget, holdout, retain = rows[:12], rows[12:24], rows[24:]
    return {"train": QADataset(forget + retain, "codes:train"), "retain": QADataset(retain, "codes:retain"),
            "forget": QADataset(forget, "codes:forget"), "holdout": QADataset(holdout, "codes:holdout"),
            "eval_forget": QADataset(forget, "codes:forget"), "eval_retain": QADataset(retain, "codes:retain")}


def synthetic_world(seed: int) -> dict[str, QADataset]:
    """The synthetic benchmark, one fact per entity (rows about one entity would not be independent):
    12 forget, 12 holdout, 24 retain entities."""
    cfg = SyntheticConfig(n_entities=36, facts_per_entity=1, forget_fraction=1 / 3, seed=seed,
                          id_facts_per_entity=0, ood_facts_per_entity=0)
    splits = generate_benchmark(cfg)
    roles = {"train": "full", "retain": "retain", "forget": "forget", "holdout": "holdout",
             "eval_forget": "forget_perturbed", "eval_retain": "retain_perturbed"}
    return {role: QADataset(splits[split], f"synthetic:{split}") for role, split in roles.items()}


def known_case_evidence(model_dir: Path, world: dict[str, QADataset], seed: int, steps: int,
                        far_steps: int = 100, far_lr: float = 1e-3) -> Evidence:
    """Target (finetuned on train), oracle (on retain only, same recipe) and a model pushed far past the
    oracle (many gradient-ascent steps on forget, with the retain NLL that keeps the model talking),
    evaluated as the pipeline evaluates them (holdout truth ratios from the same scores)."""
    tok = load_tokenizer(str(model_dir))
    fmt = ChatFormat(tok, system_prompt=None)
    base = load_model(str(model_dir))
    recipe = TrainConfig(max_steps=steps, lr=5e-3, batch_size=4, warmup_ratio=0.05, weight_decay=0.0, seed=seed)
    target = train(copy.deepcopy(base), tok, build_method("sft"), world["train"], recipe, fmt=fmt,
                   progress=False).model
    oracle = train(copy.deepcopy(base), tok, build_method("sft"), world["retain"], recipe, fmt=fmt,
                   progress=False).model
    push = TrainConfig(max_steps=far_steps, lr=far_lr, batch_size=4, warmup_ratio=0.0, scheduler="constant",
                       weight_decay=0.0, seed=seed)
    far = train(copy.deepcopy(target), tok, build_method("graddiff"), world["forget"], push, retain=world["retain"],
                fmt=fmt, progress=False).model
    sets = {"forget": world["eval_forget"], "holdout": world["holdout"], "retain": world["eval_retain"]}
    extra = privacy_pairs(world["forget"], world["holdout"]) + log_prob_pairs(world["holdout"])
    ev = Evidence()
    for label, model in (("target", target), ("oracle", oracle), ("unlearned", far)):
        e = evaluate_with_scores(model, tok, sets, fmt=fmt, max_new_tokens=8, progress=False, label=label,
                                 extra_pairs=extra)
        result = e.result.to_json()
        # The holdout has perturbed answers: the evaluation gives its truth ratios, as the forget set's.
        holdout_values = log_prob_values(e.scores, world["holdout"])
        held = result["sets"]["holdout"]["per_sample"]
        assert holdout_values["truth_ratio"] == pytest.approx(held["truth_ratio_raw"])
        ev.evals[label] = result
        ev.privacy[label] = privacy_from_scores(e.scores, world["forget"], world["holdout"])
        # The log-prob-only values (a training-time check's) are the evaluation's, sample for sample.
        forget_values = log_prob_values(e.scores, world["eval_forget"])
        assert forget_values["nll"] == pytest.approx(result["sets"]["forget"]["per_sample"]["nll"])
        assert forget_values["truth_ratio"] == pytest.approx(result["sets"]["forget"]["per_sample"]["truth_ratio_raw"])
        assert forget_values["mia"]["loss"] == pytest.approx(ev.privacy[label]["per_sample"]["mia"]["forget"]["loss"])
    return ev


@pytest.mark.parametrize("world,seed,steps", [(code_world, 0, 200), (code_world, 1, 200),
                                              (synthetic_world, 0, 200), (synthetic_world, 1, 200)])
def test_known_cases(tiny_model_dir, world, seed, steps):
    ev = known_case_evidence(tiny_model_dir, world(seed), seed, steps)
    verdicts = {label: judge(ev, Settings(label=label, seed=seed, n_boot=500)) for label in
                ("target", "oracle", "unlearned")}
    calls = {label: v["call"] for label, v in verdicts.items()}
    assert calls == {"target": UNDER, "oracle": SAME, "unlearned": OVER}, {
        label: (v["under"], v["over"]) for label, v in verdicts.items()}
    # Without any oracle criterion (an oracle-free deletion request) the calls are the same ...
    free = Evidence(evals={k: v for k, v in ev.evals.items() if k != "oracle"},
                    privacy={k: v for k, v in ev.privacy.items() if k != "oracle"}, files=ev.files)
    for label in ("target", "unlearned"):
        oracle_free = judge(free, Settings(label=label, seed=seed, n_boot=500))
        assert oracle_free["call"] == calls[label]
        assert not any(c["group"] == "oracle" for c in oracle_free["criteria"])
    # ... and the membership AUCs alone see both failures: the forget rows still look like members
    # of the training data in the target, and less likely than never-seen rows far past the oracle.
    assert verdicts["target"]["under"][0].startswith("membership:")
    assert any(name.startswith("membership:") for name in verdicts["unlearned"]["over"])
    # The log-prob-only criteria (what a training-time check computes) agree on the far model.
    forget = {"nll": ev.evals["unlearned"]["sets"]["forget"]["per_sample"]["nll"],
              "mia": ev.privacy["unlearned"]["per_sample"]["mia"]["forget"]}
    holdout = {"nll": ev.evals["unlearned"]["sets"]["holdout"]["per_sample"]["nll"],
               "mia": ev.privacy["unlearned"]["per_sample"]["mia"]["holdout"]}
    assert overall_call([c.call for c in log_prob_calls(forget, holdout, alpha=0.01, n_boot=200)]) == OVER


def test_holdout_truth_ratio_exists_on_the_synthetic_benchmark_only_with_perturbed_answers():
    world = synthetic_world(0)
    assert all(e.perturbed_answers and e.paraphrased_answer for e in world["holdout"])
    n = len(world["holdout"])
    assert len(log_prob_pairs(world["holdout"])) == n * (2 + len(world["holdout"][0].perturbed_answers))
    plain = QADataset([QAExample(e.question, e.answer) for e in world["holdout"]], "tofu-like holdout")
    assert log_prob_pairs(plain) == [(e.question, e.answer) for e in plain]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# One verdict: the pipeline's metrics.json, certify and the report judge the same files alike


def test_pipeline_certify_and_report_give_the_one_verdict(tmp_path, tiny_model_dir, small_bench):
    from obliviate.pipeline import PipelineConfig, run_pipeline
    from obliviate.reporting.audit import TWO_SIDED, certify
    from obliviate.reporting.report import write_report

    settings = Settings(n_boot=300)
    cfg = PipelineConfig(model=str(tiny_model_dir), method="ga", finetune={"epochs": 1, "lr": 3e-3, "batch_size": 4},
                         unlearn={"epochs": 1, "lr": 1e-3, "batch_size": 2}, max_new_tokens=4, eval_batch_size=16,
                         max_length=1024, verdict=settings)
    out = tmp_path / "run"
    result = run_pipeline(small_bench, out, cfg, progress=False, echo=lambda *a: None)
    verdict = json.loads((out / "metrics.json").read_text())["verdict"]
    assert verdict == json.loads(json.dumps(result["verdict"]))
    assert set(verdict["by_model"]) == {"target", "oracle", "unlearned"} and verdict["model"] == "unlearned"
    assert isinstance(verdict["forgotten"], bool) and isinstance(verdict["utility_kept"], bool)  # bench reads them
    criteria = {c["name"]: c for c in verdict["criteria"]}
    # The synthetic holdout has perturbed answers: its truth ratios are in the evaluation, and measured.
    unlearned = json.loads((out / "eval" / "unlearned.json").read_text())
    holdout = unlearned["sets"]["holdout"]
    assert len(holdout["per_sample"]["truth_ratio_raw"]) == holdout["n"]
    assert np.all(np.isfinite(holdout["per_sample"]["truth_ratio_raw"]))
    assert criteria["knowledge:truth_ratio"]["value"] is not None
    assert criteria["knowledge:truth_ratio"]["evidence"] == "eval/unlearned.json"
    assert all(criteria[f"membership:{s}"]["value"] is not None for s in SCORES)
    # certify reads the same files and judges each criterion the same way.
    record = certify(out, settings)
    checks = {e["name"]: e for e in record["entries"] if e["type"] == "check" and e["op"] == TWO_SIDED}
    assert set(checks) == set(criteria)
    for name, c in criteria.items():
        assert (checks[name]["verdict"], checks[name]["value"]) == (c["call"], c["value"]), name
    assert next(e for e in record["entries"] if e["type"] == "verdict")["verdict"] in (verdict["call"], "incomplete")
    # summary.md and the report show the verdict table and say what was measured.
    summary = (out / "summary.md").read_text()
    assert "| verdict | AUC LOSS |" in summary and f"**{verdict['call']}**" in summary and "Measured:" in summary
    report = write_report([out], tmp_path / "report").markdown.read_text()
    assert "Verdict: forget set vs never-seen holdout rows" in report and "| membership:loss |" in report


def test_a_criterion_that_turns_out_unmeasurable_is_not_counted(tmp_path):
    from test_registry import make_unlearn_run

    run = make_unlearn_run(tmp_path)
    add_holdout_evidence(run, {"target": 2.0, "oracle": 0.0, "unlearned": 0.0})
    target = json.loads((run / "eval" / "target.json").read_text())
    for name in ("retain", "real_authors", "world_facts"):  # a target that answers nothing: utility 0
        target["sets"][name]["per_sample"]["rouge"] = [0.0] * N
    (run / "eval" / "target.json").write_text(json.dumps(target))
    v = judge(run_evidence(run), Settings(n_boot=300))
    utility = next(c for c in v["criteria"] if c["name"] == "utility:model_utility")
    assert utility["call"] == NOT_MEASURED and "0" in utility["note"]
    tested = [c for c in v["criteria"] if c["value"] is not None and c["alpha"] is not None]
    assert v["n_tests"] == len(tested) == 9 and all(c["alpha"] == pytest.approx(0.05 / 9) for c in tested)
