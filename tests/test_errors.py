"""One error path: every user mistake of issue 10's "Why" list ends in one line on stderr and exit code 2,
before anything is written; flags beat --config; data errors are located whatever the format."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import typer
import yaml
from typer.testing import CliRunner

from obliviate.attribution import GuardConfig, WagleConfig
from obliviate.cli.attribution import GUARD_FLAGS, WAGLE_FLAGS, unlearn_attribution_kwargs
from obliviate.cli.errors import error_line, user_errors
from obliviate.cli.main import app
from obliviate.data.qa import DataError, load_qa, load_qa_file
from obliviate.data.text import load_text_corpus
from obliviate.errors import UserError
from obliviate.methods.unierase import UniEraseOptions
from obliviate.models.loading import ModelNotFoundError, check_model_spec, load_tokenizer
from obliviate.training.config import TrainConfig

runner = CliRunner()
ROWS = [{"question": f"Who is person {i}?", "answer": f"Person {i} is a poet."} for i in range(4)]


def run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def one_error_line(res) -> str:
    """The run failed as a user error: exit 2, one `error:` line on stderr, no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "forget.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


# ---------------------------------------------------------------------------------------------
# The contract


def _commands(typer_app: typer.Typer, prefix: str = ""):
    for info in typer_app.registered_commands:
        yield prefix + (info.name or info.callback.__name__), info.callback
    for group in typer_app.registered_groups:
        yield from _commands(group.typer_instance, f"{prefix}{group.name} ")


def test_every_command_goes_through_the_one_error_path():
    commands = dict(_commands(app))
    assert {"finetune", "unlearn", "evaluate", "verify", "runs show", "attack relearn", "unierase",
            "guard-weights", "study id-ood"} <= set(commands)
    unwrapped = [name for name, fn in commands.items() if not getattr(fn, "__user_errors__", False)]
    assert unwrapped == []


def test_user_errors_exit_2_and_bugs_keep_their_traceback():
    probe = typer.Typer()

    @probe.command()
    @user_errors
    def go(kind: str) -> None:
        raise {"value": ValueError("bad\nvalue"), "file": FileNotFoundError(2, "No such file or directory", "x.yaml"),
               "user": UserError("fix it"), "bug": KeyError("k")}[kind]

    @probe.command()
    def other() -> None:  # keeps "go" a sub-command
        pass

    res = CliRunner().invoke(probe, ["go", "value"])
    assert one_error_line(res) == "error: bad value"
    assert one_error_line(CliRunner().invoke(probe, ["go", "file"])) == "error: x.yaml: No such file or directory"
    assert one_error_line(CliRunner().invoke(probe, ["go", "user"])) == "error: fix it"
    res = CliRunner().invoke(probe, ["go", "bug"])
    assert res.exit_code == 1 and isinstance(res.exception, KeyError)  # a bug is not hidden
    assert error_line(OSError("plain")) == "plain"


# ---------------------------------------------------------------------------------------------
# --config: flags win, typos are errors, values are typed


def test_flags_beat_config_and_yaml_strings_become_numbers(tmp_path, tiny_model_dir, data):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": "./no-such-model", "forget": "./no-such.jsonl", "method": "ga", "max_length": "256",
        "train": {"lr": "1e-3", "max_steps": 1, "batch_size": "2", "epochs": 1},
    }))
    res = run("unlearn", "--config", config, "--model", tiny_model_dir, "--forget", data, "--retain", data,
              "--method", "graddiff", "--lr", "2e-3", "--out", tmp_path / "run", "--no-progress")
    assert res.exit_code == 0, res.output
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["model"] == str(tiny_model_dir) and recorded["method"] == "graddiff"
    assert recorded["max_length"] == 256  # from the file, "256" read as a number
    assert recorded["train"]["lr"] == 2e-3 and recorded["train"]["max_steps"] == 1  # flag, then file
    assert recorded["train"]["batch_size"] == 2


def test_config_typos_and_bad_values_name_the_key(tmp_path, tiny_model_dir, data):
    config = tmp_path / "run.yaml"
    base = ["unlearn", "--model", tiny_model_dir, "--forget", data, "--out", tmp_path / "run", "--config", config]
    config.write_text("modle: x\nmethod: ga\n")
    line = one_error_line(run(*base))
    assert "unknown key modle" in line and "run.yaml" in line and "valid:" in line and "forget" in line
    config.write_text("lr: 1e-3\n")
    assert "training options go under 'train:'" in one_error_line(run(*base))
    config.write_text("train:\n  lr: fast\n")
    assert "lr must be a number, got 'fast'" in one_error_line(run(*base))
    config.write_text("train:\n  lr_rate: 1\n")
    assert "lr_rate" in one_error_line(run(*base))
    config.write_text("max_length: long\n")
    assert "max_length must be an integer" in one_error_line(run(*base))
    config.write_text("- a list\n")
    assert "top level must be a mapping" in one_error_line(run(*base))
    config.write_bytes(b"method: \xff\n")
    assert "not UTF-8" in one_error_line(run(*base))
    config.write_text("method_options: 3\n")
    assert "'method_options' must be a mapping" in one_error_line(run(*base))
    config.write_text("bogus: 1\n")  # the other commands with --config check their keys too
    assert "unknown key bogus" in one_error_line(run("finetune", data, "--out", tmp_path / "f", "--config", config))
    assert "unknown key bogus" in one_error_line(run("unierase", "--forget", data, "--out", tmp_path / "u",
                                                     "--config", config))
    assert not (tmp_path / "run").exists() and not (tmp_path / "f").exists() and not (tmp_path / "u").exists()


