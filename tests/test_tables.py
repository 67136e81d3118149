"""One number formatter, one Markdown table, one leaderboard ranking: what every table prints."""

from __future__ import annotations

import random

import pytest

from obliviate.bench import leaderboard, leaderboard_markdown
from obliviate.pipeline import summary_markdown
from obliviate.reporting.ranking import rank
from obliviate.reporting.registry import LeaderboardRow, rank_rows
from obliviate.reporting.tables import DETAIL, SUMMARY, format_number, markdown_table


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


def test_summary_markdown_is_the_demo_table():
    result = {"models": {
        "target": {"forget_quality": 2.2e-9, "model_utility": 0.4312, "forget_rouge": 0.9, "forget_probability": 0.8,
                   "forget_truth_ratio": 0.51, "retain_rouge": 0.85},
        "oracle": {"forget_quality": 1.0, "model_utility": 0.42, "forget_rouge": 0.31, "forget_probability": 0.2,
                   "forget_truth_ratio": 0.66, "retain_rouge": 0.84},
        "unlearned": {"forget_quality": 0.12, "model_utility": None, "forget_rouge": 0.35, "forget_probability": 0.1,
                      "forget_truth_ratio": 0.7, "retain_rouge": 0.7}},
        "verdict": {"forgotten": True, "utility_kept": False, "forget_quality": 0.12,
                    "forget_rouge_gap_to_oracle": 0.04, "utility_ratio_to_target": None, "target_memorised": True}}
    assert summary_markdown(result) == (
        "| model | forget quality | model utility | forget ROUGE-L | forget prob. | forget truth ratio "
        "| retain ROUGE-L |\n"
        "|---|---|---|---|---|---|---|\n"
        "| target | 2.20e-09 | 0.431 | 0.900 | 0.800 | 0.510 | 0.850 |\n"
        "| oracle | 1.000 | 0.420 | 0.310 | 0.200 | 0.660 | 0.840 |\n"
        "| unlearned | 0.120 | - | 0.350 | 0.100 | 0.700 | 0.700 |\n"
        "\n"
        "Forgotten: **yes** (forget quality 0.120, forget ROUGE +0.040 vs the oracle).\n"
        "Utility kept: **no** (unlearned / target model utility = -).\n"
        "Target memorised the forget set: yes.\n")


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
