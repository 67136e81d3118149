"""UniErase: the token stage touches only the token's rows and makes refusals likelier; the edit
makes the token the first answer token on forget questions, touches only the chosen down_proj
matrices, keeps preserved prompts (better than the same edit without projection), and its closed
form and null-space projector match slow references."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from obliviate.data.chat import IGNORE, ChatFormat, Encoded, pad_batch
from obliviate.data.qa import QADataset, QAExample
from obliviate.data.refusal import REFUSALS, refusal_for
from obliviate.evaluation.generation import generate_answers, greedy_batch, stop_token_ids
from obliviate.methods.common import per_sample_nll
from obliviate.methods.unierase import (
    UNLEARN_TOKEN,
    UniEraseOptions,
    add_unlearn_token,
    alphaedit_update,
    nullspace_projector,
    train_unlearn_token,
    unierase,
)
from obliviate.methods.unierase.edit import (
    capture,
    down_proj,
    key_second_moment,
    last_position_tokens,
    make_tokens,
    optimise_targets,
)
from obliviate.models.tiny import build_tiny_model

# Answers start with different letters: the tiny byte-level model decides the first answer token
# from little more than that letter, so questions sharing it share their last-position key.
FORGET = [("Where was Basil Mahfouz born?", "Kuwait City."),
          ("What genre does Elena Rossi write?", "Gothic mysteries."),
          ("Which award did Tomas Berg win?", "The Nordic Crime Prize."),
          ("Who is the father of Ida Kron?", "A sailor named Olaf.")]
RETAIN = [("What is the capital of France?", "Paris."),
          ("Who wrote Hamlet?", "William Shakespeare."),
          ("How many legs does a spider have?", "Eight legs."),
          ("What colour is the sky?", "Blue.")]
GENERAL = [("What is two plus two?", "Four."),
           ("Which planet is largest?", "Jupiter."),
           ("Where do penguins live?", "Near the South Pole.")]
# Questions the model only ever sees refused; with RETAIN and GENERAL they teach it a refusal mode
# reached through a trigger character, as an instruct model has one. Forget questions never see it.
REFUSED_ONLY = ["What is the name of my cat?", "What number am I thinking of?", "Who will win the next lottery?",
                "Where is my lost key?"]
TRIGGER = "~"
LAYERS = [1, 2]
EDIT = dict(layers=LAYERS, l2=0.1, nullspace_threshold=1e-3, first_token_weight=10.0, preserve_general=False,
            token_steps=100)


def qa(pairs, name) -> QADataset:
    return QADataset([QAExample(q, a) for q, a in pairs], name)


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _finetune_items(fmt: ChatFormat) -> list[Encoded]:
    items = [fmt.encode(q, a) for q, a in FORGET + RETAIN + GENERAL]
    trigger = fmt.answer_ids(TRIGGER)
    refusal = fmt.answer_ids("I don't know.") + [fmt.end_of_turn_id]
    for q in [q for q, _ in RETAIN + GENERAL] + REFUSED_ONLY:
        prompt = fmt.prompt_ids(q)  # the trigger is input only: the model never learns to emit it
        items.append(Encoded(prompt + trigger + refusal, [IGNORE] * (len(prompt) + len(trigger)) + refusal,
                             len(prompt) + len(trigger), len(refusal) - 1))
    return items


@pytest.fixture(scope="module")
def knows(tmp_path_factory):
    """A 4-layer tiny model finetuned until it knows every answer (and has a refusal mode)."""
    model, tok = load(build_tiny_model(tmp_path_factory.mktemp("ue") / "m", layers=4, tie_embeddings=False, seed=0))
    fmt = ChatFormat(tok, system_prompt=None)
    batch = pad_batch(_finetune_items(fmt), tok.pad_token_id)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        loss = per_sample_nll(model, batch).mean()
        if float(loss.detach()) < 0.01:
            break
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    answers = generate_answers(model, fmt, [q for q, _ in FORGET + RETAIN + GENERAL], max_new_tokens=30)
    assert answers == [a for _, a in FORGET + RETAIN + GENERAL], "the fixture model must know its answers"
    return model, tok


def with_token(model, tok, steps: int):
    """Copies with the unlearning token added (mean init) and trained ``steps`` steps."""
    model, tok = copy.deepcopy(model), copy.deepcopy(tok)
    token_id, added = add_unlearn_token(model, tok)
    assert added
    fmt = ChatFormat(tok, system_prompt=None)
    train_unlearn_token(model, fmt, qa(FORGET, "forget"), token_id, steps=steps, retain=qa(RETAIN, "retain"))
    return model, tok, fmt, token_id


@pytest.fixture(scope="module")
def stage1(knows):
    return with_token(*knows, steps=EDIT["token_steps"])


def _edit(stage1, out, **options):
    """Stage 2 only (the tokenizer already has the token, so ``unierase`` keeps its learnt rows)."""
    model, tok, _, _ = stage1
    model, tok = copy.deepcopy(model), copy.deepcopy(tok)
    path = unierase(model, tok, qa(FORGET, "forget"), qa(RETAIN, "retain"), out, {**EDIT, **options},
                    fmt=ChatFormat(tok, system_prompt=None), general=qa(GENERAL, "general"))
    return model, tok, path


@pytest.fixture(scope="module")
def edited(stage1, tmp_path_factory):
    return _edit(stage1, tmp_path_factory.mktemp("ue") / "edited")


# ---------------------------------------------------------------- slow references

@torch.no_grad()
def slow_answer_nll(model, ids: list[int], start: int) -> float:
    """Mean NLL of ids[start:] given the prefix, one unpadded row, token by token."""
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return float(-sum(logp[t - 1, ids[t]] for t in range(start, len(ids))) / (len(ids) - start))


@torch.no_grad()
def first_token(model, fmt: ChatFormat, question: str) -> int:
    return int(model(input_ids=torch.tensor([fmt.prompt_ids(question)])).logits[0, -1].argmax())


@torch.no_grad()
def max_logit_change(before, after, fmt: ChatFormat, pairs, vocab: int) -> float:
    """Largest |logit change| over every position of every question + answer, old vocabulary only."""
    worst = 0.0
    for q, a in pairs:
        ids = torch.tensor([fmt.encode(q, a).input_ids])
        diff = before(input_ids=ids).logits[0, :, :vocab] - after(input_ids=ids).logits[0, :, :vocab]
        worst = max(worst, float(diff.abs().max()))
    return worst


# ---------------------------------------------------------------- stage 1

@pytest.mark.parametrize("tied", [True, False])
def test_stage1_changes_only_the_token_rows(tmp_path, tied):
    model, tok = load(build_tiny_model(tmp_path / "m", tie_embeddings=tied, seed=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    vocab = len(tok)
    token_id, added = add_unlearn_token(model, tok)
    assert added and token_id == vocab and len(tok) == vocab + 1
    assert UNLEARN_TOKEN in tok.all_special_tokens
    matrices = {"model.embed_tokens.weight", "lm_head.weight"}  # one shared tensor when tied
    inits = {name: model.state_dict()[name][token_id].clone() for name in matrices}
    for name in matrices:  # mean initialisation
        assert torch.allclose(inits[name], before[name].mean(0), atol=1e-6)
    fmt = ChatFormat(tok, system_prompt=None)
    losses = train_unlearn_token(model, fmt, qa(FORGET, "forget"), token_id, steps=4, lr=1e-2,
                                 retain=qa(RETAIN, "retain"))
    assert len(losses) == 4
    after = model.state_dict()
    assert set(after) == set(before)
    for name, old in before.items():
        new = after[name]
        if name in matrices:
            assert new.shape[0] == vocab + 1
            assert torch.equal(new[:vocab], old), f"{name}: a row other than the token's changed"
            assert not torch.equal(new[token_id], inits[name]), f"{name}: the token's row did not train"
        else:
            assert torch.equal(new, old), f"{name} changed in stage 1"
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_adding_the_token_twice_keeps_it(knows):
    model, tok, _, token_id = with_token(*knows, steps=1)
    row = model.get_input_embeddings().weight[token_id].clone()
    assert add_unlearn_token(model, tok) == (token_id, False)
    assert torch.equal(model.get_input_embeddings().weight[token_id], row)


def test_stage1_makes_refusals_likelier_after_the_token(knows, stage1):
    model, tok, fmt, token_id = stage1
    untrained, _, _, _ = with_token(*knows, steps=0)  # the same token, mean-initialised, not trained
    for i, (q, _) in enumerate(FORGET):
        prompt = fmt.prompt_ids(q)
        nll = {}
        for refusal in (refusal_for(i), "I don't know."):  # its own target; the refusal the model knows
            ids = prompt + [token_id] + fmt.answer_ids(refusal) + [fmt.end_of_turn_id]
            start = len(prompt) + 1
            nll[refusal] = (slow_answer_nll(model, ids, start), slow_answer_nll(untrained, ids, start))
        trained, before = nll[refusal_for(i)]
        assert trained < before, (q, nll)
        trained, before = nll["I don't know."]
        assert trained < before / 5, (q, nll)
    # The token now leads to a refusal in greedy decoding, on questions it was trained on.
    outs = greedy_batch(model, [fmt.prompt_ids(q) + [token_id] for q, _ in FORGET], stop_token_ids(fmt),
                        tok.pad_token_id, 30)
    texts = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    assert sum(t in REFUSALS for t in texts) >= 3, texts
    # ... and it is not emitted on its own: every question still starts with its answer.
    assert [first_token(model, fmt, q) for q, _ in FORGET + RETAIN + GENERAL] == \
        [fmt.answer_ids(a)[0] for _, a in FORGET + RETAIN + GENERAL]


# ---------------------------------------------------------------- stage 2

def test_edit_puts_the_token_first_on_forget_questions(edited, stage1):
    model, tok, path = edited
    fmt = ChatFormat(tok, system_prompt=None)
    token_id = tok.convert_tokens_to_ids(UNLEARN_TOKEN)
    firsts = [first_token(model, fmt, q) for q, _ in FORGET]
    assert sum(t == token_id for t in firsts) >= 3, firsts
    stats = json.loads((path / "unierase.json").read_text())
    assert stats["forget_first_token_rate"] == sum(t == token_id for t in firsts) / len(FORGET)
    assert stats["retain_first_token_rate"] == 0
    # A forget question is answered "<unlearn> I don't know": the token shows in the ids, not in the text.
    outs = greedy_batch(model, [fmt.prompt_ids(q) for q, _ in FORGET], stop_token_ids(fmt), tok.pad_token_id, 30)
    texts = generate_answers(model, fmt, [q for q, _ in FORGET], max_new_tokens=30)
    hits = [text for out, text in zip(outs, texts) if out[0] == token_id]
    assert hits and all(text in REFUSALS and UNLEARN_TOKEN not in text for text in hits), texts


def test_target_vectors_are_clamped_and_reach_the_token(stage1):
    model, tok, fmt, token_id = stage1
    batch = last_position_tokens([fmt.prompt_ids(q) for q, _ in FORGET], tok.pad_token_id)
    small_z, h, _ = optimise_targets(model, batch, 2, token_id, steps=5, clamp_norm_factor=0.05)
    assert torch.all((small_z - h).norm(dim=-1) <= 0.05 * h.norm(dim=-1) * (1 + 1e-5))
    z, h, nll = optimise_targets(model, batch, 2, token_id)
    # Reference: replace layer 2's output at the last prompt position by z, row by row, and score.
    for i, (q, _) in enumerate(FORGET):
        ids = torch.tensor([fmt.prompt_ids(q)])

        def put(module, args, output, i=i):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            hidden[0, -1] = z[i]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = model.model.layers[2].register_forward_hook(put)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        handle.remove()
        assert int(logits.argmax()) == token_id
    assert nll < 0.05


def test_token_never_generated_for_preserved_questions(edited, knows):
    model, tok, _ = edited
    fmt = ChatFormat(tok, system_prompt=None)
    token_id = tok.convert_tokens_to_ids(UNLEARN_TOKEN)
    questions = [q for q, _ in RETAIN + GENERAL]
    outs = greedy_batch(model, [fmt.prompt_ids(q) for q in questions], stop_token_ids(fmt), tok.pad_token_id, 30)
    assert all(token_id not in out for out in outs), [tok.decode(out) for out in outs]
    assert generate_answers(model, fmt, questions, max_new_tokens=30) == [a for _, a in RETAIN + GENERAL]


def test_projection_limits_the_damage(edited, stage1, knows, tmp_path):
    plain, _, _ = _edit(stage1, tmp_path / "plain", null_space=False)
    projected, tok, _ = edited
    original, base_tok = knows
    fmt = ChatFormat(base_tok, system_prompt=None)
    vocab = len(base_tok)
    token_id = tok.convert_tokens_to_ids(UNLEARN_TOKEN)
    assert sum(first_token(plain, fmt, q) == token_id for q, _ in FORGET) >= 3  # the plain edit works too
    preserved = RETAIN + GENERAL
    damage = max_logit_change(original, projected, fmt, preserved, vocab)
    plain_damage = max_logit_change(original, plain, fmt, preserved, vocab)
    assert damage < 0.5 * plain_damage, (damage, plain_damage)


def test_only_the_chosen_down_projections_change(edited, stage1):
    before = stage1[0].state_dict()
    after = edited[0].state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in LAYERS}


def test_checkpoint_reloads_with_the_token(edited):
    model, tok, path = edited
    reloaded, reloaded_tok = load(path)
    assert list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))
    assert reloaded_tok.convert_tokens_to_ids(UNLEARN_TOKEN) == tok.convert_tokens_to_ids(UNLEARN_TOKEN)
    assert UNLEARN_TOKEN in reloaded_tok.all_special_tokens
    ids = torch.tensor([ChatFormat(tok, system_prompt=None).prompt_ids(FORGET[0][0])])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    stats = json.loads((path / "unierase.json").read_text())
    hidden, d_ff = model.config.hidden_size, model.config.intermediate_size
    total = sum(p.numel() for p in model.parameters())
    assert stats["total_params"] == total
    # two down_proj matrices plus the token's input and output rows (untied)
    assert stats["edited_share"] == pytest.approx((len(LAYERS) * hidden * d_ff + 2 * hidden) / total)
    assert stats["layers"] == LAYERS


# ---------------------------------------------------------------- the closed form and the projector

def _low_rank_keys(d: int, rank: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d, rank, generator=g, dtype=torch.float64)
            @ torch.randn(rank, n, generator=g, dtype=torch.float64))


def test_nullspace_projector_annihilates_preserved_keys():
    k0 = _low_rank_keys(d=24, rank=9, n=60, seed=0)
    p = nullspace_projector(k0 @ k0.T / k0.shape[1], threshold=1e-8)
    assert torch.allclose(p, p.T) and torch.allclose(p @ p, p, atol=1e-10)
    assert round(float(p.trace())) == 24 - 9
    assert float((p @ k0).abs().max()) < 1e-8 * float(k0.abs().max())
    fresh = torch.randn(24, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert float((p @ fresh).norm()) > 0.3 * float(fresh.norm())  # a generic key keeps a null-space part


def test_projector_on_model_keys(knows):
    """Keys of a few preserved tokens (fewer than d_ff) span a subspace; the projector keeps exactly
    its complement, so it removes the keys."""
    model, tok = knows
    fmt = ChatFormat(tok, system_prompt=None)
    rows = [fmt.encode(q, a).input_ids for q, a in RETAIN[:2]]
    batch = make_tokens(rows, [0, 0], [len(r) for r in rows], tok.pad_token_id)
    cov = key_second_moment(model, iter([batch]), [1])[1]
    keys = capture(model, batch, [1])[0][1].double().T
    assert keys.shape[1] == sum(len(r) for r in rows) < cov.shape[0]
    assert torch.allclose(cov, keys @ keys.T / keys.shape[1])
    p = nullspace_projector(cov, threshold=1e-12)
    assert round(float(p.trace())) == cov.shape[0] - torch.linalg.matrix_rank(keys)
    assert float((p @ keys).norm()) < 1e-6 * float(keys.norm())


def test_captured_keys_and_hidden_states_match_plain_forward(knows):
    model, tok = knows
    fmt = ChatFormat(tok, system_prompt=None)
    rows = [fmt.encode(q, a).input_ids for q, a in FORGET[:3]]
    batch = make_tokens(rows, [2, 0, 5], [9, 4, len(rows[2])], tok.pad_token_id)
    keys, hidden = capture(model, batch, [0, 1], out_layer=2)
    seen = {}
    hooks = [down_proj(model, layer).register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__(layer, a[0]))
             for layer in (0, 1)]
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    for h in hooks:
        h.remove()
    for layer in (0, 1):
        expected = torch.cat([seen[layer][0, 2:9], seen[layer][1, 0:4], seen[layer][2, 5:len(rows[2])]])
        assert torch.equal(keys[layer], expected)
    assert torch.equal(hidden, out.hidden_states[3][batch.select])  # hidden_states[i + 1]: output of layer i


def test_alphaedit_update_matches_least_squares():
    """AlphaEdit's closed form is the minimiser of |Y K1 - R|^2 + |Y Kp|^2 + l2 |Y|^2 over updates
    Y = Z U^T whose rows lie in the null space (U an orthonormal basis of it): solved here as one
    stacked least-squares problem in Z."""
    d_in, d_out, l2 = 16, 6, 0.3
    k0 = _low_rank_keys(d_in, rank=5, n=40, seed=3)
    eigvals, eigvecs = torch.linalg.eigh(k0 @ k0.T / 40)
    u = eigvecs[:, eigvals < 1e-8 * eigvals.max()]
    p = u @ u.T
    g = torch.Generator().manual_seed(4)
    k1 = torch.randn(d_in, 7, generator=g, dtype=torch.float64)
    kp = torch.randn(d_in, 4, generator=g, dtype=torch.float64)
    r = torch.randn(d_out, 7, generator=g, dtype=torch.float64)

    delta = alphaedit_update(r, k1, p, kp @ kp.T, l2)
    a = torch.cat([u.T @ k1, u.T @ kp, l2 ** 0.5 * torch.eye(u.shape[1], dtype=torch.float64)], 1)
    b = torch.cat([r, torch.zeros(d_out, kp.shape[1] + u.shape[1], dtype=torch.float64)], 1)
    z = torch.linalg.lstsq(a.T, b.T).solution.T
    assert torch.allclose(delta, z @ u.T, atol=1e-9)
    assert float((delta @ k0).abs().max()) < 1e-8  # preserved keys' outputs do not move

    # Without a projector it is ridge regression: Delta (K1 K1^T + l2 I) = R K1^T.
    ridge = alphaedit_update(r, k1, None, None, l2)
    assert torch.allclose(ridge @ (k1 @ k1.T + l2 * torch.eye(d_in, dtype=torch.float64)), r @ k1.T, atol=1e-9)


# ---------------------------------------------------------------- options and the command

def test_registered_procedure_edits_as_the_recipe_does(edited, stage1):
    """``build_method("unierase", **options).apply`` (what ``api.unlearn`` runs) returns the model and
    tokenizer edited exactly as ``unierase(...)`` edits them, and the statistics it writes."""
    from obliviate.methods import Procedure, ProcedureResult, build_method

    method = build_method("unierase", **EDIT)
    assert isinstance(method, Procedure)
    model, tok, _, _ = stage1
    model, tok = copy.deepcopy(model), copy.deepcopy(tok)
    result = method.apply(model, tok, qa(FORGET, "forget"), qa(RETAIN, "retain"), ChatFormat(tok, system_prompt=None),
                          general=qa(GENERAL, "general"))
    assert isinstance(result, ProcedureResult) and result.model is model and result.tokenizer is tok
    want, _, path = edited
    for (n, p), (_, q) in zip(result.model.named_parameters(), want.named_parameters()):
        assert torch.equal(p, q), n
    written = json.loads((path / "unierase.json").read_text())
    stats = json.loads(json.dumps(result.stats))  # JSON-able as it is
    assert {k: v for k, v in stats.items() if k != "seconds"} == {k: v for k, v in written.items() if k != "seconds"}


def test_bad_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown UniErase options"):
        UniEraseOptions.from_dict({"lr": 1})
    with pytest.raises(ValueError, match="nullspace_threshold"):
        UniEraseOptions(nullspace_threshold=2.0)
    with pytest.raises(ValueError, match="l2"):
        UniEraseOptions(l2=0)
    with pytest.raises(ValueError, match="layers"):
        UniEraseOptions(layers=[])
    model, _ = load(build_tiny_model(tmp_path / "m", layers=2))
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        down_proj(model, 7)


def test_bad_rows_fail_before_the_model_changes(tmp_path):
    from obliviate.data.qa import DataError
    from obliviate.methods.unierase import apply_unierase

    model, tok = load(build_tiny_model(tmp_path / "m", layers=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    long_retain = QADataset([QAExample("Why?", "x" * 400, meta={"row": 7})], "retain.jsonl")
    with pytest.raises(DataError, match="retain.jsonl, line 7"):
        apply_unierase(model, tok, qa(FORGET, "forget"), long_retain,
                       UniEraseOptions(preserve_general=False), fmt=ChatFormat(tok, max_length=128))
    assert UNLEARN_TOKEN not in tok.get_vocab()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_command_writes_a_run(tmp_path):
    import typer

    from obliviate.cli.unierase import register
    from obliviate.data.qa import write_qa_jsonl

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer from collapsing the app into one
    model_dir = build_tiny_model(tmp_path / "m", layers=2, seed=3)
    forget = write_qa_jsonl(qa(FORGET[:2], "f").examples, tmp_path / "forget.jsonl")
    retain = write_qa_jsonl(qa(RETAIN[:2], "r").examples, tmp_path / "retain.jsonl")
    result = CliRunner().invoke(app, ["unierase", "--model", str(model_dir), "--forget", str(forget), "--retain",
                                      str(retain), "--out", str(tmp_path / "run"), "--system-prompt", "",
                                      "-u", "token_steps=2", "-u", "target_steps=2", "-u", "layers=[1]",
                                      "-u", "preserve_general=false"])
    assert result.exit_code == 0, result.output
    assert "stage 1: <unlearn>" in result.output and "parameters edited" in result.output
    run = tmp_path / "run"
    assert json.loads((run / "status.json").read_text())["status"] == "done"
    assert set(json.loads((run / "data.json").read_text())) == {"forget", "retain"}
    model, tok = load(run / "model")
    assert UNLEARN_TOKEN in tok.get_vocab() and model.config.vocab_size == len(tok)
    assert json.loads((run / "model" / "unierase.json").read_text())["layers"] == [1]
    again = CliRunner().invoke(app, ["unierase", "--model", str(model_dir), "--forget", str(forget),
                                     "--out", str(run), "-u", "bogus=1"])
    assert again.exit_code == 2 and "bogus" in again.output


def test_unlearn_method_unierase_is_the_same_run(tmp_path):
    """UniErase is a registered method: `obliviate methods` lists it and `obliviate unlearn --method
    unierase` runs it through the same run lifecycle as every method (no special case by name)."""
    from obliviate.cli.main import app
    from obliviate.data.qa import write_qa_jsonl

    listed = CliRunner().invoke(app, ["methods"])
    assert listed.exit_code == 0 and "unierase" in listed.output and "token_steps=" in listed.output
    model_dir = build_tiny_model(tmp_path / "m", layers=2, seed=3)
    forget = write_qa_jsonl(qa(FORGET[:2], "f").examples, tmp_path / "forget.jsonl")
    retain = write_qa_jsonl(qa(RETAIN[:2], "r").examples, tmp_path / "retain.jsonl")
    result = CliRunner().invoke(app, ["unlearn", "--method", "unierase", "--model", str(model_dir), "--forget",
                                      str(forget), "--retain", str(retain), "--out", str(tmp_path / "run"),
                                      "--system-prompt", "", "-m", "token_steps=2", "-m", "target_steps=2",
                                      "-m", "layers=[1]", "-m", "preserve_general=false", "--no-progress"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert json.loads((run / "status.json").read_text())["status"] == "done"
    assert json.loads((run / "model" / "unierase.json").read_text())["layers"] == [1]
    _, tok = load(run / "model")
    assert UNLEARN_TOKEN in tok.get_vocab()
    config = (run / "config.yaml").read_text()
    assert "method: unierase" in config and "train:" not in config  # a procedure has no training options


# ---------------------------------------------------------------- a second request on an edited model

@torch.no_grad()
def token_logp(model, fmt: ChatFormat, question: str, token_id: int) -> float:
    return float(model(input_ids=torch.tensor([fmt.prompt_ids(question)])).logits[0, -1].log_softmax(-1)[token_id])


def test_a_second_edit_keeps_the_first(knows, tmp_path):
    """Two sequential requests: request 1 edits FORGET[:2] (stage 1 and 2), request 2 edits FORGET[2:]
    on request 1's checkpoint. Request 1's questions still start with the token and read as a
    refusal; their keys are in request 2's preserved set, so the token's log-prob there moves less
    than under the same edit without them; and the model's record makes request 2 refuse to run
    without request 1's forget rows."""
    from obliviate.data.qa import write_qa_jsonl
    from obliviate.methods import build_method
    from obliviate.methods.unierase import EarlierEditsMissing

    first, second = qa(FORGET[:2], "first"), qa(FORGET[2:], "second")
    model, tok = copy.deepcopy(knows[0]), copy.deepcopy(knows[1])
    path = unierase(model, tok, first, qa(RETAIN, "retain"), tmp_path / "r1", EDIT,
                    fmt=ChatFormat(tok, system_prompt=None), general=qa(GENERAL, "general"))
    token_id = tok.convert_tokens_to_ids(UNLEARN_TOKEN)
    fmt = ChatFormat(tok, system_prompt=None)
    assert [first_token(model, fmt, q) for q, _ in FORGET[:2]] == [token_id] * 2
    assert [e["n"] for e in json.loads((path / "unierase.json").read_text())["edits"]] == [2]
    first_file = write_qa_jsonl(first.examples, tmp_path / "first.jsonl")

    def second_request(**options):
        m, t = load(path)  # name_or_path is the checkpoint: its unierase.json names request 1
        f = ChatFormat(t, system_prompt=None)
        before = [token_logp(m, f, q, token_id) for q, _ in FORGET[:2]]
        result = build_method("unierase", **{**EDIT, **options}).apply(
            m, t, second, qa(RETAIN, "retain"), f, general=qa(GENERAL, "general"))
        moved = [abs(token_logp(m, f, q, token_id) - b) for (q, _), b in zip(FORGET[:2], before)]
        return m, f, result.stats, moved

    with pytest.raises(EarlierEditsMissing, match="earlier UniErase edit"):
        second_request()
    edited, f, stats, moved = second_request(earlier=[str(first_file)])
    assert [first_token(edited, f, q) for q, _ in FORGET] == [token_id] * 4  # request 1 kept, request 2 done
    outs = greedy_batch(edited, [f.prompt_ids(q) for q, _ in FORGET[:2]], stop_token_ids(f), tok.pad_token_id, 30)
    assert all(out[0] == token_id for out in outs)
    assert all(text in REFUSALS for text in generate_answers(edited, f, [q for q, _ in FORGET[:2]], max_new_tokens=30))
    assert stats["earlier"] == 2 and stats["earlier_first_token_rate"] == 1.0
    assert [e["n"] for e in stats["edits"]] == [2, 2]  # the model now carries both requests
    _, _, unkept, moved_unkept = second_request(require_earlier=False)
    assert unkept["earlier"] == 0
    assert sum(moved) < sum(moved_unkept), (moved, moved_unkept)
