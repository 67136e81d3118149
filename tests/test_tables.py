"""One number formatter, one Markdown table, one leaderboard ranking: what every table prints."""

from __future__ import annotations

import random

import pytest

from obliviate.bench import leaderboard, leaderboard_markdown
from obliviate.pipeline import summary_markdown
from obliviate.reporting.ranking import rank
from obliviate.reporting.registry import LeaderboardRow, rank_rows
from obliviate.reporting.tables import (
    DETAIL,
    SUMMARY,
    format_number,
    markdown_table,
    verdict_rows,
    verdict_summary,
)


@pytest.mark.parametrize("value,summary,detail", [
    (None, "-", ""), (0.5, "0.500", "0.5000"), (0.0, "0.000", "0.0000"), (1e-20, "1.00e-20", "1.000e-20"),
    (-2.5e-4, "-2.50e-04", "-2.500e-04"), (1e-3, "0.001", "0.0010"), (0.99951, "1.000", "0.9995"),
    (123.456, "123.456", "123.4560"), (float("nan"), "nan", "nan"), (float("inf"), "inf", "inf"),
    (3, "3", "3"), (True, "True", "True"), ("npo", "npo", "npo")])
def test_format_number_styles(value, summary, detail):
    assert format_number(value, SUMMARY) == summary
    assert format_number(value, DETAIL) == format_number(value) == detail


def test_markdown_table_escapes_cells():
    assert markdown_table(["a", "b|c"], [["x\ny", "1\\2"]]) == "| a | b\\|c |\n|---|---|\n| x y | 1\\\\2 |"


def _criterion(name, call, value=None, **extra):
    return {"name": name, "group": name.split(":")[0], "statistic": "s", "value": value, "band": None,
            "interval": None, "p_value": None, "alpha": 0.0125, "call": call, "evidence": None, "note": "", "n": {},
            **extra}


def test_summary_markdown_is_the_demo_table():
    verdict = {
        "model": "unlearned", "call": "over-unlearned", "under": [], "over": ["membership:loss", "knowledge:nll"],
        "alpha": 0.05, "alpha_per_criterion": 0.0125, "n_tests": 4,
        "criteria": [
            _criterion("membership:loss", "over-unlearned", 0.05, statistic="AUC forget vs holdout (LOSS)",
                       band=[0.2, 0.8], n={"forget": 12, "holdout": 12}),
            _criterion("knowledge:truth_ratio", "not measured", alpha=None,
                       note="the holdout set has no per-sample truth ratio"),
            _criterion("knowledge:nll", "over-unlearned", 0.9),
            _criterion("utility:model_utility", "indistinguishable", 0.97),
            _criterion("oracle:forget_quality", "indistinguishable", 0.2)],
        "by_model": {"target": "under-unlearned", "oracle": "indistinguishable", "unlearned": "over-unlearned"},
        "forgotten": False, "utility_kept": True, "target_memorised": True}
    aucs = ("mia_auc_loss", "mia_auc_zlib", "mia_auc_mink", "mia_auc_minkpp")
    result = {"models": {
        "target": {**dict(zip(aucs, (1.0, 0.99, 0.98, 0.97))), "forget_quality": 2.2e-9, "model_utility": 0.4312,
                   "forget_rouge": 0.9, "holdout_rouge": 0.2, "retain_rouge": 0.85},
        "oracle": {**dict(zip(aucs, (0.52, 0.5, 0.48, 0.55))), "forget_quality": 1.0, "model_utility": 0.42,
                   "forget_rouge": 0.21, "holdout_rouge": 0.2, "retain_rouge": 0.84},
        "unlearned": {**dict(zip(aucs, (0.05, 0.04, None, 0.1))), "forget_quality": 0.2, "model_utility": None,
                      "forget_rouge": 0.0, "holdout_rouge": 0.19, "retain_rouge": 0.7}},
        "verdict": verdict}
    assert summary_markdown(result) == (
        "| model | verdict | AUC LOSS | AUC zlib | AUC Min-K% | AUC Min-K%++ | forget quality | model utility "
        "| forget ROUGE-L | holdout ROUGE-L | retain ROUGE-L |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| target | under-unlearned | 1.000 | 0.990 | 0.980 | 0.970 | 2.20e-09 | 0.431 | 0.900 | 0.200 | 0.850 |\n"
        "| oracle | indistinguishable | 0.520 | 0.500 | 0.480 | 0.550 | 1.000 | 0.420 | 0.210 | 0.200 | 0.840 |\n"
        "| unlearned | over-unlearned | 0.050 | 0.040 | - | 0.100 | 0.200 | - | 0.000 | 0.190 | 0.700 |\n"
        "\n"
        "Verdict on the unlearned model: **over-unlearned**: the forget rows now look *less* likely than never-seen "
        "holdout rows, which marks them as deleted.\n\n"
        "Over-unlearned on: membership:loss, knowledge:nll.\n\n"
        "Measured: membership-inference AUCs of 12 forget rows against 12 never-seen holdout rows (LOSS 0.050; "
        "0.5 = cannot tell them apart, indistinguishable inside [0.200, 0.800]); knowledge (forget vs holdout: nll); "
        "utility against the model before unlearning (model utility); against the oracle (forget quality).\n\n"
        "4 statistical criteria share a family-wise error rate of 0.050 (each judged at 0.0125): indistinguishable "
        "means no evidence of a difference at that level, not proof of equality.\n\n"
        "Not measured: knowledge:truth_ratio: the holdout set has no per-sample truth ratio.\n\n"
        "Other models on the same criteria: target under-unlearned, oracle indistinguishable.\n")
    # Over on utility alone says so, not that the forget rows are marked.
    utility_only = {**verdict, "over": ["utility:model_utility"]}
    assert "lost utility beyond the tolerance" in verdict_summary(utility_only)[0]


