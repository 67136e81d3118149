import copy

import numpy as np
import pytest
import torch

from obliviate.data.chat import ChatFormat
from obliviate.data.qa import QADataset, QAExample
from obliviate.evaluation.logprobs import TokenScores
from obliviate.evaluation.memorisation import (
    exact_memorisation,
    extraction_strength,
    memorisation_report,
    run_memorisation,
)
from obliviate.evaluation.muse import (
    continue_texts,
    knowmem,
    knowmem_scores,
    rouge_l,
    text_stop_ids,
    verbmem,
    verbmem_scores,
)
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.models.tiny import build_tiny_model


def matches(*flags):
    n = len(flags)
    return TokenScores(logprobs=np.zeros(n), argmax_match=np.array(flags, dtype=bool), dist_mean=np.zeros(n),
                       dist_std=np.ones(n), token_ids=np.arange(n))


# ---------------------------------------------------------------- EM and ES by hand
@pytest.mark.parametrize("flags, em, es", [
    ((True, True, True), 1.0, 1.0),  # k = 0
    ((False, True, True), 2 / 3, 2 / 3),  # k = 1: from the first token on it is reproduced
    ((True, False, True, True), 0.75, 0.5),  # k = 2
    ((True, True, False), 2 / 3, 0.0),  # last token wrong: k = |a|
    ((False, False, False, False), 0.0, 0.0),
    ((False,), 0.0, 0.0),
    ((True,), 1.0, 1.0),
])
def test_em_and_es_hand_cases(flags, em, es):
    assert exact_memorisation(matches(*flags)) == pytest.approx(em)
    assert extraction_strength(matches(*flags)) == pytest.approx(es)


def test_report_and_empty_input():
    report = memorisation_report([matches(True, False), matches(True, True)])
    assert report == {"em": pytest.approx(0.75), "es": pytest.approx(0.5),
                      "per_sample": {"em": [0.5, 1.0], "es": [0.0, 1.0]}}
    with pytest.raises(ValueError, match="no tokens"):
        exact_memorisation(matches())
    with pytest.raises(ValueError, match="no samples"):
        memorisation_report([])


# ---------------------------------------------------------------- on a tiny model that memorised a little
PAIRS = [("Code?", "abab abab"), ("Name?", "Ann Lee"), ("City?", "Oslo")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)
    tok = load_tokenizer(str(path))
    return load_model(str(path)), tok


@pytest.fixture(scope="module")
def trained(tiny):
    """The tiny model after a few steps on PAIRS: partly memorised, so matches vary by token."""
    model, tok = tiny
    model = copy.deepcopy(model)
    fmt = ChatFormat(tok, system_prompt=None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    encoded = [fmt.encode(q, a, close=False) for q, a in PAIRS]
    torch.manual_seed(0)
    for _ in range(9):
        for e in encoded:
            ids = torch.tensor([e.input_ids])
            logits = model(input_ids=ids).logits[0, e.answer_start - 1:-1]
            loss = torch.nn.functional.cross_entropy(logits, ids[0, e.answer_start:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, fmt


def greedy(model, ids, n):
    """n greedy tokens after ids, one full forward per token (no cache, no padding)."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


def test_run_memorisation_matches_brute_force_greedy_extraction(trained):
    model, fmt = trained
    ds = QADataset([QAExample(q, a) for q, a in PAIRS], "pairs")
    result = run_memorisation(model, fmt, ds, batch_size=2)
    for i, (q, a) in enumerate(PAIRS):
        # The scored tokens: the answer and its closing end-of-turn (ChatFormat.scored_tokens="labels").
        prompt, ans = fmt.prompt_ids(q), fmt.answer_ids(a) + [fmt.end_of_turn_id]
        em = np.mean([greedy(model, prompt + ans[:t], 1)[0] == ans[t] for t in range(len(ans))])
        # ES by definition: the shortest prefix from which greedy decoding reproduces the rest.
        k = next(k for k in range(len(ans) + 1) if greedy(model, prompt + ans[:k], len(ans) - k) == ans[k:])
        assert result["per_sample"]["em"][i] == pytest.approx(em)
        assert result["per_sample"]["es"][i] == pytest.approx(1 - k / len(ans))
    assert result["em"] == pytest.approx(np.mean(result["per_sample"]["em"]))
    assert result["es"] == pytest.approx(np.mean(result["per_sample"]["es"]))
    assert 0 < result["em"]  # the few training steps did teach something


# ---------------------------------------------------------------- MUSE VerbMem / KnowMem
def test_rouge_l_hand_values():
    score = rouge_l("the cat sat on the mat", "the cat sat")  # LCS 3 of 6 reference words, 3 generated
    assert (score.precision, score.recall) == (pytest.approx(1.0), pytest.approx(0.5))
    assert score.fmeasure == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert rouge_l("cats sitting", "cat sit").fmeasure == pytest.approx(1.0)  # Porter stemmer


def test_verbmem_is_f1_and_knowmem_is_recall():
    gens, refs = ["the cat sat", "nothing alike"], ["the cat sat on the mat", "a b"]
    assert verbmem_scores(gens, refs) == {"verbmem": pytest.approx(1 / 3), "per_sample": [pytest.approx(2 / 3), 0.0]}
    assert knowmem_scores(gens, refs) == {"knowmem": pytest.approx(0.25), "per_sample": [pytest.approx(0.5), 0.0]}
    asked = []

    def generate(questions):
        asked.extend(questions)
        return ["the cat sat", "a"]

    result = knowmem(generate, ["q1", "q2"], refs)
    assert asked == ["q1", "q2"] and result["generation"] == ["the cat sat", "a"]
    assert result["per_sample"] == [pytest.approx(0.5), pytest.approx(0.5)]
    with pytest.raises(ValueError, match="2 generations but 1 references"):
        verbmem_scores(gens, refs[:1])


def test_continuations_match_unbatched_greedy_reference(tiny):
    model, tok = tiny
    prompts = ["Once upon a time", "The", "Hsiao Yun-Hwa was born in Taipei", "abc"]
    got = continue_texts(model, tok, prompts, max_new_tokens=6, batch_size=3)
    stops = set(text_stop_ids(tok))
    assert stops == {tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")}
    for prompt, text in zip(prompts, got):
        ref = greedy(model, tok(prompt)["input_ids"], 6)
        cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
        assert text == tok.decode(ref[:cut], skip_special_tokens=True)


def test_verbmem_on_a_model(tiny):
    model, tok = tiny
    result = verbmem(model, tok, ["The", "Once"], ["cat sat", "upon a time"], max_new_tokens=4)
    assert len(result["generation"]) == 2
    references = ["cat sat", "upon a time"]
    assert result["per_sample"] == [rouge_l(r, g).fmeasure for g, r in zip(result["generation"], references)]
    with pytest.raises(ValueError, match="prompts but"):
        verbmem(model, tok, ["The"], [])
