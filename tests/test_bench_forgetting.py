"""benchmarks/bench_forgetting.py: the smoke run end to end (every row, attacks, verdict, JSON and Markdown),
and the goal's arithmetic on hand-made medians."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from obliviate.evaluation.verdict import CALLS, MIXED


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_forgetting.py"
    spec = importlib.util.spec_from_file_location("bench_forgetting", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, float):
        yield obj


def test_smoke_run_writes_every_row(bench, tmp_path):
    result = bench.main(["--smoke", "--results", str(tmp_path)])
    saved = json.loads((tmp_path / "forgetting-smoke.json").read_text())
    table = (tmp_path / "forgetting-smoke.md").read_text()
    labels = ["npo", "graddiff", "npo-calibrated", "npo-calibrated-sam", "unierase"]
    assert list(saved["rows"]) == labels and saved["seeds"] == [0] and result["name"] == "smoke"
    assert all(math.isfinite(x) for x in _numbers(saved))  # None where not measured, never NaN
    runs = Path(saved["runs"])
    for label in labels:
        entry = saved["rows"][label]
        (seed,) = entry["per_seed"]
        cell = runs / "cells" / f"{label}-s0"
        metrics = json.loads((cell / "metrics.json").read_text())["models"]["unlearned"]
        for key in bench.AUC_KEYS.values():
            assert 0.0 <= seed[key] <= 1.0 and seed[key] == metrics[key] == entry["median"][key]
        assert seed["verdict"] in (*CALLS, MIXED)
        assert seed["verdict"] == json.loads((cell / "verdict.json").read_text())["call"]
        assert {"durability:relearn", "durability:quantise", "oracle:forget_quality"} <= set(seed["calls"])
        for attack in ("relearn", "quantise"):
            assert (cell / "attacks" / f"{attack}.json").is_file()
        assert f"| {label} |" in table
    # One target and one oracle for the seed, shared by every row.
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith(("target", "oracle"))) == ["oracle-s0",
                                                                                                 "target-s0"]
    def unlearn_config(label):
        return json.loads((runs / "cells" / f"{label}-s0" / "unlearn" / "fingerprint.json").read_text())["config"]

    assert "calibrate" not in unlearn_config("npo") and unlearn_config("npo-calibrated")["calibrate"]
    assert unlearn_config("npo-calibrated-sam")["train"]["sam_rho"] > 0 == unlearn_config("npo")["train"]["sam_rho"]
    assert saved["goal"]["row"] in ("npo-calibrated", "npo-calibrated-sam")
    assert ("**reached**" in table) == saved["goal"]["reached"] and ("**not reached**" in table) != saved["goal"][
        "reached"]
    for part in saved["goal"]["checks"]:
        assert f"- {part}: " in table


def test_goal_arithmetic(bench):
    inside = {"mia_auc_loss": 0.45, "mia_auc_zlib": 0.55, "mia_auc_mink": 0.5, "mia_auc_minkpp": 0.6,
              "forget_quality": 0.5, "utility_ratio": 0.95, "relearn_excess": 0.05}
    assert all(bench.goal_checks(inside).values())
    for key, value in (("mia_auc_zlib", 0.61), ("forget_quality", 0.49), ("utility_ratio", 0.94),
                       ("relearn_excess", 0.06)):
        checks = bench.goal_checks({**inside, key: value})
        assert sum(v is False for v in checks.values()) == 1, (key, checks)
    assert bench.goal_checks({**inside, "utility_ratio": None})["utility >= 0.95 x oracle's"] is None
    table = {"a": {"median": {**inside, "forget_quality": 0.1}}, "b": {"median": inside}}
    assert bench.goal(table, ["a", "b"]) == {"row": "b", "checks": bench.goal_checks(inside), "reached": True}
    assert bench.goal(table, ["a"])["reached"] is False
    # Medians over seeds, and the recovery's excess over the holdout control per seed.
    seeds = [{"seed": s, "relearn_recovery": r, "relearn_holdout_control": h, "verdict": v, "x": x}
             for s, r, h, v, x in ((0, 0.3, 0.1, "indistinguishable", 1.0), (1, 0.5, 0.1, "under-unlearned", None),
                                   (2, 0.2, 0.2, "indistinguishable", 3.0))]
    summary = bench.summarise(seeds)
    assert summary["relearn_excess"] == pytest.approx(0.2) and summary["x"] == 2.0
    assert summary["verdicts"] == {"indistinguishable": 2, "under-unlearned": 1}
    with pytest.raises(ValueError, match="non-finite"):
        bench.median([1.0, float("nan")])
