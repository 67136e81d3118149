"""`obliviate bench`: a methods x splits x seeds matrix that reuses target and oracle, ranks methods,
writes a report, and skips finished cells when run again."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from obliviate.bench import BenchConfig, leaderboard
from obliviate.cli.main import app


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown keys nope"):
        BenchConfig.from_dict({"benchmark": "x", "nope": 1})
    with pytest.raises(ValueError, match="exactly one of"):
        BenchConfig.from_dict({"methods": ["npo"]})
    with pytest.raises(ValueError, match="unknown method 'nop'"):
        BenchConfig.from_dict({"benchmark": "x", "methods": ["nop"]})
    with pytest.raises(ValueError, match=r"methods\[0\]"):
        BenchConfig.from_dict({"benchmark": "x", "methods": [{"nam": "npo"}]})
    cfg = BenchConfig.from_dict({"benchmark": "x", "methods": ["ga", {"name": "npo", "options": {"beta": 0.2}}]})
    assert [m.label for m in cfg.methods] == ["ga", "npo-beta0.2"]


def test_leaderboard_ranks_by_pareto_front_then_forget_quality():
    cells = [{"method": "a", "forget_quality": 0.1, "model_utility": 0.5, "forget_rouge": 0.2, "forgotten": True,
              "utility_kept": True},
             {"method": "b", "forget_quality": 0.1, "model_utility": 0.6, "forget_rouge": 0.3, "forgotten": True,
              "utility_kept": False},
             {"method": "c", "forget_quality": 0.3, "model_utility": 0.1, "forget_rouge": 0.1, "forgotten": False,
              "utility_kept": False},
             {"method": "c", "forget_quality": 0.1, "model_utility": 0.3, "forget_rouge": 0.3, "forgotten": True,
              "utility_kept": True}]
    board = leaderboard(cells)
    assert [r["method"] for r in board] == ["c", "b", "a"]
    assert board[0]["n"] == 2 and board[0]["forget_quality"] == pytest.approx(0.2)
    assert board[0]["forgotten"] == 1 and board[0]["model_utility"] == pytest.approx(0.2)


# Few optimisation steps: this checks the plumbing (the edit's effect is tested in test_unierase.py).
UNIERASE_FAST = {"token_steps": 3, "target_steps": 3, "preserve_general": False}
UE = "unierase-preserve_generalFalse-target_steps3-token_steps3"  # the cell label names its options


def test_bench_runs_matrix_reuses_target_and_resumes(tmp_path, tiny_model_dir, small_bench):
    cfg = {"benchmark": str(small_bench), "model": str(tiny_model_dir), "forget_splits": ["forget"],
           "methods": ["ga", "graddiff", {"name": "unierase", "options": UNIERASE_FAST}], "seeds": [0],
           "finetune": {"epochs": 1, "lr": 3e-3},
           "unlearn": {"epochs": 1, "lr": 1e-3}, "max_new_tokens": 6}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    args = ["bench", str(tmp_path / "bench.yaml"), "--out", str(tmp_path / "out"), "--no-progress"]
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    board = json.loads((out / "leaderboard.json").read_text())
    assert {c["cell"] for c in board["cells"]} == {"ga-forget-s0", "graddiff-forget-s0", f"{UE}-forget-s0"}
    assert {r["method"] for r in board["leaderboard"]} == {"ga", "graddiff", UE}
    unierase_stats = json.loads((out / "cells" / f"{UE}-forget-s0" / "unlearn" / "model" / "unierase.json").read_text())
    assert 0 < unierase_stats["edited_share"] < 0.5
    assert not (out / "cells" / "ga-forget-s0" / "target").exists()  # the target is shared, not re-made
    assert (out / "target-s0" / "model").is_dir() and (out / "report" / "report.html").exists()
    stamp = (out / "cells" / "ga-forget-s0" / "unlearn" / "model" / "model.safetensors").stat().st_mtime_ns
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0 and "done, skipped" in res.output
    assert (out / "cells" / "ga-forget-s0" / "unlearn" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
