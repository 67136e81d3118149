"""Scoring and generation that compute only what the answer needs keep the numbers (issue 12 item 7).

The references here are plain: one unpadded forward pass of the whole model per (question, answer)
pair, log-softmax over full logits; one full forward pass per generated token, no cache. The library
path (prompts prefilled once and shared by their answers and generation, the output layer only at
scored positions and in chunks, finished rows leaving the batch) must give the same per-token values
within 1e-5 and the same generations, on the tiny model on a CPU in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import obliviate.evaluation.forward as forward
import obliviate.evaluation.logprobs as logprobs
from obliviate.data.chat import ChatFormat
from obliviate.evaluation.forward import Runner
from obliviate.evaluation.generation import generate_answers, greedy_batch, stop_token_ids
from obliviate.evaluation.logprobs import plan_batches, score_and_generate, score_pairs
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.models.tiny import build_tiny_model

ATOL = 1e-5

# Prompts of different lengths in one batch, a question with many answers, answers shared by two
# questions, one-token answers, a repeated pair and documents (empty question: no prompt to share).
PAIRS = [
    ("Who is Bo?", "A painter."),
    ("Where was Ana born? Tell me the city and the country, please.", "In Lisbon, Portugal."),
    ("Who is Bo?", "A singer who also paints on Sundays."),
    ("Who is Bo?", "A cook."),
    ("Who is Bo?", "X"),
    ("Who is Bo?", "A painter."),  # the same pair again
    ("Where does Bo live?", "A painter."),  # an answer shared with another question
    ("Where was Ana born? Tell me the city and the country, please.", "In Oslo."),
    ("", "A plain document about Bo and his paintings."),
    ("Why?", "Because."),
    ("", "Another, shorter document."),
    ("Where does Bo live?", "In Riga, by the sea, in a small house near the old harbour."),
]
QUESTIONS = ["Who is Bo?", "hi", "Where was Ana born? Tell me the city and the country, please.", "x" * 40, "Why?",
             "Who is Bo?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Untied embeddings: the tied random model only repeats its last input token.
    path = build_tiny_model(tmp_path_factory.mktemp("fast") / "m", tie_embeddings=False, seed=3)
    tok = load_tokenizer(str(path))
    return load_model(str(path)).eval(), ChatFormat(tok)


@torch.no_grad()
def plain_scores(model, fmt: ChatFormat, question: str, answer: str) -> dict[str, np.ndarray]:
    """One unpadded forward pass over the pair; every statistic from the full log-softmax."""
    enc = fmt.encode_scored(question, answer)
    ids = torch.tensor([enc.input_ids])
    logits = model(input_ids=ids).logits[0].double()
    rows = torch.log_softmax(logits[enc.answer_start - 1:enc.answer_start - 1 + enc.scored_len], -1)
    target = ids[0, enc.answer_start:enc.answer_start + enc.scored_len]
    p = rows.exp()
    mean = (p * rows).sum(-1)
    return {"logprobs": rows.gather(-1, target[:, None])[:, 0].numpy(),
            "argmax_match": (rows.argmax(-1) == target).numpy(), "dist_mean": mean.numpy(),
            "dist_std": (p * (rows - mean[:, None]) ** 2).sum(-1).sqrt().numpy(), "token_ids": target.numpy()}


@torch.no_grad()
def plain_greedy_tokens(model, prompt: list[int], stops: set[int], max_new_tokens: int) -> list[int]:
    """One full forward pass over the whole sequence per generated token; no cache, no padding."""
    seq, out = list(prompt), []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


def plain_greedy(model, fmt: ChatFormat, question: str, max_new_tokens: int) -> str:
    out = plain_greedy_tokens(model, fmt.prompt_ids(question), set(stop_token_ids(fmt)), max_new_tokens)
    return fmt.tokenizer.decode(out, skip_special_tokens=True).strip()


def assert_same_scores(got, want: dict[str, np.ndarray], what) -> None:
    np.testing.assert_array_equal(got.token_ids, want["token_ids"], err_msg=str(what))
    for key in ("logprobs", "dist_mean", "dist_std"):
        np.testing.assert_allclose(getattr(got, key), want[key], rtol=0, atol=ATOL, err_msg=f"{what} {key}")
        assert np.isfinite(getattr(got, key)).all()
    np.testing.assert_array_equal(got.argmax_match, want["argmax_match"], err_msg=str(what))


@pytest.mark.parametrize("tree_nodes", [1024, 6, 0], ids=["answer-trees", "small-trees", "one-row-per-answer"])
@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_scores_equal_one_plain_forward_per_pair(tiny, batch_size, tree_nodes, monkeypatch):
    """With answer trees (SDPA, eager attention), trees split when they grow past a size (so a
    prompt's answers fill several), and one row per answer (the path for flash attention)."""
    model, fmt = tiny
    monkeypatch.setattr(logprobs, "tree_attention", lambda runner: tree_nodes > 0)
    monkeypatch.setattr(logprobs, "TREE_NODES", tree_nodes)
    got = score_pairs(model, fmt, PAIRS, batch_size=batch_size)
    assert len(got) == len(PAIRS)
    for pair, scores in zip(PAIRS, got):
        assert_same_scores(scores, plain_scores(model, fmt, *pair), pair)


def test_answer_trees_under_eager_attention_give_the_same_numbers(tiny):
    """Eager attention adds the 4D mask to its scores (an additive mask there, a boolean one for SDPA)."""
    model, fmt = tiny
    eager = load_model(model.name_or_path, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager" and logprobs.tree_attention(Runner(eager))
    pairs = [p for p in PAIRS if p[0]]
    for pair, scores in zip(pairs, score_pairs(eager, fmt, pairs, batch_size=4)):
        assert_same_scores(scores, plain_scores(model, fmt, *pair), pair)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_answer_trees_run_under_bf16_autocast(tiny, attention):
    """Under autocast the queries are bf16 while the weights stay float32: the trees' mask must suit
    both attentions (bf16 moves log-probs by about 1e-3, not more)."""
    model, fmt = tiny
    model = load_model(model.name_or_path, attn_implementation=attention).eval()
    pairs = [p for p in PAIRS if p[0]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = score_pairs(model, fmt, pairs, batch_size=4)
    for pair, scores in zip(pairs, mixed):
        np.testing.assert_allclose(scores.logprobs, plain_scores(model, fmt, *pair)["logprobs"], atol=0.05,
                                   err_msg=str(pair))


@pytest.mark.parametrize("head_rows, stats_rows", [(1, 1), (5, 2), (7, 3), (6, 8), (341, 8)])
def test_output_layer_and_statistics_pieces_of_any_size_give_the_same_numbers(tiny, monkeypatch, head_rows,
                                                                               stats_rows):
    """The output layer runs over ``head_rows`` positions at a time and the log-softmax statistics over
    ``stats_rows``; neither has to divide the other (a statistics piece stops at its product's end)."""
    model, fmt = tiny
    monkeypatch.setattr(Runner, "chunk_rows", lambda self: (head_rows, stats_rows))
    for pair, scores in zip(PAIRS, score_pairs(model, fmt, PAIRS, batch_size=4)):
        assert_same_scores(scores, plain_scores(model, fmt, *pair), pair)


def test_scores_without_distribution_statistics_are_the_same_numbers(tiny):
    """``distribution=False`` skips only the mean and spread of each position's log-probs (what
    Min-K%++ reads), which then refuses instead of giving a number; the rest is bit-identical."""
    from obliviate.evaluation.mia import min_k_plus_plus_score

    model, fmt = tiny
    assert any(not q for q, _ in PAIRS)  # documents too, not only prompted answers
    full = score_pairs(model, fmt, PAIRS, batch_size=4)
    lean = score_pairs(model, fmt, PAIRS, batch_size=4, distribution=False)
    for pair, a, b in zip(PAIRS, full, lean):
        assert np.array_equal(a.logprobs, b.logprobs) and np.array_equal(a.argmax_match, b.argmax_match), pair
        assert np.array_equal(a.token_ids, b.token_ids)
        assert b.dist_mean is None and b.dist_std is None and a.dist_mean is not None and a.dist_std is not None
    with pytest.raises(ValueError, match="distribution"):
        min_k_plus_plus_score(lean[0])


def test_evaluation_keeps_distribution_statistics_only_when_a_consumer_reads_them(tiny):
    """The TOFU metrics do not read them; extra pairs (privacy's) do, and then every score has them."""
    from obliviate.evaluation import evaluate as ev

    model, fmt = tiny
    sets = _sets()
    plain = ev.evaluate_with_scores(model, fmt.tokenizer, sets, fmt=fmt, max_new_tokens=2, progress=False)
    extra = [(sets["forget"].examples[0].question, "an answer no set holds")]
    rich = ev.evaluate_with_scores(model, fmt.tokenizer, sets, fmt=fmt, max_new_tokens=2, progress=False,
                                   extra_pairs=extra)
    assert all(s.dist_mean is None for s in plain.scores.pairs.values())
    assert all(s.dist_mean is not None for s in rich.scores.pairs.values()) and extra[0] in rich.scores
    assert plain.result.to_json()["sets"] == rich.result.to_json()["sets"]


def test_answer_only_scoring_and_one_token_answers(tiny):
    model, tok_fmt = tiny
    fmt = ChatFormat(tok_fmt.tokenizer, scored_tokens="answer")
    got = score_pairs(model, fmt, PAIRS, batch_size=4)
    one_token = [s for (q, a), s in zip(PAIRS, got) if q and len(fmt.answer_ids(a)) == 1]
    assert one_token and all(len(s) == 1 for s in one_token)  # scored from the prefill alone
    for pair, scores in zip(PAIRS, got):
        assert_same_scores(scores, plain_scores(model, fmt, *pair), pair)


def test_generations_equal_plain_greedy_and_share_the_scoring_prefill(tiny):
    model, fmt = tiny
    budgets = [12, 3, 12, 12, 1, 7]  # "Who is Bo?" twice, with different budgets
    scores, answers = score_and_generate(model, fmt, PAIRS, QUESTIONS, max_new_tokens=budgets, batch_size=2)
    want = [plain_greedy(model, fmt, q, b) for q, b in zip(QUESTIONS, budgets)]
    assert answers == want
    assert answers[0].startswith(answers[5])  # the shorter budget's answer is a prefix of the longer's
    assert any(len(a) > 2 for a in answers), "the random model should produce some text for this test to mean anything"
    for pair, s in zip(PAIRS, scores):
        assert_same_scores(s, plain_scores(model, fmt, *pair), pair)
    # generation alone gives the same answers as with scoring
    assert generate_answers(model, fmt, QUESTIONS, max_new_tokens=budgets, batch_size=3) == want


def test_each_prompt_is_prefilled_once(tiny, monkeypatch):
    model, fmt = tiny
    prefilled: list[int] = []
    real = forward.prefill

    def counting(runner, prompts, pad_id):
        prefilled.extend(map(tuple, prompts))
        return real(runner, prompts, pad_id)

    import obliviate.evaluation.logprobs as logprobs

    monkeypatch.setattr(logprobs, "prefill", counting)
    score_and_generate(model, fmt, PAIRS, QUESTIONS, max_new_tokens=4, batch_size=2)
    distinct = {q for q, _ in PAIRS if q} | set(QUESTIONS)
    assert sorted(prefilled) == sorted(tuple(fmt.prompt_ids(q)) for q in distinct)
    # every pair and every question lands in exactly one batch
    batches = plan_batches(fmt, PAIRS, QUESTIONS, batch_size=2)
    assert sorted(i for b in batches for i in b.pairs) == list(range(len(PAIRS)))
    assert sorted(j for b in batches for j in b.generate) == list(range(len(QUESTIONS)))
    assert all(len(b.prompts) <= 2 for b in batches)


def test_the_prompts_shared_start_runs_once(tiny):
    """The system turn every prompt starts with runs at batch 1, each prompt's own tokens after it."""
    model, fmt = tiny
    assert forward.common_start([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert forward.common_start([[1, 2, 3], [1, 2, 3]]) == 2  # each prompt keeps a token of its own
    assert forward.common_start([[1, 2, 3]]) == 0 and forward.common_start([[1, 2], [3, 2]]) == 0
    prompts = [fmt.prompt_ids(q) for q in QUESTIONS[:4]]
    shared = forward.common_start(prompts)
    assert shared > 0 and all(p[:shared] == prompts[0][:shared] for p in prompts)
    embedded: list[tuple[int, ...]] = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: embedded.append(tuple(args[0].shape)))
    try:
        forward.prefill(Runner(model), prompts, fmt.tokenizer.pad_token_id)
    finally:
        hook.remove()
    assert embedded == [(1, shared), (len(prompts), max(map(len, prompts)) - shared)]


def test_output_layer_runs_only_at_scored_positions(tiny, monkeypatch):
    """The LM head sees each scored position once (the prompt's last position once per prompt),
    at most a chunk of rows at a time, and never the prompt's other positions."""
    model, fmt = tiny
    head = model.get_output_embeddings()
    seen: list[int] = []
    hook = head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[:-1].numel()))
    monkeypatch.setattr(forward, "LOGIT_BYTES_PER_CHUNK", 4 * Runner(model).vocab_size * 3)  # 3 rows per chunk
    pairs = [p for p in PAIRS if p[0]]
    try:
        score_pairs(model, fmt, pairs, batch_size=32)
    finally:
        hook.remove()
    unique = list(dict.fromkeys(pairs))
    prompts = {q for q, _ in unique}
    # an answer's inputs are its scored tokens but the last; answers to one question that start
    # alike ("A painter." and "A cook.") run their common start once
    inputs = [(q, fmt.encode_scored(q, a)) for q, a in unique]
    starts = {(q, tuple(e.input_ids[e.answer_start:e.answer_start + k])) for q, e in inputs
              for k in range(1, e.scored_len)}
    assert max(seen) <= 3
    assert sum(seen) == len(starts) + len(prompts)
    assert len(starts) < sum(e.scored_len - 1 for _, e in inputs)


def test_finished_rows_leave_the_batch(tiny, monkeypatch):
    model, fmt = tiny
    widths: list[int] = []
    runner = Runner(model)
    real = runner.states

    def recording(ids, mask, *args, **kw):
        widths.append(ids.shape[0])
        return real(ids, mask, *args, **kw)

    monkeypatch.setattr(runner, "states", recording)
    prompts = [fmt.prompt_ids(q) for q in QUESTIONS[:4]]
    budgets = [1, 2, 5, 9]
    out = greedy_batch(model, prompts, [], fmt.tokenizer.pad_token_id, budgets, runner=runner)
    assert [len(o) for o in out] == budgets  # no stop tokens: each row runs to its own budget
    # the prompts' shared start (batch 1), the rest of the prefill, then one step per token after
    # the first, with only the unfinished rows
    assert widths == [1, 4] + [3] + [2] * 3 + [1] * 4
    assert out == [plain_greedy_tokens(model, p, set(), b) for p, b in zip(prompts, budgets)]
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_batch(model, prompts, [], 0, [1, 0, 1, 1])


def test_models_whose_logits_are_not_the_head_of_the_decoder_fall_back(tiny):
    """A model that post-processes its logits (here: scaled) is scored from its own logits."""
    model, fmt = tiny

    class Scaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                    logits_to_keep=0):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep)
            out.logits = out.logits * 0.5
            return out

        def get_decoder(self):
            return self.inner.get_decoder()

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

    scaled = Scaled(model).eval()
    runner = Runner(scaled)
    assert runner.head is None and runner.body is scaled
    got = score_pairs(scaled, fmt, PAIRS[:4], batch_size=2)
    for pair, s in zip(PAIRS[:4], got):
        assert_same_scores(s, plain_scores(scaled, fmt, *pair), pair)
    assert Runner(model).head is model.get_output_embeddings()


