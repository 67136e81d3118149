"""obliviate's TOFU numbers equal the field's reference framework's on the same model and rows.

The reference framework (and TOFU's original code) scores each answer's training labels: the answer
and its closing end-of-turn token. Its aggregates for the base SmolLM2-135M-Instruct (system prompt
"You are a helpful assistant.") on the first 40 / 100 / 50 / 50 rows of forget01_perturbed /
retain_perturbed / real_authors_perturbed / world_facts_perturbed are pinned here (issue 12,
measured with that framework on the same machine kind); obliviate's default scoring must give them
within 1e-3. The likelihood numbers (probability, truth ratio) need no generation and always run;
ROUGE and model utility need 240 greedy generations of up to 200 tokens (minutes on a CPU) and run
when OBLIVIATE_REFERENCE_ROUGE=1 (benchmarks/bench_speed.py runs the same evaluation and checks
them too).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from obliviate.data.chat import ChatFormat
from obliviate.data.qa import QADataset, load_qa_file
from obliviate.evaluation.evaluate import evaluate_model
from obliviate.models.loading import DEFAULT_MODEL, embedded_gguf, load_model, load_tokenizer

pytestmark = pytest.mark.slow

TOFU = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "tofu"
ROWS = {"forget": ("forget01_perturbed", 40), "retain": ("retain_perturbed", 100),
        "real_authors": ("real_authors_perturbed", 50), "world_facts": ("world_facts_perturbed", 50)}
# The reference framework's aggregates (issue 12), per set: probability, truth ratio, ROUGE-L recall.
REFERENCE = {
    "forget": {"probability": 0.1376, "truth_ratio": 0.7834, "rouge": 0.4493},
    "retain": {"probability": 0.1121, "truth_ratio": 0.1929, "rouge": 0.3798},
    "real_authors": {"probability": 0.3475, "truth_ratio": 0.4925, "rouge": 0.51},
    "world_facts": {"probability": 0.2546, "truth_ratio": 0.3386, "rouge": 0.5567},
}
REFERENCE_UTILITY = 0.2788
# The reference values are given to 4 decimals: half a unit of the last digit, plus the 1e-3.
TOLERANCE = 1e-3 + 5e-5


@pytest.fixture(scope="module")
def reference_setup():
    if not TOFU.is_dir():
        pytest.skip(f"TOFU data not found at {TOFU}")
    try:
        embedded_gguf(DEFAULT_MODEL)
    except FileNotFoundError as exc:  # pragma: no cover - the Makefile installs it
        pytest.skip(str(exc))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    sets = {}
    for name, (split, n) in ROWS.items():
        ds = load_qa_file(TOFU / f"{split}.jsonl")
        sets[name] = QADataset(ds.examples[:n], ds.source)
    yield load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL), sets
    torch.set_num_threads(threads)


def test_likelihood_numbers_match_the_reference_framework(reference_setup):
    model, tok, sets = reference_setup
    # One generated token: ROUGE is not read here, the likelihood metrics do not depend on it.
    result = evaluate_model(model, tok, sets, fmt=ChatFormat(tok), max_new_tokens=1, batch_size=16, progress=False)
    assert result["scored_tokens"] == "labels"
    for name, ref in REFERENCE.items():
        got = result["sets"][name]
        assert got["n"] == ROWS[name][1]
        for metric in ("probability", "truth_ratio"):
            assert abs(got[metric] - ref[metric]) <= TOLERANCE, (name, metric, got[metric], ref[metric])


def test_answer_only_scoring_is_the_named_alternative(reference_setup):
    """The answer-only variant is kept and differs where the issue measured it (real authors)."""
    model, tok, sets = reference_setup
    ra = {"real_authors": sets["real_authors"]}
    labels = evaluate_model(model, tok, ra, fmt=ChatFormat(tok), max_new_tokens=1, progress=False)
    answer = evaluate_model(model, tok, ra, fmt=ChatFormat(tok, scored_tokens="answer"), max_new_tokens=1,
                            progress=False)
    assert answer["scored_tokens"] == "answer"
    assert abs(labels["sets"]["real_authors"]["probability"] - REFERENCE["real_authors"]["probability"]) <= TOLERANCE
    assert abs(answer["sets"]["real_authors"]["probability"] - labels["sets"]["real_authors"]["probability"]) > 0.02


@pytest.mark.skipif(os.environ.get("OBLIVIATE_REFERENCE_ROUGE") != "1",
                    reason="240 greedy generations of up to 200 tokens: set OBLIVIATE_REFERENCE_ROUGE=1")
def test_rouge_and_model_utility_match_the_reference_framework(reference_setup):
    model, tok, sets = reference_setup
    result = evaluate_model(model, tok, sets, fmt=ChatFormat(tok), max_new_tokens=200, batch_size=32, progress=False)
    for name, ref in REFERENCE.items():
        assert abs(result["sets"][name]["rouge"] - ref["rouge"]) <= TOLERANCE, (name, result["sets"][name]["rouge"])
    assert abs(result["model_utility"] - REFERENCE_UTILITY) <= TOLERANCE, result["model_utility"]
