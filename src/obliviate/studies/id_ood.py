"""Unlearning in- vs out-of-distribution examples with gradient-based methods.

Baluta, Lamblin, Tarlow, Pedregosa, Dziugaite, "Unlearning in- vs. out-of-distribution data in LLMs
under gradient-based method", 2024, arXiv 2411.04388. Their findings, which this study checks on
the synthetic benchmark: out-of-distribution (OOD) examples need more unlearning steps but cost
less utility, in-distribution (ID) examples make utility decay fast, and memorisation strength and
example difficulty change how hard an example is to unlearn.

Procedure (``obliviate study id-ood``):

1. target: the model finetuned on ``full`` + ``id_forget`` + ``ood_forget`` (both memorised);
2. one oracle per forget set S: finetuned, same recipe, on the target's data without S
   (``shared_oracle=True``: one oracle on ``full`` alone for every S);
3. for each S and each method (``ga``, ``graddiff``), a copy of the target unlearns S alone, at a
   constant learning rate, and every ``eval_every`` steps (the training loop's ``on_eval``) the
   study records, per example of S, its exposure among its candidate answers (Carlini et al. 2019,
   arXiv 1802.08232: log2|R| - log2 rank), ROUGE-L recall of the greedy answer and NLL, and the
   retain utility: mean probability and ROUGE-L on the first ``retain_eval`` retain rows.

Per example, **steps to forget** is the first evaluated step at which its exposure is at or below
the oracle's exposure of that example (likewise for ROUGE); None (censored) when the budget ends
first, so the resolution is ``eval_every`` steps. Medians count censored examples as slower than
any forgotten one (a median over the forgotten ones alone would favour the set that forgets fewer).
**Utility at forget** is the retain utility at that step. Statistics cover the *memorised* examples
only (target exposure above the oracle's; for ROUGE, target ROUGE above the oracle's): an example
the target never memorised is at the oracle level from step 0 and says nothing about unlearning.
Within each set, examples are split at the set's median into memorisation strength ``strong`` /
``weak`` (the target's length-normalised probability of the answer) and difficulty ``easy`` /
``hard`` (the oracle's: an example a model that never saw it finds likely is easy).

Outputs in the study directory: ``id_ood.json`` (everything), ``id_ood.csv`` (summary table),
``id_ood_examples.csv`` (one row per example and method), ``curves/<set>-<method>.json`` (the
logged curves; reused on ``--resume``) and the plots ``steps_to_forget.png``,
``utility_at_forget.png`` and ``curves.png``.
"""

from __future__ import annotations

import copy
import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from obliviate import api
from obliviate.data.benchmark import Benchmark, load_benchmark
from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat
from obliviate.data.qa import QADataset
from obliviate.evaluation.exposure import exposure_for_examples
from obliviate.evaluation.generation import generate_answers
from obliviate.evaluation.logprobs import score_pairs
from obliviate.evaluation.tofu import rouge_l_recall
from obliviate.methods import build_method
from obliviate.models.loading import DEFAULT_MODEL, load_model, load_tokenizer
from obliviate.processes import processes
from obliviate.reporting.plots import new_figure, png_bytes
from obliviate.runs import RunDir, atomic_write_bytes, atomic_write_text
from obliviate.runs.fingerprint import dataset_fingerprint
from obliviate.training.config import TrainConfig
from obliviate.training.loop import train
from obliviate.training.presets import STUDY_FINETUNE

SETS = ("id_forget", "ood_forget")
METHODS = ("ga", "graddiff")
GROUPS = ("all", "strong", "weak", "easy", "hard")
SET_LABEL = {"id_forget": "ID", "ood_forget": "OOD"}