# ----------------------------------------------------------------------------------------------
# cheap evaluation where a full one is not needed (trajectory points) and per-set token budgets


def _sets():
    from obliviate.data.qa import QADataset, QAExample

    def qa(q, a, para=None, pert=()):
        return QAExample(q, a, para, list(pert))

    forget = [qa("Where was Ana born?", "In Lisbon.", "Ana was born in Lisbon.", ["In Oslo.", "In Rome."]),
              qa("What did Ana write?", "Novels.", "She wrote novels.", ["Poems.", "Plays."]),
              qa("When did Ana die?", "In 2001.", "She died in 2001.", ["In 1990.", "In 1980."])]
    retain = [qa("Who is Bo?", "A painter.", "Bo paints.", ["A singer.", "A cook."]),
              qa("Where does Bo live?", "In Riga, a city by the Baltic sea.", None, ["In Kyiv.", "In Oslo."])]
    authors = [qa("Who wrote Hamlet?", "Shakespeare", None, ["Dickens", "Austen"])]
    facts = [qa("Capital of France?", "Paris", None, ["Rome", "Berlin"])]
    return {"forget": QADataset(forget, "forget.jsonl"), "retain": QADataset(retain, "retain.jsonl"),
            "real_authors": QADataset(authors, "ra.jsonl"), "world_facts": QADataset(facts, "wf.jsonl")}


