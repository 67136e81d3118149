import math
import zlib

import numpy as np
import pytest
import torch

from obliviate.data.chat import ChatFormat
from obliviate.data.qa import QADataset, QAExample
from obliviate.evaluation.logprobs import TokenScores
from obliviate.evaluation.mia import (
    auc,
    gradnorm_scores,
    loss_score,
    mia_report,
    mia_scores,
    min_k_count,
    min_k_plus_plus_score,
    min_k_score,
    privleak,
    reference_score,
    run_mia,
    zlib_score,
)
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.models.tiny import build_tiny_model


def scores(logprobs, mean=None, std=None, ids=None):
    n = len(logprobs)
    return TokenScores(
        logprobs=np.array(logprobs, dtype=np.float64),
        argmax_match=np.zeros(n, dtype=bool),
        dist_mean=np.array(mean if mean is not None else [0.0] * n),
        dist_std=np.array(std if std is not None else [1.0] * n),
        token_ids=np.array(ids if ids is not None else list(range(n))),
    )


HAND = scores([-0.5, -2.0, -1.0, -4.0, -0.1], mean=[-1.0, -1.0, -2.0, -2.0, -0.5], std=[0.5, 1.0, 2.0, 0.0, 0.2])


# ---------------------------------------------------------------- hand-computed scores
def test_loss_is_minus_mean_nll():
    assert loss_score(HAND) == pytest.approx(-(0.5 + 2.0 + 1.0 + 4.0 + 0.1) / 5)  # -1.52


def test_zlib_divides_total_log_prob_by_compressed_answer_length():
    text = "The author's full name is Hsiao Yun-Hwa."
    assert zlib_score(HAND, text) == pytest.approx(-7.6 / len(zlib.compress(text.encode("utf-8"))))
    # A repetitive text compresses better, so the same log-prob gives a more negative score.
    assert zlib_score(HAND, "a" * 40) < zlib_score(HAND, text)


def test_min_k_averages_the_lowest_fraction_with_at_least_one_token():
    assert min_k_score(HAND, 0.4) == pytest.approx((-4.0 - 2.0) / 2)  # floor(0.4 * 5) = 2 tokens
    assert min_k_score(HAND, 0.1) == pytest.approx(-4.0)  # floor(0.5) = 0 -> 1 token
    assert min_k_score(HAND, 1.0) == pytest.approx(-1.52)
    assert min_k_count(5, 0.4) == 2 and min_k_count(1, 0.01) == 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="k must be"):
            min_k_score(HAND, bad)


def test_min_k_plus_plus_standardises_by_the_model_distribution():
    # z = (lp - mu) / sigma = [1.0, -1.0, 0.5, 0 (sigma = 0), 2.0]; lowest two: -1.0 and 0.
    assert min_k_plus_plus_score(HAND, 0.4) == pytest.approx(-0.5)
    assert min_k_plus_plus_score(HAND, 0.2) == pytest.approx(-1.0)
    assert min_k_plus_plus_score(HAND, 1.0) == pytest.approx((1.0 - 1.0 + 0.5 + 0.0 + 2.0) / 5)


def test_reference_score_is_higher_when_the_target_is_more_confident_than_the_reference():
    ref = scores([-1.0] * 5)
    assert reference_score(HAND, ref) == pytest.approx(1.0 - 1.52)  # NLL_ref - NLL_target
    confident = scores([-0.1] * 5)
    assert reference_score(confident, ref) == pytest.approx(1.0 - 0.1)
    with pytest.raises(ValueError, match="different tokens"):
        reference_score(HAND, scores([-1.0] * 5, ids=[9, 9, 9, 9, 9]))
    with pytest.raises(ValueError, match="different tokens"):
        reference_score(HAND, scores([-1.0] * 4))


def test_mia_scores_collects_every_attack():
    rows = [HAND, scores([-0.2, -0.3])]
    out = mia_scores(rows, ["first answer", "second"], k=0.4)
    assert set(out) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
    assert out["loss"] == [loss_score(HAND), pytest.approx(-0.25)]
    assert out["min_k"][1] == pytest.approx(-0.3)
    with_ref = mia_scores(rows, ["first answer", "second"], ref_scores=[scores([-1.0] * 5), scores([-1.0, -1.0])])
    assert with_ref["reference"] == [pytest.approx(-0.52), pytest.approx(0.75)]
    with pytest.raises(ValueError, match="answers"):
        mia_scores(rows, ["only one"])
    with pytest.raises(ValueError, match="reference rows"):
        mia_scores(rows, ["a", "b"], ref_scores=[HAND])