@dataclass
class IdOodConfig:
    model: str = DEFAULT_MODEL
    sets: tuple[str, ...] = SETS
    methods: tuple[str, ...] = METHODS
    finetune: dict[str, Any] = field(default_factory=lambda: dict(STUDY_FINETUNE))  # TrainConfig fields
    unlearn_lr: float = 2e-5
    unlearn_steps: int = 40
    eval_every: int = 5
    batch_size: int = 4
    retain_eval: int = 16  # retain rows measuring utility
    max_new_tokens: int = 32
    eval_batch_size: int = 32
    shared_oracle: bool = False
    mixed_precision: str = "no"  # for unlearning; finetuning takes it from ``finetune``
    seed: int = 0
    dtype: str = "float32"
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    max_length: int = 512

    def __post_init__(self) -> None:
        self.sets, self.methods = tuple(self.sets), tuple(self.methods)
        unknown = [s for s in self.sets if s not in SETS]
        if unknown or not self.sets:
            raise ValueError(f"sets must be among {', '.join(SETS)}, got {list(self.sets)}")
        if not self.methods:
            raise ValueError("give at least one unlearning method")
        for m in self.methods:
            build_method(m)  # unknown names fail here, before any training
        if self.unlearn_steps < 1 or self.eval_every < 1 or self.unlearn_steps % self.eval_every:
            raise ValueError(f"unlearn_steps ({self.unlearn_steps}) must be a positive multiple of eval_every "
                             f"({self.eval_every}), so the last step is evaluated")
        if self.retain_eval < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("retain_eval, max_new_tokens and batch_size must be at least 1")
        self.unlearn_config(1)  # validates lr and mixed precision

    def unlearn_config(self, n_rows: int):
        return TrainConfig(max_steps=self.unlearn_steps, epochs=1, lr=self.unlearn_lr,
                           batch_size=min(self.batch_size, n_rows), scheduler="constant", warmup_ratio=0.0,
                           eval_every=self.eval_every, seed=self.seed, mixed_precision=self.mixed_precision)


# ------------------------------------------------------------------------------------------- measuring

def measure(model, fmt: ChatFormat, forget: QADataset, retain_eval: QADataset, max_new_tokens: int = 32,
            batch_size: int = 32) -> dict[str, Any]:
    """Per forget example: exposure, ROUGE-L recall, NLL; and the retain utility (mean probability
    and ROUGE-L recall over ``retain_eval``). One scoring pass and one generation pass for both sets."""

    rows = list(forget) + list(retain_eval)
    nll = np.array([s.nll for s in score_pairs(model, fmt, [(e.question, e.answer) for e in rows], batch_size)])
    generations = generate_answers(model, fmt, [e.question for e in rows], max_new_tokens=max_new_tokens,
                                   batch_size=batch_size)
    rouge = rouge_l_recall([e.answer for e in rows], generations)
    n = len(forget)
    exposure = exposure_for_examples(model, fmt, forget, batch_size, forget.source)["per_sample"]["exposure"]
    return {"exposure": list(exposure), "rouge": rouge[:n].tolist(), "nll": nll[:n].tolist(),
            "retain_probability": float(np.exp(-nll[n:]).mean()), "retain_rouge": float(rouge[n:].mean())}


def unlearn_curve(target, tokenizer, fmt: ChatFormat, forget: QADataset, retain: QADataset,
                  retain_eval: QADataset, method: str, cfg: IdOodConfig, start: dict[str, Any],
                  progress: bool = False) -> dict[str, Any]:
    """Unlearn ``forget`` from a copy of ``target`` with ``method``; ``start`` is the target's
    :func:`measure` (step 0). Returns ``{"steps": [...], key: [value per step] ...}`` for the keys
    of :func:`measure` (per-example keys hold one list per step)."""

    points = {0: start}

    def on_eval(model, step: int) -> None:
        points[step] = measure(model, fmt, forget, retain_eval, cfg.max_new_tokens, cfg.eval_batch_size)

    model = copy.deepcopy(target)
    train(model, tokenizer, build_method(method), forget, cfg.unlearn_config(len(forget)), retain=retain, fmt=fmt,
          on_eval=on_eval, progress=progress, description=f"unlearn {forget.source} ({method})")
    del model
    steps = sorted(points)
    return {"steps": steps, **{key: [points[s][key] for s in steps] for key in start}}


# ------------------------------------------------------------------------------------------- analysis

def steps_to_reach(steps: Sequence[int], values: Sequence[float], level: float) -> int | None:
    """The first of ``steps`` whose value is at or below ``level``; None when none is."""
    for step, value in zip(steps, values):
        if value <= level:
            return int(step)
    return None


def _median_split(values: Sequence[float], high: str, low: str) -> list[str]:
    """``high`` for values at or above the median, else ``low``."""
    mid = float(np.median(values))
    return [high if v >= mid else low for v in values]


