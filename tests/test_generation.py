"""Greedy generation: batched equals one-by-one equals a slow cache-free reference; stops at end-of-turn."""

from __future__ import annotations

import pytest
import torch

from obliviate.data.chat import ChatFormat, pad_batch
from obliviate.evaluation.generation import decode_width, generate_answers, greedy_batch, stop_token_ids
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.models.tiny import build_tiny_model

QUESTIONS = ["hi", "What is the capital of France?", "x" * 40, "Who wrote it?", "abc def", "Why?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Untied embeddings: the tied random model only repeats its last input token.
    path = build_tiny_model(tmp_path_factory.mktemp("gen") / "m", tie_embeddings=False, seed=1)
    tok = load_tokenizer(str(path))
    return load_model(str(path)), tok, ChatFormat(tok)


@torch.no_grad()
def slow_greedy(model, prompt: list[int], stop: set[int], max_new_tokens: int) -> list[int]:
    """Reference: full forward pass over the whole sequence at every step, no cache, no padding."""
    seq, out = list(prompt), []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
        nxt = int(torch.argmax(logits))
        if nxt in stop:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


def test_batched_matches_one_by_one_and_slow_reference(tiny):
    model, tok, fmt = tiny
    stops = stop_token_ids(fmt)
    prompts = [fmt.prompt_ids(q) for q in QUESTIONS]
    batched = greedy_batch(model, prompts, stops, tok.pad_token_id, max_new_tokens=10)
    for prompt, got in zip(prompts, batched):
        assert got == greedy_batch(model, [prompt], stops, tok.pad_token_id, max_new_tokens=10)[0]
        assert got == slow_greedy(model, prompt, set(stops), 10)

    seen = []
    # batch size 1: prompts prefilled one at a time, decoded decode_width(1) < 6 at a time, so answers
    # finish in several rounds
    assert decode_width(1) < len(QUESTIONS)
    texts = generate_answers(model, fmt, QUESTIONS, max_new_tokens=10, batch_size=1, progress=seen.append)
    singles = [generate_answers(model, fmt, [q], max_new_tokens=10)[0] for q in QUESTIONS]
    assert texts == singles
    assert texts == [tok.decode(t, skip_special_tokens=True).strip() for t in batched]
    assert sum(seen) == len(QUESTIONS) and len(seen) > 1
    assert any(texts), "the random model should produce some text for this test to mean anything"


def test_max_new_tokens_bounds_length(tiny):
    model, tok, fmt = tiny
    stops = stop_token_ids(fmt)
    outs = greedy_batch(model, [fmt.prompt_ids(q) for q in QUESTIONS], stops, tok.pad_token_id, max_new_tokens=5)
    assert all(len(o) <= 5 for o in outs)
    # rows that never hit a stop token run to the limit
    assert any(len(o) == 5 for o in outs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(model, fmt, ["hi"], max_new_tokens=0)


def test_stop_ids_include_end_of_turn_and_eos(tiny):
    _, tok, fmt = tiny
    assert stop_token_ids(fmt) == [tok.convert_tokens_to_ids("<|im_end|>")]
    other = load_tokenizer(tok.name_or_path)
    other.eos_token = "<|endoftext|>"
    ids = stop_token_ids(ChatFormat(other))
    assert set(ids) == {other.convert_tokens_to_ids("<|im_end|>"), other.convert_tokens_to_ids("<|endoftext|>")}


def test_stops_at_end_of_turn(tmp_path):
    """A tiny model trained on two short answers, each closed by <|im_end|>, must return exactly
    those answers, alone and together in one batch (where one row stops long before the other)."""
    path = build_tiny_model(tmp_path / "m", hidden=32, layers=1, tie_embeddings=False, seed=2)
    tok = load_tokenizer(str(path))
    model, fmt = load_model(str(path)), ChatFormat(tok)
    qa = [("Say hi", "Hi!"), ("Say more", "A longer answer.")]
    batch = pad_batch([fmt.encode(q, a, close=True) for q, a in qa], tok.pad_token_id)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    eot = fmt.end_of_turn_id
    for q, a in qa:
        # Without stopping, the greedy continuation is the answer, the end-of-turn token, then more.
        raw = slow_greedy(model, fmt.prompt_ids(q), set(), len(fmt.answer_ids(a)) + 3)
        assert raw[:len(fmt.answer_ids(a)) + 1] == fmt.answer_ids(a) + [eot]
        assert generate_answers(model, fmt, [q], max_new_tokens=40) == [a]
    assert generate_answers(model, fmt, [q for q, _ in qa], max_new_tokens=40) == [a for _, a in qa]
