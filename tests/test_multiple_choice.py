"""Multiple-choice evaluation: loading WMDP/MMLU-format rows (files, hub, errors located), the scorer
against a slow reference (one full forward per choice, log-softmax summed by hand) on a tiny model,
the pure accuracy metrics, score-once sharing, the eval.json form, `obliviate evaluate --mc` end to
end and its section in the report."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import obliviate.data.multiple_choice as mcdata
from obliviate.cli.main import app
from obliviate.data.chat import ChatFormat
from obliviate.data.multiple_choice import MCItem, MCSet, load_mc, load_mc_sets, parse_mc_option
from obliviate.data.qa import DataError
from obliviate.evaluation import multiple_choice as mc
from obliviate.evaluation.logprobs import score_pairs
from obliviate.evaluation.results import EvalResult
from obliviate.evaluation.scores import ModelScores
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.reporting.report import write_report

DATA = Path(__file__).parent / "data" / "mc_tiny.jsonl"
runner = CliRunner()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- loading ----------------------------------------------------------------------------------------


def test_load_jsonl_answers_as_index_letter_or_digit(tmp_path):
    path = write_jsonl(tmp_path / "wmdp.jsonl", [
        {"question": "Q1?", "choices": ["a", "b", "c"], "answer": 2, "subject": "bio"},
        {"question": "Q2?", "choices": ["a", "b"], "answer": "b"},
        "",  # blank lines are skipped, line numbers stay the editor's
        {"question": "Q3?", "choices": ["a", "b", "c", "d"], "answer": "3"}])
    s = load_mc(path)
    assert s.name == "wmdp" and s.source == str(path) and len(s) == 3
    assert [i.answer for i in s] == [2, 1, 3]
    assert s[0].meta == {"subject": "bio", "row": 1} and s[2].meta == {"row": 4}
    assert load_mc(path, "bio").name == "bio"


def test_load_csv_letter_columns_and_json_choices(tmp_path):
    csv = tmp_path / "mmlu.csv"
    csv.write_text('question,A,B,C,D,answer,subject\n"What, exactly?",one,two,three,four,C,math\n'
                   "Next?,x,y,z,w,0,math\n")
    s = load_mc(csv)
    assert [(i.question, i.choices, i.answer) for i in s] == [
        ("What, exactly?", ["one", "two", "three", "four"], 2), ("Next?", ["x", "y", "z", "w"], 0)]
    assert s[0].meta == {"subject": "math", "row": 2}
    listed = tmp_path / "listed.csv"
    listed.write_text('question,choices,answer\nQ?,"[""yes"", ""no""]",B\n')
    assert load_mc(listed)[0].choices == ["yes", "no"] and load_mc(listed)[0].answer == 1


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"question": ["Q?"], "choices": [["a", "b", "c", "d"]], "answer": [3]}), path)
    s = load_mc(path)
    assert (s[0].choices, s[0].answer, s[0].meta) == (["a", "b", "c", "d"], 3, {"row": 1})


@pytest.mark.parametrize("row, problem", [
    ({"choices": ["a", "b"], "answer": 0}, "missing key 'question'"),
    ({"question": "Q?", "answer": 0}, "missing key 'choices'"),
    ({"question": "Q?", "choices": ["a"], "answer": 0}, "at least 2 choices"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": 2}, "out of range: the row has 2 choices (0-1 or A-B)"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": "E"}, "out of range"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": "maybe"}, "neither a choice index nor a letter"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": 1.0}, "got float"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": True}, "got bool"),
    ({"question": "Q?", "choices": ["a", "b"]}, "missing key 'answer'"),
    ({"question": "Q?", "choices": ["a", " "], "answer": 0}, "choice B is empty"),
    ({"question": "Q?", "choices": ["a", 3], "answer": 0}, "choice B must be text"),
    ({"question": "Q?", "choices": "a", "answer": 0}, "not a JSON list"),
    ({"question": "Q?", "choices": ["a", "b"], "A": "a", "answer": 0}, "not both"),
    ({"question": " ", "choices": ["a", "b"], "answer": 0}, "'question' is empty"),
    ([1, 2], "row must be an object"),
])
def test_bad_rows_are_located(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Fine?", "choices": ["a", "b"], "answer": 0}, row])
    with pytest.raises(DataError) as err:
        load_mc(path)
    assert err.value.line == 2 and problem in str(err.value) and str(path) in str(err.value)
    kept = load_mc(path, skip_bad=True)
    assert len(kept) == 1 and kept.skipped == 1


@pytest.mark.parametrize("spec, problem", [
    ("missing/none.jsonl", "no such file or directory"),
    ("{tmp}", "a directory, not a file"),
    ("{tmp}/empty.jsonl", "no questions (the file is empty)"),
    ("{tmp}/broken.jsonl", "invalid JSON"),
    ("plain", "not a file or a hub dataset id"),
])
def test_bad_specs(tmp_path, spec, problem):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"question": \n')
    with pytest.raises(DataError, match=re.escape(problem)):
        load_mc(spec.format(tmp=tmp_path))


def test_option_names_and_duplicates(tmp_path):
    assert parse_mc_option("wmdp_bio=data/x.jsonl") == ("wmdp_bio", "data/x.jsonl")
    assert parse_mc_option("cais/wmdp:wmdp-bio") == (None, "cais/wmdp:wmdp-bio")
    odd = tmp_path / "a=b.jsonl"  # a file whose name holds '=' is a file, not NAME=SPEC
    write_jsonl(odd, [{"question": "Q?", "choices": ["a", "b"], "answer": 0}])
    assert parse_mc_option(str(odd)) == (None, str(odd))
    with pytest.raises(DataError, match="NAME=FILE_OR_HUB_ID"):
        parse_mc_option("=x.jsonl")
    assert [s.name for s in load_mc_sets([f"one={DATA}", str(DATA)])] == ["one", "mc_tiny"]
    with pytest.raises(DataError, match="a second multiple-choice set named 'mc_tiny'"):
        load_mc_sets([str(DATA), f"mc_tiny={DATA}"])
    with pytest.raises(Exception, match="not a plain name"):
        load_mc(DATA, "../escape")


def test_hub_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(mcdata, "hub_unreachable", lambda: "HF_HUB_OFFLINE is set")
    with pytest.raises(DataError) as err:
        load_mc("cais/wmdp:wmdp-bio")
    text = str(err.value)
    assert "\n" not in text and "out of reach (HF_HUB_OFFLINE is set)" in text and "pass a local file" in text


def test_hub_files_of_a_config_and_split(monkeypatch, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    listing = ["README.md", "wmdp-bio/test-00000-of-00001.parquet", "wmdp-chem/test-00000-of-00001.parquet",
               "wmdp-bio/dev-00000-of-00001.parquet"]
    local = tmp_path / "bio.parquet"
    pq.write_table(pa.table({"question": ["Q?", "R?"], "choices": [["a", "b"], ["c", "d"]], "answer": [1, 0]}), local)
    fetched = []
    monkeypatch.setattr(mcdata, "hub_unreachable", lambda: None)
    monkeypatch.setattr(mcdata.huggingface_hub, "list_repo_files", lambda repo, repo_type: listing)
    monkeypatch.setattr(mcdata.huggingface_hub, "hf_hub_download",
                        lambda repo, f, repo_type: fetched.append((repo, f)) or str(local))
    s = load_mc("cais/wmdp:wmdp-bio")
    assert fetched == [("cais/wmdp", "wmdp-bio/test-00000-of-00001.parquet")]
    assert (s.name, s.source, len(s), s[0].answer) == ("wmdp-bio", "cais/wmdp:wmdp-bio", 2, 1)
    fetched.clear()
    load_mc("cais/wmdp:wmdp-bio:dev", "dev")
    assert fetched == [("cais/wmdp", "wmdp-bio/dev-00000-of-00001.parquet")]
    with pytest.raises(DataError, match="no files for config 'wmdp-cyber'"):
        load_mc("cais/wmdp:wmdp-cyber")
    with pytest.raises(DataError, match="ORG/NAME:CONFIG"):
        load_mc("cais/wmdp")


# -- the metrics, pure ------------------------------------------------------------------------------


def test_predictions_accuracy_and_normalisation():
    lls = [np.array([-10.0, -12.0]), np.array([-3.0, -3.0, -5.0]), np.array([-8.0, -2.0])]
    chars = [np.array([2.0, 10.0]), np.array([1.0, 1.0, 1.0]), np.array([1.0, 1.0])]
    assert mc.predict(lls).tolist() == [0, 0, 1]  # ties: the first choice
    assert mc.predict(lls, chars).tolist() == [1, 0, 1]  # -5 vs -1.2 per character
    assert mc.accuracy(mc.predict(lls), [1, 0, 1]) == pytest.approx(2 / 3)
    assert mc.char_lengths(["é", "ab"]).tolist() == [1, 2] and mc.byte_lengths(["é", "ab"]).tolist() == [2, 2]
    items = [MCItem("q", ["a", "b"], 0), MCItem("q", ["a", "b", "c", "d"], 0)]
    assert mc.chance_accuracy(items) == pytest.approx((1 / 2 + 1 / 4) / 2)
    with pytest.raises(ValueError, match="no questions"):
        mc.accuracy(np.array([]), [])


def test_result_from_loglikelihoods_and_non_finite():
    s = MCSet("t", [MCItem("q1", ["aa", "b"], 1), MCItem("q2", ["é", "e", "x"], 0)], "src")
    r = mc.mc_result(s, [np.array([-4.0, -3.0]), np.array([-2.0, -1.5, -9.0])])
    # q1: -4/2 chars beats -3/1; q2: "é" is 1 character but 2 bytes, -2/2 beats -1.5/1 by bytes only
    assert r.per_sample["predicted"] == [1, 1] and r.per_sample["predicted_norm"] == [0, 1]
    assert r.per_sample["predicted_bytes"] == [0, 0]
    assert (r.accuracy, r.accuracy_norm, r.accuracy_bytes) == (0.5, 0.0, 0.5)
    assert r.per_sample["correct"] == [True, False] and r.per_sample["choice_bytes"] == [[2, 1], [2, 1, 1]]
    with pytest.raises(mc.NonFiniteScores, match="not finite"):
        mc.mc_result(s, [np.array([-4.0, np.nan]), np.array([-2.0, -1.5, -9.0])])
    with pytest.raises(ValueError, match="2 log-likelihoods for 3 choices"):
        mc.mc_result(s, [np.array([-4.0, -3.0]), np.array([-2.0, -1.5])])


# -- the scorer on a tiny model, against a slow reference --------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


@torch.no_grad()
def reference_loglikelihood(model, fmt: ChatFormat, prompt: str, choice: str) -> float:
    """One full forward of prompt + choice tokens (no end-of-turn), log-softmax summed over the choice."""
    prompt_ids = fmt.prompt_ids(prompt)
    choice_ids = fmt.tokenizer(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + choice_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(prompt_ids) + k - 1, t]) for k, t in enumerate(choice_ids))


@pytest.mark.parametrize("list_choices", [False, True])
def test_scorer_matches_slow_reference(tiny, list_choices):
    model, tok = tiny
    fmt = ChatFormat(tok)  # scored_tokens="labels": the scorer must still leave the end-of-turn out
    s = load_mc(DATA)
    r = mc.evaluate_mc(model, fmt, s, batch_size=3, list_choices=list_choices)
    ref = [[reference_loglikelihood(model, fmt, mc.mc_prompt(item, list_choices), c) for c in item.choices]
           for item in s]
    for got, want in zip(r.per_sample["choice_logprob"], ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    answers = [item.answer for item in s]
    pred = [int(np.argmax(row)) for row in ref]
    pred_norm = [int(np.argmax(np.array(row) / [len(c) for c in item.choices])) for row, item in zip(ref, s)]
    assert r.per_sample["predicted"] == pred and r.per_sample["predicted_norm"] == pred_norm
    assert r.accuracy == pytest.approx(np.mean(np.array(pred) == answers))
    assert r.accuracy_norm == pytest.approx(np.mean(np.array(pred_norm) == answers))
    assert r.n == len(s) and r.prompt == ("question+choices" if list_choices else "question")
    assert all(len(v) == len(s) for v in r.per_sample.values())
    if list_choices:
        assert mc.mc_prompt(s[4], True).endswith("\nA. Temperature\nB. Pressure\nC. Mass")


def test_each_pair_is_scored_once_and_shared(tiny):
    model, tok = tiny
    fmt = ChatFormat(tok)
    calls = []

    def counting(model, fmt, pairs, batch_size=32, progress=None, distribution=True):
        calls.append(len(pairs))
        assert fmt.scored_tokens == "answer"
        return score_pairs(model, fmt, pairs, batch_size=batch_size, distribution=distribution)

    full = load_mc(DATA)
    half = MCSet("half", full.items[:3], "half")
    scores = ModelScores.empty(mc.mc_format(fmt))
    first = mc.evaluate_mc(model, fmt, full, scores, score=counting)
    again = mc.evaluate_mc(model, fmt, half, scores, score=counting)
    n_pairs = len({(i.question, c) for i in full for c in i.choices})
    assert calls == [n_pairs] and scores.scored == n_pairs  # the second set was all held already
    assert again.per_sample["choice_logprob"] == first.per_sample["choice_logprob"][:3]
    with pytest.raises(ValueError, match="prompt layout"):  # TOFU scores (answer + end-of-turn) never mix in
        mc.evaluate_mc(model, fmt, full, ModelScores.empty(fmt))
    assert mc.mc_format(replace(fmt, scored_tokens="answer")).scored_tokens == "answer"


def test_too_long_and_empty_sets_are_located(tiny):
    model, tok = tiny
    s = MCSet("long", [MCItem("Q?", ["a", "b"], 0, {"row": 1}), MCItem("Q?", ["a", "x" * 600], 0, {"row": 7})],
              "long.jsonl")
    with pytest.raises(DataError, match=r"long.jsonl, line 7: choice B: prompt \+ answer is"):
        mc.evaluate_mc(model, ChatFormat(tok), s)
    with pytest.raises(DataError, match="is empty"):
        mc.evaluate_mc(model, ChatFormat(tok), MCSet("none", [], "none.jsonl"))


def test_eval_json_round_trip(tiny):
    model, tok = tiny
    r = mc.evaluate_mc(model, ChatFormat(tok), load_mc(DATA))
    ev = EvalResult(model="m", sets={}, forget_quality=None, model_utility=None, seconds=1.0,
                    multiple_choice={"tiny": r})
    data = json.loads(json.dumps(ev.to_json()))
    assert list(data) == ["model", "sets", "forget_quality", "model_utility", "seconds", "multiple_choice"]
    back = EvalResult.from_json(data)
    assert back.multiple_choice["tiny"] == r and back.to_json() == data
    assert "multiple_choice" not in EvalResult("m", {}, None, None, 1.0).to_json()  # files without MC: unchanged


# -- the command line -------------------------------------------------------------------------------


def run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def test_evaluate_mc_end_to_end(tmp_path, tiny, tiny_model_dir, small_bench):
    csv = tmp_path / "csvset.csv"
    csv.write_text("question,A,B,C,answer\nWhat is ice?,Frozen water,Hot air,Sand,A\n"
                   "What is steam?,Sand,Water vapour,Rock,B\n")
    out = tmp_path / "run"
    res = run("evaluate", "--model", tiny_model_dir, "--benchmark", small_bench, "--out", out, "--label", "target",
              "--max-new-tokens", "4", "--batch-size", "8", "--no-progress", "--mc", f"tiny={DATA}", "--mc", csv)
    assert res.exit_code == 0, res.output
    ev = json.loads((out / "eval" / "target.json").read_text())
    assert list(ev["multiple_choice"]) == ["tiny", "csvset"]
    model, tok = tiny
    direct = mc.evaluate_mc(model, ChatFormat(tok), load_mc(DATA, "tiny")).to_json()
    got = ev["multiple_choice"]["tiny"]
    np.testing.assert_allclose(np.concatenate(got["per_sample"]["choice_logprob"]),
                               np.concatenate(direct["per_sample"]["choice_logprob"]), atol=1e-4)
    assert got["accuracy"] == pytest.approx(np.mean(got["per_sample"]["correct"]))
    csv_result = ev["multiple_choice"]["csvset"]
    assert csv_result["n"] == 2 and csv_result["chance"] == pytest.approx(1 / 3)
    assert "mc_tiny_accuracy" in res.output and "mc_csvset_accuracy_norm" in res.output
    assert "forget" in ev["sets"]  # the TOFU sets are evaluated as before

    # the report's multiple-choice section
    (out / "config.yaml").write_text("command: evaluate\nmodel: tiny\n")
    rep = write_report([out], tmp_path / "report")
    md, html = rep.markdown.read_text(), rep.html.read_text()
    assert "**Multiple choice**" in md and "<h3>Multiple choice</h3>" in html
    acc = got["accuracy"]
    assert any(line.startswith("| tiny | accuracy |") and f"{acc:.4f}" in line for line in md.splitlines()), md


def test_evaluate_mc_errors_are_one_line_before_loading(tmp_path, tiny_model_dir, small_bench):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q?", "choices": ["a", "b"], "answer": 5}])
    for mc_arg, problem in ((bad, "bad.jsonl, line 1: 'answer' 5 is out of range"),
                            (tmp_path / "none.jsonl", "no such file or directory"),
                            ("=x", "NAME=FILE_OR_HUB_ID")):
        res = run("evaluate", "--model", tiny_model_dir, "--benchmark", small_bench, "--out", tmp_path / "r",
                  "--mc", mc_arg)
        assert res.exit_code == 2, res.output
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0], res.stderr
    assert not (tmp_path / "r" / "eval").exists()


def test_help_lists_the_options():
    text = run("evaluate", "--help").output
    for flag in ("--mc", "--mc-list-choices", "--lm-eval", "--lm-eval-limit", "--lm-eval-include"):
        assert flag in text