def per_example(forget: QADataset, set_name: str, target: dict, oracle: dict,
                curves: dict[str, dict]) -> list[dict[str, Any]]:
    """One record per example of a set: target and oracle levels, groups, and per method the steps
    to reach the oracle level and the retain utility at that step."""
    strength = _median_split([float(np.exp(-x)) for x in target["nll"]], "strong", "weak")
    difficulty = _median_split([float(np.exp(-x)) for x in oracle["nll"]], "easy", "hard")
    records = []
    for i, ex in enumerate(forget):
        rec = {"set": set_name, "index": i, "question": ex.question, "attribute": ex.meta.get("attribute"),
               "target_exposure": target["exposure"][i], "oracle_exposure": oracle["exposure"][i],
               "target_rouge": target["rouge"][i], "oracle_rouge": oracle["rouge"][i],
               "target_probability": float(np.exp(-target["nll"][i])),
               "oracle_probability": float(np.exp(-oracle["nll"][i])),
               "memorised": target["exposure"][i] > oracle["exposure"][i],
               "memorised_rouge": target["rouge"][i] > oracle["rouge"][i],
               "memorisation": strength[i], "difficulty": difficulty[i], "methods": {}}
        for method, c in curves.items():
            entry = {}
            for key in ("exposure", "rouge"):
                step = steps_to_reach(c["steps"], [v[i] for v in c[key]], oracle[key][i])
                at = None if step is None else c["steps"].index(step)
                entry[f"steps_{key}"] = step
                entry[f"retain_probability_at_{key}"] = None if at is None else c["retain_probability"][at]
                entry[f"retain_rouge_at_{key}"] = None if at is None else c["retain_rouge"][at]
            rec["methods"][method] = entry
        records.append(rec)
    return records


def _stat(values: list, fn: Callable) -> float | None:
    return float(fn(values)) if values else None


def censored_median(steps: Sequence[float | None]) -> float | None:
    """Median steps to forget with "not reached" (None) counted as longer than any budget: finite
    only when fewer than half of the examples are censored around the middle. Returns None for an
    empty list and ``inf`` when the median is not reached within the budget."""
    if not steps:
        return None
    return float(np.median([np.inf if x is None else x for x in steps]))


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else x


def summary_table(examples: list[dict], curves: dict[str, dict[str, dict]]) -> list[dict[str, Any]]:
    """One row per (set, method, group): counts, steps to forget and utility at forget, over the
    memorised examples (see the module doc).

    ``median_steps_<key>`` counts examples not forgotten within the budget as slower than any that
    were (:func:`censored_median`); it is None with ``median_not_reached_<key>`` true when half or
    more of them were not forgotten. ``median_steps_forgotten_<key>`` is over the forgotten ones
    only (biased low when many are censored). Utility at forget is over the forgotten ones."""
    rows = []
    for set_name, by_method in curves.items():
        for method, c in by_method.items():
            for group in GROUPS:
                recs = [r for r in examples if r["set"] == set_name
                        and (group == "all" or group in (r["memorisation"], r["difficulty"]))]
                row = {"set": set_name, "method": method, "group": group, "n": len(recs)}
                for key, flag in (("exposure", "memorised"), ("rouge", "memorised_rouge")):
                    mem = [r["methods"][method] for r in recs if r[flag]]
                    done = [m for m in mem if m[f"steps_{key}"] is not None]
                    steps = [m[f"steps_{key}"] for m in done]
                    row[f"n_memorised_{key}"] = len(mem)
                    row[f"forgotten_share_{key}"] = len(done) / len(mem) if mem else None
                    median = censored_median([m[f"steps_{key}"] for m in mem])
                    row[f"median_steps_{key}"] = _finite_or_none(median)
                    row[f"median_not_reached_{key}"] = median == np.inf
                    row[f"median_steps_forgotten_{key}"] = _stat(steps, np.median)
                    row[f"retain_probability_at_{key}"] = _stat(
                        [m[f"retain_probability_at_{key}"] for m in done], np.mean)
                    row[f"retain_rouge_at_{key}"] = _stat([m[f"retain_rouge_at_{key}"] for m in done], np.mean)
                row["retain_probability_start"] = c["retain_probability"][0]
                row["retain_probability_end"] = c["retain_probability"][-1]
                rows.append(row)
    return rows


