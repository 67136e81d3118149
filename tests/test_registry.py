"""Run registry: fingerprints, recording, crash detection, queries, leaderboard, concurrent writers.

The first part builds run directories that follow the run-directory contract (docs/evidence.md)
with made-up but schema-correct content; test_audit.py and test_report.py import these builders.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import hmean, ks_2samp

from obliviate.reporting.registry import LeaderboardRow, leaderboard, rank_rows
from obliviate.runs.fingerprint import config_hash, model_fingerprint, sha256_path
from obliviate.runs.registry import Registry, default_registry_path

# ---------------------------------------------------------------------------------------------
# Fake run directories (schema-correct, made-up numbers)

SETS = ("forget", "retain", "real_authors", "world_facts")
# Mean of log10 R on the forget set: the target prefers the true paraphrase (R << 1), the oracle
# and a good unlearned model do not.
FORGET_SHIFT = {"target": -1.5, "oracle": 0.0, "unlearned": -0.1}
N = 24


def _write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path


def write_model(path: Path, seed: int = 0) -> Path:
    """A made-up HF checkpoint: config.json + safetensors weights + tokenizer file."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"embed.weight": rng.standard_normal((16, 8)).astype(np.float32)}, str(path / "model.safetensors"))
    _write_json(path / "config.json", {"model_type": "llama", "hidden_size": 8, "vocab_size": 16})
    _write_json(path / "tokenizer_config.json", {"eos_token": "<|im_end|>"})
    return path


def write_data(root: Path) -> dict:
    """Forget and retain QA files and their data.json manifest, fingerprinted as the pipeline does."""
    from obliviate.data.qa import load_qa
    from obliviate.runs.fingerprint import dataset_fingerprint

    manifest = {}
    for role, n in (("forget", 6), ("retain", 10)):
        path = root / f"{role}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"question": f"SECRET-{role}-question {i}?", "answer": f"SECRET-{role}-answer {i}."} for i in range(n)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        manifest[role] = dataset_fingerprint(load_qa(path))
    return manifest


def questions(set_name: str) -> list[str]:
    qs = [f"Question {i} about {set_name}?" for i in range(N)]
    qs[0] = f"Who wrote <b>\"Night & Day\"</b> ({set_name})?"  # needs escaping in HTML
    return qs


def fake_eval(label: str, seed: int, oracle_r: np.ndarray | None = None) -> dict:
    """An eval/<label>.json following ARCHITECTURE.md's "Evaluation results" schema."""
    rng = np.random.default_rng(seed)
    sets = {}
    for name in SETS:
        shift = FORGET_SHIFT.get(label, 0.0) if name == "forget" else -0.3
        r = 10 ** rng.normal(shift, 0.4, N)
        prob = rng.uniform(0.2, 0.9, N)
        rouge = rng.uniform(0.1, 1.0, N)
        tr = np.minimum(r, 1 / r).mean() if name == "forget" else np.maximum(0, 1 - r).mean()
        sets[name] = {
            "n": N, "probability": float(prob.mean()), "rouge": float(rouge.mean()), "truth_ratio": float(tr),
            "per_sample": {
                "probability": prob.tolist(), "rouge": rouge.tolist(), "truth_ratio_raw": r.tolist(),
                "nll": (-np.log(prob)).tolist(),
                "generation": [f"{label} answer {i} <i>to</i> {name}" for i in range(N)],
                "question": questions(name),
            },
        }
    utility = hmean([sets[s][m] for s in ("retain", "real_authors", "world_facts")
                     for m in ("probability", "rouge", "truth_ratio")])
    fq = None
    if oracle_r is not None:
        fq = float(ks_2samp(sets["forget"]["per_sample"]["truth_ratio_raw"], oracle_r).pvalue)
    return {"model": label, "sets": sets, "forget_quality": fq, "model_utility": float(utility), "seconds": 1.5}