# ---------------------------------------------------------------- AUC and PrivLeak
def brute_force_auc(members, nonmembers):
    wins = sum(1.0 if m > n else 0.5 if m == n else 0.0 for m in members for n in nonmembers)
    return wins / (len(members) * len(nonmembers))


def test_auc_hand_cases():
    assert auc([3, 2], [1, 2]) == pytest.approx(3.5 / 4)  # 3>1, 3>2, 2>1, 2=2 (one half)
    assert auc([5, 6], [1, 2, 3]) == 1.0
    assert auc([1, 2], [5, 6]) == 0.0
    assert auc([1, 1, 1], [1, 1]) == 0.5


def test_auc_matches_brute_force_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.integers(0, 6, size=int(rng.integers(1, 30))).astype(float)
        n = rng.integers(0, 6, size=int(rng.integers(1, 30))).astype(float)
        assert auc(m, n) == pytest.approx(brute_force_auc(m, n), abs=1e-12)


def test_auc_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="needs members"):
        auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auc([float("nan")], [1.0])


def test_mia_report_gives_auc_per_attack():
    forget = {"loss": [3, 2], "min_k": [0, 0]}
    holdout = {"loss": [1, 2], "min_k": [1, 1]}
    assert mia_report(forget, holdout) == {"loss": pytest.approx(0.875), "min_k": 0.0}
    with pytest.raises(ValueError, match="attacks differ"):
        mia_report(forget, {"loss": [1, 2]})
    with pytest.raises(ValueError, match="attack 'loss'"):
        mia_report({"loss": [float("nan")]}, {"loss": [1.0]})


def test_privleak_uses_muse_orientation():
    # MUSE scores are losses, so its AUC is 1 - ours: an un-unlearned model (ours 0.9 -> MUSE 0.1)
    # against a retain model at chance gives (0.1 - 0.5) / 0.5 = -80 %.
    assert privleak(0.9, 0.5) == pytest.approx(-80.0)
    assert privleak(0.2, 0.5) == pytest.approx(60.0)  # over-unlearned: (0.8 - 0.5) / 0.5
    assert privleak(0.55, 0.55) == pytest.approx(0.0)
    assert privleak(0.7, 0.6) == pytest.approx((0.3 - 0.4) / 0.4 * 100)
    with pytest.raises(ValueError, match="undefined"):
        privleak(0.5, 1.0)
    with pytest.raises(ValueError, match="auc_unlearned"):
        privleak(1.2, 0.5)


# ---------------------------------------------------------------- on a tiny model, against a slow reference
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    path = build_tiny_model(root / "target", seed=0)
    ref_path = build_tiny_model(root / "ref", seed=1)
    tok = load_tokenizer(str(path))
    return load_model(str(path)), load_model(str(ref_path)), ChatFormat(tok, system_prompt=None)


FORGET = QADataset([QAExample("Who?", "Ann Lee."), QAExample("Where?", "Oslo, 1990"),
                    QAExample("Genre?", "Crime")], "forget")
HOLDOUT = QADataset([QAExample("Bo?", "A poet."), QAExample("When?", "May 2001"),
                     QAExample("Why?", "Because.")], "holdout")


def scored_ids(fmt, answer):
    """The tokens evaluation scores: the answer, then end-of-turn unless scored_tokens="answer"."""
    return fmt.answer_ids(answer) + ([fmt.end_of_turn_id] if fmt.scored_tokens == "labels" else [])


