"""TOFU metrics against slow references computed here and against hand-checked values."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat
from obliviate.evaluation import tofu
from obliviate.evaluation.logprobs import TokenScores, score_pairs
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.models.tiny import build_tiny_model


def scores_of(logprobs: list[float]) -> TokenScores:
    """TokenScores with the given token log-probs (the metrics here only read those)."""
    lp = np.array(logprobs, dtype=np.float64)
    zeros = np.zeros_like(lp)
    return TokenScores(logprobs=lp, argmax_match=zeros.astype(bool), dist_mean=zeros, dist_std=zeros,
                       token_ids=zeros.astype(np.int64))


def p_scores(p: float, n_tokens: int = 1) -> TokenScores:
    """An answer whose length-normalised probability is exactly p."""
    return scores_of([math.log(p)] * n_tokens)


# --- against a slow per-sample forward pass on a tiny model ---------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    path = build_tiny_model(tmp_path_factory.mktemp("tofu") / "m", seed=3)
    tok = load_tokenizer(str(path))
    yield load_model(str(path)), tok
    torch.set_num_threads(before)


ROWS = [
    {"q": "Where was Ana born?", "a": "In Lisbon, in 1950.", "para": "Ana was born in Lisbon in 1950.",
     "pert": ["In Oslo, in 1950.", "In Rome, in 1962.", "In Paris."]},
    {"q": "What did she write?", "a": "Novels.", "para": "She wrote novels.",
     "pert": ["Poems.", "Plays about the sea.", "Nothing at all, ever."]},
]


@torch.no_grad()
def slow_nll(model, tok, question: str, answer: str, scored_tokens: str = "labels") -> float:
    """Mean NLL of the scored tokens (the answer, then its closing <|im_end|> unless
    ``scored_tokens="answer"``), one token at a time, from a plain forward pass of one sample."""
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    if scored_tokens == "labels":
        answer_ids = answer_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
    logits = model(input_ids=torch.tensor([prompt + answer_ids])).logits[0]
    total = 0.0
    for k, token in enumerate(answer_ids):
        position = len(prompt) + k - 1  # logits here predict the k-th answer token
        total -= float(torch.log_softmax(logits[position].double(), dim=-1)[token])
    return total / len(answer_ids)


@pytest.mark.parametrize("scored_tokens", ["labels", "answer"])
def test_probability_truth_ratio_normalised_against_slow_reference(tiny, scored_tokens):
    model, tok = tiny
    fmt = ChatFormat(tok, scored_tokens=scored_tokens)
    pairs = [(r["q"], a) for r in ROWS for a in [r["a"], r["para"], *r["pert"]]]
    scores = dict(zip(pairs, score_pairs(model, fmt, pairs, batch_size=3)))

    answer = [scores[(r["q"], r["a"])] for r in ROWS]
    para = [scores[(r["q"], r["para"])] for r in ROWS]
    pert = [[scores[(r["q"], p)] for p in r["pert"]] for r in ROWS]

    ref_p = [math.exp(-slow_nll(model, tok, r["q"], r["a"], scored_tokens)) for r in ROWS]
    ref_para = [math.exp(-slow_nll(model, tok, r["q"], r["para"], scored_tokens)) for r in ROWS]
    ref_pert = [[math.exp(-slow_nll(model, tok, r["q"], p, scored_tokens)) for p in r["pert"]] for r in ROWS]
    ref_geo = [math.prod(ps) ** (1 / len(ps)) for ps in ref_pert]
    ref_ratio = [g / p for g, p in zip(ref_geo, ref_para)]
    ref_norm = [p / (p + sum(ps)) for p, ps in zip(ref_p, ref_pert)]

    np.testing.assert_allclose(tofu.length_normalised_probability(answer), ref_p, rtol=1e-4)
    assert tofu.probability(answer) == pytest.approx(np.mean(ref_p), rel=1e-4)
    np.testing.assert_allclose(tofu.nll(answer), [-math.log(p) for p in ref_p], rtol=1e-4)
    np.testing.assert_allclose(tofu.truth_ratio(para, pert), ref_ratio, rtol=1e-4)
    np.testing.assert_allclose(tofu.normalised_probability(answer, pert), ref_norm, rtol=1e-4)


# --- hand-checked values ----------------------------------------------------------------------------

def test_length_normalised_probability_by_hand():
    # exp(mean(log .5, log .125)) = sqrt(.0625) = .25
    assert tofu.length_normalised_probability([scores_of([math.log(0.5), math.log(0.125)])])[0] == pytest.approx(0.25)
    assert tofu.probability([p_scores(0.2, 3), p_scores(0.6, 1)]) == pytest.approx(0.4)


def test_normalised_probability_by_hand():
    got = tofu.normalised_probability([p_scores(0.25), p_scores(0.5, 4)],
                                      [[p_scores(0.25), p_scores(0.5)], [p_scores(0.1), p_scores(0.1), p_scores(0.3)]])
    np.testing.assert_allclose(got, [0.25 / 1.0, 0.5 / 1.0])
    # Probabilities far below float range: exp(-1000) and exp(-1001) still give 1 / (1 + e^-1).
    tiny = tofu.normalised_probability([scores_of([-1000.0])], [[scores_of([-1001.0, -1001.0])]])
    assert tiny[0] == pytest.approx(1 / (1 + math.exp(-1)))


def test_truth_ratio_by_hand():
    # base P~ .25; perturbed .5 and .125 -> geometric mean .25 -> R = 1; perturbed .5, .5 -> R = 2
    got = tofu.truth_ratio([p_scores(0.25), p_scores(0.25, 2)],
                           [[p_scores(0.5), p_scores(0.125, 3)], [p_scores(0.5), p_scores(0.5)]])
    np.testing.assert_allclose(got, [1.0, 2.0])
    # geometric, not arithmetic, mean of the perturbed probabilities: (.9 * .1) ** .5 = .3
    assert tofu.truth_ratio([p_scores(0.3)], [[p_scores(0.9), p_scores(0.1)]])[0] == pytest.approx(1.0)
    # log space: exp(-1000) / exp(-1001) = e
    assert tofu.truth_ratio([scores_of([-1001.0])], [[scores_of([-1000.0])]])[0] == pytest.approx(math.e)


def test_truth_ratio_aggregates_by_hand():
    r = [2.0, 0.5, 1.0, 0.25]
    assert tofu.aggregate_truth_ratio(r, forget=True) == pytest.approx((0.5 + 0.5 + 1 + 0.25) / 4)
    assert tofu.aggregate_truth_ratio(r, forget=False) == pytest.approx((0 + 0.5 + 0 + 0.75) / 4)
    with pytest.raises(ValueError):
        tofu.aggregate_truth_ratio([], forget=True)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="perturbed"):
        tofu.truth_ratio([p_scores(0.5)], [[]])
    with pytest.raises(ValueError, match="2 answers but 1"):
        tofu.normalised_probability([p_scores(0.5), p_scores(0.5)], [[p_scores(0.5)]])
    with pytest.raises(ValueError, match="references"):
        tofu.rouge_l_recall(["a"], [])


# --- ROUGE-L recall ---------------------------------------------------------------------------------

def lcs_recall(reference: str, generated: str) -> float:
    """Hand-written ROUGE-L recall on lower-cased alphanumeric words: LCS length / reference length."""
    ref, gen = re.findall(r"[a-z0-9]+", reference.lower()), re.findall(r"[a-z0-9]+", generated.lower())
    table = [[0] * (len(gen) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref):
        for j, g in enumerate(gen):
            table[i + 1][j + 1] = table[i][j] + 1 if r == g else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1] / len(ref)


def test_rouge_l_recall_against_hand_lcs():
    cases = [("The cat sat on the mat", "the cat was on a mat"),  # LCS: the cat on mat -> 4/6
             ("a b c d e", "e d c b a"),
             ("She wrote two books", "she wrote two books and a play"),
             ("Lisbon", "Oslo")]
    got = tofu.rouge_l_recall([r for r, _ in cases], [g for _, g in cases])
    np.testing.assert_allclose(got, [lcs_recall(r, g) for r, g in cases])
    assert got[0] == pytest.approx(4 / 6) and got[2] == 1.0 and got[3] == 0.0


def test_rouge_uses_porter_stemmer_and_scores_empty_generation_zero():
    # cats -> cat, jumped/jumps -> jump: full recall only with stemming
    assert tofu.rouge_l_recall(["cats jumped"], ["the cat jumps"])[0] == 1.0
    assert lcs_recall("cats jumped", "the cat jumps") == 0.0
    assert tofu.rouge_l_recall(["an answer"], [""])[0] == 0.0


# --- forget quality and model utility ---------------------------------------------------------------

def test_forget_quality_ks_pvalue():
    # Completely separated samples of sizes 3 and 3: D = 1, exact two-sided p = 2 / C(6, 3) = 0.1
    assert tofu.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(2 / math.comb(6, 3))
    assert tofu.forget_quality([1.0, 2.0], [3.0, 4.0]) == pytest.approx(2 / math.comb(4, 2))
    # identical distributions: p = 1
    assert tofu.forget_quality([0.3, 0.9, 1.4], [0.3, 0.9, 1.4]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(0, 1, 40), rng.lognormal(0.5, 1, 30)
    assert tofu.forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue)
    # TOFU's code tests 1/R; KS only sees the order, so the p-value is the same
    assert tofu.forget_quality(1 / a, 1 / b) == pytest.approx(tofu.forget_quality(a, b))
    with pytest.raises(ValueError):
        tofu.forget_quality([], [1.0])


def test_model_utility_harmonic_mean_by_hand():
    values = [0.9, 0.8, 0.5, 0.6, 0.7, 0.4, 0.3, 0.95, 0.55]
    assert tofu.model_utility(values) == pytest.approx(9 / sum(1 / v for v in values))
    assert tofu.model_utility([0.5] * 8 + [0.0]) == 0.0
    with pytest.raises(ValueError, match="9 numbers"):
        tofu.model_utility([0.5] * 8)
    with pytest.raises(ValueError, match="non-negative"):
        tofu.model_utility([0.5] * 8 + [-0.1])
