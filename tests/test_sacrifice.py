"""Sacrifice rate: hand-computed values on hand-made eval.json results, the undefined cases, errors."""

from __future__ import annotations

import json

import pytest

from obliviate.evaluation.sacrifice import knowledge, metric_drops, sacrifice_rates


def _eval(forget: dict, retain: dict) -> dict:
    # A complete eval.json layout (evaluate.save_eval); sacrifice rates read only the per-sample values,
    # so the aggregates are placeholders that must not be read.
    def one(values):
        n = len(values["probability"])
        return {"n": n, "probability": -1.0, "rouge": -1.0, "truth_ratio": -1.0,
                "per_sample": {"probability": values["probability"], "rouge": values["rouge"],
                               "truth_ratio_raw": values.get("truth_ratio_raw"), "nll": [0.0] * n,
                               "generation": [""] * n, "question": [""] * n}}

    return {"model": "m", "sets": {"forget": one(forget), "retain": one(retain)}, "forget_quality": None,
            "model_utility": None, "seconds": 0.0}


TARGET = _eval(forget={"probability": [0.8, 0.6], "rouge": [1.0, 0.8], "truth_ratio_raw": [0.2, 0.4]},
               retain={"probability": [0.9, 0.7], "rouge": [0.9, 0.9], "truth_ratio_raw": [0.1, 0.3]})
UNLEARNED = _eval(forget={"probability": [0.2, 0.2], "rouge": [0.1, 0.3], "truth_ratio_raw": [1.5, 0.9]},
                  retain={"probability": [0.7, 0.5], "rouge": [0.9, 0.8], "truth_ratio_raw": [0.2, 0.5]})


def test_rates_by_hand():
    # probability: retain 0.8 -> 0.6 (drop 0.2), forget 0.7 -> 0.2 (drop 0.5): 0.2 / 0.5 = 0.4
    # rouge: retain 0.9 -> 0.85 (drop 0.05), forget 0.9 -> 0.2 (drop 0.7): 0.05 / 0.7
    # truth ratio, mean max(0, 1 - R): forget target (0.8 + 0.6) / 2 = 0.7, unlearned (0 + 0.1) / 2 = 0.05,
    # drop 0.65; retain target (0.9 + 0.7) / 2 = 0.8, unlearned (0.8 + 0.5) / 2 = 0.65, drop 0.15
    rates = sacrifice_rates(TARGET, UNLEARNED)
    assert rates["probability"] == pytest.approx(0.4)
    assert rates["rouge"] == pytest.approx(0.05 / 0.7)
    assert rates["truth_ratio"] == pytest.approx(0.15 / 0.65)
    drops = metric_drops(TARGET, UNLEARNED)
    assert drops["truth_ratio"] == {"retain": pytest.approx(0.15), "forget": pytest.approx(0.65)}


def test_forget_truth_ratio_above_one_counts_as_no_knowledge():
    """R = 1.5 (true answer less likely than the perturbed ones) scores 0, not min(R, 1/R) = 0.67."""
    assert knowledge(UNLEARNED, "forget", "truth_ratio") == pytest.approx((0.0 + 0.1) / 2)


def test_undefined_when_the_forget_metric_did_not_drop():
    same_forget = _eval(forget={"probability": [0.8, 0.6], "rouge": [1.0, 0.9], "truth_ratio_raw": [0.2, 0.4]},
                        retain={"probability": [0.7, 0.5], "rouge": [0.9, 0.8], "truth_ratio_raw": [0.2, 0.5]})
    rates = sacrifice_rates(TARGET, same_forget)
    assert rates["probability"] is None  # forget drop exactly 0
    assert rates["truth_ratio"] is None
    assert rates["rouge"] is None  # forget ROUGE rose (0.9 -> 0.95): negative drop
    assert sacrifice_rates(TARGET, UNLEARNED, eps=0.6)["probability"] is None  # drop 0.5 <= eps


def test_negative_when_retain_improved():
    better = _eval(forget={"probability": [0.2, 0.2], "rouge": [0.1, 0.3], "truth_ratio_raw": [1.5, 0.9]},
                   retain={"probability": [1.0, 0.8], "rouge": [1.0, 1.0], "truth_ratio_raw": [0.1, 0.1]})
    rates = sacrifice_rates(TARGET, better)
    assert rates["probability"] == pytest.approx(-0.1 / 0.5)
    assert rates["rouge"] == pytest.approx(-0.1 / 0.7)
    assert rates["truth_ratio"] == pytest.approx((0.8 - 0.9) / 0.65)


def test_missing_truth_ratios_give_none_for_that_metric_only():
    no_tr = _eval(forget={"probability": [0.2, 0.2], "rouge": [0.1, 0.3]},
                  retain={"probability": [0.7, 0.5], "rouge": [0.9, 0.8]})
    rates = sacrifice_rates(TARGET, no_tr)
    assert rates["truth_ratio"] is None and rates["probability"] == pytest.approx(0.4)


def test_other_retain_set():
    target = json.loads(json.dumps(TARGET))
    unlearned = json.loads(json.dumps(UNLEARNED))
    target["sets"]["world_facts"] = target["sets"].pop("retain")
    unlearned["sets"]["world_facts"] = unlearned["sets"].pop("retain")
    assert sacrifice_rates(target, unlearned, retain_set="world_facts") == sacrifice_rates(TARGET, UNLEARNED)
    with pytest.raises(ValueError, match="'retain' set"):
        sacrifice_rates(target, unlearned)


def test_errors():
    short = json.loads(json.dumps(UNLEARNED))
    for key in ("probability", "rouge", "truth_ratio_raw"):
        short["sets"]["retain"]["per_sample"][key] = short["sets"]["retain"]["per_sample"][key][:1]
    with pytest.raises(ValueError, match="same sets"):
        sacrifice_rates(TARGET, short)
    nan = json.loads(json.dumps(UNLEARNED))
    nan["sets"]["forget"]["per_sample"]["truth_ratio_raw"] = [float("nan"), 1.0]
    with pytest.raises(ValueError, match="NaN"):
        sacrifice_rates(TARGET, nan)
    with pytest.raises(ValueError, match="metric"):
        knowledge(TARGET, "forget", "bleu")


def test_cli_sacrifice_rate(tmp_path):
    import typer
    from typer.testing import CliRunner

    from obliviate.cli.attribution import register

    app = typer.Typer()
    register(app)
    (tmp_path / "t.json").write_text(json.dumps(TARGET))
    (tmp_path / "u.json").write_text(json.dumps(UNLEARNED))
    result = CliRunner().invoke(app, ["sacrifice-rate", "--target-eval", str(tmp_path / "t.json"),
                                      "--unlearned-eval", str(tmp_path / "u.json"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["sacrifice_rate"]["probability"] == pytest.approx(0.4)
