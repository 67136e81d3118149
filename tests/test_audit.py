"""Audit records: fingerprints, the two-sided verdict per criterion, the hash chain, re-hashing, format-1
records, model cards, CLI."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import yaml
from scipy.stats import ks_2samp

from obliviate.evaluation.verdict import judge_threshold
from obliviate.reporting.audit import (
    FORMATS,
    GENESIS,
    TWO_SIDED,
    AuditError,
    Settings,
    certify,
    chain,
    entry_hash,
    verify,
    write_record,
)
from obliviate.reporting.model_card import model_card_info, write_model_card
from obliviate.runs.fingerprint import canonical_json, model_fingerprint
from test_registry import _reference_dir_hash, make_demo_run, make_unlearn_run
from test_verdict import add_holdout_evidence

FAST = Settings(n_boot=300)


def _entries(record, kind):
    return [e for e in record["entries"] if e["type"] == kind]


def _file(record, role):
    return next(e for e in record["entries"] if e.get("role") == role)


def _check(record, name):
    return next(e for e in record["entries"] if e.get("name") == name)


def verdict_run(tmp_path: Path, unlearned: float = 0.0, **kwargs) -> Path:
    """An unlearn run with holdout evidence: the target still knows the forget set, the oracle does
    not, and the unlearned model's forget set is ``unlearned`` better known than its holdout."""
    run = make_unlearn_run(tmp_path, **kwargs)
    add_holdout_evidence(run, {"target": 2.0, "oracle": 0.0, "unlearned": unlearned})
    return run


@pytest.mark.parametrize("op,value,threshold,expected", [
    (">=", 0.05, 0.05, "pass"), (">=", 0.049, 0.05, "fail"), ("<=", 0.2, 0.1, "fail"), ("<=", -1.0, 0.1, "pass"),
    ("abs<=", -12.0, 10.0, "fail"), ("abs<=", -9.5, 10.0, "pass"), ("within", 0.5, [0.4, 0.6], "pass"),
    ("within", 0.61, [0.4, 0.6], "fail"), ("==", "ab", "ab", "pass"), ("==", "ab", "ac", "fail"),
    (">=", None, 0.05, "not measured"), (">=", math.nan, 0.05, "not measured")])
def test_judge_threshold(op, value, threshold, expected):
    assert judge_threshold(op, value, threshold) == expected


def test_certify_records_fingerprints_config_code_and_the_two_sided_verdict(tmp_path):
    run = verdict_run(tmp_path, unlearned=-2.0)
    record = certify(run, FAST)

    assert record["format"] == FORMATS[-1]
    assert _file(record, "model_before")["sha256"] == _reference_dir_hash(tmp_path / "target_model")
    assert _file(record, "model_after")["sha256"] == _reference_dir_hash(run / "model")
    forget = tmp_path / "data" / "forget.jsonl"
    assert _file(record, "forget_data")["sha256"] == hashlib.sha256(forget.read_bytes()).hexdigest()
    assert _file(record, "forget_data")["n"] == 6 and _file(record, "retain_data")["n"] == 10
    (config,) = _entries(record, "config")
    assert config["config"] == yaml.safe_load((run / "config.yaml").read_text())
    assert config["sha256"] == hashlib.sha256(canonical_json(config["config"]).encode()).hexdigest()
    (code,) = _entries(record, "code")
    env = json.loads((run / "environment.json").read_text())
    assert code["git_commit"] == env["git_commit"] and code["versions"] == env["versions"]

    checks = {e["name"]: e for e in _entries(record, "check")}
    assert {checks["forget_data_unchanged"]["verdict"], checks["retain_data_unchanged"]["verdict"]} == {"pass"}
    criteria = [c for c in checks.values() if c["op"] == TWO_SIDED]
    assert {c["name"].split(":")[0] for c in criteria} == {"membership", "knowledge", "durability", "utility",
                                                           "oracle"}
    # The forget set looks less likely than never-seen rows: over-unlearned, and it says on what.
    assert checks["membership:loss"]["verdict"] == "over-unlearned"
    assert checks["membership:loss"]["evidence"] == "privacy.json"
    (verdict,) = _entries(record, "verdict")
    assert verdict["verdict"] == "over-unlearned" and "membership:loss" in verdict["over"]
    # Forget quality is the KS p-value of the truth ratios against the oracle's, as eval.json gives it.
    unlearned = json.loads((run / "eval" / "unlearned.json").read_text())
    oracle = json.loads((run / "eval" / "oracle.json").read_text())
    assert checks["oracle:forget_quality"]["p_value"] == pytest.approx(ks_2samp(
        unlearned["sets"]["forget"]["per_sample"]["truth_ratio_raw"],
        oracle["sets"]["forget"]["per_sample"]["truth_ratio_raw"]).pvalue)
    assert checks["utility:model_utility"]["value"] == pytest.approx(
        unlearned["model_utility"] / json.loads((run / "eval" / "target.json").read_text())["model_utility"])

    # the chain, recomputed here from its definition
    prev = GENESIS
    for i, e in enumerate(record["entries"]):
        body = {k: v for k, v in e.items() if k not in ("prev", "hash")}
        assert e["seq"] == i and e["prev"] == prev
        assert e["hash"] == hashlib.sha256((prev + json.dumps(body, sort_keys=True, separators=(",", ":"),
                                                              ensure_ascii=False)).encode()).hexdigest()
        prev = e["hash"]
    assert record["head"] == prev


