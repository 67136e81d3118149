"""``--engine vllm``: the greedy answers come from vLLM, the log-prob metrics from the model itself.

vLLM needs a GPU and is not installed here, so a stand-in ``vllm`` module with vLLM's calling
convention (``LLM(model=...)``, ``SamplingParams``, ``generate`` of token-id prompts, outputs that
keep the stop token that ended them) decodes with obliviate's own greedy decoding: the evaluation
through the engine must then equal the evaluation without it."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from obliviate import api
from obliviate.cli.main import app
from obliviate.data.benchmark import load_benchmark
from obliviate.errors import UserError
from obliviate.evaluation.engines import VLLMGreedy, cut_at_stop
from obliviate.evaluation.evaluate import eval_sets_from_benchmark
from obliviate.evaluation.generation import greedy_batch
from obliviate.models.loading import load_model


class _SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class _LLM:
    made: list[_LLM] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.model = load_model(kwargs["model"])
        self.prompts: list[list[int]] = []
        _LLM.made.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        assert len(prompts) == len(params)
        outputs = []
        for prompt, p in zip(prompts, params):
            assert p.temperature == 0.0 and p.max_tokens >= 1
            self.prompts.append(prompt["prompt_token_ids"])
            tokens = greedy_batch(self.model, [prompt["prompt_token_ids"]], p.stop_token_ids, 0, p.max_tokens)[0]
            if len(tokens) < p.max_tokens:
                tokens = tokens + [p.stop_token_ids[-1]]  # vLLM keeps the stop token that ended the answer
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tuple(tokens))]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    _LLM.made = []
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=_LLM, SamplingParams=_SamplingParams))
    return _LLM


def _comparable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


def test_answers_from_the_engine_give_the_evaluation_of_obliviates_own(tiny_model_dir, small_bench, fake_vllm):
    common = dict(max_new_tokens=12, progress=False)
    own = api.evaluate(str(tiny_model_dir), str(small_bench), None, **common)
    engine = api.evaluate(str(tiny_model_dir), str(small_bench), None, engine="vllm", **common)
    assert _comparable(engine) == _comparable(own)
    (llm,) = fake_vllm.made
    assert llm.kwargs["model"] == str(tiny_model_dir) and llm.kwargs["trust_remote_code"] is False
    sets = eval_sets_from_benchmark(load_benchmark(small_bench))
    questions = {ex.question for ds in sets.values() for ex in ds.examples}
    assert len(llm.prompts) == len(set(map(tuple, llm.prompts))) == len(questions)  # each question once


def test_the_engine_cuts_at_the_stop_token_and_asks_nothing_for_a_zero_budget(tiny_model_dir, fake_vllm):
    assert cut_at_stop([5, 6, 2, 7], [2, 3]) == [5, 6] and cut_at_stop([5, 6], [2]) == [5, 6]
    engine = VLLMGreedy(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    prompts, stops = [[1, 2, 3], [4, 5]], [0]
    got = engine(prompts, [6, 0], stops)
    assert got == [greedy_batch(model, [prompts[0]], stops, 0, 6)[0], []]
    assert engine.llm.prompts == [prompts[0]]


def test_a_missing_or_unknown_engine_is_one_clear_line(tiny_model_dir, small_bench, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(UserError, match="pip install vllm"):
        VLLMGreedy(str(tiny_model_dir))
    runner = CliRunner()
    for engine, says in (("vllm", "pip install vllm"), ("sglang", "not an engine")):
        res = runner.invoke(app, ["evaluate", "--model", str(tiny_model_dir), "--benchmark", str(small_bench),
                                  "--out", str(tmp_path / engine), "--engine", engine, "--no-progress"],
                            env={"COLUMNS": "300"})
        assert res.exit_code == 2, res.output
        assert says in res.output and "Traceback" not in res.output
        assert not (tmp_path / engine / "eval").exists()
