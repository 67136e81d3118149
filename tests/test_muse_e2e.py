"""MUSE end to end: the MUSE-layout loader (local and hub), the synthetic MUSE benchmark, VerbMem /
KnowMem / PrivLeak through `obliviate evaluate --muse`, and scalability / sustainability through
`obliviate bench` (Shi et al. 2024, arXiv 2407.06460)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from obliviate.bench import BenchConfig, scale_sizes, sequential_parts
from obliviate.cli.main import app
from obliviate.data.chat import ChatFormat
from obliviate.data.muse import MuseSyntheticConfig, generate_muse, load_muse, write_synthetic_muse
from obliviate.data.qa import DataError
from obliviate.evaluation import muse as muse_eval
from obliviate.evaluation.muse import (
    continue_texts,
    cut_answer,
    document_prompt_ids,
    evaluate_muse,
    knowmem_prompt,
    text_stop_ids,
    verbmem_scores,
)
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.models.tiny import build_tiny_model

SMALL = {"n_forget": 4, "n_retain": 4, "n_holdout": 4}


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Two tiny random models with one tokenizer: the model evaluated and a stand-in retain model."""
    root = tmp_path_factory.mktemp("muse-models")
    return build_tiny_model(root / "a", seed=0), build_tiny_model(root / "b", seed=1)


@pytest.fixture(scope="module")
def small_muse(tmp_path_factory):
    return write_synthetic_muse(tmp_path_factory.mktemp("muse") / "bench", MuseSyntheticConfig(**SMALL))


def one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output, res.output
    return lines[0]


# ---------------------------------------------------------------- the synthetic benchmark


def test_synthetic_muse_is_seeded_consistent_and_loads_back(tmp_path):
    cfg = MuseSyntheticConfig(**SMALL, seed=3)
    a, b = write_synthetic_muse(tmp_path / "a", cfg), write_synthetic_muse(tmp_path / "b", cfg)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jsonl"))
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert generate_muse(MuseSyntheticConfig(**SMALL, seed=4))["forget"] != generate_muse(cfg)["forget"]

    bench = load_muse(a)
    splits = generate_muse(cfg)
    forget, retain, holdout = (bench.texts(r).docs for r in ("forget", "retain", "holdout"))
    assert (len(forget), len(retain), len(holdout)) == (4, 4, 4)
    # VerbMem: the prompt and its continuation are one forget document, cut at a sentence.
    vm = bench.verbmem()
    assert [p + " " + c for p, c in zip(vm.prompts, vm.continuations)] == forget
    # KnowMem answers are facts stated in the corpus they are about; few-shot people are in no corpus.
    for role, corpus in (("knowmem_forget", forget), ("knowmem_retain", retain)):
        qa = bench.qa(role)
        assert len(qa) == 4 * cfg.qa_per_doc
        assert all(any(e.answer in doc and e.meta["person"] in doc for doc in corpus) for e in qa)
    people = [{e.meta["person"] for e in bench.qa(r)} for r in ("knowmem_forget_icl", "knowmem_retain_icl")]
    everything = " ".join(forget + retain + holdout)
    assert all(len(p) == cfg.icl_shots and not any(name in everything for name in p) for p in people)
    assert bench.texts("privleak_forget").docs == forget and bench.texts("privleak_holdout").docs == holdout
    assert [e.question for e in bench.qa("knowmem_forget")] == [e.question for e in splits["knowmem_forget"]]
    with pytest.raises(FileExistsError):
        write_synthetic_muse(a, cfg)
    with pytest.raises(ValueError, match="verbmem_prefix_facts"):
        MuseSyntheticConfig(facts_per_doc=3, verbmem_prefix_facts=3)


# ---------------------------------------------------------------- VerbMem / KnowMem / PrivLeak by hand


