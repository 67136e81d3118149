"""General ability through lm-evaluation-harness, on the model already in memory.

lm-evaluation-harness (Gao et al., "A framework for few-shot language model evaluation", Zenodo
10.5281/zenodo.5371628; the ``lm-eval`` package, 0.4.13 here) is how the field reports MMLU and
WMDP next to forgetting (WMDP: Li et al. 2024, arXiv 2403.03218; UniErase, arXiv 2505.15674). Its
tasks run on the loaded model and tokenizer, wrapped in lm-eval's ``HFLM`` (no second load), through
``lm_eval.simple_evaluate`` with its defaults (no chat template, the task's own prompt and shots).

Offline, tasks whose data lives on the hub work only from the datasets cache; local tasks work
anywhere: a directory of lm-eval task YAML files (``include_path``), whose ``dataset_path: json``
with ``dataset_kwargs.data_files`` reads local JSONL files.

lm-eval is an optional dependency (``pip install obliviate[lm_eval]``); without it, asking for a task
is a one-line error saying how to install it. Under ``accelerate launch`` every process runs the
tasks on its own copy of the model (lm-eval does not split work for a model passed in), so each
returns the same result.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from obliviate.data.specs import hub_unreachable
from obliviate.errors import UserError
from obliviate.runs import atomic_write_json

LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"


class LMEvalError(UserError):
    """lm-eval is missing, a task is unknown, or a task's data cannot be had."""


def parse_tasks(value: str | Sequence[str]) -> list[str]:
    """Task names from ``"mmlu,wmdp_bio"`` or a list of such strings, each once, in order."""
    parts = [value] if isinstance(value, str) else list(value)
    names = [t.strip() for part in parts for t in part.split(",")]
    if not names or not all(names):
        raise LMEvalError(f"--lm-eval {','.join(parts)!r}: give task names separated by commas, e.g. mmlu,wmdp_bio")
    return list(dict.fromkeys(names))


def require_lm_eval() -> None:
    """A one-line error when the ``lm-eval`` package is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise LMEvalError(f"--lm-eval needs the lm-eval package: pip install '{LM_EVAL_REQUIREMENT}' "
                          "(or pip install 'obliviate[lm_eval]')")


def task_manager(include_path: str | Path | None = None):
    """lm-eval's TaskManager: its built-in tasks plus the YAML tasks under ``include_path``."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager  # optional, ~5 s to import

    if include_path is not None and not Path(include_path).is_dir():
        raise LMEvalError(f"--lm-eval-include {include_path}: not a directory (give the folder of lm-eval task "
                          "YAML files)")
    return TaskManager(include_path=str(include_path) if include_path is not None else None)


def check_tasks(manager, tasks: Sequence[str]) -> None:
    """Every name is a task, group or tag lm-eval knows; otherwise one line with the closest names."""
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LMEvalError(f"--lm-eval: lm-eval has no task {name!r}{hint}; `lm-eval ls tasks` lists them, "
                              "--lm-eval-include DIR adds local task YAML files")


@dataclass
class LMEvalPlan:
    """Tasks checked against lm-eval's index before any model is loaded (a typo fails at once)."""

    tasks: list[str]
    limit: int | None
    manager: Any  # lm_eval.tasks.TaskManager


def plan_lm_eval(tasks: str | Sequence[str], limit: int | None = None,
                 include_path: str | Path | None = None) -> LMEvalPlan:
    """Parse and check ``--lm-eval`` tasks (with ``--lm-eval-include`` tasks) and ``--lm-eval-limit``."""
    names = parse_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise LMEvalError(f"--lm-eval-limit {limit}: give a whole number of documents per task, at least 1")
    manager = task_manager(include_path)
    check_tasks(manager, names)
    return LMEvalPlan(names, limit, manager)


