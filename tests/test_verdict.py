"""The one verdict: the pipeline's "forgotten / utility kept" and certify's checks judge alike."""

from __future__ import annotations

import json

import pytest

from obliviate.evaluation.verdict import (
    FAIL,
    NOT_MEASURED,
    PASS,
    PIPELINE_THRESHOLDS,
    Thresholds,
    measure,
    pipeline_verdict,
    run_checks,
)
from obliviate.pipeline import verdict
from obliviate.reporting.audit import certify
from test_registry import make_unlearn_run


def rows(fq=0.2, rouge_u=0.30, rouge_o=0.25, rouge_t=0.9, mu_u=0.46, mu_t=0.5):
    return {"target": {"forget_rouge": rouge_t, "model_utility": mu_t, "forget_quality": 1e-12},
            "oracle": {"forget_rouge": rouge_o, "model_utility": 0.48, "forget_quality": 1.0},
            "unlearned": {"forget_rouge": rouge_u, "model_utility": mu_u, "forget_quality": fq}}


def test_pipeline_verdict_by_hand():
    v = pipeline_verdict(rows())
    # fq 0.2 >= 0.05, ROUGE gap 0.05 <= 0.1: forgotten; utility 0.46 / 0.5 = 0.92 >= 0.9: kept.
    assert v == {"forgotten": True, "utility_kept": True, "forget_quality": 0.2, "forget_rouge_gap_to_oracle": 0.05,
                 "utility_ratio_to_target": 0.92, "target_memorised": True,
                 "thresholds": {"min_forget_quality": 0.05, "max_forget_rouge_gap": 0.1, "min_utility_ratio": 0.9}}
    assert pipeline_verdict(rows(fq=0.049))["forgotten"] is False
    assert pipeline_verdict(rows(rouge_u=0.36))["forgotten"] is False  # gap 0.11
    assert pipeline_verdict(rows(fq=None))["forgotten"] is False  # no oracle: not measured, not forgotten
    assert pipeline_verdict(rows(mu_u=0.44))["utility_kept"] is False  # 0.88
    assert pipeline_verdict(rows(mu_t=0.0))["utility_kept"] is False  # no ratio to a zero utility
    assert pipeline_verdict(rows(rouge_t=0.2))["target_memorised"] is False
    assert verdict(rows(), PIPELINE_THRESHOLDS) == pipeline_verdict(rows())
    # Limits that are not asked are not judged.
    loose = Thresholds(min_forget_quality=0.5, min_utility_ratio=0.9)
    assert pipeline_verdict(rows(rouge_u=0.9), loose)["forgotten"] is False  # fq 0.2 < 0.5
    assert pipeline_verdict(rows(fq=0.6, rouge_u=0.9), loose)["forgotten"] is True  # the ROUGE gap is not asked
    assert pipeline_verdict(rows(), loose)["thresholds"] == {"min_forget_quality": 0.5, "min_utility_ratio": 0.9}


def test_measure_and_checks():
    m = measure({**rows(), "unlearned": {**rows()["unlearned"], "mia_auc_mink": 0.52, "privleak": -4.0}},
                relearn={"summary": {"recovery": 0.3}})
    assert m["forget_rouge_gap"] == pytest.approx(0.05) and m["utility_ratio"] == pytest.approx(0.92)
    assert m["utility_drop"] == pytest.approx(0.08) and m["relearn_recovery"] == 0.3
    assert (m["mia_auc"], m["privleak"], m["target_memorised"]) == (0.52, -4.0, True)
    t = Thresholds(mia_auc_range=(0.4, 0.6), max_abs_privleak=3.0, max_relearn_recovery=0.5, max_utility_drop=0.1)
    assert {c["name"]: c["verdict"] for c in run_checks(t, m)} == {
        "mia_auc": PASS, "privleak": FAIL, "relearn_recovery": PASS, "utility_drop": PASS}
    empty = measure({})
    assert all(v is None for v in empty.values())
    assert {c["verdict"] for c in run_checks(PIPELINE_THRESHOLDS, empty)} == {NOT_MEASURED}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_certify_and_the_pipeline_judge_a_run_alike(tmp_path, seed):
    run = make_unlearn_run(tmp_path, seed=seed)
    models = json.loads((run / "metrics.json").read_text())["models"]
    record = certify(run, PIPELINE_THRESHOLDS)
    checks = {e["name"]: e for e in record["entries"] if e["type"] == "check"}
    v = pipeline_verdict(models)
    assert v["forgotten"] == (checks["forget_quality"]["verdict"] == PASS == checks["forget_rouge_gap"]["verdict"])
    assert v["utility_kept"] == (checks["utility_ratio"]["verdict"] == PASS)
    assert checks["forget_quality"]["value"] == v["forget_quality"]
    assert round(checks["forget_rouge_gap"]["value"], 4) == v["forget_rouge_gap_to_oracle"]
    assert round(checks["utility_ratio"]["value"], 4) == v["utility_ratio_to_target"]
