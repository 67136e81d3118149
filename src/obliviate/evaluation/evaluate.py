"""TOFU evaluation of one model: every answer scored once, every question answered once.

All (question, answer) pairs of all sets (true, paraphrased and perturbed answers, identical pairs
merged) and all questions go through one ``score_and_generate`` call, where each question's prompt
is prefilled once for all its answers and its greedy generation (``evaluation.logprobs``); every
metric is then a pure function of those (``evaluation.tofu``). The result is an
:class:`~obliviate.evaluation.results.EvalResult` (``eval.json``, docs/ARCHITECTURE.md) and the
scores themselves (:class:`~obliviate.evaluation.scores.ModelScores`), which membership inference,
memorisation and exposure reuse instead of running the model again. :func:`evaluate_likelihoods`
is the same evaluation without generation (the log-prob metrics only), for checks along a training
run. Definitions: docs/metrics.md.

Metrics are those of TOFU (Maini et al. 2024, arXiv 2401.06121).
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from obliviate.data.chat import ChatFormat
from obliviate.data.qa import DataError, QADataset, QAExample
from obliviate.evaluation import tofu
from obliviate.evaluation.distributed import score_and_generate_distributed, score_pairs_distributed
from obliviate.evaluation.engines import Generate
from obliviate.evaluation.logprobs import TokenScores, score_and_generate, score_pairs
from obliviate.evaluation.results import EvalResult, PerSample, SetResult
from obliviate.evaluation.scores import ModelScores, Pair
from obliviate.processes import processes
from obliviate.runs import atomic_write_json, read_json
from obliviate.runs.fingerprint import dataset_fingerprint

# Benchmark role -> evaluation set name.
SET_ROLES = {
    "eval_forget": "forget",
    "eval_retain": "retain",
    "eval_real_authors": "real_authors",
    "eval_world_facts": "world_facts",
    "holdout": "holdout",
}
TRUTH_RATIO_SETS = ("forget", "retain", "real_authors", "world_facts", "holdout")
# Sets with a truth ratio only when every row has perturbed answers (TOFU's holdout has none, the
# synthetic benchmark's has them): the verdict compares the holdout's per-sample ratios with the forget set's.
OPTIONAL_TRUTH_RATIO_SETS = ("holdout",)
NORMALISED_SETS = ("real_authors", "world_facts")  # probability is the normalised one
UTILITY_SETS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("probability", "rouge", "truth_ratio")
# Model utility without ROUGE (which needs generation): what an evaluation without generation can
# give along a training run (evaluate_likelihoods); not TOFU's model utility.
LOGPROB_UTILITY_METRICS = ("probability", "truth_ratio")


@dataclass
class _SetPlan:
    """Where one set's answers sit in the shared list of unique pairs."""

    answer: list[int]
    base: list[int] | None = None  # truth-ratio base answer (paraphrased, else the answer)
    perturbed: list[list[int]] | None = None


class _Pairs:
    """Unique (question, answer) pairs, each checked once against the format's length limit."""

    def __init__(self, fmt: ChatFormat):
        self.fmt = fmt
        self.pairs: list[tuple[str, str]] = []
        self._index: dict[tuple[str, str], int] = {}

    def add(self, question: str, answer: str, source: str, row: int, field: str) -> int:
        key = (question, answer)
        if key not in self._index:
            try:
                self.fmt.encode_scored(question, answer)
            except ValueError as exc:
                raise DataError(source, row, f"{field}: {exc}") from None
            self._index[key] = len(self.pairs)
            self.pairs.append(key)
        return self._index[key]


def _row(ex: QAExample, i: int) -> int:
    return int(ex.meta.get("row", i + 1))


def _has_truth_ratio(name: str, ds: QADataset) -> bool:
    """Whether the set gets a truth ratio; rejects sets where only some rows can have one."""
    if name not in TRUTH_RATIO_SETS:
        return False
    missing = [i for i, ex in enumerate(ds.examples) if not ex.perturbed_answers]
    if not missing:
        return True
    if (len(missing) < len(ds) and name not in OPTIONAL_TRUTH_RATIO_SETS) or name in NORMALISED_SETS:
        first = missing[0]
        raise DataError(ds.source, _row(ds.examples[first], first),
                        f"the {name} set needs 'perturbed_answer' on every row (truth ratio"
                        f"{', normalised probability' if name in NORMALISED_SETS else ''}); this row has none")
    return False


