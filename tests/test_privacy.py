"""Privacy evaluation against slow references, PrivLeak by hand, the pipeline's privacy rows, and the
attack orchestration (relearn / quantise / probes / privacy) on a finished tiny pipeline run."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from obliviate.attacks.relearn import RelearnConfig
from obliviate.attacks.run import open_run, run_privacy, run_probes, run_quantise, run_relearn
from obliviate.cli.attacks import register
from obliviate.data.benchmark import load_benchmark
from obliviate.data.chat import ChatFormat
from obliviate.evaluation.evaluate import load_eval, summary_row
from obliviate.evaluation.exposure import exposure_for_examples
from obliviate.evaluation.privacy import privacy_eval, privacy_of_models, privacy_row, privacy_rows, privleak_vs
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.models.tiny import build_tiny_model
from obliviate.pipeline import PipelineConfig, run_pipeline

# ------------------------------------------------------------------------------------------- slow references

def slow_token_logprobs(model, fmt, question, answer):
    """Answer-token log-probs and argmax hits from one full forward pass, written out longhand."""
    enc = fmt.encode(question, answer, close=fmt.scored_tokens == "labels")
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lps, hits = [], []
    for pos in range(enc.answer_start, len(enc.input_ids)):  # the answer (+ end-of-turn when scored)
        row = torch.log_softmax(logits[pos - 1], -1)
        lps.append(float(row[ids[0, pos]]))
        hits.append(int(row.argmax()) == int(ids[0, pos]))
    return np.array(lps), np.array(hits)


def pairwise_auc(members, nonmembers):
    wins = sum(1.0 if m > n else 0.5 if m == n else 0.0 for m in members for n in nonmembers)
    return wins / (len(members) * len(nonmembers))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, small_bench, tmp_path_factory):
    tok = load_tokenizer(str(tiny_model_dir))
    ref_dir = build_tiny_model(tmp_path_factory.mktemp("ref") / "model", seed=1)
    return {"model": load_model(str(tiny_model_dir)), "ref": load_model(str(ref_dir)), "tok": tok,
            "fmt": ChatFormat(tok), "bench": load_benchmark(small_bench)}


def test_privacy_eval_matches_slow_references(tiny):
    model, ref, fmt, bench = tiny["model"], tiny["ref"], tiny["fmt"], tiny["bench"]
    forget, holdout = bench.split("forget"), bench.split("holdout")
    out = privacy_eval(model, tiny["tok"], forget, holdout, fmt, ref_model=ref)
    slow = {}
    for name, ds in (("forget", forget), ("holdout", holdout)):
        rows = [slow_token_logprobs(model, fmt, e.question, e.answer) for e in ds]
        ref_rows = [slow_token_logprobs(ref, fmt, e.question, e.answer) for e in ds]
        k = [max(1, int(0.4 * len(lp))) for lp, _ in rows]
        slow[name] = {"loss": [lp.mean() for lp, _ in rows],
                      "min_k": [np.sort(lp)[:n].mean() for (lp, _), n in zip(rows, k)],
                      "reference": [lp.mean() - r.mean() for (lp, _), (r, _) in zip(rows, ref_rows)],
                      "em": [h.mean() for _, h in rows]}
    for attack in ("loss", "min_k", "reference"):
        assert out["auc"][attack] == pytest.approx(pairwise_auc(slow["forget"][attack], slow["holdout"][attack]))
    assert set(out["auc"]) == {"loss", "zlib", "min_k", "min_k_plus_plus", "reference"}
    assert out["forget_em"] == pytest.approx(np.mean(slow["forget"]["em"]))
    assert out["holdout_em"] == pytest.approx(np.mean(slow["holdout"]["em"]))
    assert out["forget_exposure"] is None  # plain forget rows carry no candidates
    assert out["n_forget"] == len(forget) and out["n_holdout"] == len(holdout)


def test_exposure_when_rows_have_candidates(tiny):
    bench = tiny["bench"]
    ids = bench.split("id_forget")
    out = privacy_eval(tiny["model"], tiny["tok"], ids, bench.split("holdout"), tiny["fmt"])
    assert out["forget_exposure"] == pytest.approx(exposure_for_examples(tiny["model"], tiny["fmt"], ids)["exposure"])
    assert out["per_sample"]["forget_exposure"] is not None and len(out["per_sample"]["forget_exposure"]) == len(ids)


def test_privleak_and_rows_by_hand():
    u = {"k": 0.4, "auc": {"loss": 0.9, "min_k": 0.8}, "forget_em": 0.5, "forget_es": 0.25, "holdout_em": 0.1,
         "forget_exposure": None}
    o = {**u, "auc": {"loss": 0.55, "min_k": 0.5}}
    # MUSE orientation: 1 - AUC. (0.2 - 0.5) / 0.5 * 100 = -60: under-unlearned.
    assert privleak_vs(u, o) == pytest.approx(-60.0)
    row = privacy_row(u, o)
    assert row == {"mia_auc_loss": 0.9, "mia_auc_mink": 0.8, "privleak": pytest.approx(-60.0), "forget_em": 0.5,
                   "forget_es": 0.25, "holdout_em": 0.1, "forget_exposure": None}
    rows = privacy_rows({"oracle": o, "unlearned": u})
    assert rows["oracle"]["privleak"] == 0.0 and rows["unlearned"]["privleak"] == pytest.approx(-60.0)
    assert privleak_vs(u, {**o, "auc": {"min_k": 1.0}}) is None  # undefined: oracle AUC 1
    with pytest.raises(ValueError, match="one k"):
        privleak_vs(u, {**o, "k": 0.2})


# ------------------------------------------------------------------------------------------- scores once per model

@pytest.fixture
def count_forward(monkeypatch):
    """Pairs the model scores (rows of its scoring passes), and the models loaded, while a test runs."""
    import obliviate.evaluation.logprobs as logprobs
    import obliviate.evaluation.privacy as privacy

    seen = {"rows": 0, "loaded": []}
    real_batch, real_load = logprobs.run_batch, privacy.load_model

    def batch(runner, fmt, batch, *args, **kw):
        seen["rows"] += len(batch.pairs)
        return real_batch(runner, fmt, batch, *args, **kw)

    def load(spec, **kw):
        seen["loaded"].append(str(spec))
        return real_load(spec, **kw)

    monkeypatch.setattr(logprobs, "run_batch", batch)
    monkeypatch.setattr(privacy, "load_model", load)
    return seen


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    return {label: build_tiny_model(root / label, seed=10 + i)
            for i, label in enumerate(("target", "oracle", "unlearned"))}


def test_privacy_of_models_scores_the_reference_once(tiny, three_models, tiny_model_dir, count_forward):
    bench = tiny["bench"]
    forget, holdout = bench.split("forget"), bench.split("holdout")
    n = len(forget) + len(holdout)
    out = privacy_of_models(three_models, forget, holdout, reference=tiny_model_dir, device="cpu")
    # Each model's forget and holdout answers, and the reference's once (it was once per model: 6n).
    assert count_forward["rows"] == 4 * n
    ref = load_model(str(tiny_model_dir))
    for label, path in three_models.items():
        tok = load_tokenizer(str(path))
        alone = privacy_eval(load_model(str(path)), tok, forget, holdout, ChatFormat(tok), ref_model=ref)
        assert json.dumps(out[label]) == json.dumps(alone)  # number for number


def test_privacy_from_evaluation_scores_runs_no_evaluated_model(tiny, three_models, tiny_model_dir, count_forward):
    from obliviate.evaluation.evaluate import eval_sets_from_benchmark, evaluate_with_scores
    from obliviate.evaluation.privacy import privacy_pairs

    bench = tiny["bench"]
    forget, holdout = bench.split("forget"), bench.split("holdout")
    scores = {}
    for label, path in three_models.items():
        tok = load_tokenizer(str(path))
        scores[label] = evaluate_with_scores(load_model(str(path)), tok, eval_sets_from_benchmark(bench),
                                             ChatFormat(tok), max_new_tokens=2, progress=False, label=label,
                                             extra_pairs=privacy_pairs(forget, holdout)).scores
    before = count_forward["rows"]
    reused = privacy_of_models(three_models, forget, holdout, reference=tiny_model_dir, device="cpu", scores=scores)
    assert count_forward["rows"] - before == len(forget) + len(holdout)  # the reference model only
    assert count_forward["loaded"] == [str(tiny_model_dir)]
    fresh = privacy_of_models(three_models, forget, holdout, reference=tiny_model_dir, device="cpu")
    for label in three_models:
        # The scores came from the evaluation's batches, not from batches of the forget set alone: the
        # same up to float32 rounding, and the rank- and argmax-based numbers exactly the same.
        for key in ("auc", "forget_em", "forget_es", "holdout_em", "holdout_es", "k", "n_forget", "n_holdout"):
            assert reused[label][key] == fresh[label][key], (label, key)
        for side in ("forget", "holdout"):
            for attack, values in fresh[label]["per_sample"]["mia"][side].items():
                assert reused[label]["per_sample"]["mia"][side][attack] == pytest.approx(values, rel=1e-5, abs=1e-6)
    # Scores that lack a pair make the model run, for the missing pairs only.
    partial = {"target": scores["target"]}
    partial["target"].pairs.pop((forget[0].question, forget[0].answer))
    before = count_forward["rows"]
    privacy_of_models({"target": three_models["target"]}, forget, holdout, device="cpu", scores=partial)
    assert count_forward["rows"] - before == 1
    # So do scores without the distribution statistics Min-K%++ reads (a log-prob-only evaluation's).
    lean = scores["oracle"]
    pair = (holdout[0].question, holdout[0].answer)
    lean.pairs[pair] = replace(lean.pairs[pair], dist_mean=None, dist_std=None)
    before = count_forward["rows"]
    again = privacy_of_models({"oracle": three_models["oracle"]}, forget, holdout, device="cpu",
                              scores={"oracle": lean})
    assert count_forward["rows"] - before == 1 and np.isfinite(again["oracle"]["auc"]["min_k_plus_plus"])


# ------------------------------------------------------------------------------------------- a finished run

@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, small_bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "run"
    cfg = PipelineConfig(model=str(tiny_model_dir), method="ga",
                         finetune={"epochs": 3, "lr": 3e-3, "batch_size": 4},
                         unlearn={"epochs": 1, "lr": 1e-3, "batch_size": 2, "scheduler": "constant",
                                  "warmup_ratio": 0.0},
                         max_new_tokens=8, eval_batch_size=16, max_length=1024)  # byte tokens: long probes
    result = run_pipeline(small_bench, out, cfg, progress=False, echo=lambda *a: None)
    return out, result


def test_pipeline_rows_carry_privacy(finished_run, tiny_model_dir, small_bench):
    out, result = finished_run
    rows = json.loads((out / "metrics.json").read_text())["models"]
    for label in ("target", "oracle", "unlearned"):
        for key in ("mia_auc_mink", "mia_auc_loss", "mia_auc_ref", "privleak", "forget_em", "forget_es"):
            assert key in rows[label], (label, key)
    assert rows["oracle"]["privleak"] == 0.0
    stored = json.loads((out / "privacy.json").read_text())
    assert rows["unlearned"]["privleak"] == pytest.approx(privleak_vs(stored["unlearned"], stored["oracle"]))
    # Recomputed from the saved unlearned model with the base model as reference: the same numbers.
    bench = load_benchmark(small_bench)
    tok = load_tokenizer(str(out / "unlearn" / "model"))
    again = privacy_eval(load_model(str(out / "unlearn" / "model")), tok, bench.split("forget"),
                         bench.split("holdout"), ChatFormat(tok), ref_model=load_model(str(tiny_model_dir)))
    assert rows["unlearned"]["mia_auc_mink"] == pytest.approx(again["auc"]["min_k"])
    assert rows["unlearned"]["mia_auc_ref"] == pytest.approx(again["auc"]["reference"])
    assert rows["unlearned"]["forget_em"] == pytest.approx(again["forget_em"])


def test_run_privacy_quantise_probes(finished_run):
    out, _ = finished_run
    run = open_run(out)
    assert set(run.models) == {"unlearned", "oracle", "target"}

    priv = run_privacy(run, reference=False)
    assert set(priv["rows"]) == {"unlearned", "oracle", "target"}
    assert "mia_auc_ref" not in priv["rows"]["unlearned"] and priv["rows"]["oracle"]["privleak"] == 0.0
    assert (out / "attacks" / "privacy.json").is_file()

    quant = run_quantise(run, bits=(8, 4), backend="rtn")
    assert set(quant) == {"none", "8", "4"}
    saved = summary_row(load_eval(out / "eval" / "unlearned.json"))
    # Full precision is the pipeline's own evaluation of the unlearned model, number for number.
    for key in ("forget_probability", "forget_truth_ratio", "forget_quality", "model_utility"):
        assert quant["none"][key] == pytest.approx(saved[key]), key
    assert quant["4"]["forget_probability"] != quant["none"]["forget_probability"]
    assert json.loads((out / "attacks" / "quantise_config.json").read_text())["backend"] == "rtn"

    probes = run_probes(run, models=("unlearned", "oracle"))
    assert set(probes["probes"]) == {"none", "paraphrase", "few_shot", "context"} and not probes["skipped"]
    assert probes["probes"]["none"]["unlearned"]["forget_probability"] == pytest.approx(saved["forget_probability"])
    assert probes["probes"]["context"]["oracle"]["forget_quality"] == 1.0
    fq = probes["probes"]["paraphrase"]["unlearned"]["forget_quality"]
    assert fq is not None and 0 <= fq <= 1
    assert json.loads((out / "attacks" / "probes.json").read_text())["n_forget"] == len(run.forget_set())


def test_quantise_takes_the_stored_evaluation_only_when_it_was_made_the_same_way(finished_run, monkeypatch, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)  # the attacks write into the run: a copy keeps the shared one as it was
    import obliviate.attacks.run as attack_run

    evaluated: list[str] = []
    real = attack_run.evaluate_model
    monkeypatch.setattr(attack_run, "evaluate_model",
                        lambda *a, **k: evaluated.append(k["label"]) or real(*a, **k))
    stored = summary_row(load_eval(out / "eval" / "unlearned.json"))
    run = open_run(out)
    assert run_quantise(run, bits=(4,), backend="rtn")["none"] == stored
    assert evaluated == ["unlearned-4bit"]  # the full-precision row is the pipeline's own evaluation
    # Made another way (a different token budget), or of a model given explicitly: evaluated anew.
    for changed in (replace(open_run(out), max_new_tokens=run.max_new_tokens + 1),
                    open_run(out, unlearned=out / "target" / "model")):
        evaluated.clear()
        fresh = run_quantise(changed, bits=(4,), backend="rtn")
        assert evaluated == ["unlearned", "unlearned-4bit"]
    assert fresh["none"]["forget_probability"] != stored["forget_probability"]  # the target is another model


def test_run_relearn_writes_the_layout(finished_run):
    out, _ = finished_run
    run = open_run(out)
    result = run_relearn(run, RelearnConfig(steps=(2,), lr=1e-3, max_new_tokens=8), "forget_subset", fraction=0.34)
    saved = json.loads((out / "attacks" / "relearn.json").read_text())
    assert saved["steps"] == [0, 2] and len(saved["forget_rouge"]) == 2 and len(saved["keyword_hit"]) == 2
    assert set(saved["oracle"]) >= {"steps", "forget_rouge", "forget_probability", "keyword_hit"}
    assert saved["target"] is not None and "recovery" in saved["summary"]
    assert saved["relearn_set"]["n_relearn"] == 2 and result["relearn_set"]["kind"] == "forget_subset"


def test_cli_attack_commands(finished_run, tmp_path):
    out, _ = finished_run
    app = typer.Typer()
    app.command()(lambda: None)  # a second command keeps the sub-apps addressable by name
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["attack", "privacy", str(out), "--no-reference"])
    assert res.exit_code == 0, res.output
    assert "unlearned" in res.output and "mia_auc_mink" in res.output
    text = lambda r: " ".join(r.output.split())  # noqa: E731 - rich wraps long lines
    res = runner.invoke(app, ["attack", "relearn", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not found" in text(res)
    res = runner.invoke(app, ["attack", "relearn", str(out), "--source", "nope", "--steps", "1"])
    assert res.exit_code == 2 and "unknown relearn set" in text(res)
    res = runner.invoke(app, ["attack", "quantise", str(out), "--backend", "nope"])
    assert res.exit_code == 2 and "backend must be" in text(res)


def test_open_run_errors(tmp_path, small_bench):
    with pytest.raises(FileNotFoundError, match="not found"):
        open_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="names no benchmark"):
        open_run(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no unlearned model"):
        open_run(tmp_path / "empty", benchmark=small_bench)
