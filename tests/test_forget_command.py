"""`obliviate forget`: a deletion request end to end on a tiny model and a small synthetic benchmark.

A tiny model finetuned on the benchmark's train split remembers its forget rows (membership AUC 1 against
the never-seen holdout rows). Request 1 forgets half of them with calibrated NPO, request 2 (on request
1's run) the other half; the tests check what each run writes (verdict, audit record, ledger, report),
that request 1 is still forgotten after request 2 (re-checked on the new model), that the records are
linked, the error without a holdout, and resuming an interrupted request.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from obliviate import api
from obliviate.cli.main import app
from obliviate.data.qa import write_qa_jsonl
from obliviate.data.sources import as_dataset
from obliviate.data.synthetic import SyntheticConfig, generate_benchmark, write_benchmark
from obliviate.evaluation.verdict import SAME, UNDER, group_call
from obliviate.models.tiny import build_tiny_model

FAST = ["--system-prompt", "", "--max-new-tokens", "16", "--relearn-steps", "0,2", "--eval-batch-size", "16",
        "--no-progress"]
CALIBRATED = ["--check-every", "2", "--lr", "2e-3", "--epochs", "10", "--batch-size", "4"]


def invoke(*args: str):
    return CliRunner().invoke(app, ["forget", *args])


def read(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """A finetuned tiny model and two sequential requests on it: (bench, target, r1, r2, results)."""
    root = tmp_path_factory.mktemp("forget")
    cfg = SyntheticConfig(n_entities=12, facts_per_entity=4, forget_fraction=0.34, seed=0, id_facts_per_entity=0,
                          ood_facts_per_entity=0)
    bench = write_benchmark(generate_benchmark(cfg), root / "bench", cfg)
    target = api.finetune(str(build_tiny_model(root / "tiny")), f"{bench}:full", root / "target",
                          {"max_steps": 150, "lr": 3e-3, "batch_size": 8, "warmup_ratio": 0.0, "scheduler": "constant"},
                          system_prompt=None, progress=False)
    rows = as_dataset(f"{bench}:forget_perturbed").examples
    first = write_qa_jsonl(rows[:len(rows) // 2], root / "request1.jsonl")
    second = write_qa_jsonl(rows[len(rows) // 2:], root / "request2.jsonl")
    data = ["--holdout", f"{bench}:holdout", "--retain", f"{bench}:retain"]
    r1, r2 = root / "r1", root / "r2"
    outputs = [invoke("--model", str(target), "--forget", str(first), "--out", str(r1), *data, *FAST, *CALIBRATED),
               invoke("--model", str(r1), "--forget", str(second), "--out", str(r2), *data, *FAST, *CALIBRATED,
                      "--probes", "")]
    for result in outputs:
        assert result.exit_code == 0, result.output
    return bench, target, r1, r2, outputs


def test_request_writes_verdict_audit_ledger_and_report(lineage):
    _, target, r1, _, outputs = lineage
    assert read(r1 / "status.json")["status"] == "done"
    metrics = read(r1 / "metrics.json")
    verdict = metrics["verdict"]
    # The model before remembered the forget rows; the calibrated model does not, on membership.
    assert verdict["by_model"]["target"] == UNDER
    assert group_call(verdict, ("membership",)) == SAME
    assert {c["name"] for c in verdict["criteria"]} >= {"membership:loss", "knowledge:nll", "knowledge:truth_ratio",
                                                        "durability:relearn", "durability:quantise",
                                                        "utility:model_utility"}
    measured = {c["name"] for c in verdict["criteria"] if c["call"] != "not measured"}
    assert {"knowledge:truth_ratio", "durability:relearn", "durability:quantise"} <= measured
    for name in ("relearn", "quantise", "probes"):
        assert (r1 / "attacks" / f"{name}.json").is_file()
    assert (r1 / "data" / "forget.jsonl").is_file() and (r1 / "unlearn" / "checks.jsonl").is_file()
    # The audit record holds the same two-sided calls and verifies; the ledger names its head.
    record = read(r1 / "audit.json")
    calls = {e["name"]: e["verdict"] for e in record["entries"] if e["type"] == "check" and e["op"] == "two-sided"}
    assert calls == {c["name"]: c["call"] for c in verdict["criteria"]}
    # The record hashes the rows as copied into the run: it stays checkable once the originals are deleted.
    files = {e["role"]: e for e in record["entries"] if e["type"] == "file"}
    assert files["forget_data"]["path"] == str((r1 / "data" / "forget.jsonl").resolve())
    assert files["model_before"]["path"] == str(Path(target).resolve())
    ledger = read(r1 / "ledger.json")
    assert [r["request"] for r in ledger["requests"]] == [1] and ledger["head"] == record["head"]
    assert ledger["requests"][0]["previous_head"] is None and metrics["audit"]["head"] == record["head"]
    verified = CliRunner().invoke(app, ["verify", str(r1 / "audit.json")])
    assert verified.exit_code == 0, verified.output
    assert (r1 / "report" / "report.html").is_file() and "Verdict" in (r1 / "report" / "report.md").read_text()
    assert "Deletion request 1" in (r1 / "summary.md").read_text()
    assert "Deletion request 1" in outputs[0].output


def test_request_1_is_still_forgotten_after_request_2(lineage):
    _, _, r1, r2, _ = lineage
    metrics = read(r2 / "metrics.json")
    assert metrics["request"] == 2 and [e["request"] for e in metrics["earlier"]] == [1]
    recheck = r2 / "earlier" / "request-1"
    # Request 1's data and its "before" were copied, and its rows judged again on request 2's model.
    assert (recheck / "data" / "forget.jsonl").read_bytes() == (r1 / "data" / "forget.jsonl").read_bytes()
    assert read(recheck / "eval" / "target.json") == read(r1 / "eval" / "target.json")
    assert "unlearn/model" in (recheck / "config.yaml").read_text() and str(r2) in (recheck / "config.yaml").read_text()
    before = read(r1 / "eval" / "unlearned.json")["sets"]["forget"]["per_sample"]["nll"]
    now = read(recheck / "eval" / "unlearned.json")["sets"]["forget"]["per_sample"]["nll"]
    assert len(now) == len(before) and now != before  # the same rows, another model
    verdict = read(recheck / "verdict.json")
    assert verdict["by_model"]["target"] == UNDER  # there was something to forget
    assert group_call(verdict, ("membership",)) == SAME  # and it has not come back
    assert metrics["earlier"][0]["then"] == read(r1 / "metrics.json")["verdict"]["call"]
    assert metrics["earlier"][0]["now"] == verdict["call"]
    assert (recheck / "attacks" / "relearn.json").is_file()
    assert "request-1" in (r2 / "report" / "report.md").read_text()


def test_ledger_links_the_records(lineage, tmp_path):
    _, _, r1, r2, _ = lineage
    first, second = read(r1 / "audit.json"), read(r2 / "audit.json")
    links = [e for e in second["entries"] if e["type"] == "previous"]
    assert len(links) == 1 and links[0]["head"] == first["head"] and links[0]["request"] == 1
    assert second["entries"][1]["type"] == "previous"  # right after the request entry, inside the chain
    assert f"Follows the record of request 1 on the same model: head <code>{first['head']}" in (
        r2 / "audit.html").read_text()
    ledger = read(r2 / "ledger.json")
    assert ledger["requests"][0] == read(r1 / "ledger.json")["requests"][0]
    assert ledger["requests"][1]["previous_head"] == first["head"] and ledger["head"] == second["head"]
    assert ledger["lineage"] == ledger["requests"][0]["model_before_sha256"]
    assert ledger["requests"][1]["model_before_sha256"] == ledger["requests"][0]["model_after_sha256"]
    assert CliRunner().invoke(app, ["verify", str(r2 / "audit.json")]).exit_code == 0
    # Replacing request 1's record (a new head) breaks request 2's link; putting it back mends it.
    original = (r1 / "audit.json").read_text()
    try:
        (r1 / "audit.json").write_text(original.replace(first["head"], "f" * 64))
        broken = CliRunner().invoke(app, ["verify", str(r2 / "audit.json")])
        assert broken.exit_code == 1 and "previous record" in broken.output
    finally:
        (r1 / "audit.json").write_text(original)
    assert CliRunner().invoke(app, ["verify", str(r2 / "audit.json")]).exit_code == 0


def test_missing_holdout_or_retain_is_one_line(tiny_model_dir, small_bench, tmp_path):
    result = invoke("--model", str(tiny_model_dir), "--forget", f"{small_bench}:forget", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--holdout" in lines[0]
    assert "never saw" in lines[0] and "holdout" in lines[0].split("--holdout", 1)[1]
    # NPO keeps the retain rows with a retain term: without --retain it says so before anything is written.
    result = invoke("--model", str(tiny_model_dir), "--forget", f"{small_bench}:forget", "--holdout",
                    f"{small_bench}:holdout", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "--retain" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_interrupted_request_resumes(tiny_model_dir, small_bench, tmp_path, monkeypatch):
    import obliviate.forget as forget_module

    out = tmp_path / "r"
    args = ["--model", str(tiny_model_dir), "--forget", f"{small_bench}:forget_perturbed", "--holdout",
            f"{small_bench}:holdout", "--out", str(out), "--method", "npo_only", *FAST, "--probes", "", "--epochs", "1",
            "--batch-size", "2"]

    def stop(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(forget_module, "run_quantise", stop)
    assert invoke(*args).exit_code == 130
    assert read(out / "status.json")["status"] == "interrupted"
    kept = [out / "eval" / "target.json", out / "eval" / "unlearned.json", out / "attacks" / "relearn.json",
            out / "unlearn" / "model" / "model.safetensors"]
    stamps = [p.stat().st_mtime_ns for p in kept]
    assert not (out / "attacks" / "quantise.json").exists()
    monkeypatch.undo()

    again = invoke(*args)
    assert again.exit_code == 2 and "--resume" in again.output  # never overwritten silently
    changed = invoke(*args, "--resume", "--alpha", "0.1")
    assert changed.exit_code == 2 and "alpha" in changed.output
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert read(out / "status.json")["status"] == "done" and (out / "attacks" / "quantise.json").is_file()
    assert [p.stat().st_mtime_ns for p in kept] == stamps  # finished stages were not run again
    assert read(out / "metrics.json")["verdict"]["criteria"]
