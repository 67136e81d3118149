"""Chat templating, answer-only loss masks, collation and length-grouped batching.

A QA pair becomes ``prompt tokens + answer tokens + end-of-turn``. The prompt comes from the
tokenizer's own chat template (system prompt, user question, generation prompt); prompt and answer
are tokenised separately and concatenated, so the answer's tokens are the same in training,
scoring and generation. Labels are -100 on the prompt and padding: only the answer and the closing
end-of-turn token are trained on (the end-of-turn token teaches the model to stop). Evaluation
scores the same tokens by default (``scored_tokens="labels"``), as TOFU's original code and the
field's reference framework do; ``scored_tokens="answer"`` scores the answer's tokens alone (see
``evaluation.logprobs`` and docs/metrics.md).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence, cast

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
PLAIN_TEMPLATE = "Question: {question}\nAnswer: "
# What evaluation scores of an answer: the training labels (answer + closing end-of-turn) or the
# answer's tokens alone.
SCORED_TOKENS = ("labels", "answer")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    answer_start: int  # index of the first answer token in input_ids
    answer_len: int  # number of answer tokens, end-of-turn excluded
    closed: bool = False  # the closing end-of-turn token follows the answer (and is in the labels)

    @property
    def scored_len(self) -> int:
        """Tokens from ``answer_start`` that are in the labels: the answer, plus end-of-turn if closed."""
        return self.answer_len + int(self.closed)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class ChatFormat:
    """How questions and answers are laid out for one tokenizer."""

    tokenizer: PreTrainedTokenizerBase
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    max_length: int = 512
    scored_tokens: str = "labels"  # one of SCORED_TOKENS: what evaluation scores of an answer
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.scored_tokens not in SCORED_TOKENS:
            raise ValueError(f"scored_tokens must be one of {', '.join(SCORED_TOKENS)}, not {self.scored_tokens!r}")

    @property
    def end_of_turn_id(self) -> int:
        if "eot" not in self._cache:  # get_vocab() builds the whole vocabulary: once, not per encoded pair
            tok = self.tokenizer
            if tok.chat_template and "<|im_end|>" in tok.get_vocab():
                self._cache["eot"] = cast(int, tok.convert_tokens_to_ids("<|im_end|>"))  # one token in, one id out
            elif tok.eos_token_id is None:
                raise ValueError("the tokenizer has no end-of-sequence token")
            else:
                self._cache["eot"] = tok.eos_token_id
        return self._cache["eot"]

    def prompt_text(self, question: str) -> str:
        tok = self.tokenizer
        if tok.chat_template:
            messages = [{"role": "user", "content": question}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return cast(str, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return PLAIN_TEMPLATE.format(question=question)

    def prompt_ids(self, question: str) -> list[int]:
        key = ("p", question)
        if key not in self._cache:
            ids = self.tokenizer(self.prompt_text(question), add_special_tokens=False)["input_ids"]
            if self.tokenizer.bos_token_id is not None and not self.tokenizer.chat_template:
                ids = [self.tokenizer.bos_token_id] + ids
            self._cache[key] = ids
        return self._cache[key]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"]

    def encode(self, question: str, answer: str, close: bool = True) -> Encoded:
        """Prompt + answer (+ end-of-turn). Raises ValueError if it does not fit ``max_length``.

        An empty ``question`` marks a plain-text document (``data.text.documents_as_qa``): no chat
        template and no end-of-turn; every token after the first (or after BOS) is in the loss."""
        if not question:
            return self._encode_document(answer)
        prompt = self.prompt_ids(question)
        ans = self.answer_ids(answer)
        if not ans:
            raise ValueError("answer is empty after tokenisation")
        tail = ans + ([self.end_of_turn_id] if close else [])
        ids = prompt + tail
        if len(ids) > self.max_length:
            raise ValueError(f"prompt + answer is {len(ids)} tokens, longer than max_length {self.max_length}")
        return Encoded(ids, [IGNORE] * len(prompt) + tail, len(prompt), len(ans), closed=close)

    def encode_scored(self, question: str, answer: str) -> Encoded:
        """The pair as evaluation scores it: closed with end-of-turn unless ``scored_tokens="answer"``
        (``Encoded.scored_len`` tokens from ``answer_start`` are scored)."""
        return self.encode(question, answer, close=self.scored_tokens == "labels")

    def _encode_document(self, text: str) -> Encoded:
        ids = self.answer_ids(text)
        bos = self.tokenizer.bos_token_id
        # Without a BOS token the first token has no context to be predicted from: context only.
        prefix, ids = ([bos], ids) if bos is not None else (ids[:1], ids[1:])
        if not ids:
            raise ValueError("document has fewer than 2 tokens")
        if len(prefix) + len(ids) > self.max_length:
            raise ValueError(f"document is {len(prefix) + len(ids)} tokens, longer than max_length {self.max_length}; "
                             "split it (one document per line) or raise --max-length")
        return Encoded(prefix + ids, [IGNORE] * len(prefix) + ids, len(prefix), len(ids))


def pad_batch(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Returns input_ids, attention_mask, labels, answer_start, answer_len."""
    width = max(len(x) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x)
        ids[i, :n] = torch.tensor(x.input_ids)
        labels[i, :n] = torch.tensor(x.labels)
        mask[i, :n] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "answer_start": torch.tensor([x.answer_start for x in items]),
        "answer_len": torch.tensor([x.answer_len for x in items]),
        "scored_len": torch.tensor([x.scored_len for x in items]),
    }


def common_start(sequences: Sequence[list[int]]) -> int:
    """How many leading tokens every sequence shares (the chat template's system turn), leaving each
    at least one token of its own; 0 for fewer than two sequences. Evaluation's prefill and
    training's packed rows run that start once."""
    if len(sequences) < 2:
        return 0
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


def left_pad_prompts(prompts: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padding for batched generation, so every row's next token is at the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0, group_factor: int = 16
) -> list[list[int]]:
    """Batches of similar length to cut padding: shuffle, cut into mega-batches of
    ``group_factor * batch_size``, sort each by length, split into batches, shuffle the batches."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    mega = batch_size * group_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def num_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def iter_chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