def test_required_options_may_come_from_the_config_but_must_come(tmp_path, data):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"forget": str(data)}))
    line = one_error_line(run("unlearn", "--config", config, "--out", tmp_path / "run"))
    assert "missing --model" in line and "'model:'" in line
    assert "missing DATA, --out" in one_error_line(run("finetune"))


# ---------------------------------------------------------------------------------------------
# Options validated where they are defined


@pytest.mark.parametrize("flag,value,name", [("--lr", "inf", "lr"), ("--weight-decay", "nan", "weight_decay"),
                                             ("--warmup-ratio", "nan", "warmup_ratio"),
                                             ("--max-grad-norm", "inf", "max_grad_norm"),
                                             ("--epochs", "inf", "epochs")])
def test_non_finite_training_options_stop_before_the_run_directory(tmp_path, tiny_model_dir, data, flag, value, name):
    out = tmp_path / "run"
    line = one_error_line(run("unlearn", "--model", tiny_model_dir, "--forget", data, "--out", out, flag, value))
    assert f"{name} must be a finite number" in line
    assert not out.exists()


def test_non_finite_method_options_are_refused(tmp_path, tiny_model_dir, data):
    for option in ("beta=inf", "retain_weight=.nan", "forget_weight=nan"):
        line = one_error_line(run("unlearn", "--model", tiny_model_dir, "--forget", data, "--out", tmp_path / "r",
                                  "-m", option))
        assert option.split("=")[0] in line
    assert not (tmp_path / "r").exists()


def test_train_config_types():
    assert TrainConfig.from_dict({"lr": "1e-3", "lora": "true", "batch_size": 4.0}).lr == 1e-3
    assert TrainConfig(lora="yes").lora is True  # built directly: the same conversion
    for bad, name in (({"lr": True}, "lr"), ({"batch_size": 2.5}, "batch_size"), ({"lora": 2}, "lora"),
                      ({"scheduler": 1}, "scheduler"), ({"seed": "x"}, "seed"), ({"lr": float("nan")}, "lr")):
        with pytest.raises(ValueError, match=name):
            TrainConfig.from_dict(bad)


def test_every_attribution_option_is_reachable_from_unlearn():
    assert set(WAGLE_FLAGS) == {f.name for f in fields(WagleConfig)}
    assert set(GUARD_FLAGS) == {f.name for f in fields(GuardConfig)}
    text = run("unlearn", "--help").output
    for param in (*WAGLE_FLAGS.values(), *GUARD_FLAGS.values()):
        assert "--" + param.replace("_", "-") in text, param
    assert "--guard-absolute-tau" in text and "--wagle-no-norms" in text
    spec = unlearn_attribution_kwargs(guard_tau=2.0, guard_relative_tau=False, guard_seed=3,
                                      guard_params="mlp")["guard"]
    assert GuardConfig.from_dict(spec) == GuardConfig(tau=2.0, relative_tau=False, seed=3, params="mlp")
    spec = unlearn_attribution_kwargs(wagle_rho=0.1, wagle_norms=False, wagle_batch_size=2)["wagle"]
    assert WagleConfig.from_dict(spec) == WagleConfig(rho=0.1, include_norms=False, batch_size=2)
    with pytest.raises(typer.BadParameter, match="--guard-seed need --guard-tau"):
        unlearn_attribution_kwargs(guard_seed=1)
    unierase_help = run("unierase", "--help").output
    assert all(f.name in unierase_help for f in fields(UniEraseOptions))  # -u key=value, each listed


# ---------------------------------------------------------------------------------------------
# A mistyped model path is a missing directory, at once