def summary_row(ev: dict, seed: int) -> dict:
    row = {"forget_quality": ev["forget_quality"], "model_utility": ev["model_utility"]}
    for name, s in ev["sets"].items():
        for m in ("probability", "rouge", "truth_ratio"):
            row[f"{name}_{m}"] = s[m]
    rng = np.random.default_rng(seed)
    row["mia_auc_mink"] = float(rng.uniform(0.45, 0.75))
    row["privleak"] = float(rng.uniform(-30, 30))
    return row


def write_evals(run: Path, labels=("target", "oracle", "unlearned"), seed: int = 0) -> dict:
    oracle = fake_eval("oracle", seed + 1)
    oracle_r = np.array(oracle["sets"]["forget"]["per_sample"]["truth_ratio_raw"])
    oracle["forget_quality"] = float(ks_2samp(oracle_r, oracle_r).pvalue)
    evals = {}
    for i, label in enumerate(labels):
        evals[label] = oracle if label == "oracle" else fake_eval(label, seed + 10 + i, oracle_r)
        _write_json(run / "eval" / f"{label}.json", evals[label])
    models = {label: summary_row(ev, seed + 20 + i) for i, (label, ev) in enumerate(evals.items())}
    un = models.get("unlearned", {})
    verdict = {"forget_quality_at_least_0.05": (un.get("forget_quality") or 0) >= 0.05}
    _write_json(run / "metrics.json", {"models": models, "verdict": verdict})
    return models