def _plan(name: str, ds: QADataset, pairs: _Pairs) -> _SetPlan:
    with_ratio = _has_truth_ratio(name, ds)
    answer: list[int] = []
    bases: list[int] = []
    perturbed: list[list[int]] = []
    for i, ex in enumerate(ds.examples):
        row = _row(ex, i)
        answer.append(pairs.add(ex.question, ex.answer, ds.source, row, "answer"))
        if with_ratio:
            base = ex.paraphrased_answer if ex.paraphrased_answer is not None else ex.answer
            bases.append(pairs.add(ex.question, base, ds.source, row, "paraphrased_answer"))
            perturbed.append([pairs.add(ex.question, p, ds.source, row, f"perturbed_answer[{j}]")
                              for j, p in enumerate(ex.perturbed_answers)])
    return _SetPlan(answer=answer, base=bases if with_ratio else None, perturbed=perturbed if with_ratio else None)


@dataclass
class _Likelihoods:
    """One set's log-prob metrics, per sample."""

    answer: list[TokenScores]
    probability: np.ndarray
    ratios: np.ndarray | None  # raw truth ratios; None for sets without one

    def truth_ratio(self, name: str) -> float | None:
        return None if self.ratios is None else tofu.aggregate_truth_ratio(self.ratios, forget=name == "forget")


def _likelihoods(name: str, plan: _SetPlan, scores: list[TokenScores]) -> _Likelihoods:
    answer = [scores[i] for i in plan.answer]
    perturbed, ratios = None, None
    if plan.base is not None and plan.perturbed is not None:  # both or neither (_plan)
        perturbed = [[scores[i] for i in row] for row in plan.perturbed]
        ratios = tofu.truth_ratio([scores[i] for i in plan.base], perturbed)
    if name in NORMALISED_SETS:
        assert perturbed is not None  # _has_truth_ratio made sure these sets have perturbed answers
        prob = tofu.normalised_probability(answer, perturbed)
    else:
        prob = tofu.length_normalised_probability(answer)
    return _Likelihoods(answer, prob, ratios)


def _set_result(name: str, ds: QADataset, plan: _SetPlan, scores: list[TokenScores],
                generations: list[str]) -> SetResult:
    lik = _likelihoods(name, plan, scores)
    answer, prob, ratios = lik.answer, lik.probability, lik.ratios
    rouge = tofu.rouge_l_recall([ex.answer for ex in ds.examples], generations)
    return SetResult(
        n=len(ds),
        probability=float(prob.mean()),
        rouge=float(rouge.mean()),
        truth_ratio=lik.truth_ratio(name),
        per_sample=PerSample(
            probability=prob.tolist(),
            rouge=rouge.tolist(),
            truth_ratio_raw=None if ratios is None else ratios.tolist(),
            nll=tofu.nll(answer).tolist(),
            generation=list(generations),
            question=[ex.question for ex in ds.examples],
        ),
    )


def _oracle_ratios(oracle: EvalResult | Mapping[str, Any], scored_tokens: str) -> list[float]:
    """The oracle's per-sample forget truth ratios, checked to be scored like this evaluation's."""
    if isinstance(oracle, EvalResult):
        oracle = oracle.to_json()
    try:
        ratios = oracle["sets"]["forget"]["per_sample"]["truth_ratio_raw"]
    except (KeyError, TypeError):
        raise ValueError("the oracle result has no sets.forget.per_sample.truth_ratio_raw "
                         "(evaluate the retain model on the same forget set first)") from None
    if not isinstance(ratios, list) or not ratios:
        raise ValueError("the oracle result's forget-set truth ratios are missing or empty "
                         "(its forget set needs paraphrased and perturbed answers)")
    # Results written before the option existed scored the answer's tokens alone.
    oracle_scored = oracle.get("scored_tokens", "answer")
    if oracle_scored != scored_tokens:
        raise DataError(f"the oracle result ({oracle.get('model', 'no model name')})", None,
                        f"it scored {oracle_scored!r} tokens, this evaluation {scored_tokens!r}: truth ratios "
                        f"are not comparable; evaluate the oracle again with --scored-tokens {scored_tokens}")
    return [float(r) for r in ratios]


def utility_from_sets(sets: Mapping[str, SetResult | Mapping[str, Any]]) -> float | None:
    """TOFU model utility from per-set results: the harmonic mean of probability, ROUGE and truth
    ratio on retain, real_authors and world_facts; None when one of them is missing."""
    if not all(name in sets for name in UTILITY_SETS):
        return None
    values = [getattr(s, metric) if isinstance(s, SetResult) else s[metric]
              for s in (sets[name] for name in UTILITY_SETS) for metric in UTILITY_METRICS]
    if any(v is None for v in values):
        return None
    return tofu.model_utility(values)