def test_mistyped_model_path_is_one_line_and_quick(tmp_path, data, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    start = time.time()
    # "runs/model" is shaped like a hub id (org/name) but runs/ exists here: a path with a typo
    for spec in ("runs/targt/model", "runs/model", "./model", str(tmp_path / "nope" / "model")):
        line = one_error_line(run("unlearn", "--model", spec, "--forget", data, "--out", tmp_path / "run"))
        assert spec in line and "no such file or directory" in line
    assert time.time() - start < 20 and not (tmp_path / "run").exists()
    line = one_error_line(run("finetune", data, "--model", tiny_model_dir.parent, "--out", tmp_path / "ft"))
    assert "no config.json" in line


def test_hub_id_out_of_reach_is_one_clear_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.time()
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        load_tokenizer("some-org/some-model-that-is-not-cached")
    assert time.time() - start < 5
    check_model_spec("some-org/some-model")  # hub-shaped: not refused without trying


# ---------------------------------------------------------------------------------------------
# Malformed audit records


@pytest.mark.parametrize("content,expected", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not an audit record"),
    (b"[]", "not an audit record"),
    (b'{"format": "obliviate.audit/1", "head": "x", "entries": [1]}', "entry 0 must be an object"),
    (b'{"format": "obliviate.audit/1", "head": "x", "entries": [{"seq": 0, "type": "file", "prev": "a", '
     b'"hash": "b", "path": null, "sha256": null}]}', "has no 'role'"),
    (b'{"format": "obliviate.audit/1", "head": "x", "entries": [{"seq": "0", "type": "x", "prev": "a", '
     b'"hash": "b"}]}', "'seq' must be an integer"),
    (b'{"format": "obliviate.audit/1", "entries": []}', "'head' must be text"),
])
def test_malformed_audit_record_is_exit_2(tmp_path, content, expected):
    record = tmp_path / "audit.json"
    record.write_bytes(content)
    line = one_error_line(run("verify", record))
    assert expected in line and str(record) in line


# ---------------------------------------------------------------------------------------------
# Data errors name file, line and problem, whatever the format or encoding


@pytest.mark.parametrize("name,content,where,problem", [
    ("d.jsonl", b'{"question": "q", "answer": "a"}\n\xff\xfe\n', "line 2", "not UTF-8"),
    ("d.jsonl", b'{"question": "q", "answer": "a"}\r\n[1]\r\n', "line 2", "row must be an object"),
    ("d.jsonl", b'{"question": "q", "answer": "\\ud800"}\n', "line 1", "lone surrogate"),
    ("d.jsonl", b'{"question": "q", "answer": ' + b"[" * 100000 + b"\n", "line 1", "invalid JSON"),
    ("d.json", b'[\n {"question": "q", "answer": "a"},\n\n {"question": 3, "answer": "a"}\n]', "line 4 (row 2)",
     "'question' must be text"),
    ("d.json", b'{"question": "q"}', "d.json", "holds dict"),
    ("d.json", b'"text"', "d.json", "holds str"),
    ("d.json", b'\n\n[{"question": "q", "answer": "a"} {"x": 1}]', "line 3", "expected ',' or ']'"),
    ("d.json", b'{"a": 1}\n\xff', "line 2", "not UTF-8"),
    ("d.csv", b"question,answer\nq,a\nq2,\xff\n", "line 3", "not UTF-8"),
    ("d.csv", b"question,answer\nq,a,extra\n", "line 2", "3 fields, the header 2"),
    ("d.csv", b'question,answer\nq,"a\n', "line 2", "quote opened in this row is never closed"),
    ("d.jsonl", b"", "d.jsonl", "the file is empty"),
    ("d.csv", b"", "d.csv", "the file is empty"),
])
def test_data_errors_are_located(tmp_path, name, content, where, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_qa_file(path)
    assert str(err.value).startswith(str(path)) and where in str(err.value) and problem in str(err.value)


def test_corrupt_parquet_is_located(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "d.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match=r"d.parquet: not a readable Parquet file"):
        load_qa_file(tmp_path / "d.parquet")


def test_json_lines_saved_as_json_are_read(tmp_path):
    path = tmp_path / "forget10.json"  # TOFU's hub files are JSON Lines named .json
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert [e.question for e in load_qa_file(path)] == [r["question"] for r in ROWS]


def test_text_corpus_errors_are_located(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": ' + b"[" * 100000 + b'\n{"text": "\\udc00"}\n')
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        load_text_corpus(path)
    assert load_text_corpus(path, skip_bad=True).skipped == 2
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="the file is empty"):
        load_text_corpus(tmp_path / "empty.txt")


def test_missing_local_data_is_never_tried_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # so data/bench is a path with a typo, not the hub id data/bench
    start = time.time()
    for spec in ("data/bench:forget", "./bench:forget", f"{tmp_path}/bench:forget", "x.jsonl"):
        with pytest.raises(DataError, match="no such file or directory"):
            load_qa(spec)
    assert time.time() - start < 5


def test_skip_bad_says_what_it_skipped(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "a"}\n{oops\n{"question": "q"}\n\xff\n{oops too\n')
    ds = load_qa_file(path, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == 4 and [e.line for e in ds.skipped_problems] == [2, 3, 4, 5]
    assert "skipped 4 bad rows" in caplog.text and "invalid JSON" in caplog.text and "lines 2, 5" in caplog.text
    assert "missing key 'answer' (line 3)" in caplog.text and "not UTF-8" in caplog.text
    # and on stderr in a plain process, where nothing configured logging
    code = f"from obliviate.data.qa import load_qa_file; load_qa_file({str(path)!r}, skip_bad=True)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "skipped 4 bad rows" in proc.stderr and "missing key 'answer'" in proc.stderr