def test_overall_verdict_indistinguishable_incomplete_under(tmp_path):
    run = verdict_run(tmp_path / "same", unlearned=0.0)
    same = _entries(certify(run, FAST), "verdict")[0]
    assert (same["verdict"], same["gaps"], same["under"], same["over"]) == ("indistinguishable", [], [], [])
    under = verdict_run(tmp_path / "under", unlearned=2.0)
    assert _entries(certify(under, FAST), "verdict")[0]["verdict"] == "under-unlearned"
    # Nothing to judge (no evaluation at all): a gap, and not measured.
    bare = make_unlearn_run(tmp_path / "bare")
    for p in (bare / "eval").iterdir():
        p.unlink()
    rec = certify(bare, FAST)
    assert _entries(rec, "verdict")[0]["verdict"] == "not measured"
    assert any("no criterion" in g for g in _entries(rec, "verdict")[0]["gaps"])


def test_model_before_not_local_is_a_gap_unless_recorded(tmp_path):
    run = verdict_run(tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rec = certify(run, FAST)
    assert _file(rec, "model_before")["sha256"] is None
    assert _entries(rec, "verdict")[0]["verdict"] == "incomplete"
    assert "model before unlearning" in _entries(rec, "verdict")[0]["gaps"][0]
    config["model_sha256"] = "ab" * 32
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rec = certify(run, FAST)
    assert _file(rec, "model_before")["sha256"] == "ab" * 32 and _file(rec, "model_before")["source"] == "recorded"
    assert _entries(rec, "verdict")[0]["verdict"] == "indistinguishable"


def test_data_changed_since_the_run_fails(tmp_path):
    run = verdict_run(tmp_path)
    forget = tmp_path / "data" / "forget.jsonl"
    # the same rows written differently: the data (rows) is unchanged, the file's bytes are not
    rows = [json.loads(line) for line in forget.read_text().splitlines()]
    forget.write_text("".join(json.dumps({"answer": r["answer"], "question": r["question"]}, indent=None) + "\n"
                              for r in rows))
    rec = certify(run, FAST)
    assert _check(rec, "forget_data_unchanged")["verdict"] == "pass"
    assert _file(rec, "forget_data")["sha256"] == hashlib.sha256(forget.read_bytes()).hexdigest()
    with forget.open("a") as fh:
        fh.write('{"question": "new?", "answer": "row"}\n')
    rec = certify(run, FAST)
    check = _check(rec, "forget_data_unchanged")
    recorded = json.loads((run / "data.json").read_text())["forget"]["sha256"]
    assert check["verdict"] == "fail" and check["threshold"] == recorded
    assert _entries(rec, "verdict")[0]["verdict"] == "fail"


def test_demo_run_uses_its_sub_runs(tmp_path):
    demo = make_demo_run(tmp_path)
    rec = certify(demo, FAST)
    assert _file(rec, "model_before")["path"] == str((demo / "target" / "model").resolve())
    assert _file(rec, "model_after")["path"] == str((demo / "unlearn" / "model").resolve())
    assert [c["run"] for c in _entries(rec, "config")] == [".", "target", "oracle", "unlearn"]
    # The attacks live in the unlearn sub-run: found there, and named as the evidence (this fake
    # relearn.json predates the holdout control, which the criterion says).
    relearn = _check(rec, "durability:relearn")
    assert relearn["verdict"] == "not measured" and relearn["evidence"] == "unlearn/attacks/relearn.json"


def test_missing_checkpoint_is_an_error(tmp_path):
    run = make_unlearn_run(tmp_path)
    for p in (run / "model").iterdir():
        p.unlink()
    (run / "model").rmdir()
    with pytest.raises(AuditError, match="model: missing"):
        certify(run, FAST)


# ---------------------------------------------------------------------------------------------
# verify


@pytest.fixture
def written(tmp_path):
    run = verdict_run(tmp_path, unlearned=-2.0)
    record = certify(run, FAST)
    path, page = write_record(record, tmp_path / "audit" / "record.json")
    return run, path, page, record


def _rewrite(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2))


