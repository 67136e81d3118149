"""evaluate_model end to end on a tiny model: schema, per-sample values, one scoring and one
generation pass, forget quality against an oracle, model utility, saving and summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import obliviate.evaluation.evaluate as ev
from obliviate.data.chat import ChatFormat
from obliviate.data.qa import DataError, QADataset, QAExample
from obliviate.evaluation.generation import generate_answers
from obliviate.evaluation.logprobs import score_pairs
from obliviate.evaluation.tofu import rouge_l_recall
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.models.tiny import build_tiny_model

MAX_NEW = 8


def qa(q, a, para=None, pert=(), row=None):
    return QAExample(q, a, para, list(pert), meta={"row": row} if row else {})


def make_sets() -> dict[str, QADataset]:
    forget = [qa("Where was Ana born?", "In Lisbon.", "Ana was born in Lisbon.", ["In Oslo.", "In Rome.", "In Paris."]),
              qa("What did Ana write?", "Novels.", "She wrote novels.", ["Poems.", "Plays.", "Poems."]),
              qa("When did Ana die?", "In 2001.", "She died in 2001.", ["In 1990.", "In 1980.", "In 1970."])]
    retain = [qa("Who is Bo?", "A painter.", "Bo paints.", ["A singer.", "A cook."]),
              qa("Where does Bo live?", "In Riga.", "Bo lives in Riga.", ["In Kyiv.", "In Oslo."]),
              qa("Is Bo married?", "Yes, to Cy.", None, ["No.", "Yes, to Di."])]  # no paraphrase: base = answer
    authors = [qa("Who wrote Hamlet?", "Shakespeare", None, ["Dickens", "Austen", "Joyce"]),
               qa("Who wrote Emma?", "Jane Austen", None, ["Dickens", "Tolstoy", "Homer"])]
    facts = [qa("Capital of France?", "Paris", None, ["Rome", "Berlin", "Madrid"]),
             qa("Largest ocean?", "The Pacific", None, ["The Atlantic", "The Arctic", "The Indian"])]
    holdout = [qa("Where was Ana born?", "In Lisbon."),  # the same pair and question as forget row 1
               qa("Who is Eve?", "A pilot.")]
    return {"forget": QADataset(forget, "forget.jsonl"), "retain": QADataset(retain, "retain.jsonl"),
            "real_authors": QADataset(authors, "ra.jsonl"), "world_facts": QADataset(facts, "wf.jsonl"),
            "holdout": QADataset(holdout, "holdout.jsonl")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    path = build_tiny_model(tmp_path_factory.mktemp("eval") / "m", tie_embeddings=False, seed=4)
    tok = load_tokenizer(str(path))
    yield load_model(str(path)), tok
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def result(tiny):
    model, tok = tiny
    return ev.evaluate_model(model, tok, make_sets(), batch_size=4, max_new_tokens=MAX_NEW, progress=True,
                             label="tiny")


def test_schema_and_per_sample_lengths(result):
    sets = make_sets()
    assert set(result) == {"model", "sets", "forget_quality", "model_utility", "seconds", "scored_tokens", "made_with"}
    assert result["scored_tokens"] == "labels"
    made = result["made_with"]  # what the numbers depend on besides the weights
    assert (made["batch_size"], made["max_new_tokens"], made["length_budget"], made["dtype"], made["device"]) == \
        (4, MAX_NEW, None, "torch.float32", "cpu")
    assert {name: s["n"] for name, s in made["sets"].items()} == {name: len(ds) for name, ds in sets.items()}
    assert result["model"] == "tiny" and result["seconds"] > 0
    assert list(result["sets"]) == list(sets)
    for name, s in result["sets"].items():
        assert set(s) == {"n", "probability", "rouge", "truth_ratio", "per_sample"}
        assert s["n"] == len(sets[name])
        ps = s["per_sample"]
        assert set(ps) == {"probability", "rouge", "truth_ratio_raw", "nll", "generation", "question"}
        for key in ("probability", "rouge", "nll", "generation", "question"):
            assert len(ps[key]) == s["n"], (name, key)
        assert ps["question"] == [ex.question for ex in sets[name]]
        assert s["probability"] == pytest.approx(np.mean(ps["probability"]))
        assert s["rouge"] == pytest.approx(np.mean(ps["rouge"]))
        if name == "holdout":
            assert s["truth_ratio"] is None and ps["truth_ratio_raw"] is None
        else:
            assert len(ps["truth_ratio_raw"]) == s["n"]
    json.dumps(result, allow_nan=False)  # plain JSON, no NaN or Infinity


def test_values_against_independent_computation(tiny, result):
    model, tok = tiny
    fmt = ChatFormat(tok)
    sets = make_sets()
    for name, ds in sets.items():
        ps = result["sets"][name]["per_sample"]
        answer_nll = np.array([s.nll for s in score_pairs(model, fmt, [(e.question, e.answer) for e in ds])])
        np.testing.assert_allclose(ps["nll"], answer_nll, rtol=1e-5)
        generations = [generate_answers(model, fmt, [e.question], max_new_tokens=MAX_NEW)[0] for e in ds]
        assert ps["generation"] == generations
        np.testing.assert_allclose(ps["rouge"], rouge_l_recall([e.answer for e in ds], generations))
        if name in ("real_authors", "world_facts"):
            for e, got in zip(ds, ps["probability"]):
                pairs = [(e.question, a) for a in [e.answer, *e.perturbed_answers]]
                p = [math.exp(-s.nll) for s in score_pairs(model, fmt, pairs)]
                assert got == pytest.approx(p[0] / sum(p), rel=1e-5)
        else:
            np.testing.assert_allclose(ps["probability"], np.exp(-answer_nll), rtol=1e-5)
        if name != "holdout":
            for e, got in zip(ds, ps["truth_ratio_raw"]):
                base = e.paraphrased_answer or e.answer
                nlls = [s.nll for s in score_pairs(model, fmt, [(e.question, a) for a in [base, *e.perturbed_answers]])]
                geo = math.prod(math.exp(-x) for x in nlls[1:]) ** (1 / len(nlls[1:]))
                assert got == pytest.approx(geo / math.exp(-nlls[0]), rel=1e-5)

    r = np.array(result["sets"]["forget"]["per_sample"]["truth_ratio_raw"])
    assert result["sets"]["forget"]["truth_ratio"] == pytest.approx(np.mean([min(x, 1 / x) for x in r]))
    for name in ("retain", "real_authors", "world_facts"):
        r = result["sets"][name]["per_sample"]["truth_ratio_raw"]
        assert result["sets"][name]["truth_ratio"] == pytest.approx(np.mean([max(0.0, 1 - x) for x in r]))
    nine = [result["sets"][n][m] for n in ("retain", "real_authors", "world_facts")
            for m in ("probability", "rouge", "truth_ratio")]
    expected = 0.0 if min(nine) == 0 else 9 / sum(1 / v for v in nine)
    assert result["model_utility"] == pytest.approx(expected)
    assert result["forget_quality"] is None


def test_model_utility_uses_the_nine_numbers():
    def metrics(p, r, t):
        return {"probability": p, "rouge": r, "truth_ratio": t}

    sets = {"forget": metrics(0.01, 0.02, 0.03), "retain": metrics(0.9, 0.8, 0.5),
            "real_authors": metrics(0.6, 0.7, 0.4), "world_facts": metrics(0.3, 0.95, 0.55),
            "holdout": metrics(0.04, 0.05, None)}
    nine = [0.9, 0.8, 0.5, 0.6, 0.7, 0.4, 0.3, 0.95, 0.55]
    assert ev.utility_from_sets(sets) == pytest.approx(9 / sum(1 / v for v in nine))
    sets["retain"]["truth_ratio"] = 0.0
    assert ev.utility_from_sets(sets) == 0.0
    sets["retain"]["truth_ratio"] = None  # retain without truth-ratio fields
    assert ev.utility_from_sets(sets) is None
    del sets["world_facts"]
    assert ev.utility_from_sets(sets) is None


def test_one_scoring_pass_over_unique_pairs_and_one_generation_pass(tiny, monkeypatch):
    # one score_and_generate call: every unique pair scored and every question answered, each
    # question's prompt prefilled once for both (tests/test_fast_scoring.py)
    model, tok = tiny
    calls = {"score": [], "generate": []}
    real = ev.score_and_generate

    def counting(model, fmt, pairs, questions, *args, **kw):
        calls["score"].append(list(pairs))
        calls["generate"].append(list(questions))
        return real(model, fmt, pairs, questions, *args, **kw)

    monkeypatch.setattr(ev, "score_and_generate", counting)
    sets = make_sets()
    ev.evaluate_model(model, tok, sets, max_new_tokens=2, progress=False)

    assert len(calls["score"]) == 1 and len(calls["generate"]) == 1
    expected_pairs = set()
    for name, ds in sets.items():
        for e in ds:
            expected_pairs.add((e.question, e.answer))
            if name != "holdout":
                expected_pairs.add((e.question, e.paraphrased_answer or e.answer))
                expected_pairs.update((e.question, p) for p in e.perturbed_answers)
    scored = calls["score"][0]
    assert len(scored) == len(set(scored)) == len(expected_pairs)
    assert set(scored) == expected_pairs
    questions = {e.question for ds in sets.values() for e in ds}
    assert sorted(calls["generate"][0]) == sorted(questions)


def test_forget_quality_with_oracle(tiny, result):
    model, tok = tiny
    sets = {"forget": make_sets()["forget"]}
    own = ev.evaluate_model(model, tok, sets, max_new_tokens=2, oracle=result, progress=False)
    assert own["forget_quality"] == pytest.approx(1.0)  # identical distributions
    assert own["model_utility"] is None  # retain, real authors and world facts are missing

    ratios = result["sets"]["forget"]["per_sample"]["truth_ratio_raw"]
    shifted = {"scored_tokens": "labels", "sets": {"forget": {"per_sample": {
        "truth_ratio_raw": [r * 1e6 for r in ratios]}}}}
    far = ev.evaluate_model(model, tok, sets, max_new_tokens=2, oracle=shifted, progress=False)
    assert far["forget_quality"] == pytest.approx(2 / math.comb(6, 3))  # fully separated, 3 vs 3

    # An oracle scored on other tokens (or written before scored_tokens existed: the answer alone)
    # is refused rather than compared.
    for other in ({**shifted, "scored_tokens": "answer"}, {"sets": shifted["sets"]}):
        with pytest.raises(DataError, match="scored 'answer' tokens.*--scored-tokens labels"):
            ev.evaluate_model(model, tok, sets, max_new_tokens=2, oracle=other, progress=False)
    answer_only = ev.evaluate_model(model, tok, sets, max_new_tokens=2, progress=False,
                                    fmt=ChatFormat(tok, scored_tokens="answer"))
    assert answer_only["scored_tokens"] == "answer"
    assert answer_only["sets"]["forget"]["probability"] != pytest.approx(own["sets"]["forget"]["probability"])

    with pytest.raises(ValueError, match="truth_ratio_raw"):
        ev.evaluate_model(model, tok, sets, max_new_tokens=2, oracle={"sets": {}}, progress=False)


def test_bad_sets_raise_located_errors(tiny):
    model, tok = tiny
    no_pert = QADataset([qa("Q1?", "A1", row=7)], "ra.jsonl")
    with pytest.raises(DataError, match=r"ra\.jsonl, line 7: .*real_authors.*perturbed_answer"):
        ev.evaluate_model(model, tok, {"real_authors": no_pert}, progress=False)
    partial = QADataset([qa("Q1?", "A1", "P1", ["W1"], row=2), qa("Q2?", "A2", row=3)], "retain.jsonl")
    with pytest.raises(DataError, match=r"retain\.jsonl, line 3"):
        ev.evaluate_model(model, tok, {"retain": partial}, progress=False)
    long_row = QADataset([qa("Q?", "x" * 400, row=5)], "holdout.jsonl")
    with pytest.raises(DataError, match=r"holdout\.jsonl, line 5: answer: .*max_length"):
        ev.evaluate_model(model, tok, {"holdout": long_row}, fmt=ChatFormat(tok, max_length=128), progress=False)
    forget_plain = QADataset([qa("Q?", "A")], "forget.jsonl")
    with pytest.raises(DataError, match="forget quality"):
        ev.evaluate_model(model, tok, {"forget": forget_plain}, oracle={"scored_tokens": "labels", "sets": {"forget": {
            "per_sample": {"truth_ratio_raw": [1.0]}}}}, progress=False)
    with pytest.raises(ValueError, match="no evaluation sets"):
        ev.evaluate_model(model, tok, {}, progress=False)


def test_forget_without_truth_ratio_fields_gets_null_truth_ratio(tiny):
    model, tok = tiny
    plain = QADataset([qa("Q?", "A"), qa("R?", "B")], "forget10.jsonl")
    out = ev.evaluate_model(model, tok, {"forget": plain}, max_new_tokens=2, progress=False)
    assert out["sets"]["forget"]["truth_ratio"] is None
    assert out["forget_quality"] is None and out["model_utility"] is None


def test_save_and_load(result, tmp_path):
    path = ev.save_eval(result, tmp_path / "run" / "eval.json")
    assert ev.load_eval(path) == json.loads(json.dumps(result))
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "x"}')
    with pytest.raises(ValueError, match="bad.json.*sets"):
        ev.load_eval(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ev.load_eval(bad)
    with pytest.raises(FileNotFoundError):
        ev.load_eval(tmp_path / "missing.json")


def test_eval_sets_from_benchmark():
    sets = make_sets()

    class Bench:
        roles = {"eval_forget": sets["forget"], "eval_world_facts": sets["world_facts"],
                 "holdout": sets["holdout"], "train": sets["retain"]}

        def has(self, role):
            return role in self.roles

        def split(self, role):
            return self.roles[role]

    got = ev.eval_sets_from_benchmark(Bench())
    assert got == {"forget": sets["forget"], "world_facts": sets["world_facts"], "holdout": sets["holdout"]}

    class Empty(Bench):
        roles = {"train": sets["retain"]}

    with pytest.raises(ValueError, match="evaluation roles"):
        ev.eval_sets_from_benchmark(Empty())


def test_summary_row(result):
    row = ev.summary_row(result)
    assert list(row)[:5] == ["forget_rouge", "forget_probability", "forget_truth_ratio", "forget_quality",
                             "model_utility"]
    assert row["retain_rouge"] == result["sets"]["retain"]["rouge"]
    assert row["world_facts_probability"] == result["sets"]["world_facts"]["probability"]
    assert row["holdout_truth_ratio"] is None
    assert row["model_utility"] == result["model_utility"]
    assert len(row) == 5 * 3 + 2


# ------------------------------------------------------------------------------------------- typed results, scores

def test_typed_result_round_trips_eval_json_exactly(result, tmp_path):
    from obliviate.evaluation.results import EvalFormatError, EvalResult

    typed = EvalResult.from_json(result)
    assert typed.to_json() == result
    assert json.dumps(typed.to_json()) == json.dumps(result)  # key order too: the file's bytes are the same
    assert typed.sets["forget"].per_sample.truth_ratio_raw == result["sets"]["forget"]["per_sample"]["truth_ratio_raw"]
    path = ev.save_eval(typed, tmp_path / "typed.json")
    assert path.read_bytes() == ev.save_eval(result, tmp_path / "plain.json").read_bytes()
    assert ev.read_eval(path) == typed
    # keys beyond the documented ones survive a read and a write
    extended = json.loads(json.dumps(result))
    extended["note"] = "kept"
    extended["sets"]["forget"]["per_sample"]["extra_metric"] = [1, 2, 3]
    assert EvalResult.from_json(extended).to_json() == extended
    broken = json.loads(json.dumps(result))
    del broken["sets"]["retain"]["per_sample"]["nll"]
    with pytest.raises(EvalFormatError, match=r"set 'retain', per_sample has no 'nll'"):
        EvalResult.from_json(broken, "x.json")


def test_evaluation_keeps_every_score_and_answer(tiny, result):
    model, tok = tiny
    sets = make_sets()
    evaluation = ev.evaluate_with_scores(model, tok, sets, batch_size=4, max_new_tokens=MAX_NEW, progress=False,
                                         label="tiny")
    got = evaluation.result.to_json()
    assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in result.items() if k != "seconds"}
    scores = evaluation.scores
    fmt = ChatFormat(tok)
    for name, ds in sets.items():
        own = scores.get([(e.question, e.answer) for e in ds])
        assert [s.nll for s in own] == result["sets"][name]["per_sample"]["nll"]
        assert [scores.generations[e.question] for e in ds] == result["sets"][name]["per_sample"]["generation"]
    assert scores.scored == len(scores)  # each pair scored once
    ref = score_pairs(model, fmt, [("Who is Eve?", "A pilot.")])[0]
    np.testing.assert_allclose(scores.get([("Who is Eve?", "A pilot.")])[0].logprobs, ref.logprobs, rtol=1e-5)


def test_extra_pairs_are_scored_after_and_change_nothing(tiny, result, monkeypatch):
    model, tok = tiny
    calls = []
    real = ev.score_pairs

    def counting(model, fmt, pairs, **kw):
        calls.append(list(pairs))
        return real(model, fmt, pairs, **kw)

    monkeypatch.setattr(ev, "score_pairs", counting)
    new = [("Who is Eve?", "A doctor."), ("Where was Ana born?", "In Lisbon.")]  # the second is a set pair already
    evaluation = ev.evaluate_with_scores(model, tok, make_sets(), batch_size=4, max_new_tokens=MAX_NEW,
                                         progress=False, label="tiny", extra_pairs=new)
    # the sets' pairs go through score_and_generate; only the missing pair through a call of its own
    assert calls == [[new[0]]]
    got = evaluation.result.to_json()
    assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in result.items() if k != "seconds"}
    assert new[0] in evaluation.scores and evaluation.scores.scored == len(evaluation.scores)


def test_model_scores_score_only_what_is_missing(tiny):
    from obliviate.evaluation.scores import MissingScores, ModelScores

    model, tok = tiny
    fmt = ChatFormat(tok)
    scores = ModelScores.empty(fmt, "tiny")
    pairs = [("Q1?", "A1"), ("Q2?", "A2")]
    first = scores.ensure(model, fmt, pairs, batch_size=2)
    assert scores.scored == 2
    again = scores.ensure(model, fmt, [pairs[1], ("Q3?", "A3"), pairs[1]], batch_size=2)
    assert scores.scored == 3 and again[0] is first[1] and again[2] is first[1]
    with pytest.raises(MissingScores, match="1 pair.*'Q4\\?'"):
        scores.get([("Q4?", "A4")])
    with pytest.raises(ValueError, match="prompt layout"):
        scores.ensure(model, ChatFormat(tok, system_prompt="Be brief."), [("Q4?", "A4")])


def test_holdout_truth_ratio_when_every_row_has_perturbed_answers(tiny):
    """A holdout with perturbed answers on every row gets per-sample truth ratios (the verdict compares
    them with the forget set's), computed as the forget set's are; one with none, or only some, gets
    none and is no error (TOFU's holdout has question and answer only)."""
    model, tok = tiny
    rows = [qa("Q1?", "A1", "P1", ["W1", "V1"], row=1), qa("Q2?", "A2", None, ["W2"], row=2)]
    both = {"forget": QADataset(rows, "forget.jsonl"), "holdout": QADataset(rows, "holdout.jsonl")}
    result = ev.evaluate_model(model, tok, both, max_new_tokens=2, progress=False)
    forget, holdout = result["sets"]["forget"], result["sets"]["holdout"]
    assert holdout["per_sample"]["truth_ratio_raw"] == pytest.approx(forget["per_sample"]["truth_ratio_raw"])
    assert len(holdout["per_sample"]["truth_ratio_raw"]) == 2 and holdout["truth_ratio"] is not None
    for held in ([qa("Q1?", "A1", row=1)], [rows[0], qa("Q3?", "A3", row=3)]):
        result = ev.evaluate_model(model, tok, {"holdout": QADataset(held, "holdout.jsonl")}, max_new_tokens=2,
                                   progress=False)
        assert result["sets"]["holdout"]["truth_ratio"] is None
        assert result["sets"]["holdout"]["per_sample"].get("truth_ratio_raw") is None