def logprob_utility(row: Mapping[str, Any]) -> float | None:
    """Model utility without ROUGE, from a summary row (:func:`summary_row`'s keys): the harmonic
    mean of probability and truth ratio on retain, real_authors and world_facts (0 when one is 0);
    None when one is missing. Not TOFU's model utility: what an evaluation without generation gives."""
    values = [row.get(f"{name}_{metric}") for name in UTILITY_SETS for metric in LOGPROB_UTILITY_METRICS]
    if any(v is None or not math.isfinite(v) or v < 0 for v in values):
        return None
    numbers = [float(v) for v in values if v is not None]
    return 0.0 if min(numbers) == 0 else len(numbers) / sum(1 / v for v in numbers)


def check_length_budget(length_budget: float | None) -> None:
    if length_budget is not None and not (math.isfinite(length_budget) and length_budget > 0):
        raise ValueError(f"the length budget (--length-budget) must be a positive number, a factor of each set's "
                         f"longest answer in tokens; got {length_budget}")


def set_token_budgets(sets: Mapping[str, QADataset], fmt: ChatFormat, max_new_tokens: int,
                      length_budget: float | None) -> dict[str, int]:
    """Each set's generation budget: ``max_new_tokens``, or with ``length_budget`` (a factor) that
    many times the set's longest reference answer in tokens, rounded up and at most ``max_new_tokens``.
    TOFU's answers are short; a budget from the set's own answers stops runaway generations early."""
    check_length_budget(length_budget)
    if length_budget is None:
        return {name: max_new_tokens for name in sets}
    return {name: max(1, min(max_new_tokens, math.ceil(length_budget * max(len(fmt.answer_ids(ex.answer))
                                                                           for ex in ds.examples))))
            for name, ds in sets.items()}


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int], Callable[[int], None] | None]]:
    """Yields ``track(description, total)`` returning an ``advance(n)`` callback (None when off)."""
    if not enabled:
        yield lambda description, total: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as bar:
        def track(description: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(description, total=total)
            return lambda n: bar.advance(task, n)

        yield track


@dataclass
class Evaluation:
    """An evaluation result and the scores it was computed from (to reuse for privacy metrics)."""

    result: EvalResult
    scores: ModelScores


def evaluation_settings(model, sets: Mapping[str, QADataset], fmt: ChatFormat, batch_size: int,
                        max_new_tokens: int, length_budget: float | None) -> dict[str, Any]:
    """What an evaluation's numbers depend on besides the model's weights: each set's rows (content
    fingerprint), the prompt format, the batch size (padding), the token budget, and the weights' dtype
    and device type (kernels differ in their last bits).
    Recorded as ``made_with`` in ``eval.json``, so that a later consumer (the quantisation attack's
    full-precision row) can take a stored evaluation of the same model instead of running it again
    only when it was made exactly as it would make it."""
    weight = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return {"sets": {name: {k: v for k, v in dataset_fingerprint(ds).items() if k in ("n", "sha256")}
                     for name, ds in sets.items()},
            "system_prompt": fmt.system_prompt, "max_length": fmt.max_length, "scored_tokens": fmt.scored_tokens,
            "batch_size": batch_size, "max_new_tokens": max_new_tokens, "length_budget": length_budget,
            "dtype": None if weight is None else str(weight.dtype),
            "device": None if weight is None else weight.device.type}


def evaluate_with_scores(model, tokenizer, sets: dict[str, QADataset], fmt: ChatFormat | None = None,
                         batch_size: int = 32, max_new_tokens: int = 200,
                         oracle: EvalResult | Mapping[str, Any] | None = None, progress: bool = True,
                         label: str | None = None, distributed: bool = False,
                         extra_pairs: Sequence[Pair] = (), length_budget: float | None = None,
                         generate: Generate | None = None) -> Evaluation:
    """TOFU metrics of ``model`` on ``sets`` (any of forget, retain, real_authors, world_facts,
    plus extra sets such as holdout, which get probability and ROUGE only), and the scores.

    ``oracle`` is the result of this function for the retain (oracle) model; with it and a forget
    set, ``forget_quality`` is the KS-test p-value between the two models' forget-set truth
    ratios, otherwise null. ``model_utility`` needs retain, real_authors and world_facts (null
    otherwise). The result's JSON form is the ``eval.json`` dict described in docs/ARCHITECTURE.md.

    ``extra_pairs`` (e.g. ``privacy.privacy_pairs(...)``) are (question, answer) pairs a later
    consumer of the scores needs beyond the sets' own; those not among the sets' pairs are scored
    in a second call after the main one, which leaves the sets' batches, and so their numbers,
    exactly as without them. Only with ``extra_pairs`` do the scores carry each position's
    next-token distribution statistics (``TokenScores.dist_mean``/``dist_std``, for Min-K%++): the
    TOFU metrics do not read them.

    ``distributed=True`` (under ``accelerate launch``, the whole model on each process's device)
    splits the scoring and generation batches across the processes (``evaluation.distributed``);
    every process returns the full result, the same as one process's.

    ``length_budget`` (a factor; default off) bounds each set's generations by its own answers'
    lengths (:func:`set_token_budgets`); the budgets are recorded as ``max_new_tokens_per_set``.

    ``generate`` (an engine of ``evaluation.engines``, one process only) makes the greedy answers;
    the model scores the pairs.
    """
    start = time.perf_counter()
    if generate is not None and distributed:
        raise ValueError("an engine's generation runs in one process: not with distributed=True")
    score = score_pairs
    score_generate: Callable[..., tuple[list[TokenScores], list[str]]] = \
        score_and_generate if generate is None else functools.partial(score_and_generate, generate=generate)
    if distributed:
        score, score_generate = score_pairs_distributed, score_and_generate_distributed
        progress = progress and processes().is_main_process
    if not sets:
        raise ValueError("no evaluation sets given")
    for name, ds in sets.items():
        if len(ds) == 0:
            raise DataError(ds.source, None, f"the {name} set is empty")
    fmt = fmt or ChatFormat(tokenizer)
    oracle_ratios = _oracle_ratios(oracle, fmt.scored_tokens) if oracle is not None and "forget" in sets else None
    label = label or getattr(model, "name_or_path", None) or type(model).__name__

    pairs = _Pairs(fmt)
    plans = {name: _plan(name, ds, pairs) for name, ds in sets.items()}
    if oracle_ratios is not None and plans["forget"].perturbed is None:
        raise DataError(sets["forget"].source, None, "forget quality needs paraphrased and perturbed "
                        "answers in the forget set")
    questions = list(dict.fromkeys(ex.question for ds in sets.values() for ex in ds.examples))
    set_budgets = set_token_budgets(sets, fmt, max_new_tokens, length_budget)
    budget_of: dict[str, int] = {}
    for name, ds in sets.items():
        for ex in ds.examples:
            budget_of[ex.question] = max(budget_of.get(ex.question, 0), set_budgets[name])
    model_scores = ModelScores.empty(fmt, label)

    with _progress(progress) as track:
        scores, answers = score_generate(model, fmt, pairs.pairs, questions, [budget_of[q] for q in questions],
                                         batch_size=batch_size,
                                         score_progress=track("scoring answers", len(pairs.pairs)),
                                         generate_progress=track("generating answers", len(questions)),
                                         distribution=bool(extra_pairs))
        model_scores.add(pairs.pairs, scores)
        model_scores.scored = len(pairs.pairs)
        model_scores.ensure(model, fmt, list(extra_pairs), batch_size=batch_size, score=score)
    answer_of = dict(zip(questions, answers))
    model_scores.generations.update(answer_of)

    results = {name: _set_result(name, ds, plans[name], scores, [answer_of[ex.question] for ex in ds.examples])
               for name, ds in sets.items()}
    quality = None
    forget_ratios = results["forget"].per_sample.truth_ratio_raw if "forget" in results else None
    if oracle_ratios is not None and forget_ratios is not None:  # the plan check above: both or neither
        quality = tofu.forget_quality(forget_ratios, oracle_ratios)
    extra: dict[str, Any] = {"scored_tokens": fmt.scored_tokens,
                             "made_with": evaluation_settings(model, sets, fmt, batch_size, max_new_tokens,
                                                              length_budget)}
    if length_budget is not None:
        extra["max_new_tokens_per_set"] = set_budgets
    result = EvalResult(model=label, sets=results, forget_quality=quality, model_utility=utility_from_sets(results),
                        seconds=time.perf_counter() - start, extra=extra)
    return Evaluation(result, model_scores)


def evaluate_likelihoods(model, sets: dict[str, QADataset], fmt: ChatFormat, batch_size: int = 32,
                         oracle: EvalResult | Mapping[str, Any] | None = None,
                         scores_held: ModelScores | None = None) -> dict[str, float | None]:
    """The log-prob metrics of :func:`evaluate_with_scores`, without generation: a summary row
    (:func:`summary_row`'s keys) with each set's probability and truth ratio and forget quality as
    the full evaluation computes them, ROUGE and model utility None (they need generated answers),
    and ``logprob_utility`` (:func:`logprob_utility`). For checks along a training run (the
    pipeline's trajectory points), where a full evaluation each time would cost generations.
    ``scores_held``: scores of this model already made (e.g. by a calibrated check at the same
    training step); only the pairs they lack are scored, and added to them."""
    if not sets:
        raise ValueError("no evaluation sets given")
    oracle_ratios = _oracle_ratios(oracle, fmt.scored_tokens) if oracle is not None and "forget" in sets else None
    pairs = _Pairs(fmt)
    plans = {name: _plan(name, ds, pairs) for name, ds in sets.items()}
    held = scores_held if scores_held is not None else ModelScores.empty(fmt)
    scores = held.ensure(model, fmt, pairs.pairs, batch_size=batch_size, distribution=False)
    row: dict[str, float | None] = {}
    order = (["forget"] if "forget" in sets else []) + [name for name in sets if name != "forget"]
    for i, name in enumerate(order):
        lik = _likelihoods(name, plans[name], scores)
        row.update({f"{name}_rouge": None, f"{name}_probability": float(lik.probability.mean()),
                    f"{name}_truth_ratio": lik.truth_ratio(name)})
        if i == 0:
            quality = None
            if name == "forget" and oracle_ratios is not None and lik.ratios is not None:
                quality = tofu.forget_quality(lik.ratios.tolist(), oracle_ratios)
            row.update(forget_quality=quality, model_utility=None)
    row["logprob_utility"] = logprob_utility(row)
    return row


def evaluate_model(model, tokenizer, sets: dict[str, QADataset], fmt: ChatFormat | None = None,
                   batch_size: int = 32, max_new_tokens: int = 200,
                   oracle: EvalResult | Mapping[str, Any] | None = None, progress: bool = True,
                   label: str | None = None, distributed: bool = False,
                   length_budget: float | None = None) -> dict[str, Any]:
    """:func:`evaluate_with_scores`, returning only the result, as its ``eval.json`` dict."""
    return evaluate_with_scores(model, tokenizer, sets, fmt, batch_size, max_new_tokens, oracle, progress, label,
                                distributed, length_budget=length_budget).result.to_json()


def save_eval(result: EvalResult | Mapping[str, Any], path: str | Path) -> Path:
    """Write an evaluation result as JSON, atomically."""
    return atomic_write_json(path, result.to_json() if isinstance(result, EvalResult) else result)


def read_eval(path: str | Path) -> EvalResult:
    """Read an evaluation result written by :func:`save_eval`, checking its layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: evaluation result not found")
    try:
        data = read_json(path)
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return EvalResult.from_json(data, str(path))


def load_eval(path: str | Path) -> dict[str, Any]:
    """:func:`read_eval` as the ``eval.json`` dict (the file's content, checked)."""
    return read_eval(path).to_json()


def eval_sets_from_benchmark(bench) -> dict[str, QADataset]:
    """The evaluation sets a benchmark provides, keyed by set name (see ``SET_ROLES``)."""
    sets = {name: bench.split(role) for role, name in SET_ROLES.items() if bench.has(role)}
    if not sets:
        raise ValueError(f"the benchmark has none of the evaluation roles {', '.join(SET_ROLES)}")
    return sets


def summary_row(result: EvalResult | Mapping[str, Any]) -> dict[str, float | None]:
    """Flat numbers for tables: forget metrics, forget quality, model utility, then the other sets."""
    if isinstance(result, EvalResult):
        result = result.to_json()
    sets = result["sets"]
    order = (["forget"] if "forget" in sets else []) + [name for name in sets if name != "forget"]
    row: dict[str, float | None] = {}
    for i, name in enumerate(order):
        for metric in ("rouge", "probability", "truth_ratio"):
            row[f"{name}_{metric}"] = sets[name].get(metric)
        if i == 0:
            row["forget_quality"] = result.get("forget_quality")
            row["model_utility"] = result.get("model_utility")
    return row