def test_verdict_rows_show_interval_band_and_why_not_measured():
    header, rows = verdict_rows({"criteria": [
        _criterion("utility:model_utility", "over-unlearned", 0.5, interval=[0.4, 0.6], band=[0.9, None],
                   evidence="eval/unlearned.json"),
        _criterion("durability:relearn", "not measured", note="no attacks/relearn.json")]})
    assert header == ["criterion", "statistic", "value", "interval", "band", "p-value", "call", "evidence"]
    assert rows[0] == ["utility:model_utility", "s", "0.5000", "[0.4000, 0.6000]", "[0.9000, inf]", "",
                       "over-unlearned", "eval/unlearned.json"]
    assert rows[1][-2:] == ["not measured", "no attacks/relearn.json"]


def _cell(method, fq, mu):
    return {"method": method, "forget_quality": fq, "model_utility": mu, "forget_rouge": 0.5, "forgotten": False,
            "utility_kept": True}


def test_ranking_pareto_first_by_hand():
    # By forget quality alone: A, C, B. C is beaten by A on both numbers, B by nobody: A, B, then C.
    board = leaderboard([_cell("A", 0.5, 0.1), _cell("B", 0.4, 0.9), _cell("C", 0.45, 0.05), _cell("D", None, 0.99)])
    assert [(r["method"], r["rank"], r["front"]) for r in board] == [("A", 1, 1), ("B", 2, 1), ("C", 3, 2),
                                                                     ("D", 4, None)]
    assert leaderboard_markdown(board).splitlines()[2] == "| 1 | A | 1 | 0.500 | 0.100 | 0.500 | 0/1 | 1/1 |"


def test_bench_and_registry_rank_the_same_rows_alike():
    rng = random.Random(7)
    for trial in range(50):
        points = [(rng.choice([None, 0.0, 1e-9, *[round(rng.random(), 1) for _ in range(3)]]),
                   rng.choice([None, round(rng.random(), 1), round(rng.random(), 1)]))
                  for _ in range(rng.randint(1, 9))]
        names = [f"m{i}" for i in range(len(points))]  # the registry breaks ties by run id, the bench by order
        bench = [r["method"] for r in leaderboard([_cell(n, fq, mu) for n, (fq, mu) in zip(names, points)])]
        registry = [r.run_id for r in rank_rows([LeaderboardRow(None, None, n, n, fq, mu, None, "")
                                                 for n, (fq, mu) in zip(names, points)])]
        assert bench == registry, (trial, points)


def test_rank_keeps_every_item_once():
    items = list(range(30))
    ranked = rank(items, lambda i: (i * 7) % 5 / 5, lambda i: (i * 3) % 7 / 7)
    assert sorted(r.item for r in ranked) == items and [r.rank for r in ranked] == list(range(1, 31))
    fronts = [r.front for r in ranked]
    assert fronts == sorted(fronts)