def _write_hand_made(root):
    """A MUSE directory written by hand, in the file kinds the layout allows."""
    (root / "verbmem").mkdir(parents=True)
    (root / "knowmem").mkdir()
    (root / "privleak").mkdir()
    (root / "verbmem" / "forget.json").write_text(json.dumps([
        {"prompt": "Alpha beta", "gt": "gamma delta epsilon"},
        {"prompt": "One two", "gt": "three four"}]))
    (root / "knowmem" / "forget_qa.jsonl").write_text(
        '{"question": "Q1?", "answer": "red apple"}\n{"question": "Q2?", "answer": "blue sky today"}\n')
    (root / "knowmem" / "forget_qa_icl.jsonl").write_text('{"question": "S?", "answer": "shot"}\n')
    (root / "knowmem" / "retain_qa.csv").write_text("question,answer\nR1?,green leaf\n")
    (root / "privleak" / "forget.txt").write_text(
        "The harbour lights of Ashford were lit at dusk.\nA quiet orchard grew behind the mill.\n"
        "Seven lanterns hung over the old bridge.\n")
    (root / "privleak" / "holdout.jsonl").write_text(
        '{"text": "Nobody remembers the name of the ferry."}\n{"text": "Snow fell on the northern pass."}\n')
    return root


def _min_k_reference(model, tokenizer, text: str, k: float = 0.4) -> float:
    """Min-K% of one document, the slow way: one unbatched forward pass, sort, average."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    token_lp = sorted(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))
    n = max(1, math.floor(k * len(token_lp)))
    return sum(token_lp[:n]) / n


def test_verbmem_knowmem_privleak_against_hand_computation(tmp_path, tiny_pair, monkeypatch):
    bench = load_muse(_write_hand_made(tmp_path / "hand"))
    tokenizer, model = load_tokenizer(str(tiny_pair[0])), load_model(str(tiny_pair[0]))
    # The model's greedy outputs, by exact prompt: a prompt laid out otherwise is a KeyError.
    outputs = {
        "Alpha beta": " gamma delta zeta",  # LCS 2 of 3 and 3 tokens: F1 = 2/3
        "One two": " nothing here",  # F1 = 0
        knowmem_prompt("Q1?", [("S?", "shot")]): " red apple\n\nQuestion: Q9?",  # cut: recall 2/2
        knowmem_prompt("Q2?", [("S?", "shot")]): " blue sea",  # recall 1/3
        "Question: R1?\nAnswer: ": "green Question: x",  # no retain shots; cut: recall 1/2
    }
    monkeypatch.setattr(muse_eval, "continue_texts", lambda m, t, prompts, *a, **kw: [outputs[p] for p in prompts])
    result = evaluate_muse(model, tokenizer, bench, ChatFormat(tokenizer, system_prompt=None), retain_auc=0.25,
                           label="u")
    assert knowmem_prompt("Q1?", [("S?", "shot")]) == "Question: S?\nAnswer: shot\n\nQuestion: Q1?\nAnswer: "
    assert cut_answer(" red apple\n\nQuestion: Q9?") == " red apple"
    assert result["verbmem_forget"] == pytest.approx((2 / 3 + 0) / 2)
    assert result["per_sample"]["verbmem"]["rouge_f1"] == pytest.approx([2 / 3, 0.0])
    assert result["knowmem_forget"] == pytest.approx((1 + 1 / 3) / 2)
    assert result["knowmem_retain"] == pytest.approx(0.5)
    assert result["per_sample"]["knowmem_forget"]["generation"] == [" red apple", " blue sea"]
    assert result["settings"]["knowmem_shots"] == {"forget": 1, "retain": 0}

    # PrivLeak: Min-K% 40 per text against the slow reference, the AUC by counting pairs, MUSE's formula.
    forget = bench.texts("privleak_forget").docs
    holdout = bench.texts("privleak_holdout").docs
    ref_f = [_min_k_reference(model, tokenizer, t) for t in forget]
    ref_h = [_min_k_reference(model, tokenizer, t) for t in holdout]
    assert result["per_sample"]["privleak"]["forget_min_k"] == pytest.approx(ref_f, abs=1e-5)
    assert result["per_sample"]["privleak"]["holdout_min_k"] == pytest.approx(ref_h, abs=1e-5)
    pairs = [(f > h) + 0.5 * (f == h) for f in ref_f for h in ref_h]
    auc = sum(pairs) / len(pairs)
    assert result["privleak_auc"] == pytest.approx(auc)
    assert result["privleak"] == pytest.approx(((1 - auc) - (1 - 0.25)) / (1 - 0.25) * 100)
    assert result["note"] is None

    no_retain = evaluate_muse(model, tokenizer, bench, label="u")
    assert no_retain["privleak"] is None and "--retain-model" in no_retain["note"]
    assert no_retain["privleak_auc"] == pytest.approx(auc)


def test_muse_prompts_are_laid_out_as_training_documents(tiny_pair):
    tokenizer, model = load_tokenizer(str(tiny_pair[0])), load_model(str(tiny_pair[0]))
    text = "Alpha beta gamma"
    # Training lays a document out as BOS + its tokens (an empty question); prompts start the same way.
    trained = ChatFormat(tokenizer, system_prompt=None).encode("", text).input_ids
    assert document_prompt_ids(tokenizer, text) == trained
    prompts, stops = [text, knowmem_prompt("Q?", [("S?", "shot")])], set(text_stop_ids(tokenizer))
    got = continue_texts(model, tokenizer, prompts, max_new_tokens=5, batch_size=2, as_document=True)
    for prompt, generated in zip(prompts, got):
        ids, new = document_prompt_ids(tokenizer, prompt), []
        with torch.no_grad():
            for _ in range(5):  # unbatched greedy decoding, one full forward pass per token
                new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        assert generated == tokenizer.decode(new[:cut], skip_special_tokens=True)


# ---------------------------------------------------------------- through the CLI


def test_cli_evaluate_muse_on_synthetic_corpus(tmp_path, tiny_pair, small_muse, small_bench):
    runner = CliRunner()
    model, retain_model = tiny_pair
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", "--model", str(model), "--muse", str(small_muse), "--retain-model",
                              str(retain_model), "--benchmark", str(small_bench), "--out", str(out), "--label",
                              "unlearned", "--no-progress", "--max-new-tokens", "8"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "verbmem_forget" in res.output and "privleak" in res.output and "forget_rouge" in res.output
    assert (out / "eval" / "unlearned.json").is_file()  # the TOFU results, beside the MUSE ones
    result = json.loads((out / "muse" / "unlearned.json").read_text())
    for key in ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak_auc", "privleak_auc_retain"):
        assert 0 <= result[key] <= 1 and math.isfinite(result[key]), key
    assert math.isfinite(result["privleak"]) and result["note"] is None
    assert result["retain_model"] == str(retain_model)
    assert result["n"] == {"verbmem": 4, "knowmem_forget": 8, "knowmem_retain": 8, "privleak_forget": 4,
                           "privleak_holdout": 4}
    # The stored per-sample values are those of the stored generations and references.
    vm = result["per_sample"]["verbmem"]
    assert verbmem_scores(vm["generation"], vm["continuation"])["per_sample"] == pytest.approx(vm["rouge_f1"])
    assert np.mean(vm["rouge_f1"]) == pytest.approx(result["verbmem_forget"])

    res = runner.invoke(app, ["evaluate", "--model", str(model), "--muse", str(small_muse), "--out", str(out),
                              "--label", "alone", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    alone = json.loads((out / "muse" / "alone.json").read_text())
    assert alone["privleak"] is None and "retain model" in alone["note"] and "note:" in res.output
    assert alone["privleak_auc"] == pytest.approx(result["privleak_auc"])
    assert not (out / "eval" / "alone.json").exists()  # --muse alone runs no TOFU evaluation


def test_loader_errors_are_one_line(tmp_path, tiny_pair, small_muse, small_bench, monkeypatch):
    runner = CliRunner()
    model = str(tiny_pair[0])

    def evaluate(muse: str, *extra: str):
        return runner.invoke(app, ["evaluate", "--model", model, "--muse", muse, "--out", str(tmp_path / "o"),
                                   "--no-progress", *extra], catch_exceptions=False)

    broken = tmp_path / "broken"
    write_synthetic_muse(broken, MuseSyntheticConfig(**SMALL))
    (broken / "knowmem" / "retain_qa.jsonl").unlink()
    line = one_line_error(evaluate(str(broken)))
    assert "knowmem/retain_qa.jsonl" in line and "retain_qa" in line
    assert not (tmp_path / "o").exists()  # nothing written, no model loaded

    (broken / "knowmem" / "retain_qa.jsonl").write_text('{"question": "Q?", "answer": "A"}\n')
    (broken / "verbmem" / "forget.jsonl").write_text('{"prompt": "a b"}\n')
    line = one_line_error(evaluate(str(broken)))
    assert "verbmem/forget.jsonl, line 1" in line and "missing key 'gt'" in line

    assert "not a MUSE-layout directory" in one_line_error(evaluate(str(small_bench)))
    assert "no such file" in one_line_error(evaluate(str(tmp_path / "nowhere")))
    monkeypatch.setattr("obliviate.data.muse.hub_unreachable", lambda: "HF_HUB_OFFLINE is set")
    line = one_line_error(evaluate("muse-bench/MUSE-News"))
    assert "hub is not reachable" in line and "raw/, verbmem/, knowmem/ and privleak/" in line
    line = one_line_error(runner.invoke(app, ["evaluate", "--model", model, "--out", str(tmp_path / "o")]))
    assert "--benchmark" in line and "--muse" in line
    line = one_line_error(runner.invoke(app, ["evaluate", "--model", model, "--benchmark", str(small_bench),
                                              "--retain-model", model, "--out", str(tmp_path / "o")]))
    assert "--retain-model" in line


def test_hub_layout_reads_parquet_shards(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = {
        "raw/forget": [{"text": "forgotten article"}], "raw/retain1": [{"text": "kept article"}],
        "raw/retain2": [{"text": "other kept article"}], "raw/holdout": [{"text": "unseen article"}],
        "verbmem/forget": [{"gt": "the end", "prompt": "In the beginning"}],
        "knowmem/forget_qa": [{"answer": "A", "question": "Q?"}],
        "knowmem/retain_qa": [{"answer": "B", "question": "R?"}],
        "privleak/forget": [{"text": "member text"}], "privleak/holdout": [{"text": "non-member text"}],
    }
    names = ["README.md", "verbmem/forget.json"]  # files that are not shards are not read
    for split, data in rows.items():
        name = f"{split}-00000-of-00001.parquet"
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(data), tmp_path / name)
        names.append(name)
    fetched = []
    monkeypatch.setattr("obliviate.data.muse.hub_unreachable", lambda: None)
    monkeypatch.setattr("huggingface_hub.list_repo_files", lambda repo, repo_type: names)

    def download(repo, name, repo_type):
        fetched.append(name)
        return str(tmp_path / name)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    bench = load_muse("muse-bench/MUSE-News")
    assert bench.hub and not fetched  # files are fetched on first use
    assert bench.texts("retain").docs == ["kept article"]  # the hub's retain1
    assert bench.texts("retain2").docs == ["other kept article"]
    vm = bench.verbmem()
    assert (vm.prompts, vm.continuations) == (["In the beginning"], ["the end"])
    assert [e.answer for e in bench.qa("knowmem_retain")] == ["B"]
    assert fetched == ["raw/retain1-00000-of-00001.parquet", "raw/retain2-00000-of-00001.parquet",
                       "verbmem/forget-00000-of-00001.parquet", "knowmem/retain_qa-00000-of-00001.parquet"]
    assert not bench.has("knowmem_forget_icl")
    with pytest.raises(DataError, match="needs the 'knowmem' split 'forget_qa_icl'"):
        bench.qa("knowmem_forget_icl")


# ---------------------------------------------------------------- scalability and sustainability


def test_scale_sizes_and_sequential_parts():
    assert scale_sizes(8, [1, 2, 4]) == {1: 2, 2: 4, 4: 8}
    assert scale_sizes(5, [4, 1]) == {1: 1, 4: 5}
    assert sequential_parts(7, 3) == [(0, 2), (2, 5), (5, 7)]
    assert sequential_parts(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="at least 4 forget documents"):
        scale_sizes(3, [1, 4])
    with pytest.raises(ValueError, match="at least 5 forget documents"):
        sequential_parts(4, 5)


def test_bench_config_muse_options():
    with pytest.raises(ValueError, match="MUSE runs"):
        BenchConfig.from_dict({"benchmark": "x", "scale": [1, 2]})
    with pytest.raises(ValueError, match="needs 'scale'"):
        BenchConfig.from_dict({"muse": "x"})
    with pytest.raises(ValueError, match="positive integers"):
        BenchConfig.from_dict({"muse": "x", "scale": [0, 2]})
    with pytest.raises(ValueError, match="exactly one of"):
        BenchConfig.from_dict({"muse": "x", "synthetic": {}, "sequential": 2})
    with pytest.raises(ValueError, match="muse_synthetic"):
        BenchConfig.from_dict({"muse_synthetic": {"n_forget": 0}, "sequential": 2})
    assert BenchConfig.from_dict({"muse": "x", "sequential": 3}).is_muse


def test_bench_muse_scalability_and_sustainability(tmp_path, tiny_model_dir):
    cfg = {"model": str(tiny_model_dir), "methods": ["ga"], "seeds": [0], "finetune": {"epochs": 1, "lr": 3e-3},
           "unlearn": {"epochs": 1, "lr": 1e-3}, "muse_synthetic": SMALL, "verbmem_max_new_tokens": 12,
           "knowmem_max_new_tokens": 6}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    args = ["bench", str(tmp_path / "bench.yaml"), "--out", str(out), "--scale", "1,2", "--sequential", "2",
            "--no-progress"]
    runner = CliRunner()
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "muse.json").read_text())["rows"]
    assert [(r["method"], r["mode"], r["step"], r["forget_docs"]) for r in rows] == [
        ("retain", "base", 0, 0), ("target", "base", 0, 0), ("ga", "scale", 1, 2), ("ga", "scale", 2, 4),
        ("ga", "sequential", 1, 2), ("ga", "sequential", 2, 4)]
    for r in rows:
        for key in ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak_auc"):
            assert 0 <= r[key] <= 1, (r, key)
        assert r["privleak"] is None if r["method"] == "retain" else math.isfinite(r["privleak"])
    # Scale steps start from the target; sequential requests from the previous request's model.
    config = {c: yaml.safe_load((out / "cells" / c / "config.yaml").read_text())
              for c in ("ga-scale2-s0", "ga-seq1-s0", "ga-seq2-s0")}
    assert config["ga-scale2-s0"]["model"] == config["ga-seq1-s0"]["model"] == str(out / "target-s0" / "model")
    assert config["ga-seq2-s0"]["model"] == str(out / "cells" / "ga-seq1-s0" / "model")
    retain_auc = json.loads((out / "muse" / "retain-s0.json").read_text())["privleak_auc"]
    assert json.loads((out / "cells" / "ga-seq2-s0" / "muse" / "unlearned.json").read_text())[
        "privleak_auc_retain"] == retain_auc
    assert "| ga | sequential | 2 | 0 | 4 |" in (out / "muse.md").read_text()
    assert "<h3>MUSE</h3>" in (out / "report" / "report.html").read_text()
    # A re-run reuses every finished model and result.
    stamp = (out / "cells" / "ga-seq2-s0" / "muse" / "unlearned.json").stat().st_mtime_ns
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "muse.json").read_text())["rows"] == rows
    assert (out / "cells" / "ga-seq2-s0" / "muse" / "unlearned.json").stat().st_mtime_ns == stamp