def test_verify_accepts_an_intact_record_and_a_model_card(written):
    run, path, page, record = written
    assert verify(path) == [] and verify(path, expected_head=record["head"]) == []
    card = write_model_card(run / "model", model_card_info(run, record, path))  # README.md is not fingerprinted
    assert card == run / "model" / "README.md" and verify(path) == []


def test_verify_detects_an_edited_entry(written):
    _, path, _, record = written
    rec = json.loads(path.read_text())
    i = next(i for i, e in enumerate(rec["entries"]) if e.get("name") == "membership:loss")
    rec["entries"][i]["value"] = 0.5
    _rewrite(path, rec)
    problems = verify(path)
    assert any(p.startswith(f"entry {i} (check)") and "does not match its hash" in p for p in problems)


def test_verify_detects_removed_entries_and_a_rebuilt_chain(written):
    _, path, _, record = written
    rec = json.loads(path.read_text())
    del rec["entries"][3]
    _rewrite(path, rec)
    assert any("sequence number" in p for p in verify(path))
    assert any("link" in p for p in verify(path))
    # A forger who flips the verdict and recomputes every hash: the chain holds, but the verdict no
    # longer follows from the checks, and the head differs from the one kept elsewhere.
    def rechain(rec):
        prev = GENESIS
        for e in rec["entries"]:
            e["prev"] = prev
            e["hash"] = prev = entry_hash(prev, e)
        rec["head"] = prev
        _rewrite(path, rec)

    rec = json.loads(json.dumps(record))
    rec["entries"][-1]["verdict"] = "indistinguishable"
    rechain(rec)
    problems = verify(path, expected_head=record["head"])
    assert not any("hash (edited" in p for p in problems)
    assert any("does not follow from the checks" in p for p in problems)
    assert any("differs from the expected" in p for p in problems)
    # ... or who also calls every criterion indistinguishable: the calls do not follow from their numbers.
    for e in rec["entries"]:
        if e.get("op") == TWO_SIDED and e["verdict"] != "not measured":
            e["verdict"] = "indistinguishable"
    rechain(rec)
    assert any(p.startswith("check membership:loss: verdict 'indistinguishable'") for p in verify(path))
    # ... or who widens the level of one criterion so that it accepts: the Bonferroni level is rechecked.
    rec = json.loads(json.dumps(record))
    check = next(e for e in rec["entries"] if e.get("name") == "knowledge:nll")
    check["alpha"] = 1e-9
    rechain(rec)
    assert any("another level" in p for p in verify(path))


def test_verify_rehashes_models_and_data(written, tmp_path):
    run, path, _, _ = written
    with (run / "model" / "model.safetensors").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\x01\x02")
    (tmp_path / "data" / "retain.jsonl").unlink()
    problems = verify(path)
    assert any(p.startswith("model_after:") and "changed" in p for p in problems)
    assert any(p.startswith("retain_data:") and "no longer exists" in p for p in problems)
    assert verify(path, rehash=False) == []