def make_lm(model, tokenizer, batch_size: int = 32):
    """lm-eval's HFLM around the loaded model and tokenizer (the same objects, not a reload)."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    # HFLM warns that a model passed in is not distributed by it and "many other model arguments may be
    # ignored": both are what is meant here, so the warning would only mislead.
    hf_log = logging.getLogger(HFLM.__module__)
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_log.setLevel(level)


@dataclass
class LMEvalRun:
    """What one ``simple_evaluate`` call gave: results per task (lm-eval's own layout), the requested
    tasks, and one row per evaluated document."""

    tasks: list[str]
    limit: int | None
    raw: dict[str, Any]  # simple_evaluate's dict without "samples" (results, groups, configs, versions, ...)
    samples: list[dict[str, Any]]  # task, doc_id, target, and each metric's per-document value


def run_lm_eval(model, tokenizer, plan: LMEvalPlan, *, batch_size: int = 32) -> LMEvalRun:
    """Run the planned lm-eval tasks on the loaded ``model`` (at most ``plan.limit`` documents per task)."""
    import lm_eval  # optional; plan_lm_eval said how to install it

    tasks = plan.tasks
    lm = make_lm(model, tokenizer, batch_size)
    was_training = model.training
    try:
        raw = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=plan.limit, task_manager=plan.manager,
                                      log_samples=True)
    except Exception as exc:
        unreachable = hub_unreachable()
        if unreachable is None:
            raise
        # A task's dataset is on the hub and not cached: the one failure a user can fix here.
        raise LMEvalError(f"--lm-eval {','.join(tasks)}: lm-eval failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}) and the hub is out of reach "
                          f"({unreachable}); tasks need their datasets cached, or define local tasks "
                          "(--lm-eval-include DIR)") from None
    finally:
        model.train(was_training)
    if raw is None:  # simple_evaluate returns None on processes other than lm-eval's rank 0
        raise RuntimeError("lm-eval returned no results")
    samples = raw.pop("samples", {}) or {}
    return LMEvalRun(list(tasks), plan.limit, raw, sample_rows(samples))


def _number(value: Any) -> float | None:
    """A float for JSON, or None where lm-eval writes "N/A" or a non-finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def metric_table(raw: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """Task -> metric -> value from lm-eval's ``results`` (``"acc,none"`` becomes ``acc``, other filters
    keep theirs: ``exact_match,strict-match``); the ``alias`` entry is dropped."""
    table: dict[str, dict[str, float | None]] = {}
    for task, metrics in (raw.get("results") or {}).items():
        row: dict[str, float | None] = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt == "none" else key] = _number(value)
        table[task] = row
    return table


def sample_rows(samples: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per evaluated document: task, doc_id, target, and its per-document metric values
    (for multiple choice: ``acc`` 1/0, ``acc_norm``, and the choice log-likelihoods ``loglikelihood``).
    Prompts and documents stay out (their hashes are kept): they can be large and are in the task."""
    rows = []
    for task, docs in samples.items():
        for doc in docs:
            row: dict[str, Any] = {"task": task, "doc_id": doc.get("doc_id"), "target": doc.get("target")}
            resps = doc.get("filtered_resps")
            if isinstance(resps, list) and resps and all(isinstance(r, (list, tuple)) and r for r in resps):
                row["loglikelihood"] = [_number(r[0]) for r in resps]  # multiple choice: (ll, is_greedy) each
            for key in ("doc_hash", "prompt_hash", "target_hash"):
                if key in doc:
                    row[key] = doc[key]
            for key, value in doc.items():
                if key not in row and key not in ("doc", "arguments", "resps", "filtered_resps", "filter",
                                                  "metrics") and isinstance(value, (int, float, bool)):
                    row[key] = value
            rows.append(row)
    return rows


def summary(run: LMEvalRun) -> dict[str, Any]:
    """The numbers ``eval.json`` keeps (``lm_eval``): the requested tasks, the limit, lm-eval's version,
    and every task's and group's metrics."""
    versions = run.raw.get("versions") or {}
    return {"tasks": run.tasks, "limit": run.limit, "lm_eval_version": _version(),
            "n_samples": {task: (n or {}).get("effective") for task, n in (run.raw.get("n-samples") or {}).items()},
            "results": metric_table(run.raw), "task_versions": {k: str(v) for k, v in versions.items()}}


def lm_eval_summary_row(lm_eval: Mapping[str, Any] | None) -> dict[str, float | None]:
    """Flat numbers for tables and logs from ``eval.json``'s ``lm_eval``: ``lm_eval_<task>_<metric>``
    for the requested tasks (standard errors left out)."""
    if not lm_eval:
        return {}
    results = lm_eval.get("results") or {}
    return {f"lm_eval_{task}_{metric}": value for task in lm_eval.get("tasks", [])
            for metric, value in (results.get(task) or {}).items() if not metric.endswith("_stderr")}


def save_lm_eval(run: LMEvalRun, path: str | Path) -> Path:
    """Write everything one run gave (atomically): its summary, lm-eval's own output (configs,
    versions, n-shot, ...) and the per-document rows."""
    out = {"summary": summary(run), "lm_eval": _jsonable(run.raw), "samples": _jsonable(run.samples)}
    return atomic_write_json(path, out)


def _jsonable(value: Any) -> Any:
    """lm-eval's output as plain JSON: numbers, text, lists and objects; anything else (a task's
    Python function in its config, a dtype) as its text, as lm-eval's own writer does."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars
        return _jsonable(value.tolist())
    return str(value)


def _version() -> str | None:
    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return None
