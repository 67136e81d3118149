"""The hazardous-knowledge-style synthetic benchmark (data/hazard.py), its command, unlearning and
multiple-choice accuracy on it, and benchmarks/bench_hazard.py --smoke."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from obliviate.cli.main import app
from obliviate.data.hazard import (
    CRYSTALS,
    ENGINES,
    FILES,
    MANIFEST,
    HazardConfig,
    generate_hazard,
    load_hazard,
    mentions,
    write_hazard,
)
from obliviate.data.multiple_choice import load_mc
from obliviate.data.qa import DataError, QADataset
from obliviate.data.sources import as_dataset
from obliviate.data.text import is_text_corpus, load_text_corpus

SMALL = dict(n_covered=2, n_uncovered=3, n_holdout=2, n_retain=2, facts_per_entity=2, docs_per_entity=1,
             background_docs=1, n_choices=2)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_facts(tmp_path):
    a = _files(write_hazard(generate_hazard(HazardConfig(seed=3)), tmp_path / "a"))
    b = _files(write_hazard(generate_hazard(HazardConfig(seed=3)), tmp_path / "b"))
    c = _files(write_hazard(generate_hazard(HazardConfig(seed=4)), tmp_path / "c"))
    assert a == b
    assert set(a) == set(c) == {MANIFEST, "README.md", *FILES.values()}
    assert a["corpora/forget.jsonl"] != c["corpora/forget.jsonl"] and a["mc/retain.jsonl"] != c["mc/retain.jsonl"]


def test_layout_counts_and_questions(tmp_path):
    cfg = HazardConfig()
    bench = load_hazard(write_hazard(generate_hazard(cfg), tmp_path / "h"))
    manifest = json.loads((tmp_path / "h" / MANIFEST).read_text())
    assert manifest["config"]["seed"] == 0 and set(manifest["files"]) == set(FILES)
    trained = cfg.n_covered + cfg.n_uncovered
    # Corpora are plain text the rest of obliviate reads as documents (empty question).
    per_entity = cfg.docs_per_entity + cfg.faq_docs_per_entity
    for name, n_docs in (("forget", trained * per_entity), ("retain", cfg.n_retain * per_entity),
                         ("relearn", cfg.n_covered * cfg.public_docs_per_entity + cfg.background_docs)):
        path = bench.path(f"{name}_corpus")
        assert is_text_corpus(path) and len(load_text_corpus(path)) == n_docs
        assert all(e.question == "" and e.answer for e in as_dataset(path))
    sizes = {"forget": trained, "forget_covered": cfg.n_covered, "forget_uncovered": cfg.n_uncovered,
             "forget_holdout": cfg.n_holdout, "retain": cfg.n_retain}
    values: dict[tuple[str, str, str], set[str]] = {}  # (domain, split, attribute) -> values of its entities
    sets = {name: load_mc(bench.path(f"mc_{name}")) for name in sizes}
    for name, mc in sets.items():
        assert len(mc) == sizes[name] * cfg.facts_per_entity
        for item in mc:
            values.setdefault((item.meta["domain"], item.meta["split"], item.meta["attribute"]), set()).add(
                item.meta["value"])
    for name, mc in sets.items():
        for item in mc:
            meta = item.meta
            assert len(item.choices) == cfg.n_choices == len(set(item.choices))
            assert item.choices[item.answer] == meta["value"]
            assert meta["entity_name"] in item.question
            # distractors: the same attribute's values of other entities of the same split
            assert set(item.choices) <= values[(meta["domain"], meta["split"], meta["attribute"])]
            assert meta["domain"] == ("retain" if name == "retain" else "forget")
            if name.startswith("forget_"):
                assert meta["split"] == name.removeprefix("forget_")
    # each attribute's values are distinct across a domain's entities
    for domain in ("forget", "retain"):
        for attr in {a for (d, _, a) in values if d == domain}:
            per_split = [vals for (d, _, a), vals in values.items() if d == domain and a == attr]
            assert sum(map(len, per_split)) == len(set().union(*per_split))
    assert len(bench.mc("forget")) == len(bench.mc("forget_covered")) + len(bench.mc("forget_uncovered"))
    qa = bench.relearn_qa()
    assert [(e.question, e.answer) for e in qa] == [(i.question, i.meta["value"]) for i in bench.mc("forget_covered")]


def test_relearn_split_separates_covered_from_uncovered_facts(tmp_path):
    for seed in (0, 1, 2):
        data = generate_hazard(HazardConfig(seed=seed))
        relearn = [d["text"] for d in data.corpora["relearn"]]
        forget = [d["text"] for d in data.corpora["forget"]]
        retain = [d["text"] for d in data.corpora["retain"]]
        for split in ("uncovered", "holdout"):
            for item in data.mc[f"forget_{split}"]:
                name, value = item.meta["entity_name"], item.meta["value"]
                # neither the entity nor the fact's value is anywhere in the relearn corpus
                assert not any(mentions(doc, name) or mentions(doc, value) for doc in relearn), (seed, split, name)
                # nor are the distractors: no choice of an uncovered question becomes more familiar
                assert not any(mentions(doc, choice) for doc in relearn for choice in item.choices)
        for item in data.mc["forget_covered"]:  # covered facts are stated in the relearn corpus
            assert any(mentions(d, item.meta["entity_name"]) and mentions(d, item.meta["value"]) for d in relearn)
        for item in data.mc["forget"]:  # every forget question's fact is stated in the forget corpus
            assert any(mentions(d, item.meta["entity_name"]) and mentions(d, item.meta["value"]) for d in forget)
        for domain in data.entities.values():  # no two entities of a domain share a name's head
            assert len({e.name[:4] for e in domain}) == len(domain)
        for item in data.mc["forget_holdout"]:  # holdout entities are in no corpus
            assert not any(mentions(d, item.meta["entity_name"]) for d in forget + retain + relearn)
        for item in data.mc["retain"]:
            assert any(mentions(d, item.meta["entity_name"]) and mentions(d, item.meta["value"]) for d in retain)
            assert not any(mentions(d, item.meta["entity_name"]) for d in forget + relearn)
        for name, mc in data.mc.items():  # the questions asked are never in a corpus (FAQ ones are reworded)
            assert not any(item.question in doc for item in mc for doc in forget + retain + relearn), name


def test_mentions_is_whole_words():
    assert mentions("It takes 40 days.", "40 days") and not mentions("It takes 140 days.", "40 days")


def test_domains_have_enough_values_and_no_shared_names():
    assert not set(CRYSTALS.name_heads) & set(ENGINES.name_heads)
    for domain in (CRYSTALS, ENGINES):
        for attr in domain.attributes:
            assert len(set(attr.values)) == len(attr.values)
            assert "{name}" in attr.question and all("{name}" in s and "{value}" in s for s in attr.statements)


@pytest.mark.parametrize("bad", [dict(n_covered=3), dict(n_choices=1), dict(facts_per_entity=0),
                                 dict(n_uncovered=200), dict(n_holdout="x")])
def test_bad_config_is_one_clear_error(bad):
    with pytest.raises(ValueError, match="HazardConfig"):
        HazardConfig(**bad)


def test_overwrite_rules_and_checksums(tmp_path):
    data = generate_hazard(HazardConfig(**SMALL))
    out = write_hazard(data, tmp_path / "h")
    with pytest.raises(FileExistsError, match="not empty"):
        write_hazard(data, out)
    write_hazard(data, out, overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a hazard benchmark"):
        write_hazard(data, other, overwrite=True)
    (out / "mc" / "retain.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    with pytest.raises(DataError, match="changed since"):
        load_hazard(out).mc("retain")
    with pytest.raises(DataError, match="not a hazard benchmark"):
        load_hazard(other)
    (out / "hazard.json").write_text('{"format": \n')
    with pytest.raises(DataError, match=r"hazard\.json, line 2: invalid JSON"):
        load_hazard(out)


def test_synth_hazard_command(tmp_path):
    runner = CliRunner()
    out = tmp_path / "h"
    result = runner.invoke(app, ["synth-hazard", "--out", str(out), "--seed", "1", "--n-uncovered", "5"])
    assert result.exit_code == 0, result.output
    assert load_hazard(out).manifest["config"]["n_uncovered"] == 5
    again = runner.invoke(app, ["synth-hazard", "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output and "Traceback" not in again.output
    bad = runner.invoke(app, ["synth-hazard", "--out", str(tmp_path / "b"), "--n-holdout", "1"])
    assert bad.exit_code == 2 and "n_holdout" in bad.output
    help_text = runner.invoke(app, ["synth-hazard", "--help"]).output
    for option in ("--out", "--preset", "--n-covered", "--n-uncovered", "--n-holdout", "--n-retain",
                   "--facts-per-entity", "--docs-per-entity", "--faq-docs-per-entity", "--n-choices", "--seed",
                   "--overwrite"):
        assert option in help_text


def test_tiny_model_end_to_end(tmp_path, tiny_model_dir):
    """Finetune on both corpora, unlearn the forget corpus with NPO; MC accuracy is computed and in range,
    and NPO made the forget documents less likely while the retain ones stayed learnt."""
    from obliviate import api
    from obliviate.data.chat import ChatFormat
    from obliviate.evaluation.logprobs import score_pairs
    from obliviate.evaluation.multiple_choice import evaluate_mc
    from obliviate.models.loading import load_model, load_tokenizer

    bench = load_hazard(write_hazard(generate_hazard(HazardConfig(**SMALL)), tmp_path / "h"))
    forget, retain = bench.corpus("forget"), bench.corpus("retain")
    both = QADataset(forget.examples + retain.examples, "both")
    target = api.finetune(str(tiny_model_dir), both, tmp_path / "target",
                          {"max_steps": 12, "lr": 3e-3, "batch_size": 4, "warmup_ratio": 0.0}, progress=False)
    unlearned = api.unlearn(target, forget, retain, tmp_path / "npo", "npo", {"beta": 0.1},
                            {"max_steps": 6, "lr": 3e-3, "batch_size": 2}, progress=False)
    tok = load_tokenizer(str(tiny_model_dir))
    fmt = ChatFormat(tok)

    def forget_nll(model) -> float:
        return sum(s.nll for s in score_pairs(model, fmt, [("", e.answer) for e in forget])) / len(forget)

    nll = {}
    for label, path in (("target", target), ("npo", unlearned)):
        model = load_model(str(path))
        nll[label] = forget_nll(model)
        for name in ("forget", "forget_holdout", "retain"):
            result = evaluate_mc(model, fmt, bench.mc(name))
            assert result.n == len(bench.mc(name)) and result.chance == pytest.approx(0.5)
            for value in (result.accuracy, result.accuracy_norm):
                assert math.isfinite(value) and 0.0 <= value <= 1.0
            assert result.accuracy == pytest.approx(sum(result.per_sample["correct"]) / result.n)
    assert nll["npo"] > nll["target"]


@pytest.fixture(scope="module")
def bench_hazard():
    spec = importlib.util.spec_from_file_location(
        "bench_hazard", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_hazard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_relearn_summary_by_hand(bench_hazard):
    # unlearning took uncovered accuracy from 0.75 (target) to 0.25; relearning brings it to 0.5: half back.
    curve = {"steps": [0, 10], "forget_uncovered": [0.25, 0.5], "forget_holdout": [0.25, 0.3]}
    oracle = {"steps": [0, 10], "forget_uncovered": [0.25, 0.35], "forget_holdout": [0.25, 0.25]}
    s = bench_hazard.relearn_summary(curve, 0.75, oracle)
    assert s["at_step"] == 10 and s["recovery"] == pytest.approx(0.5)
    assert s["oracle_gain"] == pytest.approx(0.2) and s["holdout_gain"] == pytest.approx(0.1)
    assert s["recovery_beyond_oracle"] == pytest.approx(0.3) and s["recovery_beyond_holdout"] == pytest.approx(0.4)
    # nothing was removed (the unlearned model is as good as the target): no recovery to speak of
    none = bench_hazard.relearn_summary({**curve, "forget_uncovered": [0.75, 0.8]}, 0.75, oracle)
    assert none["recovery"] is None and none["oracle_gain"] is None and none["recovery_beyond_holdout"] is None


def test_bench_hazard_smoke(tmp_path, bench_hazard):
    record = bench_hazard.main(["--smoke", "--results", str(tmp_path)])
    saved = json.loads((tmp_path / "hazard-smoke.json").read_text())
    table = (tmp_path / "hazard-smoke.md").read_text()
    assert set(saved["accuracy"]) == {"base", "target", "oracle", "rmu", "npo", "npo+wagle"}
    assert list(saved["relearn"]) == ["rmu", "npo", "npo+wagle", "oracle"]
    for label, sets in saved["accuracy"].items():
        for name, row in sets.items():
            assert 0.0 <= row["accuracy"] <= 1.0 and len(row["correct"]) == row["n"], (label, name)
    for entry in saved["relearn"].values():
        curve = entry["curve"]
        assert curve["steps"] == [0, 1, 2]
        assert all(0.0 <= a <= 1.0 for s in ("forget_uncovered", "forget_holdout", "forget_covered") for a in curve[s])
    for label in ("rmu", "npo", "npo+wagle"):
        assert label in table
        summary = saved["relearn"][label]["summary"]
        assert summary["at_step"] == 2 and summary["uncovered_start"] == saved["relearn"][label]["curve"][
            "forget_uncovered"][0]
    assert record["name"] == "smoke" and (tmp_path / "hazard-smoke-runs" / "npo-wagle" / "model").is_dir()


def test_wagle_gradients_on_the_corpus_are_document_nll_gradients(tmp_path, tiny_model_dir):
    """WAGLE reads documents as any rows: its retain gradient on a corpus is the gradient of the mean NLL
    over every document token, checked against one unpadded forward per document."""
    import torch

    from obliviate.attribution.wagle import compute_wagle_mask, retain_gradient
    from obliviate.data.chat import ChatFormat
    from obliviate.methods import build_method
    from obliviate.models.loading import load_model, load_tokenizer

    bench = load_hazard(write_hazard(generate_hazard(HazardConfig(**SMALL)), tmp_path / "h"))
    forget, retain = bench.corpus("forget"), bench.corpus("retain")
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    fmt = ChatFormat(tok)
    params = {n: p for n, p in model.named_parameters() if "layers.1.mlp" in n}
    got = retain_gradient(model, fmt, retain, params, batch_size=3)
    model.zero_grad()
    total, count = 0.0, 0
    for doc in retain:  # the reference: BOS + the document's tokens, every token after BOS predicted
        ids = torch.tensor([[tok.bos_token_id] + tok(doc.answer, add_special_tokens=False)["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        total = total - logp.gather(1, ids[0, 1:, None]).sum()
        count += ids.shape[1] - 1
    (total / count).backward()
    for name, p in params.items():
        assert torch.allclose(got[name], p.grad, rtol=1e-4, atol=1e-7), name
    mask = compute_wagle_mask(model, fmt, build_method("npo"), forget, retain, None)
    assert 0.15 < mask.report["share"] < 0.25  # rho = 0.2 of the candidate weights
