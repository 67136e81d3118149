"""Run directories: resume only the same run (also after kill -9), SIGTERM marks a run interrupted,
--overwrite removes only what runs wrote and refuses what it must not delete, names stay inside."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from obliviate.cli.main import app
from obliviate.data.qa import QAExample, write_qa_jsonl
from obliviate.runs import RunDir, RunError, safe_name

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


@pytest.fixture
def qa_file(tmp_path):
    rows = [QAExample(f"What is fact {i}?", f"Fact {i} is {i * 7}.") for i in range(8)]
    return write_qa_jsonl(rows, tmp_path / "qa.jsonl")


def _start(model_dir, data, out, registry, *extra) -> subprocess.Popen:
    """A finetune in its own process (so it can be killed) that checkpoints every step."""
    env = {**os.environ, "OBLIVIATE_REGISTRY": str(registry), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "obliviate.cli.main", "finetune", str(data), "--model", str(model_dir),
           "--out", str(out), "--epochs", "200", "--batch-size", "2", "--save-every", "1", "--lr", "1e-3",
           "--no-progress", *map(str, extra)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((out / "checkpoints").glob("step-*/trainer_state.json")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"finetune ended early: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no checkpoint in time")


def test_resume_after_kill_9_refuses_other_options_and_data(tmp_path, tiny_model_dir, qa_file):
    out = tmp_path / "run"
    proc = _start(tiny_model_dir, qa_file, out, tmp_path / "runs.db")
    _wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "status.json").read_text())["status"] == "running"  # killed: nobody closed it
    config_before = (out / "config.yaml").read_text()

    res = run("finetune", qa_file, "--model", tiny_model_dir, "--out", out, "--epochs", "200", "--batch-size", "2",
              "--save-every", "1", "--lr", "5e-3", "--resume", "--no-progress")
    assert res.exit_code == 2, res.output
    assert "train.lr" in res.output and "cannot resume" in res.output
    other = write_qa_jsonl([QAExample("Who?", "Nobody.")] * 8, tmp_path / "other.jsonl")
    res = run("finetune", other, "--model", tiny_model_dir, "--out", out, "--epochs", "200", "--batch-size", "2",
              "--save-every", "1", "--lr", "1e-3", "--resume", "--no-progress")
    assert res.exit_code == 2 and "data.train.sha256" in res.output
    assert (out / "config.yaml").read_text() == config_before  # a refused resume changes nothing

    res = run("finetune", qa_file, "--model", tiny_model_dir, "--out", out, "--epochs", "2", "--batch-size", "2",
              "--save-every", "1", "--lr", "1e-3", "--resume", "--no-progress")
    assert res.exit_code == 2 and "train.epochs" in res.output  # fewer epochs is another run too


def test_sigterm_marks_the_run_interrupted(tmp_path, tiny_model_dir, qa_file):
    out, registry = tmp_path / "run", tmp_path / "runs.db"
    proc = _start(tiny_model_dir, qa_file, out, registry)
    _wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "interrupted" and "SIGTERM" in status["reason"]
    assert "Traceback" not in err and "--resume" in err
    with sqlite3.connect(registry) as db:
        row = db.execute("SELECT status FROM runs WHERE path = ?", (str(out.resolve()),)).fetchone()
    assert row == ("interrupted",)


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, tiny_model_dir, qa_file):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    res = run("finetune", qa_file, "--model", tiny_model_dir, "--out", folder, "--overwrite", "--epochs", "1",
              "--no-progress")
    assert res.exit_code == 2 and "not a run directory" in res.output
    assert (folder / "thesis.tex").read_text() == "precious" and len(list(folder.iterdir())) == 1


def test_overwrite_removes_only_what_runs_wrote(tmp_path, tiny_model_dir, qa_file):
    out = tmp_path / "run"
    args = ["finetune", qa_file, "--model", tiny_model_dir, "--out", out, "--epochs", "1", "--no-progress"]
    assert run(*args).exit_code == 0
    (out / "notes.txt").write_text("mine")
    (out / "model" / "stale.bin").write_text("old")  # inside an entry the run owns: goes with it
    res = run(*args, "--overwrite")
    assert res.exit_code == 0, res.output
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model" / "stale.bin").exists() and (out / "model" / "config.json").exists()


def test_overwrite_refuses_when_an_input_lives_inside_the_output(tmp_path, tiny_model_dir, qa_file):
    out = tmp_path / "run"
    assert run("finetune", qa_file, "--model", tiny_model_dir, "--out", out, "--epochs", "1",
               "--no-progress").exit_code == 0
    res = run("unlearn", "--model", out / "model", "--forget", qa_file, "--out", out, "--method", "ga",
              "--overwrite", "--no-progress")
    assert res.exit_code == 2 and "would delete an input" in res.output
    assert (out / "model" / "config.json").exists()


def test_out_that_is_a_file_is_a_clear_error(tmp_path, tiny_model_dir, qa_file):
    target = tmp_path / "file.txt"
    target.write_text("x")
    res = run("finetune", qa_file, "--model", tiny_model_dir, "--out", target, "--epochs", "1", "--no-progress")
    assert res.exit_code == 2 and "is a file" in res.output and "Traceback" not in res.output
    assert target.read_text() == "x"


def test_evaluate_label_cannot_leave_the_output(tmp_path, tiny_model_dir, small_bench):
    out = tmp_path / "a" / "b"
    res = run("evaluate", "--model", tiny_model_dir, "--benchmark", small_bench, "--out", out, "--label", "../../x",
              "--max-new-tokens", "2", "--no-progress")
    assert res.exit_code == 2 and "not a plain name" in res.output
    assert not (tmp_path / "x.json").exists() and not list(tmp_path.rglob("x.json"))


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/etc/passwd", "", ".hidden", "a\\b", "x\0y"])
def test_unsafe_names_are_refused(name, tmp_path):
    with pytest.raises(RunError):
        safe_name(name)
    if "/" not in name.strip("/") or ".." in name:  # "a/b" is a path of plain names: inside the run
        with pytest.raises(RunError):
            RunDir(tmp_path).file("eval", name)
    assert RunDir(tmp_path).file("eval", "a/b") == tmp_path / "eval" / "a" / "b"


def test_resume_of_a_finished_run_with_other_options_refuses(tmp_path, tiny_model_dir, qa_file):
    out = tmp_path / "run"
    base = ["finetune", qa_file, "--model", tiny_model_dir, "--out", out, "--epochs", "1", "--no-progress"]
    assert run(*base).exit_code == 0
    assert run(*base, "--resume").exit_code == 0  # the same run: returned as it is
    res = run(*base, "--resume", "--seed", "3")
    assert res.exit_code == 2 and "train.seed" in res.output


def test_corrupt_registry_is_one_line_and_never_costs_a_run(tmp_path, tiny_model_dir, qa_file, monkeypatch):
    registry = tmp_path / "broken.db"
    registry.write_bytes(b"this is not an SQLite database" * 100)
    res = run("runs", "list", "--registry", registry)
    assert res.exit_code == 2 and "broken.db" in res.output and "Traceback" not in res.output
    monkeypatch.setenv("OBLIVIATE_REGISTRY", str(registry))
    with pytest.warns(UserWarning, match="run registry"):
        res = runner.invoke(app, ["finetune", str(qa_file), "--model", str(tiny_model_dir), "--out",
                                  str(tmp_path / "run"), "--epochs", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "done"


def test_one_device_choice():
    """Every layer takes its device from processes().device (this process's accelerator under accelerate
    launch); a hand-written "cuda if available" would put every process on cuda:0."""
    src = Path(__file__).resolve().parents[1] / "src" / "obliviate"
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py")
                 if p.name != "processes.py" and '"cuda" if torch.cuda.is_available()' in p.read_text()]
    assert offenders == []