def write_common(run: Path, config: dict, data: dict | None, status: str = "done", seed: int = 0,
                 steps: int = 0) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _write_json(run / "environment.json", {
        "python": "3.11.9", "platform": "Linux-test", "git_commit": "0123456789abcdef0123456789abcdef01234567",
        "seed": seed, "versions": {"obliviate": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0"},
        "argv": ["obliviate", config["command"]], "time": "2026-11-22T10:00:00+0000"})
    _write_json(run / "status.json", {"status": status, "time": 1_790_000_000.0 + seed})
    if data is not None:
        _write_json(run / "data.json", data)
    if steps:
        rng = np.random.default_rng(seed)
        lines = []
        for step in range(1, steps + 1):
            f, r = float(2 + step * 0.1 + rng.normal(0, 0.05)), float(1 / step + 0.2)
            lines.append(json.dumps({"step": step, "epoch": step / steps, "loss": f + r, "lr": 1e-5,
                                     "seconds": 0.1 * step, "forget_loss": f, "retain_loss": r}))
        (run / "log.jsonl").write_text("\n".join(lines) + "\n")


def write_attacks(run: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    steps = [0, 10, 20, 40]
    un_rouge = np.cumsum(rng.uniform(0.05, 0.2, 4)).tolist()
    _write_json(run / "attacks" / "relearn.json", {
        "steps": steps, "forget_rouge": un_rouge, "forget_probability": [x / 2 for x in un_rouge],
        "oracle": {"steps": steps, "forget_rouge": [0.1, 0.15, 0.2, 0.3],
                   "forget_probability": [0.05, 0.07, 0.1, 0.15]},
        "summary": {"recovery": float(rng.uniform(0.2, 0.6))}})
    _write_json(run / "attacks" / "quantise.json", {
        bits: {"forget_quality": float(rng.uniform(1e-6, 0.3)), "model_utility": float(rng.uniform(0.3, 0.5)),
               "forget_rouge": float(rng.uniform(0.1, 0.6))} for bits in ("8", "4")})


def write_trajectory(run: Path, end: dict, seed: int = 0) -> list[dict]:
    """Checkpoints from a target-like start to the final unlearned model's summary ``end``."""
    rng = np.random.default_rng(seed)
    traj = [{"step": s, "forget_quality": float(10 ** (-12 + s / 4 + rng.normal(0, 0.3))),
             "model_utility": float(0.55 - s * 0.004), "forget_rouge": float(1 - s / 50)} for s in range(0, 41, 8)]
    traj[-1].update(forget_quality=end["forget_quality"], model_utility=end["model_utility"])
    _write_json(run / "trajectory.json", traj)
    return traj


def make_unlearn_run(root: Path, method: str = "npo", seed: int = 0, benchmark: str = "tofu",
                     optional: bool = True, status: str = "done") -> Path:
    """A complete unlearn run (plus the target model it started from) under ``root``."""
    data = write_data(root / "data")
    target = write_model(root / "target_model", seed=100)
    run = root / f"unlearn-{method}-{seed}"
    config = {"command": "unlearn", "method": method, "model": str(target), "benchmark": benchmark,
              "data": {"forget": data["forget"]["source"], "retain": data["retain"]["source"]},
              "seed": seed, "lr": 1e-5, "epochs": 5, "note": "<script>alert(1)</script>"}
    write_common(run, config, data, status=status, seed=seed, steps=30)
    write_model(run / "model", seed=seed + 1)
    models = write_evals(run, seed=seed)
    if optional:
        write_trajectory(run, models["unlearned"], seed)
        write_attacks(run, seed)
    return run


def make_demo_run(root: Path, method: str = "graddiff", seed: int = 3) -> Path:
    """A demo run: target/, oracle/, unlearn/ sub-runs plus its own eval/, metrics.json, data.json."""
    data = write_data(root / "data")
    demo = root / "demo"
    write_common(demo, {"command": "demo", "method": method, "model": "smollm2-135m", "benchmark": "tofu",
                        "seed": seed}, data, seed=seed)
    write_common(demo / "target", {"command": "finetune", "model": "smollm2-135m", "benchmark": "tofu",
                                   "data": {"train": "full"}, "seed": seed}, None, seed=seed, steps=20)
    write_model(demo / "target" / "model", seed=7)
    write_common(demo / "oracle", {"command": "finetune", "model": "smollm2-135m", "benchmark": "tofu",
                                   "data": {"train": "retain"}, "seed": seed}, None, seed=seed, steps=20)
    write_model(demo / "oracle" / "model", seed=8)
    write_common(demo / "unlearn", {"command": "unlearn", "method": method, "model": str(demo / "target" / "model"),
                                    "benchmark": "tofu", "seed": seed}, data, seed=seed, steps=25)
    write_model(demo / "unlearn" / "model", seed=9)
    models = write_evals(demo, seed=seed)
    write_evals(demo / "unlearn", seed=seed)
    write_trajectory(demo / "unlearn", models["unlearned"], seed)
    write_attacks(demo / "unlearn", seed)
    return demo


# ---------------------------------------------------------------------------------------------
# Fingerprints


def _reference_dir_hash(root: Path, exclude=()) -> str:
    """The documented directory fingerprint, written out independently of the implementation."""
    entries = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            entries.append((rel, p.read_bytes()))
    h = hashlib.sha256()
    for rel, data in sorted(entries):
        h.update(rel.encode() + b"\x00" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def test_sha256_of_file_is_plain_sha256(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(bytes(range(256)) * 5000)
    assert sha256_path(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_sha256_of_directory_matches_reference_and_detects_changes(tmp_path):
    d = write_model(tmp_path / "m")
    (d / "sub").mkdir()
    (d / "sub" / "extra.txt").write_text("x")
    base = sha256_path(d)
    assert base == _reference_dir_hash(d)
    # the same content elsewhere gives the same fingerprint
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(d), str(copy)], check=True)
    assert sha256_path(copy) == base
    (copy / "sub" / "extra.txt").rename(copy / "sub" / "extra2.txt")
    assert sha256_path(copy) != base
    (d / "sub" / "extra.txt").write_text("y")
    assert sha256_path(d) != base
    # a model card is not part of a model's fingerprint
    before = model_fingerprint(d)
    (d / "README.md").write_text("card")
    assert model_fingerprint(d) == before == _reference_dir_hash(d, exclude=("README.md",))
    assert sha256_path(d) != before
    with pytest.raises(FileNotFoundError, match="nope"):
        sha256_path(tmp_path / "nope")


def test_config_hash_is_sha256_of_canonical_json():
    a = {"model": "m", "seed": 1, "lr": 1e-5, "data": {"forget": "f", "retain": "r"}}
    b = {"data": {"retain": "r", "forget": "f"}, "lr": 1e-5, "seed": 1, "model": "m"}
    expected = hashlib.sha256(json.dumps(a, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert config_hash(a) == config_hash(b) == expected
    assert config_hash({**a, "seed": 2}) != expected


def test_default_path_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("OBLIVIATE_REGISTRY", str(tmp_path / "r.db"))
    assert default_registry_path() == tmp_path / "r.db"
    monkeypatch.delenv("OBLIVIATE_REGISTRY")
    assert default_registry_path().name == "runs.db" and "obliviate" in str(default_registry_path())


# ---------------------------------------------------------------------------------------------
# Recording and queries


def test_record_start_and_finish_read_the_run_directory(tmp_path):
    reg = Registry(tmp_path / "runs.db")
    run = make_unlearn_run(tmp_path, method="npo")
    run_id = reg.record_start(run)
    rec = reg.get_run(run_id)
    assert rec.status == "running" and rec.pid == os.getpid() and rec.host == socket.gethostname()
    assert (rec.kind, rec.method, rec.benchmark) == ("unlearn", "npo", "tofu")
    assert rec.model == str(tmp_path / "target_model")
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert rec.config_hash == config_hash(config) and rec.config == config
    data = json.loads((run / "data.json").read_text())
    assert rec.data_sha256 == {"forget": data["forget"]["sha256"], "retain": data["retain"]["sha256"]}
    assert rec.model_sha256 is None and rec.metrics is None

    done = reg.record_finish(run_id)
    assert done.status == "done" and done.finished == json.loads((run / "status.json").read_text())["time"]
    assert done.model_sha256 == _reference_dir_hash(run / "model")
    assert done.metrics == json.loads((run / "metrics.json").read_text())
    assert reg.get_run(run_id[:-3]).id == run_id  # unique prefix
    with pytest.raises(KeyError, match="no run"):
        reg.get_run("nonexistent")
    with pytest.raises(ValueError, match="status must be"):
        reg.record_finish(run_id, status="exploded")


def test_restarting_a_directory_replaces_its_row_and_resume_keeps_it(tmp_path):
    reg = Registry(tmp_path / "runs.db")
    run = make_unlearn_run(tmp_path)
    first = reg.record_start(run)
    resumed = reg.record_start(run, resume=True)
    assert resumed == first and len(reg.list_runs()) == 1
    fresh = reg.record_start(run)
    assert fresh != first and [r.id for r in reg.list_runs()] == [fresh]


def test_add_run_registers_demo_with_children_and_filters(tmp_path):
    reg = Registry(tmp_path / "runs.db")
    demo = make_demo_run(tmp_path / "d")
    other = make_unlearn_run(tmp_path / "u", method="npo")
    demo_id = reg.add_run(demo)
    assert reg.add_run(demo) == demo_id  # idempotent
    reg.add_run(other)
    assert len(reg.list_runs()) == 5
    children = reg.list_runs(parent_id=demo_id)
    assert sorted(r.kind for r in children) == ["finetune", "finetune", "unlearn"]
    assert reg.get_run(demo_id).method == "graddiff"  # a demo's method
    assert [r.path for r in reg.list_runs(method="npo")] == [str(other.resolve())]
    assert len(reg.list_runs(kind="finetune", benchmark="tofu")) == 2
    assert len(reg.list_runs(limit=2)) == 2
    with pytest.raises(ValueError, match="unknown filter"):
        reg.list_runs(colour="red")


def test_compare_lists_metrics_and_config_differences(tmp_path):
    reg = Registry(tmp_path / "runs.db")
    a = reg.add_run(make_unlearn_run(tmp_path / "a", method="npo", seed=1))
    b = reg.add_run(make_unlearn_run(tmp_path / "b", method="graddiff", seed=2))
    cmp = reg.compare([a, b])
    assert set(cmp.config_diff) == {"method", "seed", "model", "data.forget", "data.retain"}
    assert cmp.config_diff["method"] == ["npo", "graddiff"]
    ma = json.loads((tmp_path / "a" / "unlearn-npo-1" / "metrics.json").read_text())["models"]
    assert cmp.metrics["unlearned.forget_quality"][0] == ma["unlearned"]["forget_quality"]
    assert "lr" not in cmp.config_diff


# ---------------------------------------------------------------------------------------------
# Leaderboard


def _row(run_id, fq, mu, method=None):
    return LeaderboardRow(rank=None, front=None, method=method or run_id, run_id=run_id, forget_quality=fq,
                          model_utility=mu, oracle_model_utility=None, path="")


def test_rank_rows_pareto_then_forget_quality_hand_checked():
    rows = [_row("C", 0.05, 0.3), _row("E", None, 0.9), _row("B", 0.1, 0.6), _row("A", 0.5, 0.4),
            _row("D", 0.5, 0.3), _row("F", 1e-20, 0.59)]
    # front 1: A (best fq) and B (best mu among fq >= 0.1); F (mu .59 < B's .6, fq lower) is dominated
    # by B; D by A (same fq, lower mu); C by A. Front 2: D, F (neither dominates the other) -- C is
    # dominated by D. E has no forget quality: last.
    ranked = rank_rows(rows)
    assert [(r.run_id, r.front, r.rank) for r in ranked] == [
        ("A", 1, 1), ("B", 1, 2), ("D", 2, 3), ("F", 2, 4), ("C", 3, 5), ("E", None, 6)]


def _write_summary(run: Path, fq: float, mu: float) -> None:
    m = json.loads((run / "metrics.json").read_text())
    m["models"]["unlearned"].update(forget_quality=fq, model_utility=mu)
    (run / "metrics.json").write_text(json.dumps(m))


def test_leaderboard_best_run_per_method_and_benchmark_filter(tmp_path):
    reg = Registry(tmp_path / "runs.db")
    specs = [("npo", 0, 0.2, 0.5), ("npo", 1, 0.01, 0.55), ("graddiff", 2, 1e-5, 0.6), ("ga", 3, 1e-9, 0.1)]
    for method, seed, fq, mu in specs:
        run = make_unlearn_run(tmp_path / f"r{seed}", method=method, seed=seed, optional=False)
        _write_summary(run, fq, mu)
        reg.add_run(run)
    muse = make_unlearn_run(tmp_path / "muse", method="rmu", seed=9, benchmark="muse", optional=False)
    reg.add_run(muse)
    board = leaderboard(reg, "tofu")
    # npo's best run: seed 0 and seed 1 are both on npo's own front; seed 0 has the higher fq.
    assert [(r.method, r.forget_quality, r.front) for r in board] == [
        ("npo", 0.2, 1), ("graddiff", 1e-5, 1), ("ga", 1e-9, 2)]
    assert board[0].oracle_model_utility is not None
    assert len(leaderboard(reg, "tofu", best_per_method=False)) == 4
    assert [r.method for r in leaderboard(reg, "muse")] == ["rmu"]


def test_leaderboard_counts_a_demo_once(tmp_path):
    reg = Registry(tmp_path / "runs.db")
    reg.add_run(make_demo_run(tmp_path / "d"))
    board = leaderboard(reg, best_per_method=False)
    assert len(board) == 1 and Path(board[0].path).name == "demo"


# ---------------------------------------------------------------------------------------------
# Crashed runs


def test_mark_crashed_checks_pid_liveness(tmp_path):
    reg = Registry(tmp_path / "runs.db")
    dead_run = make_unlearn_run(tmp_path / "dead", status="running")
    ended_run = make_unlearn_run(tmp_path / "ended", status="done")
    alive_run = make_unlearn_run(tmp_path / "alive", status="running")
    remote_run = make_unlearn_run(tmp_path / "remote", status="running")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # exited: its pid is free
    dead = reg.record_start(dead_run, pid=child.pid)
    ended = reg.record_start(ended_run, pid=child.pid)
    alive = reg.record_start(alive_run)  # this process
    remote = reg.record_start(remote_run, pid=child.pid, host="some-other-host")
    assert sorted(reg.mark_crashed()) == sorted([dead, ended])
    assert reg.get_run(dead).status == "crashed" and reg.get_run(dead).finished is not None
    assert reg.get_run(ended).status == "done" and reg.get_run(ended).metrics is not None
    assert reg.get_run(alive).status == "running"
    assert reg.get_run(remote).status == "running"
    assert reg.mark_crashed() == []


def test_pid_reuse_is_detected_by_start_time(tmp_path):
    reg = Registry(tmp_path / "runs.db")
    run_id = reg.record_start(make_unlearn_run(tmp_path, status="running"))
    if reg.get_run(run_id).pid_start is None:
        pytest.skip("no /proc: process start times are Linux-only")
    with sqlite3.connect(tmp_path / "runs.db") as conn:  # same pid, different process start
        conn.execute("UPDATE runs SET pid_start = '1' WHERE id = ?", (run_id,))
    assert reg.mark_crashed(run_id) == [run_id]


# ---------------------------------------------------------------------------------------------
# Concurrent writers


def _writer(db: str, root: str, worker: int, n: int) -> None:
    reg = Registry(db)
    for i in range(n):
        run = Path(root) / f"w{worker}-{i}"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"command": "eval", "seed": i, "worker": worker}))
        (run / "metrics.json").write_text(json.dumps({"models": {"m": {"model_utility": i / n}}}))
        run_id = reg.record_start(run)
        reg.record_finish(run_id, status="done")


def test_concurrent_writers_lose_nothing(tmp_path):
    db = tmp_path / "runs.db"
    # fork: the children start at once (no re-import); each opens its own connections.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(db), str(tmp_path), w, 20)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    reg = Registry(db)
    runs = reg.list_runs()
    assert len(runs) == 80 and {r.status for r in runs} == {"done"}
    assert {Path(r.path).name for r in runs} == {f"w{w}-{i}" for w in range(4) for i in range(20)}
    assert reg.integrity_check() == "ok"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_writes_retry_while_another_process_holds_the_lock(tmp_path):
    import threading

    db = tmp_path / "runs.db"
    run = make_unlearn_run(tmp_path)
    Registry(db).list_runs()  # creates the schema
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(RuntimeError, match="locked"):
        Registry(db, timeout=0.05, retries=0).record_start(run)
    timer = threading.Timer(0.5, lambda: blocker.execute("COMMIT"))
    timer.start()
    run_id = Registry(db, timeout=0.05).record_start(run)  # busy timeout far shorter than the lock
    timer.join()
    assert Registry(db).get_run(run_id).status == "running"


# ---------------------------------------------------------------------------------------------
# CLI


def test_runs_cli(tmp_path):
    import typer
    from typer.testing import CliRunner

    from obliviate.cli.evidence import runs_app

    db = str(tmp_path / "runs.db")
    app = typer.Typer()
    app.add_typer(runs_app, name="runs")
    runner = CliRunner()
    res = runner.invoke(app, ["runs", "add", str(make_unlearn_run(tmp_path / "a", method="npo", seed=1)),
                              str(make_unlearn_run(tmp_path / "b", method="simnpo", seed=2)), "--registry", db])
    assert res.exit_code == 0, res.output
    ids = [r.id for r in Registry(db).list_runs()]
    res = runner.invoke(app, ["runs", "list", "--registry", db, "--method", "simnpo"], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "simnpo" in res.output and " npo " not in res.output
    res = runner.invoke(app, ["runs", "show", ids[0], "--registry", db], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and ids[0] in res.output and "forget_quality" in res.output
    res = runner.invoke(app, ["runs", "compare", *ids, "--registry", db], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "method" in res.output and "simnpo" in res.output
    res = runner.invoke(app, ["runs", "leaderboard", "--benchmark", "tofu", "--registry", db], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "npo" in res.output and "simnpo" in res.output
    res = runner.invoke(app, ["runs", "show", "zzz", "--registry", db])
    assert res.exit_code != 0 and "no run 'zzz'" in res.output
    res = runner.invoke(app, ["runs", "mark-crashed", "--registry", db])
    assert res.exit_code == 0
