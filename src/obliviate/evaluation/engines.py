"""Greedy answers from an inference engine instead of obliviate's own decoding (``--engine``).

``vllm``: vLLM (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP, arXiv 2309.06180), an optional dependency for GPUs (``pip install vllm``). It
loads its own copy of the checkpoint; the log-prob metrics are still scored on the evaluated model,
and only the greedy answers (ROUGE, model utility) come from the engine. The answers are cut as
obliviate's own are: before the first stop token (end-of-turn or end-of-sequence), at most the
question's token budget long, decoded without special tokens.
"""

from __future__ import annotations

from typing import Callable, Sequence

from obliviate.errors import UserError

ENGINES = ("obliviate", "vllm")
# token-id prompts, a token budget for each, the stop token ids -> each continuation, cut before its stop
Generate = Callable[[Sequence[list[int]], Sequence[int], Sequence[int]], list[list[int]]]


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise UserError(f"--engine {engine!r} is not an engine; choose one of {', '.join(ENGINES)}")


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """``tokens`` up to (not including) the first stop token."""
    stops = set(stop_ids)
    for i, token in enumerate(tokens):
        if token in stops:
            return list(tokens[:i])
    return list(tokens)


class VLLMGreedy:
    """Greedy continuations of token-id prompts by vLLM (a :data:`Generate`).

    ``gpu_memory_utilization``: the share of the GPU's memory vLLM may take for its weights and KV
    cache; the evaluated model is already on the GPU for scoring, so less than vLLM's own 0.9."""

    def __init__(self, model: str, dtype: str = "float32", trust_remote_code: bool = False, seed: int = 0,
                 gpu_memory_utilization: float = 0.5):
        try:
            import vllm
        except ImportError:
            raise UserError("--engine vllm needs the vllm package (pip install vllm, on a machine with a GPU); "
                            "without it, leave --engine at obliviate") from None
        self.vllm = vllm
        self.llm = vllm.LLM(model=model, tokenizer=model, dtype=dtype, trust_remote_code=trust_remote_code, seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization)

    def __call__(self, prompts: Sequence[list[int]], budgets: Sequence[int],
                 stop_ids: Sequence[int]) -> list[list[int]]:
        answers: list[list[int]] = [[] for _ in prompts]
        todo = [i for i, budget in enumerate(budgets) if budget > 0]  # vLLM asks for at least one token
        if not todo:
            return answers
        params = [self.vllm.SamplingParams(temperature=0.0, max_tokens=int(budgets[i]), stop_token_ids=list(stop_ids))
                  for i in todo]
        # a prompt of token ids (vLLM's TokensPrompt is this dict): no second tokenisation
        outputs = self.llm.generate([{"prompt_token_ids": list(prompts[i])} for i in todo], params, use_tqdm=False)
        for i, output in zip(todo, outputs):
            answers[i] = cut_at_stop(output.outputs[0].token_ids, stop_ids)  # vLLM keeps the stop token
        return answers
