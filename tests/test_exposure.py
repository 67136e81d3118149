import math

import pytest
import torch

from obliviate.data.chat import ChatFormat
from obliviate.data.qa import DataError, QADataset, QAExample
from obliviate.evaluation.exposure import candidate_set, exposure, exposure_for_examples, likelihood_rank
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.models.tiny import build_tiny_model


# ---------------------------------------------------------------- ranks and exposure by hand
def test_rank_counts_strictly_more_likely_candidates():
    assert likelihood_rank(-1.0, [-2.0, -0.5, -3.0]) == 2
    assert likelihood_rank(-0.1, [-2.0, -0.5, -3.0]) == 1
    assert likelihood_rank(-9.0, [-2.0, -0.5, -3.0]) == 4


def test_ties_go_to_the_secret():
    assert likelihood_rank(-1.0, [-1.0, -1.0]) == 1
    assert likelihood_rank(-1.0, [-1.0, -0.5]) == 2
    assert exposure(-1.0, [-1.0, -1.0]) == pytest.approx(math.log2(3))


def test_exposure_hand_values():
    others = [-2.0, -0.5, -3.0]  # |R| = 4
    assert exposure(-1.0, others) == pytest.approx(2 - 1)  # rank 2
    assert exposure(-0.1, others) == pytest.approx(2.0)  # rank 1: log2 |R|
    assert exposure(-9.0, others) == pytest.approx(0.0)  # last
    assert exposure(-1.0, [-5.0] * 7) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="at least one other"):
        exposure(-1.0, [])
    with pytest.raises(ValueError, match="NaN"):
        likelihood_rank(float("nan"), [-1.0])


# ---------------------------------------------------------------- candidate sets
def test_candidates_from_meta_true_answer_first_without_duplicates():
    e = QAExample("q", "B", perturbed_answers=["X"], meta={"candidates": ["A", "B", "C", "A"]})
    assert candidate_set(e) == ["B", "A", "C"]


def test_candidates_fall_back_to_perturbed_answers():
    e = QAExample("q", "true", perturbed_answers=["w1", "w2", "w1"])
    assert candidate_set(e) == ["true", "w1", "w2"]


def test_bad_candidate_sets_name_the_row():
    no_answer = QAExample("q", "true", meta={"candidates": ["a", "b"], "row": 7})
    with pytest.raises(DataError, match=r"forget.jsonl, line 7: 'candidates' does not include the answer"):
        candidate_set(no_answer, "forget.jsonl")
    with pytest.raises(DataError, match="at least one candidate"):
        candidate_set(QAExample("q", "true", meta={"row": 2}), "f.jsonl")
    with pytest.raises(DataError, match="at least one candidate"):
        candidate_set(QAExample("q", "true", meta={"candidates": ["true", "true"]}))
    with pytest.raises(DataError, match="list of non-empty texts"):
        candidate_set(QAExample("q", "true", meta={"candidates": "true"}))


# ---------------------------------------------------------------- on a tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)
    return load_model(str(path)), ChatFormat(load_tokenizer(str(path)), system_prompt=None)


def slow_total_logprob(model, fmt, question, answer):
    ans = fmt.answer_ids(answer) + ([fmt.end_of_turn_id] if fmt.scored_tokens == "labels" else [])
    prompt = fmt.prompt_ids(question)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + ans])).logits[0].double()
    return sum(float(torch.log_softmax(logits[len(prompt) + t - 1], -1)[tok]) for t, tok in enumerate(ans))


def test_exposure_for_examples_matches_slow_ranking(tiny):
    model, fmt = tiny
    examples = QADataset([
        QAExample("Who?", "Ann", perturbed_answers=["Bob", "Cy", "Dee", "Ed"]),
        QAExample("Year?", "1990", meta={"candidates": ["1991", "1990", "2001", "1789", "1000", "2020"]}),
        QAExample("Color?", "red", perturbed_answers=["blue"]),
    ], "probe")
    result = exposure_for_examples(model, fmt, examples, batch_size=4)
    for i, e in enumerate(examples):
        cands = candidate_set(e)
        logps = [slow_total_logprob(model, fmt, e.question, c) for c in cands]
        # Rank by sorting all candidates, most likely first (no exact ties with a random model).
        rank = sorted(logps, reverse=True).index(logps[0]) + 1
        assert result["per_sample"]["rank"][i] == rank
        assert result["per_sample"]["n_candidates"][i] == len(cands)
        assert result["per_sample"]["exposure"][i] == pytest.approx(math.log2(len(cands)) - math.log2(rank))
    assert result["exposure"] == pytest.approx(sum(result["per_sample"]["exposure"]) / 3)
    with pytest.raises(ValueError, match="no examples"):
        exposure_for_examples(model, fmt, [], batch_size=4)
