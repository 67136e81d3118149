"""The command line: help lists every option, bad input gives clear errors, and the whole pipeline
runs through `obliviate demo` on a tiny model (integration test), resumes, and refuses to overwrite."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from typer.testing import CliRunner

from obliviate.cli.main import app
from obliviate.training.config import TrainConfig

runner = CliRunner()


def run(*args):
    # Wide terminal so rich does not truncate long option names in --help.
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env={"COLUMNS": "300"})


def test_help_lists_commands_and_every_training_option():
    out = run("--help").output
    for command in ("finetune", "unlearn", "evaluate", "demo", "methods", "synth", "report", "certify", "runs"):
        assert command in out
    for command in ("finetune", "unlearn"):
        text = run(command, "--help").output
        for f in fields(TrainConfig):
            assert "--" + f.name.replace("_", "-") in text, (command, f.name)


def test_methods_lists_options():
    out = run("methods").output
    assert "npo" in out and "beta=0.1" in out and "rmu" in out


def test_bad_options_and_data_are_clear_errors(tmp_path, tiny_model_dir):
    res = run("unlearn", "--model", tiny_model_dir, "--forget", tmp_path / "none.jsonl", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "none.jsonl" in res.output and "not a file" in res.output
    assert not (tmp_path / "r").exists()  # nothing created for a run that cannot start
    res = run("finetune", tmp_path / "x.jsonl", "--out", tmp_path / "r", "--lr", "-1")
    assert res.exit_code != 0 and "lr must be > 0" in res.output
    res = run("unlearn", "--model", tiny_model_dir, "--forget", "x", "--out", tmp_path / "r", "-m", "beta")
    assert res.exit_code != 0 and "key=value" in res.output
    (tmp_path / "c.yaml").write_text("train: [1,\n")
    res = run("finetune", tmp_path / "x.jsonl", "--out", tmp_path / "r", "--config", tmp_path / "c.yaml")
    assert res.exit_code != 0 and "c.yaml" in res.output and "invalid YAML" in res.output


def test_demo_pipeline_end_to_end_resume_and_no_overwrite(tmp_path, tiny_model_dir):
    args = ["demo", "--model", tiny_model_dir, "--out", tmp_path / "demo", "--n-entities", 6,
            "--facts-per-entity", 3, "--forget-fraction", 0.34, "--finetune-epochs", 2, "--finetune-lr", 3e-3,
            "--unlearn-epochs", 2, "--unlearn-lr", 1e-3, "--max-new-tokens", 8, "--eval-every", 1, "--no-progress",
            # A fixed-length run, so the trajectory has its points (calibrated stopping: test_stopping.py).
            "--no-calibrate"]
    res = run(*args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"target", "oracle", "unlearned"}
    # the trade-off trajectory: the target at step 0, every step evaluated, the unlearned model last
    trajectory = json.loads((tmp_path / "demo" / "trajectory.json").read_text())
    steps = json.loads((tmp_path / "demo" / "unlearn" / "train_stats.json").read_text())["steps"]
    assert [p["step"] for p in trajectory] == list(range(steps + 1)) and steps >= 2
    for point, label in ((trajectory[0], "target"), (trajectory[-1], "unlearned")):
        for key in ("forget_quality", "model_utility", "forget_rouge"):
            assert point[key] == pytest.approx(metrics["models"][label][key]), (label, key)
    assert len({p["forget_quality"] for p in trajectory}) > 1
    for label in ("target", "oracle", "unlearned"):
        ev = json.loads((tmp_path / "demo" / "eval" / f"{label}.json").read_text())
        assert len(ev["sets"]["forget"]["per_sample"]["truth_ratio_raw"]) == ev["sets"]["forget"]["n"]
    assert metrics["models"]["oracle"]["forget_quality"] == pytest.approx(1.0)
    summary = (tmp_path / "demo" / "summary.md").read_text()
    assert "| verdict |" in summary and "Verdict on the unlearned model" in summary
    assert "Verdict on the unlearned model" in res.output and "AUC LOSS" in res.output
    for stage in ("target", "oracle", "unlearn"):
        assert (tmp_path / "demo" / stage / "model" / "model.safetensors").exists()
        assert json.loads((tmp_path / "demo" / stage / "status.json").read_text())["status"] == "done"

    res = run(*args)
    assert res.exit_code == 2 and "--overwrite" in res.output
    before = (tmp_path / "demo" / "unlearn" / "model" / "model.safetensors").stat().st_mtime_ns
    res = run(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "demo" / "unlearn" / "model" / "model.safetensors").stat().st_mtime_ns == before


def test_runs_are_recorded_in_the_registry_with_model_card(tmp_path, tiny_model_dir, small_bench):
    from obliviate.runs.registry import Registry

    res = run("finetune", f"{small_bench}:forget", "--out", tmp_path / "ft", "--model", tiny_model_dir,
              "--epochs", 1, "--no-progress")
    assert res.exit_code == 0, res.output
    res = run("unlearn", "--model", tmp_path / "ft" / "model", "--forget", f"{small_bench}:forget",
              "--retain", f"{small_bench}:retain", "--method", "graddiff", "--out", tmp_path / "ul", "--epochs", 1,
              "--no-progress")
    assert res.exit_code == 0, res.output
    rows = {r.kind: r for r in Registry().list_runs()}
    assert rows["finetune"].status == "done" and rows["unlearn"].status == "done"
    assert rows["unlearn"].method == "graddiff" and rows["unlearn"].model_sha256
    card = (tmp_path / "ul" / "model" / "README.md").read_text()
    assert "graddiff" in card and "forget" in card.lower()
    assert "Where was" not in card  # fingerprints, never content

    # an evaluation and an attack are runs too: rows keyed by their result files, children of the run
    res = run("evaluate", "--model", tmp_path / "ul" / "model", "--benchmark", small_bench, "--label", "unlearned",
              "--out", tmp_path / "ul", "--max-new-tokens", 4, "--no-progress")
    assert res.exit_code == 0, res.output
    from obliviate.attacks.run import AttackRun

    AttackRun(path=tmp_path / "ul", benchmark=None, models={"unlearned": tmp_path / "ul" / "model"},
              base_model=None).write("probe", {"summary": {"recovery": 0.5}})
    rows = {r.kind: r for r in Registry().list_runs()}
    assert rows["eval"].path == str((tmp_path / "ul" / "eval" / "unlearned.json").resolve())
    assert rows["eval"].parent_id == rows["unlearn"].id and rows["eval"].status == "done"
    assert set(rows["eval"].metrics["models"]["unlearned"]) >= {"forget_rouge", "model_utility"}
    assert rows["attack"].method == "probe" and rows["attack"].metrics == {"recovery": 0.5}
    assert rows["attack"].parent_id == rows["unlearn"].id