def test_likelihood_evaluation_equals_the_full_evaluations_log_prob_numbers(tiny):
    from obliviate.evaluation import evaluate as ev

    model, fmt = tiny
    sets = _sets()
    oracle = ev.evaluate_model(model, fmt.tokenizer, sets, fmt=fmt, max_new_tokens=2, progress=False)
    # another model's full evaluation against that oracle, and its log-prob-only evaluation
    other = build_tiny_model(fmt.tokenizer.name_or_path + "-other", tie_embeddings=False, seed=5)
    other_model = load_model(str(other)).eval()
    full = ev.summary_row(ev.evaluate_model(other_model, fmt.tokenizer, sets, fmt=fmt, max_new_tokens=2,
                                            oracle=oracle, progress=False))
    cheap = ev.evaluate_likelihoods(other_model, sets, fmt, oracle=oracle)  # the same batches as the full one
    assert list(cheap)[:len(full)] == list(full)  # the summary row's keys, in its order
    for key, value in full.items():
        if "rouge" in key or key == "model_utility":
            assert cheap[key] is None, key  # needs generation: absent
        else:
            assert cheap[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert 0 < full["forget_quality"] < 1  # a real comparison, not the oracle against itself
    assert cheap["logprob_utility"] == pytest.approx(ev.logprob_utility(full))


def test_logprob_utility_is_the_harmonic_mean_without_rouge():
    from obliviate.evaluation.evaluate import logprob_utility

    row = {"retain_probability": 0.5, "retain_truth_ratio": 0.25, "retain_rouge": 0.9,
           "real_authors_probability": 0.5, "real_authors_truth_ratio": 1.0, "real_authors_rouge": None,
           "world_facts_probability": 0.25, "world_facts_truth_ratio": 0.5}
    # 6 / (2 + 4 + 2 + 1 + 4 + 2), by hand
    assert logprob_utility(row) == pytest.approx(6 / 15)
    assert logprob_utility({**row, "world_facts_probability": 0.0}) == 0.0
    assert logprob_utility({k: v for k, v in row.items() if k != "retain_truth_ratio"}) is None


def test_length_budget_bounds_each_set_by_its_own_answers(tiny):
    from obliviate.evaluation import evaluate as ev

    model, fmt = tiny
    sets = _sets()
    longest = {name: max(len(fmt.answer_ids(e.answer)) for e in ds) for name, ds in sets.items()}
    budgets = ev.set_token_budgets(sets, fmt, 20, 1.5)
    assert budgets == {name: min(20, -(-3 * n // 2)) for name, n in longest.items()}
    assert budgets["retain"] == 20 and budgets["world_facts"] < 20  # capped; bounded by the set's answers
    assert ev.set_token_budgets(sets, fmt, 20, None) == dict.fromkeys(sets, 20)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--length-budget"):
            ev.set_token_budgets(sets, fmt, 20, bad)

    bounded = ev.evaluate_model(model, fmt.tokenizer, sets, fmt=fmt, max_new_tokens=20, length_budget=1.5,
                                progress=False)
    assert bounded["max_new_tokens_per_set"] == budgets
    for name, s in bounded["sets"].items():
        for q, g in zip(s["per_sample"]["question"], s["per_sample"]["generation"]):
            assert g == plain_greedy(model, fmt, q, budgets[name])
    plain = ev.evaluate_model(model, fmt.tokenizer, sets, fmt=fmt, max_new_tokens=20, progress=False)
    assert "max_new_tokens_per_set" not in plain
    for name in sets:  # the log-prob numbers do not depend on the budget
        assert bounded["sets"][name]["probability"] == plain["sets"][name]["probability"]


def test_tradeoff_figure_plots_the_utility_every_point_has():
    from obliviate.reporting import plots

    traj = [{"step": 0, "forget_quality": 1e-6, "model_utility": 0.5, "logprob_utility": 0.3, "generated": True},
            {"step": 1, "forget_quality": 1e-3, "model_utility": None, "logprob_utility": 0.28, "generated": False},
            {"step": 2, "forget_quality": 0.2, "model_utility": 0.45, "logprob_utility": 0.25, "generated": True}]
    oracle = {"forget_quality": 1.0, "model_utility": 0.6, "retain_probability": 0.5, "retain_truth_ratio": 0.5,
              "real_authors_probability": 0.5, "real_authors_truth_ratio": 0.5, "world_facts_probability": 0.5,
              "world_facts_truth_ratio": 0.5}
    fig = plots.tradeoff_figure({"npo": traj}, {"oracle": oracle})
    ax = fig.axes[0]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "npo"]
    assert list(line.get_ydata()) == [0.3, 0.28, 0.25]  # every point, on one measure
    assert ax.collections[0].get_offsets().tolist() == [[1.0, 0.5]]  # the oracle on the same measure
    assert "without ROUGE" in ax.get_ylabel()
    # trajectories written before (model utility at every point) plot as they did
    old = [{k: v for k, v in r.items() if k != "logprob_utility"} | {"model_utility": 0.5} for r in traj]
    ax = plots.tradeoff_figure({"npo": old}, {"oracle": oracle}).axes[0]
    assert ax.collections[0].get_offsets().tolist() == [[1.0, 0.6]] and "without" not in ax.get_ylabel()


def test_length_budget_option_is_checked_before_the_model_loads(tmp_path, small_bench):
    from typer.testing import CliRunner

    from obliviate.cli.main import app

    res = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "no-model"), "--benchmark", str(small_bench),
                                   "--out", str(tmp_path / "r"), "--length-budget", "0"])
    assert res.exit_code == 2 and "--length-budget" in res.output and "positive" in res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("joinable", [True, False])