def finding(table: list[dict], curves: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Per method, the paper's two claims read off the table (exposure criterion, group "all"):
    OOD takes more steps than ID (censored median steps to forget), OOD costs less utility than ID
    (retain probability at forget), and the retain probability lost per step over the whole run. A
    claim is None when it cannot be decided (no memorised example on a side; neither median reached;
    no forgotten example on a side for utility)."""
    if not all(s in curves for s in SETS):
        return {}
    out = {}
    methods = [m for m in curves[SETS[0]] if m in curves[SETS[1]]]
    for method in methods:
        row = {s: next(r for r in table if r["set"] == s and r["method"] == method and r["group"] == "all")
               for s in SETS}
        # Not reached within the budget counts as more steps than any finite median.
        steps = {s: np.inf if row[s]["median_not_reached_exposure"] else row[s]["median_steps_exposure"]
                 for s in SETS}
        utility = {s: row[s]["retain_probability_at_exposure"] for s in SETS}
        decay = {}
        for s in SETS:
            c = curves[s][method]
            decay[s] = (c["retain_probability"][0] - c["retain_probability"][-1]) / max(1, c["steps"][-1])
        both = lambda d: all(v is not None for v in d.values())  # noqa: E731
        comparable = both(steps) and not all(v == np.inf for v in steps.values())
        out[method] = {
            "median_steps_to_forget": {SET_LABEL[s]: "not reached" if steps[s] == np.inf else steps[s]
                                       for s in SETS},
            "retain_probability_at_forget": {SET_LABEL[s]: utility[s] for s in SETS},
            "retain_probability_drop_per_step": {SET_LABEL[s]: decay[s] for s in SETS},
            "ood_takes_more_steps": bool(steps["ood_forget"] > steps["id_forget"]) if comparable else None,
            "ood_costs_less_utility": utility["ood_forget"] > utility["id_forget"] if both(utility) else None,
            "id_utility_decays_faster": decay["id_forget"] > decay["ood_forget"],
        }
    return out


# ------------------------------------------------------------------------------------------- outputs

def _csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    return buf.getvalue()


def example_rows(examples: list[dict]) -> list[dict[str, Any]]:
    """Flat rows (one per example and method) for ``id_ood_examples.csv``."""
    rows = []
    for r in examples:
        base = {k: v for k, v in r.items() if k != "methods"}
        for method, entry in r["methods"].items():
            rows.append({**base, "method": method, **entry})
    return rows


def _figures(examples: list[dict], curves: dict[str, dict[str, dict]], cfg: IdOodConfig):

    methods = list(cfg.methods)
    sets = [s for s in SETS if s in curves]
    colours = {"id_forget": "#1f77b4", "ood_forget": "#ff7f0e"}
    censored = cfg.unlearn_steps + cfg.eval_every  # where "not reached within the budget" is drawn

    def per_set_panel(title: str, value: Callable[[dict], float | None], ylabel: str, show_censored: bool):
        fig = new_figure(3.6 * len(methods), 3.6)
        axes = fig.subplots(1, len(methods), squeeze=False)[0]
        rng = np.random.default_rng(0)
        for ax, method in zip(axes, methods):
            for x, s in enumerate(sets):
                entries = [(r, r["methods"][method]) for r in examples if r["set"] == s and r["memorised"]]
                ys = [value(e) for _, e in entries]
                got = [y for y in ys if y is not None]
                jitter = rng.uniform(-0.12, 0.12, len(ys))
                ax.scatter([x + j for j, y in zip(jitter, ys) if y is not None], got, s=14, alpha=0.7,
                           color=colours[s])
                if show_censored:
                    missed = [x + j for j, y in zip(jitter, ys) if y is None]
                    ax.scatter(missed, [censored] * len(missed), marker="x", color=colours[s], s=18)
                middle = censored_median(ys) if show_censored else _stat(got, np.median)
                if middle is not None:
                    ax.hlines(min(middle, censored), x - 0.3, x + 0.3, color="black", linewidth=2)
            ax.set_xticks(range(len(sets)), [SET_LABEL[s] for s in sets])
            ax.set_xlim(-0.5, len(sets) - 0.5)
            if show_censored:
                ax.set_ylim(-0.5, censored + 1)
            ax.set_title(method)
            ax.set_ylabel(ylabel)
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(title)
        return fig

    steps_fig = per_set_panel("Steps until exposure reaches the oracle's (bar: median, x: not reached)",
                              lambda e: e["steps_exposure"], "unlearning steps", True)
    utility_fig = per_set_panel("Retain probability when the example is forgotten",
                                lambda e: e["retain_probability_at_exposure"], "retain probability", False)

    curve_fig = new_figure(9.0, 3.6)
    gap_ax, util_ax = curve_fig.subplots(1, 2)
    styles = ["-o", "--s", ":^", "-.d"]
    oracle_of = {s: [r["oracle_exposure"] for r in examples if r["set"] == s] for s in sets}
    for s in sets:
        for k, method in enumerate(methods):
            c = curves[s][method]
            gap = [float(np.mean(np.asarray(v) - np.asarray(oracle_of[s]))) for v in c["exposure"]]
            label = f"{SET_LABEL[s]} {method}"
            gap_ax.plot(c["steps"], gap, styles[k % 4], color=colours[s], markersize=3, label=label)
            util_ax.plot(c["steps"], c["retain_probability"], styles[k % 4], color=colours[s], markersize=3,
                         label=label)
    gap_ax.axhline(0, color="grey", linewidth=0.8)
    gap_ax.set_ylabel("mean exposure - oracle exposure")
    util_ax.set_ylabel("retain probability")
    for ax in (gap_ax, util_ax):
        ax.set_xlabel("unlearning steps")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return {"steps_to_forget.png": steps_fig, "utility_at_forget.png": utility_fig, "curves.png": curve_fig}


# ------------------------------------------------------------------------------------------- the study

def _union(name: str, *parts: QADataset) -> QADataset:
    return QADataset([e for p in parts for e in p.examples], name)


def run_id_ood(bench: Benchmark | str | Path, out: str | Path, cfg: IdOodConfig | None = None, *,
               overwrite: bool = False, resume: bool = False, progress: bool = True, echo=print) -> dict[str, Any]:
    """Run the study (module doc) and write its outputs to ``out``; returns the ``id_ood.json`` dict."""
    cfg = cfg or IdOodConfig()
    bench = bench if isinstance(bench, Benchmark) else load_benchmark(bench)
    parts = {s: bench.split(s) for s in cfg.sets}  # a benchmark without the split fails here, with its name
    full, retain = bench.split("train"), bench.split("retain")
    config = {"command": "study id-ood", "benchmark": bench.source, **asdict(cfg)}
    data = {role: dataset_fingerprint(bench.split(role)) for role in sorted(bench.roles)}
    run = RunDir.open(out, kind="study", fingerprint={"config": config, "data": data}, overwrite=overwrite,
                      resume=resume, inputs=(bench.source, cfg.model))
    run.write_config(config, seed=cfg.seed)
    common: dict[str, Any] = dict(dtype=cfg.dtype, system_prompt=cfg.system_prompt, max_length=cfg.max_length,
                                  progress=progress, resume=resume)
    with run.running("study", resume=resume):
        echo("[obliviate] finetuning the target on full + " + " + ".join(cfg.sets))
        target_dir = api.finetune(cfg.model, _union("target", full, *parts.values()), run.file("target"),
                                  cfg.finetune, **common)
        if cfg.shared_oracle:
            echo("[obliviate] finetuning one oracle on full")
            shared = api.finetune(cfg.model, full, run.file("oracle"), cfg.finetune, **common)
            oracle_dirs = {s: shared for s in cfg.sets}
        else:
            oracle_dirs = {}
            for s in cfg.sets:
                echo(f"[obliviate] finetuning the oracle for {s} (the target's data without it)")
                others = [parts[o] for o in cfg.sets if o != s]
                oracle_dirs[s] = api.finetune(cfg.model, _union(f"without-{s}", full, *others),
                                              run.file(f"oracle-{s}"), cfg.finetune, **common)

        device = processes().device
        tokenizer = load_tokenizer(str(target_dir))
        fmt = ChatFormat(tokenizer, system_prompt=cfg.system_prompt, max_length=cfg.max_length)
        retain_eval = retain[:cfg.retain_eval]
        oracle_points = {}
        for s in cfg.sets:
            oracle = load_model(str(oracle_dirs[s]), dtype=cfg.dtype, device=device)
            oracle_points[s] = measure(oracle, fmt, parts[s], retain_eval, cfg.max_new_tokens, cfg.eval_batch_size)
            del oracle
        target = load_model(str(target_dir), dtype=cfg.dtype, device=device)
        target_points = {s: measure(target, fmt, parts[s], retain_eval, cfg.max_new_tokens, cfg.eval_batch_size)
                         for s in cfg.sets}
        curves: dict[str, dict[str, dict]] = {s: {} for s in cfg.sets}
        for s in cfg.sets:
            for method in cfg.methods:
                name = f"curves/{s}-{method}.json"
                if resume and run.has(name):
                    curves[s][method] = run.read_json(name)
                    continue
                echo(f"[obliviate] unlearning {s} with {method}")
                curves[s][method] = unlearn_curve(target, tokenizer, fmt, parts[s], retain, retain_eval, method, cfg,
                                                  target_points[s], progress)
                run.write_json(name, curves[s][method])
        examples = [r for s in cfg.sets
                    for r in per_example(parts[s], s, target_points[s], oracle_points[s], curves[s])]
        table = summary_table(examples, curves)
        result = {"config": asdict(cfg), "benchmark": bench.source,
                  "oracle": "shared (full only)" if cfg.shared_oracle else "per set (target data without the set)",
                  "finding": finding(table, curves), "table": table, "examples": examples,
                  "target": target_points, "oracle_points": oracle_points, "curves": curves}
        run.write_json("id_ood.json", result)
        atomic_write_text(run.file("id_ood.csv"), _csv(table))
        atomic_write_text(run.file("id_ood_examples.csv"), _csv(example_rows(examples)))
        for name, fig in _figures(examples, curves, cfg).items():
            atomic_write_bytes(run.file(name), png_bytes(fig))
    return result