def slow_token_stats(model, fmt, question, answer):
    """Per answer token: log-prob, and mean / std of log p under the model's distribution, each
    from its own forward pass over the unpadded prefix, in float64."""
    prompt, ans = fmt.prompt_ids(question), scored_ids(fmt, answer)
    lps, mus, sds = [], [], []
    with torch.no_grad():
        for t, token in enumerate(ans):
            prefix = torch.tensor([prompt + ans[:t]])
            logp = torch.log_softmax(model(input_ids=prefix).logits[0, -1].double(), -1).numpy()
            p = np.exp(logp)
            mu = float((p * logp).sum())
            lps.append(float(logp[token]))
            mus.append(mu)
            sds.append(math.sqrt(float((p * (logp - mu) ** 2).sum())))
    return lps, mus, sds


def slow_scores(model, ref_model, fmt, ds, k):
    out = {"loss": [], "zlib": [], "min_k": [], "min_k_plus_plus": [], "reference": []}
    for e in ds:
        lps, mus, sds = slow_token_stats(model, fmt, e.question, e.answer)
        ref_lps, _, _ = slow_token_stats(ref_model, fmt, e.question, e.answer)
        n = max(1, int(k * len(lps)))
        out["loss"].append(sum(lps) / len(lps))
        out["zlib"].append(sum(lps) / len(zlib.compress(e.answer.encode())))
        out["min_k"].append(sum(sorted(lps)[:n]) / n)
        z = sorted((lp - mu) / sd for lp, mu, sd in zip(lps, mus, sds))
        out["min_k_plus_plus"].append(sum(z[:n]) / n)
        out["reference"].append(-sum(ref_lps) / len(ref_lps) + sum(lps) / len(lps))
    return out


def test_run_mia_matches_slow_per_token_reference(tiny):
    model, ref_model, fmt = tiny
    result = run_mia(model, fmt, FORGET, HOLDOUT, ref_model=ref_model, k=0.3, batch_size=2)
    assert result["n_forget"] == 3 and result["n_holdout"] == 3 and result["k"] == 0.3
    for name, ds in (("forget", FORGET), ("holdout", HOLDOUT)):
        expected = slow_scores(model, ref_model, fmt, ds, 0.3)
        assert set(result["scores"][name]) == set(expected)
        for attack, values in expected.items():
            # score_views computes the distribution's std in float32 as sqrt(E[x^2] - E[x]^2), which
            # loses ~1e-4 relative precision on this near-uniform random model: looser for Min-K%++.
            rtol = 1e-3 if attack == "min_k_plus_plus" else 1e-4
            np.testing.assert_allclose(result["scores"][name][attack], values, rtol=rtol, atol=1e-5,
                                       err_msg=f"{name}/{attack}")
    for attack, value in result["auc"].items():
        assert value == pytest.approx(brute_force_auc(result["scores"]["forget"][attack],
                                                      result["scores"]["holdout"][attack]))


def test_gradnorm_matches_backward_and_leaves_model_untouched(tiny):
    model, _, fmt = tiny
    pairs = [(e.question, e.answer) for e in FORGET]
    model.train()
    got = gradnorm_scores(model, fmt, pairs)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for (q, a), score in zip(pairs, got):
        prompt, ans = fmt.prompt_ids(q), scored_ids(fmt, a)
        ids = torch.tensor([prompt + ans])
        logits = model(input_ids=ids).logits[0]
        loss = torch.stack([-torch.log_softmax(logits[len(prompt) + t - 1], -1)[tok]
                            for t, tok in enumerate(ans)]).mean()
        model.zero_grad()
        loss.backward()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
        model.zero_grad(set_to_none=True)
        assert score == pytest.approx(-norm, rel=1e-4)
    model.eval()
    result = run_mia(model, fmt, FORGET, HOLDOUT[:1], with_gradnorm=True)
    assert result["scores"]["forget"]["gradnorm"] == pytest.approx(got, rel=1e-5)
    assert "gradnorm" in result["auc"] and "reference" not in result["auc"]


def test_gradnorm_needs_trainable_parameters(tiny):
    model, _, fmt = tiny
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with pytest.raises(ValueError, match="requires_grad"):
            gradnorm_scores(model, fmt, [("q", "a")])
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_run_mia_rejects_bad_input(tiny):
    model, _, fmt = tiny
    with pytest.raises(ValueError, match="k must be"):
        run_mia(model, fmt, FORGET, HOLDOUT, k=0)
    with pytest.raises(ValueError, match="empty"):
        run_mia(model, fmt, FORGET, QADataset([], "holdout.jsonl"))