def test_rows_join_the_decoding_batch_as_others_finish(tiny, monkeypatch, joinable):
    """One pool of 3 rows for 7 questions whose prompts are much shorter and much longer than the
    running batch's cache: while questions wait, every step runs 3 rows (a row joins as soon as one
    leaves), and each answer equals one full forward per token. With caches that cannot be joined
    the rows wait for the batch to empty: the same answers, batch by batch."""
    from obliviate.evaluation import generation

    model, fmt = tiny
    monkeypatch.setattr(generation, "_joinable", lambda cache: joinable)
    questions = ["hi", "Who is Bo?", "x" * 60, "Why?", "Where was Ana born? Tell me the city and the country.",
                 "y" * 90, "ok"]
    budgets = [9, 2, 5, 13, 1, 7, 4]
    runner = Runner(model)
    widths: list[int] = []
    real = runner.states

    def recording(ids, mask, *args, **kw):
        if ids.shape[1] == 1:
            widths.append(ids.shape[0])
        return real(ids, mask, *args, **kw)

    monkeypatch.setattr(runner, "states", recording)
    pool = generation.DecodePool(runner, 3, [])  # no stop tokens: every row runs to its budget
    pad = fmt.tokenizer.pad_token_id
    for start in range(0, len(questions), 2):  # prefills of 2 prompts, queued as the pool makes room
        rows = list(range(start, min(start + 2, len(questions))))
        pool.add(forward.prefill(runner, [fmt.prompt_ids(questions[j]) for j in rows], pad), range(len(rows)), rows,
                 [budgets[j] for j in rows])
        pool.run_while_full()
        # decoding keeps no autograd graph, even when called with gradients on (it would hold every step's cache)
        assert pool.cache is None or not pool.cache.layers[0].keys.requires_grad
        # a decoding step writes its column in place (no copy of the whole cache per step)
        assert pool.cache is None or all(isinstance(layer, generation._PoolLayer) for layer in pool.cache.layers)
    pool.drain()
    for j, q in enumerate(questions):
        assert pool.done[j] == plain_greedy_tokens(model, fmt.prompt_ids(q), set(), budgets[j]), q
    assert sum(widths) == sum(budgets) - len(budgets)  # one step per token after each row's first
    if joinable:
        assert widths[:8] == [3] * 8  # full while questions wait
        assert len(widths) < max(budgets) + 8
    else:
        assert len(widths) > len(set(widths))  # batch by batch: each batch's rows finish down to one


