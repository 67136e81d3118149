"""The lm-evaluation-harness bridge, offline, on a local multiple-choice task (a YAML written here over
tests/data/mc_tiny.jsonl) and the tiny model: lm-eval's per-choice log-likelihoods against a slow
reference, its acc / acc_norm against this package's metric functions, the loaded model wrapped (not
reloaded), clear one-line errors, and `obliviate evaluate --lm-eval` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install -e '.[lm_eval]'")

import obliviate.evaluation.lm_eval_bridge as bridge  # noqa: E402
from obliviate.cli.main import app  # noqa: E402
from obliviate.data.multiple_choice import load_mc  # noqa: E402
from obliviate.evaluation import multiple_choice as mc  # noqa: E402
from obliviate.models.loading import load_model, load_tokenizer  # noqa: E402

DATA = Path(__file__).parent / "data" / "mc_tiny.jsonl"
TASK = "obliviate_tiny_mc"
runner = CliRunner()


def write_task(folder: Path) -> Path:
    """A local lm-eval multiple-choice task: the question as context, each choice text as continuation."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_mc.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA.resolve()}
  cache_dir: {folder / "hf_datasets_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def plan(tasks_dir):
    return bridge.plan_lm_eval(TASK, include_path=tasks_dir)


@pytest.fixture(scope="module")
def lm_run(tiny, plan):
    model, tok = tiny
    return bridge.run_lm_eval(model, tok, plan, batch_size=4)


@torch.no_grad()
def reference_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """One full forward of context + continuation (lm-eval's layout without a chat template: the
    continuation is " " + choice), log-softmax summed over the continuation's tokens."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
    return sum(float(logp[len(ctx) + k - 1, t]) for k, t in enumerate(cont))


def test_local_task_matches_slow_reference_and_our_metrics(tiny, lm_run):
    model, tok = tiny
    items = load_mc(DATA)
    rows = sorted(lm_run.samples, key=lambda r: r["doc_id"])
    assert [r["task"] for r in rows] == [TASK] * len(items) and [r["target"] for r in rows] == [i.answer for i in items]
    lls = []
    for row, item in zip(rows, items):
        want = [reference_loglikelihood(model, tok, item.question, " " + c) for c in item.choices]
        np.testing.assert_allclose(row["loglikelihood"], want, rtol=1e-5, atol=1e-4)
        lls.append(np.array(row["loglikelihood"]))
    # lm-eval's acc and acc_norm are this package's accuracy and per-character normalised accuracy
    answers = [i.answer for i in items]
    acc = mc.accuracy(mc.predict(lls), answers)
    acc_norm = mc.accuracy(mc.predict(lls, [mc.char_lengths(i.choices) for i in items]), answers)
    table = bridge.metric_table(lm_run.raw)
    assert table[TASK]["acc"] == pytest.approx(acc) and table[TASK]["acc_norm"] == pytest.approx(acc_norm)
    assert [r["acc"] for r in rows] == [float(p == a) for p, a in zip(mc.predict(lls), answers)]
    summary = bridge.summary(lm_run)
    assert summary["tasks"] == [TASK] and summary["n_samples"] == {TASK: len(items)}
    assert summary["lm_eval_version"] == "0.4.13" and set(summary["results"][TASK]) >= {"acc", "acc_stderr"}


def test_the_loaded_model_is_wrapped_not_reloaded(tiny):
    model, tok = tiny
    lm = bridge.make_lm(model, tok, batch_size=2)
    assert lm.model is model and lm.tokenizer is tok


def test_saved_file_is_plain_json(tmp_path, lm_run):
    path = bridge.save_lm_eval(lm_run, tmp_path / "lm.json")
    data = json.loads(path.read_text())
    assert set(data) == {"summary", "lm_eval", "samples"} and len(data["samples"]) == len(load_mc(DATA))
    assert data["lm_eval"]["results"][TASK]["acc,none"] == data["summary"]["results"][TASK]["acc"]


def test_metric_table_and_summary_row():
    raw = {"results": {"mmlu": {"alias": "mmlu", "acc,none": 0.5, "acc_stderr,none": 0.01},
                       "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"}}}
    table = bridge.metric_table(raw)
    assert table == {"mmlu": {"acc": 0.5, "acc_stderr": 0.01},
                     "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": None}}
    assert bridge.lm_eval_summary_row({"tasks": ["mmlu"], "results": table}) == {"lm_eval_mmlu_acc": 0.5}
    assert bridge.parse_tasks(["mmlu, wmdp_bio", "mmlu"]) == ["mmlu", "wmdp_bio"]


def test_errors_are_one_line(plan, tasks_dir, monkeypatch):
    with pytest.raises(bridge.LMEvalError, match=r"no task 'obliviate_tiny_mcc' \(did you mean obliviate_tiny_mc"):
        bridge.check_tasks(plan.manager, ["obliviate_tiny_mcc"])
    with pytest.raises(bridge.LMEvalError, match="at least 1"):
        bridge.plan_lm_eval(TASK, limit=0, include_path=tasks_dir)
    with pytest.raises(bridge.LMEvalError, match="not a directory"):
        bridge.task_manager(tasks_dir / "missing")
    with pytest.raises(bridge.LMEvalError, match="task names separated by commas"):
        bridge.parse_tasks("mmlu,,x")
    real = bridge.importlib.util.find_spec
    monkeypatch.setattr(bridge.importlib.util, "find_spec", lambda name: None if name == "lm_eval" else real(name))
    with pytest.raises(bridge.LMEvalError, match=r"pip install 'lm-eval==0.4.13'") as err:
        bridge.plan_lm_eval("mmlu")
    assert "\n" not in str(err.value)


def run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def test_evaluate_lm_eval_end_to_end(tmp_path, tasks_dir, plan, tiny_model_dir, small_bench, monkeypatch):
    import transformers

    # lm-eval's task index takes seconds to build: the command reuses the one built for this include folder
    monkeypatch.setattr(bridge, "task_manager", lambda include_path=None: plan.manager)
    loads = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(a) or real(*a, **k))
    out = tmp_path / "run"
    res = run("evaluate", "--model", tiny_model_dir, "--benchmark", small_bench, "--out", out, "--label", "target",
              "--max-new-tokens", "2", "--no-progress", "--lm-eval", TASK, "--lm-eval-include", tasks_dir,
              "--lm-eval-limit", "4")
    assert res.exit_code == 0, res.output
    assert len(loads) == 1  # the model is loaded once, for TOFU and lm-eval alike
    ev = json.loads((out / "eval" / "target.json").read_text())
    assert ev["lm_eval"]["tasks"] == [TASK] and ev["lm_eval"]["limit"] == 4
    assert ev["lm_eval"]["n_samples"] == {TASK: 4} and ev["lm_eval"]["file"] == "lm_eval/target.json"
    full = json.loads((out / "lm_eval" / "target.json").read_text())
    assert len(full["samples"]) == 4 and full["summary"]["results"] == ev["lm_eval"]["results"]
    assert f"lm_eval_{TASK}_acc" in res.output and "forget" in ev["sets"]

    res = run("evaluate", "--model", tiny_model_dir, "--benchmark", small_bench, "--out", tmp_path / "r2",
              "--lm-eval", "no_such_task_xyz", "--lm-eval-include", tasks_dir)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "no task 'no_such_task_xyz'" in lines[0], res.stderr
    assert len(loads) == 1  # refused before any model was loaded