def test_verify_refuses_a_file_that_is_not_a_record(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(AuditError, match="not valid JSON"):
        verify(bad)
    bad.write_text("[]")
    with pytest.raises(AuditError, match="not an audit record"):
        verify(bad)


def test_html_page_is_escaped(written):
    _, _, page, record = written
    text = page.read_text()
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert record["head"] in text and "membership:loss" in text and "over-unlearned" in text


# ---------------------------------------------------------------------------------------------
# Model card


def test_model_card_lists_fingerprints_never_content(written):
    run, path, _, record = written
    before = model_fingerprint(run / "model")
    card = write_model_card(run / "model", model_card_info(run, record, path)).read_text()
    data = json.loads((run / "data.json").read_text())
    assert data["forget"]["sha256"] in card and data["retain"]["sha256"] in card
    assert record["head"] in card and "verdict: over-unlearned" in card
    assert "SECRET" not in card and "forget.jsonl" not in card and str(run.parent) not in card
    assert before in card and model_fingerprint(run / "model") == before
    assert card.startswith("---\nlibrary_name: transformers\n")
    fq = json.loads((run / "metrics.json").read_text())["models"]["unlearned"]["forget_quality"]
    assert "| forget_quality |" in card and (f"{fq:.4f}" in card or f"{fq:.3e}" in card)


# ---------------------------------------------------------------------------------------------
# CLI


def test_format_1_records_still_verify(tmp_path):
    """A record written before the two-sided verdict (pass / fail per user threshold) keeps verifying."""
    bodies = [{"type": "request", "created": "2026-11-01T00:00:00Z", "run": "r", "thresholds": {}},
              {"type": "check", "name": "forget_quality", "op": ">=", "threshold": 0.05, "value": 0.2,
               "verdict": "pass"},
              {"type": "check", "name": "mia_auc", "op": "within", "threshold": [0.4, 0.6], "value": 0.55,
               "verdict": "pass"},
              {"type": "verdict", "verdict": "pass", "gaps": []}]
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**chain(bodies), "format": FORMATS[0]}))
    assert verify(path, rehash=False) == []
    bodies[1] = {**bodies[1], "value": 0.01}  # judged under the old rules: this check fails
    path.write_text(json.dumps({**chain(bodies), "format": FORMATS[0]}))
    assert verify(path, rehash=False) == ["check forget_quality: verdict 'pass' but value 0.01 >= 0.05 gives 'fail'"]


def test_certify_and_verify_cli(tmp_path):
    import typer
    from typer.testing import CliRunner

    from obliviate.cli.evidence import certify as certify_cmd
    from obliviate.cli.evidence import verify as verify_cmd

    app = typer.Typer()
    app.command("certify")(certify_cmd)
    app.command("verify")(verify_cmd)
    runner = CliRunner()
    run = verdict_run(tmp_path, unlearned=0.0)
    out = tmp_path / "rec.json"
    args = ["certify", str(run), "--out", str(out), "--model-card"]
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "verdict: indistinguishable" in res.output and out.exists() and out.with_suffix(".html").exists()
    assert "membership:loss" in res.output
    assert json.loads(out.read_text())["head"] in (run / "model" / "README.md").read_text()
    # A narrow user band for the AUCs makes the model distinguishable; --strict then exits 1.
    res = runner.invoke(app, ["certify", str(run), "--auc-band-min", "0.499", "--auc-band-max", "0.501", "--strict",
                              "--out", str(tmp_path / "strict.json")], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "verdict: indistinguishable" not in res.output
    assert runner.invoke(app, ["certify", str(run), "--auc-band-min", "0.4"]).exit_code == 2  # a user error
    assert runner.invoke(app, ["certify", str(run), "--alpha", "2"]).exit_code == 2

    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 0 and "OK" in res.output
    (run / "model" / "config.json").write_text("{}")
    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 1 and "model_after" in res.output