def test_pool_cache_works_in_place_and_holds_what_concatenation_holds():
    """The pool's cache layer (``_PoolLayer``) holds, in its live rows and columns, what plain
    concatenation gives after the same steps, rows leaving (the last rows filling their slots), rows
    joining (right-aligned, zeros on the left of the shorter) and masked columns cut; a one-column step
    and a leaving row copy nothing else, and only running out of columns makes new buffers."""
    from obliviate.evaluation.generation import _fill_from_the_end, _PoolLayer

    torch.manual_seed(0)
    keys, values = torch.randn(4, 2, 5, 3), torch.randn(4, 2, 5, 3)
    layer = _PoolLayer(keys, values, width=8)

    def same() -> None:
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        assert layer.get_seq_length() == keys.shape[2]

    def step(rows: int) -> None:
        nonlocal keys, values
        k, v = torch.randn(rows, 2, 1, 3), torch.randn(rows, 2, 1, 3)
        layer.update(k, v)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        same()

    def left(x: torch.Tensor, width: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, width - x.shape[2], 0))

    same()
    start = layer.buffers[0].data_ptr()
    for _ in range(3):
        step(4)
    assert layer.buffers[0].data_ptr() == start  # written in place

    order = _fill_from_the_end(4, {1})
    assert order == [0, 3, 2]  # the last row fills the gap; the others stay where they are
    layer.move_rows(order)
    keys, values = keys[order], values[order]
    same()
    step(3)
    assert _fill_from_the_end(5, {0, 4}) == [3, 1, 2] and _fill_from_the_end(2, {0, 1}) == []

    for cols in (4, 14):  # newcomers shorter than the batch, then longer than the buffers reach
        new_k, new_v = torch.randn(2, 2, cols, 3), torch.randn(2, 2, cols, 3)
        layer.join(new_k, new_v)
        width = max(cols, keys.shape[2])
        keys = torch.cat([left(keys, width), left(new_k, width)])
        values = torch.cat([left(values, width), left(new_v, width)])
        same()
        step(keys.shape[0])
    with pytest.raises(ValueError, match="do not fit"):
        layer.join(new_k, new_v)  # 9 rows in a pool of 8

    layer.cut(3)
    keys, values = keys[:, :, 3:], values[:, :, 3:]
    same()
    layer.batch_select_indices(torch.tensor([4, 0, 0]))  # any selection still works (a copy)
    keys, values = keys[[4, 0, 0]], values[[4, 0, 0]]
    same()
    start, room = layer.buffers[0].data_ptr(), layer.buffers[0].shape[2] - layer.hi
    for _ in range(room):
        step(3)
    assert layer.buffers[0].data_ptr() == start
    step(3)  # the room is used up: new buffers
    assert layer.buffers[0].data_ptr() != start
