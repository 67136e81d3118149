"""Benign relearning: the attack brings gradient-ascent-forgotten facts back (and does not on a model
that never knew them), keywords and relearn sets are what they say, the curve is one constant-lr run."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from obliviate.attacks.relearn import (
    RelearnConfig,
    RelearnSplit,
    attribute_subset,
    forget_subset,
    from_file,
    keyword_hit,
    keywords,
    recovery,
    relearn_attack,
    relearn_curve,
    retain_neighbours,
    summarise,
)
from obliviate.data.chat import ChatFormat
from obliviate.data.qa import DataError, QADataset, QAExample
from obliviate.evaluation.logprobs import score_pairs
from obliviate.methods import build_method
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.training.config import TrainConfig
from obliviate.training.loop import train

NAMES = ["Ana", "Bo", "Cy", "Di", "Ed", "Fa", "Gu", "Hu", "Io", "Jo", "Ka", "Lu"]
COLOURS = ["red", "blue", "green", "pink", "gold", "gray", "teal", "navy", "plum", "rose", "jade", "ruby"]


def colour_facts() -> QADataset:
    colours = COLOURS[:]
    random.Random(0).shuffle(colours)
    rows = [QAExample(f"What colour does {n} like?", f"{n} likes {c}.",
                      meta={"value": c, "attribute": "colour", "candidates": [f"{n} likes {x}." for x in COLOURS]})
            for n, c in zip(NAMES, colours)]
    return QADataset(rows, "colours")


def constant(steps: int, lr: float) -> TrainConfig:
    return TrainConfig(max_steps=steps, lr=lr, batch_size=4, warmup_ratio=0.0, scheduler="constant", weight_decay=0.0)


def mean_nll(model, fmt, ds) -> float:
    return float(np.mean([s.nll for s in score_pairs(model, fmt, [(e.question, e.answer) for e in ds])]))


@pytest.fixture(scope="module")
def world(tiny_model_dir):
    """base (never trained) -> target (facts memorised) -> unlearned (gradient ascent on all facts)."""
    tok = load_tokenizer(str(tiny_model_dir))
    fmt = ChatFormat(tok, system_prompt=None)
    facts = colour_facts()
    base = load_model(str(tiny_model_dir))
    target = train(copy.deepcopy(base), tok, build_method("sft"), facts, TrainConfig(
        max_steps=250, lr=3e-3, batch_size=4, warmup_ratio=0.05, weight_decay=0.0), fmt=fmt, progress=False).model
    unlearned = train(copy.deepcopy(target), tok, build_method("ga"), facts, constant(20, 3e-4), fmt=fmt,
                      progress=False).model
    return {"tok": tok, "fmt": fmt, "facts": facts, "base": base, "target": target, "unlearned": unlearned}


def test_relearning_a_subset_brings_held_out_forgotten_facts_back(world):
    fmt, facts = world["fmt"], world["facts"]
    split = RelearnSplit(facts[:4], facts[4:], "forget_subset")
    held = split.heldout
    target_nll, unlearned_nll = mean_nll(world["target"], fmt, held), mean_nll(world["unlearned"], fmt, held)
    assert target_nll < 0.2, "the target should have memorised the facts"
    assert unlearned_nll > target_nll + 1.5, "gradient ascent should have collapsed the answers' likelihood"

    cfg = RelearnConfig(steps=(10, 20), lr=1e-3, batch_size=4, max_new_tokens=16)
    attacked = relearn_curve(world["unlearned"], world["tok"], split, cfg, fmt)
    never_knew = relearn_curve(world["base"], world["tok"], split, cfg, fmt)
    assert attacked["steps"] == [0, 10, 20]
    assert attacked["forget_nll"][0] == pytest.approx(unlearned_nll, rel=1e-5)
    # The held-out answers were never shown again, yet their NLL falls most of the way back ...
    assert attacked["forget_nll"][-1] < target_nll + 0.5 * (unlearned_nll - target_nll)
    # ... far below what the same relearning gives a model that never saw them ...
    assert attacked["forget_nll"][-1] < never_knew["forget_nll"][-1] - 1.5
    # ... and the true value climbs back up the ranking among the 12 colours (max exposure log2 12 = 3.58).
    assert attacked["forget_exposure"][-1] > attacked["forget_exposure"][0] + 0.5
    assert attacked["forget_exposure"][-1] > never_knew["forget_exposure"][-1] + 1.0


def test_relearn_attack_layout_and_summary_against_target(world):
    fmt, facts = world["fmt"], world["facts"]
    split = forget_subset(facts, fraction=0.34, seed=1)
    cfg = RelearnConfig(steps=(3,), lr=1e-3, max_new_tokens=8)
    out = relearn_attack(world["unlearned"], world["tok"], split, cfg, oracle=world["base"],
                         target=world["target"], fmt=fmt)
    for key in ("steps", "forget_rouge", "forget_probability", "keyword_hit", "forget_nll", "forget_exposure"):
        assert len(out[key]) == 2 and len(out["oracle"][key]) == 2
    s = out["summary"]
    nll = s["by_metric"]["forget_nll"]
    assert nll["recovery"] == pytest.approx((out["forget_nll"][1] - out["forget_nll"][0]) /
                                            (out["target"]["forget_nll"] - out["forget_nll"][0]))
    assert nll["oracle_gain"] == pytest.approx((out["oracle"]["forget_nll"][1] - out["oracle"]["forget_nll"][0]) /
                                               (out["target"]["forget_nll"] - out["forget_nll"][0]))
    assert s["metric"] == "forget_rouge" and s["at_step"] == 3
    assert out["relearn_set"]["n_relearn"] + out["relearn_set"]["n_heldout"] == len(facts)
    assert set(out["per_sample"]) == {"0", "3"}


def test_curve_is_one_constant_lr_run_and_leaves_the_model_alone(world):
    fmt, facts = world["fmt"], world["facts"]
    split = RelearnSplit(facts[:4], facts[4:8], "forget_subset")
    before = {n: p.detach().clone() for n, p in world["unlearned"].named_parameters()}
    long = relearn_curve(world["unlearned"], world["tok"], split, RelearnConfig(steps=(2, 4), lr=1e-3,
                         max_new_tokens=4), fmt)
    short = relearn_curve(world["unlearned"], world["tok"], split, RelearnConfig(steps=(2,), lr=1e-3,
                          max_new_tokens=4), fmt)
    assert long["forget_nll"][1] == pytest.approx(short["forget_nll"][1], rel=1e-5)
    assert long["forget_nll"][2] != pytest.approx(long["forget_nll"][1], rel=1e-3)
    for n, p in world["unlearned"].named_parameters():
        assert torch.equal(p, before[n]), n


def test_keywords_use_the_value_else_the_rarest_content_words():
    rows = [QAExample("Where was Ana born?", "Ana was born in Ashford.", meta={"value": "Ashford"}),
            QAExample("What does Bo do?", "Bo works as a potter in the harbour town.", meta={}),
            QAExample("What does Cy do?", "Cy works as a baker in the town.", meta={})]
    keys = keywords(rows, n_words=2)
    assert keys[0] == ["Ashford"]
    # Bo: content words works, potter, harbour, town; 'works' and 'town' are in two answers,
    # potter/harbour in one each; equal frequency -> longer first.
    assert keys[1] == ["harbour", "potter"]
    assert keys[2] == ["baker", "works"]  # 'works' (5) before 'town' (4), both in two answers
    assert keyword_hit("She was born in ASHFORD, I think.", ["Ashford"])
    assert not keyword_hit("He was born in Ashfordshire.", ["Ashford"])
    assert not keyword_hit("In 2012.", ["12"]) and keyword_hit("Age 12.", ["12"])
    assert not keyword_hit("a potter", ["harbour", "potter"])
    with pytest.raises(ValueError):
        keywords(rows, n_words=0)


def test_recovery_and_summary_by_hand():
    assert recovery(0.1, 0.4, 0.7) == pytest.approx(0.5)
    assert recovery(3.0, 2.0, 1.0, sign=-1) == pytest.approx(0.5)  # NLL falls toward the target
    assert recovery(0.5, 0.9, 0.5) is None  # nothing was lost
    assert recovery(0.5, 0.9, 0.4) is None  # the unlearned model "knows" more than the target
    assert recovery(1.0, 2.0, 3.0, sign=-1) is None
    curve = {"steps": [0, 10], "forget_rouge": [0.2, 0.5], "forget_nll": [4.0, 2.0]}
    oracle = {"steps": [0, 10], "forget_rouge": [0.1, 0.2], "forget_nll": [5.0, 4.5]}
    s = summarise(curve, {"forget_rouge": 0.8, "forget_nll": 1.0}, oracle)
    assert s["recovery"] == pytest.approx(0.3 / 0.6)
    assert s["oracle_gain"] == pytest.approx(0.1 / 0.6)
    assert s["recovery_beyond_oracle"] == pytest.approx(0.2 / 0.6)
    assert s["by_metric"]["forget_nll"]["recovery"] == pytest.approx(2 / 3)
    assert s["by_metric"]["forget_nll"]["oracle_gain"] == pytest.approx(-0.5 / -3.0)
    assert summarise(curve, None, None)["recovery"] is None


def test_relearn_sets():
    facts = colour_facts()
    split = forget_subset(facts, 0.25, seed=3)
    assert len(split.relearn) == 3 and len(split.heldout) == 9
    assert not {e.question for e in split.relearn} & {e.question for e in split.heldout}
    assert forget_subset(facts, 0.25, seed=3).relearn.examples == split.relearn.examples
    with pytest.raises(DataError, match="at least 2 rows"):
        forget_subset(facts[:1])

    mixed = QADataset([QAExample(f"q{i}", f"a{i}", meta={"attribute": a, "row": i + 1})
                       for i, a in enumerate(["hobby", "pet", "hobby", "award"])], "f.jsonl")
    by_attr = attribute_subset(mixed, ["hobby"])
    assert [e.question for e in by_attr.relearn] == ["q0", "q2"]
    assert [e.question for e in by_attr.heldout] == ["q1", "q3"]
    with pytest.raises(DataError, match="no forget row has attribute"):
        attribute_subset(mixed, ["nope"])
    with pytest.raises(DataError, match="none is left"):
        attribute_subset(mixed, ["hobby", "pet", "award"])

    retain = QADataset([QAExample(f"r{i}", f"b{i}", meta={"attribute": a})
                        for i, a in enumerate(["pet", "city", "award", "pet"])], "r.jsonl")
    near = retain_neighbours(mixed, retain)
    assert [e.question for e in near.relearn] == ["r0", "r2", "r3"] and near.heldout is mixed
    assert len(retain_neighbours(mixed, retain, max_rows=2).relearn) == 2
    no_attr = QADataset([QAExample("q", "a", meta={"row": 7})], "x.jsonl")
    with pytest.raises(DataError, match="line 7.*attribute"):
        retain_neighbours(no_attr, retain)


def test_relearn_from_text_and_qa_files(tmp_path, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    facts = colour_facts()
    text = tmp_path / "public.txt"
    text.write_text("Colours are named after things people see around them every day.\n"
                    "Short.\n", encoding="utf-8")
    split = from_file(text, facts, tok, prefix_tokens=23)  # byte tokens: 23 characters
    assert split.kind == "text_file" and len(split.relearn) == 1 and split.heldout is facts
    row = split.relearn[0]
    assert row.question.endswith("Colours are named after") and row.answer.startswith(" things")
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "Who?", "answer": "Me."}\n', encoding="utf-8")
    assert from_file(qa, facts, tok).kind == "qa_file"
    jtext = tmp_path / "docs.jsonl"
    jtext.write_text('{"text": "' + "word " * 30 + '"}\n', encoding="utf-8")
    assert from_file(jtext, facts, tok, prefix_tokens=10).kind == "text_file"


def test_config_validation():
    assert RelearnConfig(steps=(5, 1, 5)).steps == (0, 1, 5)
    with pytest.raises(ValueError, match=">= 0"):
        RelearnConfig(steps=(-1, 3))
    with pytest.raises(ValueError, match="lr"):
        RelearnConfig(lr=0)


def test_holdout_control_measures_never_seen_rows_under_the_same_relearning(world):
    """The oracle-free control: the same relearning run also measures rows the model never saw."""
    fmt, facts = world["fmt"], world["facts"]
    holdout = QADataset([QAExample(f"What colour does {n} like?", f"{n} likes {c}.", meta={"value": c})
                         for n, c in zip(["Mo", "Ny", "Ox", "Pi", "Qu", "Ra"], COLOURS)], "holdout")
    split = RelearnSplit(facts[:4], facts[4:], "forget_subset")
    cfg = RelearnConfig(steps=(10, 20), lr=1e-3, batch_size=4, max_new_tokens=16)
    out = relearn_attack(world["unlearned"], world["tok"], split, cfg, target=world["target"], fmt=fmt,
                         holdout=holdout)
    for key in ("holdout_rouge", "holdout_probability", "holdout_keyword_hit", "holdout_nll"):
        assert len(out[key]) == 3
    assert "holdout_exposure" not in out  # the holdout rows have no candidates
    assert out["relearn_set"]["n_holdout"] == 6 and len(out["per_sample"]["20"]["holdout"]["nll"]) == 6
    # Step 0 is the unlearned model itself: the holdout's NLL is what scoring it directly gives.
    assert out["holdout_nll"][0] == pytest.approx(mean_nll(world["unlearned"], fmt, holdout), rel=1e-5)
    nll = out["summary"]["by_metric"]["forget_nll"]
    removed = out["target"]["forget_nll"] - out["forget_nll"][0]
    assert nll["holdout_gain"] == pytest.approx((out["holdout_nll"][-1] - out["holdout_nll"][0]) / removed)
    assert nll["recovery_beyond_holdout"] == pytest.approx(nll["recovery"] - nll["holdout_gain"])
    assert out["summary"]["holdout_gain"] == out["summary"]["by_metric"]["forget_rouge"]["holdout_gain"]
    # Relearning four forgotten facts brings the other eight back beyond what it teaches about six people
    # the model never saw (relearning restores the answers' shared form for both), without an oracle:
    # afterwards the forgotten answers are far likelier than never-seen ones.
    assert nll["recovery"] > 0.8 and nll["recovery_beyond_holdout"] > 0.2
    assert out["forget_nll"][-1] < out["holdout_nll"][-1] - 1.0
    # The verdict reads the same file: the held-out forget rows gain more than the holdout rows.
    from obliviate.evaluation.verdict import Evidence, Settings, judge

    verdict = judge(Evidence(relearn=out, files={"relearn": "attacks/relearn.json"}), Settings(n_boot=500))
    relearn = next(c for c in verdict["criteria"] if c["name"] == "durability:relearn")
    assert relearn["evidence"] == "attacks/relearn.json" and relearn["n"] == {"forget": 8, "holdout": 6}
    per = out["per_sample"]
    gain = np.mean(np.subtract(per["0"]["nll"], per["20"]["nll"])) - np.mean(
        np.subtract(per["0"]["holdout"]["nll"], per["20"]["holdout"]["nll"]))
    assert relearn["value"] == pytest.approx(gain) and relearn["call"] == "under-unlearned"
