"""Tiny randomly initialised causal LMs for tests and smoke runs.

The tokenizer is byte-level with no merges (256 byte tokens plus chat specials), so it needs no
training corpus and no download, and the chat template matches SmolLM2's ChatML layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer():
    from transformers import PreTrainedTokenizerFast  # ~4 s to import; see obliviate.models.loading

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def build_tiny_model(path: str | Path, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
                     tie_embeddings: bool = True, max_positions: int = 1024) -> Path:
    """Write a tiny Llama-architecture model + byte tokenizer as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM  # ~4 s to import; see obliviate.models.loading

    tok = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
