"""Reports: one self-contained HTML page (inline CSS, figures embedded as base64 PNG, nothing
fetched from the network) and a Markdown summary, for one or more run directories.

Per run: what ran (method, model, config hash, code version), the metric table of every evaluated
model (target / oracle / unlearned, forget side and utility side), the two-sided verdict (a table:
criterion, statistic, value, interval, call, evidence file; judged from the run's files when it
report is written, so attacks run after the pipeline count), the forgetting vs
utility trade-off along ``trajectory.json``, the relearning curve and quantisation table when those
attacks ran, truth-ratio histograms against the oracle, the training loss, and example generations
on forget and retain questions. Everything read from run files is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import obliviate
from obliviate.evaluation.verdict import NOT_MEASURED, Settings, run_evidence, run_verdict
from obliviate.reporting import plots
from obliviate.reporting.tables import format_number, markdown_cell, markdown_table, verdict_rows, verdict_summary
from obliviate.runs import atomic_write_bytes, atomic_write_text
from obliviate.runs.fingerprint import config_hash
from obliviate.runs.registry import RunFileError, find_in_run, read_config, read_json_file, run_identity

LABEL_ORDER = ("target", "oracle", "unlearned")
HEADLINE = ("forget_quality", "model_utility")
FORGET_PREFIXES = ("forget", "holdout", "mia", "privleak", "extraction", "memor", "exposure", "verbmem")
UTILITY_PREFIXES = ("model_utility", "retain", "real_authors", "world_facts", "utility", "knowmem_retain")


def metric_side(key: str) -> str:
    """"forget" (how much was forgotten / leaks), "utility" (what was kept) or "other"."""
    k = key.lower()
    if k.startswith(UTILITY_PREFIXES):
        return "utility"
    if k.startswith(FORGET_PREFIXES) or "mia" in k or "privleak" in k or "forget" in k:
        return "forget"
    return "other"


# ----------------------------------------------------------------------------------------------
# Loading a run


@dataclass
class RunData:
    path: Path
    config: dict[str, Any]
    identity: dict[str, str | None]
    environment: dict[str, Any]
    status: dict[str, Any]
    models: dict[str, dict[str, Any]]  # label -> flat summary row
    verdict: dict[str, Any]
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> eval/<label>.json
    trajectory: list[dict[str, Any]] | None = None
    relearn: dict[str, Any] | None = None
    quantise: dict[str, Any] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    muse: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> muse/<label>.json (MUSE metrics)


def _check_eval(path: Path, ev: Any) -> dict[str, Any]:
    if not isinstance(ev, dict) or not isinstance(ev.get("sets"), dict):
        raise RunFileError(f"{path}: not an evaluation result (expected an object with a 'sets' mapping)")
    for name, s in ev["sets"].items():
        per = s.get("per_sample", {}) if isinstance(s, dict) else None
        if not isinstance(per, dict):
            raise RunFileError(f"{path}: set '{name}' must be an object with a 'per_sample' mapping")
        lengths = {k: len(v) for k, v in per.items() if isinstance(v, list)}
        if len(set(lengths.values())) > 1:
            raise RunFileError(f"{path}: set '{name}' has per-sample lists of different lengths {lengths}")
    return ev


def read_log(path: Path) -> list[dict[str, Any]]:
    """log.jsonl rows; a torn last line (the run was killed mid-write) is ignored."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def summary_from_eval(ev: dict[str, Any]) -> dict[str, Any]:
    """A flat summary row from an eval result, for runs without metrics.json."""
    row = {"forget_quality": ev.get("forget_quality"), "model_utility": ev.get("model_utility")}
    for name, s in ev["sets"].items():
        for key in ("probability", "rouge", "truth_ratio"):
            if key in s:
                row[f"{name}_{key}"] = s[key]
    return row


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory (a demo's sub-runs supply what the demo itself lacks)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    eval_dir = find_in_run(run_dir, "eval")
    evals = {}
    for path in sorted(eval_dir.glob("*.json")) if eval_dir else []:
        evals[path.stem] = _check_eval(path, read_json_file(path))
    metrics = read_json_file(run_dir / "metrics.json") or {}
    if not isinstance(metrics, dict) or not isinstance(metrics.get("models", {}), dict):
        raise RunFileError(f"{run_dir / 'metrics.json'}: expected {{\"models\": {{label: row}}, \"verdict\": ...}}")
    models = metrics.get("models") or {label: summary_from_eval(ev) for label, ev in evals.items()}
    trajectory = _optional(run_dir, "trajectory.json", list)
    log_path = find_in_run(run_dir, "log.jsonl")
    return RunData(
        path=run_dir, config=config, identity=run_identity(run_dir, config),
        environment=read_json_file(run_dir / "environment.json") or {},
        status=read_json_file(run_dir / "status.json") or {},
        models=_ordered(models), verdict=current_verdict(run_dir, metrics.get("verdict") or {}), evals=_ordered(evals),
        trajectory=trajectory, relearn=_optional(run_dir, "attacks/relearn.json", dict),
        quantise=_optional(run_dir, "attacks/quantise.json", dict),
        log=read_log(log_path) if log_path else [], muse=muse_results(run_dir))


MUSE_KEYS = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak", "privleak_auc", "privleak_auc_retain")


def muse_results(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``muse/<label>.json`` of a run (``obliviate evaluate --muse``), by label."""
    muse_dir = find_in_run(run_dir, "muse")
    results = {}
    for path in sorted(muse_dir.glob("*.json")) if muse_dir else []:
        result = read_json_file(path)
        if not isinstance(result, dict) or not all(k in result for k in MUSE_KEYS[:4]):
            raise RunFileError(f"{path}: not a MUSE result (expected an object with {', '.join(MUSE_KEYS[:4])})")
        results[path.stem] = result
    return _ordered(results)


def current_verdict(run_dir: Path, recorded: dict[str, Any]) -> dict[str, Any]:
    """The two-sided verdict judged from the run's files now (``evaluation.verdict``, with the settings
    the run recorded), so attacks run after the pipeline count; the recorded one (metrics.json's) when
    nothing can be judged from files."""
    if not find_in_run(run_dir, "eval/unlearned.json"):
        return recorded
    verdict = run_verdict(run_evidence(run_dir), Settings.from_json(recorded.get("settings")))
    return recorded if verdict["call"] == NOT_MEASURED else verdict


def _optional(run_dir: Path, rel: str, kind: type) -> Any:
    path = find_in_run(run_dir, rel)
    if path is None:
        return None
    value = read_json_file(path)
    if not isinstance(value, kind):
        raise RunFileError(f"{path}: expected a JSON {'list' if kind is list else 'object'}, "
                           f"got {type(value).__name__}")
    return value


def _ordered(d: dict[str, Any]) -> dict[str, Any]:
    first = [k for k in LABEL_ORDER if k in d]
    return {k: d[k] for k in first + sorted(k for k in d if k not in LABEL_ORDER)}


# ----------------------------------------------------------------------------------------------
# Tables (as rows of strings, rendered to HTML or Markdown)


def metric_rows(models: dict[str, dict[str, Any]], side: str) -> list[list[str]]:
    """[metric, value per model] for every metric of one side, headline metrics first."""
    scalars = {k for row in models.values() for k, v in row.items() if not isinstance(v, (dict, list))}
    keys = [k for k in scalars if metric_side(k) == side]
    keys.sort(key=lambda k: (k not in HEADLINE, HEADLINE.index(k) if k in HEADLINE else 0, k))
    return [[k] + [format_number(row.get(k)) for row in models.values()] for k in keys]


def quantise_rows(run: RunData) -> tuple[list[str], list[list[str]]]:
    """Unlearned model at full precision vs after 8- and 4-bit quantisation (Zhang et al. 2024,
    arXiv 2410.16454: quantisation can restore forgotten knowledge)."""
    full = run.models.get("unlearned", {})
    # quantise.json may repeat the full-precision row under "none"; the pipeline's row is shown instead.
    by_bits = sorted((run.quantise or {}).items(), key=lambda kv: -int(kv[0]) if kv[0].isdigit() else 0)
    rows_in = [("full precision", full)] + [(f"{bits}-bit", row) for bits, row in by_bits if bits.isdigit()]
    keys = [k for k in ("forget_quality", "model_utility") if any(k in r for _, r in rows_in)]
    keys += sorted({k for _, r in rows_in[1:] for k in r if k not in keys and not isinstance(r[k], (dict, list))})
    return ["weights"] + keys, [[name] + [format_number(r.get(k)) for k in keys] for name, r in rows_in]


def generation_rows(run: RunData, set_name: str, n: int) -> tuple[list[str], list[list[str]]]:
    """Question, then each model's generation (with its ROUGE-L recall) for the first ``n`` questions."""
    labels = [label for label, ev in run.evals.items() if set_name in ev["sets"]
              and "generation" in ev["sets"][set_name].get("per_sample", {})]
    if not labels:
        return [], []
    base = run.evals[labels[0]]["sets"][set_name]["per_sample"]
    questions = base.get("question") or [f"#{i}" for i in range(len(base["generation"]))]
    # Only models evaluated on the same questions, in the same order, go side by side.
    labels = [label for label in labels
              if run.evals[label]["sets"][set_name]["per_sample"].get("question", questions) == questions]
    rows = []
    for i in range(min(n, len(questions))):
        row = [questions[i]]
        for label in labels:
            per = run.evals[label]["sets"][set_name]["per_sample"]
            rouge = per.get("rouge", [None] * len(questions))[i]
            row.append(per["generation"][i] + (f"  [ROUGE {format_number(rouge)}]" if rouge is not None else ""))
        rows.append(row)
    return ["question"] + labels, rows


MC_METRICS = ("accuracy", "accuracy_norm", "chance")


def mc_rows(run: RunData) -> tuple[list[str], list[list[str]]]:
    """Multiple-choice accuracy per set (``multiple_choice`` of each eval): [set, metric, value per model];
    ``accuracy_norm`` is per-character length normalised, ``chance`` a uniform guess's accuracy."""
    labels = [label for label, ev in run.evals.items() if ev.get("multiple_choice")]
    names = list(dict.fromkeys(name for label in labels for name in run.evals[label]["multiple_choice"]))
    rows = []
    for name in names:
        results = [run.evals[label]["multiple_choice"].get(name) or {} for label in labels]
        rows += [[name, metric] + [format_number(r.get(metric)) for r in results] for metric in MC_METRICS]
    return ["set", "metric"] + labels, rows


def lm_eval_rows(run: RunData) -> tuple[list[str], list[list[str]]]:
    """lm-evaluation-harness results of the requested tasks (``lm_eval`` of each eval): [task, metric,
    value (± standard error) per model]."""
    labels = [label for label, ev in run.evals.items() if isinstance(ev.get("lm_eval"), dict)]
    summaries = [run.evals[label]["lm_eval"] for label in labels]
    tasks = list(dict.fromkeys(t for s in summaries for t in s.get("tasks", [])))
    rows = []
    for task in tasks:
        per_model = [(s.get("results") or {}).get(task) or {} for s in summaries]
        metrics = list(dict.fromkeys(m for r in per_model for m in r if not m.endswith("_stderr")))
        for metric in metrics:
            cells = []
            for r in per_model:
                err = r.get(f"{metric}_stderr")
                cells.append(format_number(r.get(metric)) + (f" ± {format_number(err)}" if err is not None else ""))
            rows.append([task, metric] + cells)
    return ["task", "metric"] + labels, rows


def muse_rows(run: RunData) -> tuple[list[str], list[list[str]]]:
    """MUSE metrics of each model with a ``muse/<label>.json``: [metric, value per model]."""
    labels = list(run.muse)
    rows = [[key] + [format_number(run.muse[label].get(key)) for label in labels] for key in MUSE_KEYS]
    return ["metric"] + labels, rows if labels else []


MUSE_NOTE = ("MUSE (Shi et al. 2024): VerbMem = ROUGE-L F1 of the continuation of forget-text prompts, KnowMem = "
             "ROUGE-L recall of answers to questions about the forget / retain corpus (lower on forget, higher "
             "on retain is better); PrivLeak = Min-K% AUC difference to the retain model in percent (near 0 is "
             "ideal, negative = under-unlearned).")


def run_facts(run: RunData) -> list[tuple[str, str]]:
    env, ident = run.environment, run.identity
    versions = env.get("versions") or {}
    facts = [("kind", ident.get("kind")), ("method", ident.get("method")), ("model", ident.get("model")),
             ("benchmark", ident.get("benchmark")), ("seed", run.config.get("seed", env.get("seed"))),
             ("status", run.status.get("status")), ("config sha256", config_hash(run.config)),
             ("git commit", env.get("git_commit")),
             ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v))]
    return [(k, str(v)) for k, v in facts if v not in (None, "")]


def truth_ratios(run: RunData) -> dict[str, list[float]]:
    out = {}
    for label, ev in run.evals.items():
        values = ev["sets"].get("forget", {}).get("per_sample", {}).get("truth_ratio_raw")
        if values:
            out[label] = values
    return out if "oracle" in out and len(out) > 1 else {}


# ----------------------------------------------------------------------------------------------
# Figures


@dataclass
class ReportFigure:
    name: str
    title: str
    png: bytes


def run_figures(run: RunData) -> list[ReportFigure]:
    figs = []
    if run.trajectory:
        # Summary rows: the figure computes from each the same utility as the curve's (without ROUGE
        # when the trajectory's points were scored by log-probs only).
        fig = plots.tradeoff_figure({run.identity.get("method") or "unlearning": run.trajectory}, dict(run.models))
        figs.append(ReportFigure("tradeoff", "Forget quality vs model utility", plots.png_bytes(fig)))
    if run.relearn and run.relearn.get("steps"):
        figs.append(ReportFigure("relearn", "Relearning attack", plots.png_bytes(plots.relearn_figure(run.relearn))))
    ratios = truth_ratios(run)
    if ratios:
        figs.append(ReportFigure("truth_ratio", "Truth ratios vs the oracle",
                                 plots.png_bytes(plots.truth_ratio_figure(ratios))))
    if any("loss" in r for r in run.log):
        figs.append(ReportFigure("loss", "Training loss", plots.png_bytes(plots.loss_figure(run.log))))
    return figs


def overview_figure(runs: Sequence[RunData], names: Sequence[str]) -> ReportFigure | None:
    curves = {name: run.trajectory for run, name in zip(runs, names) if run.trajectory}
    if not curves:
        return None
    fig = plots.tradeoff_figure(curves)
    return ReportFigure("overview", "Forget quality vs model utility, all runs", plots.png_bytes(fig))


# ----------------------------------------------------------------------------------------------
# HTML


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1150px;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.4em 0 1.2em;font-size:.92em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f2f4f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.88em;background:#f5f5f5;padding:0 .2em}
img.plot{display:block;width:760px;max-width:100%;height:auto;margin:.5em 0 1.2em;border:1px solid #eee}
.tables{display:flex;gap:2em;flex-wrap:wrap}.note{color:#555;font-size:.9em}
td.gen{max-width:22em;white-space:pre-wrap}.pass{color:#176f2c}.fail{color:#b00020}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


_NUMBER = re.compile(r"^-?[\d.]+(e[-+]?\d+)?$")


def html_table(header: Sequence[str] | None, rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(
        f"<td class='{'num' if _NUMBER.match(c) else cls}'>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def img_tag(fig: ReportFigure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return f"<img class='plot' alt='{_e(fig.title)}' src='data:image/png;base64,{data}'>"


def _verdict_html(verdict: dict[str, Any]) -> str:
    items = []
    for k, v in verdict.items():
        cls = "pass" if v is True else "fail" if v is False else ""
        shown = json.dumps(v) if isinstance(v, (dict, list)) else format_number(v)
        items.append(f"<li><span class='{cls}'>{_e(k)}: <b>{_e(shown)}</b></span></li>")
    return "<ul>" + "".join(items) + "</ul>"


def run_html(run: RunData, name: str, figs: list[ReportFigure], examples: int) -> str:
    out = [f"<h2 id='{_e(name)}'>{_e(name)}</h2>",
           f"<p class='note'><code>{_e(run.path.resolve())}</code></p>",
           html_table(None, run_facts(run))]
    if run.models:
        labels = list(run.models)
        out.append("<h3>Metrics</h3><p class='note'>Forget side: lower ROUGE/probability means more forgotten; "
                   "forget quality is the KS-test p-value against the oracle (higher = closer to never having "
                   "seen the data). Utility side: higher is better.</p><div class='tables'>")
        for side, title in (("forget", "forget side"), ("utility", "utility side"), ("other", "other")):
            rows = metric_rows(run.models, side)
            if rows:
                out.append(f"<div><h4>{title}</h4>{html_table(['metric'] + labels, rows)}</div>")
        out.append("</div>")
    if run.verdict.get("criteria"):
        header, rows = verdict_rows(run.verdict)
        out.append("<h3>Verdict: forget set vs never-seen holdout rows</h3>"
                   + "".join(f"<p>{_e(line).replace('**', '')}</p>" for line in verdict_summary(run.verdict))
                   + html_table(header, rows))
    elif run.verdict:
        out.append("<h3>Verdict</h3>" + _verdict_html(run.verdict))
    for fig in figs:
        out.append(f"<h3>{_e(fig.title)}</h3>{img_tag(fig)}")
        if fig.name == "relearn":
            rec = ((run.relearn or {}).get("summary") or {}).get("recovery")
            out.append(f"<p>Recovery: <b>{_e(format_number(rec))}</b></p>")
    if run.quantise:
        header, rows = quantise_rows(run)
        out.append("<h3>Quantisation attack</h3>" + html_table(header, rows))
    header, rows = mc_rows(run)
    if rows:
        out.append("<h3>Multiple choice</h3><p class='note'>Accuracy by each choice's log-likelihood; "
                   "accuracy_norm divides it by the choice's length in characters; chance is a uniform "
                   "guess.</p>" + html_table(header, rows))
    header, rows = lm_eval_rows(run)
    if rows:
        out.append("<h3>lm-evaluation-harness</h3>" + html_table(header, rows))
    header, rows = muse_rows(run)
    if rows:
        notes = "".join(f"<p class='note'>{_e(label)}: {_e(r['note'])}</p>" for label, r in run.muse.items()
                        if r.get("note"))
        out.append(f"<h3>MUSE</h3><p class='note'>{_e(MUSE_NOTE)}</p>{html_table(header, rows)}{notes}")
    for set_name in ("forget", "retain"):
        header, rows = generation_rows(run, set_name, examples)
        if rows:
            out.append(f"<h3>Example generations: {set_name} set</h3>" + html_table(header, rows, cls="gen"))
    return "\n".join(out)


def overview_rows(runs: Sequence[RunData], names: Sequence[str]) -> list[list[str]]:
    rows = []
    for run, name in zip(runs, names):
        un = run.models.get("unlearned") or {}
        oracle = run.models.get("oracle") or {}
        rows.append([name, run.identity.get("method") or "", format_number(un.get("forget_quality")),
                     format_number(un.get("model_utility")), format_number(oracle.get("model_utility"))])
    return rows


OVERVIEW_HEADER = ["run", "method", "forget quality (unlearned)", "model utility (unlearned)", "model utility (oracle)"]


# ----------------------------------------------------------------------------------------------
# Markdown


def run_markdown(run: RunData, name: str, fig_paths: dict[str, str]) -> str:
    out = [f"## {markdown_cell(name)}", "", markdown_table(["", "value"], run_facts(run)), ""]
    if run.models:
        for side in ("forget", "utility"):
            rows = metric_rows(run.models, side)
            if rows:
                out += [f"**Metrics, {side} side**", "", markdown_table(["metric"] + list(run.models), rows), ""]
    if run.verdict.get("criteria"):
        header, rows = verdict_rows(run.verdict)
        out += ["**Verdict: forget set vs never-seen holdout rows**", ""]
        out += [x for line in verdict_summary(run.verdict) for x in (line, "")]
        out += [markdown_table(header, rows), ""]
    elif run.verdict:
        out += ["**Verdict**", ""] + [
            f"- {markdown_cell(k)}: "
            f"{markdown_cell(format_number(v) if not isinstance(v, (dict, list)) else json.dumps(v))}"
            for k, v in run.verdict.items()] + [""]
    if run.relearn:
        out += [f"Relearning recovery: {format_number((run.relearn.get('summary') or {}).get('recovery'))}", ""]
    if run.quantise:
        header, rows = quantise_rows(run)
        out += ["**Quantisation attack**", "", markdown_table(header, rows), ""]
    for title, (header, rows) in (("Multiple choice", mc_rows(run)), ("lm-evaluation-harness", lm_eval_rows(run))):
        if rows:
            out += [f"**{title}**", "", markdown_table(header, rows), ""]
    header, rows = muse_rows(run)
    if rows:
        out += ["**MUSE**", "", markdown_table(header, rows), ""]
        out += [f"- {markdown_cell(label)}: {markdown_cell(r['note'])}" for label, r in run.muse.items()
                if r.get("note")] + [""]
    for title, path in fig_paths.items():
        out += [f"![{markdown_cell(title)}]({path})", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Entry point


@dataclass
class Report:
    html: Path
    markdown: Path
    figures: list[Path]


def _names(runs: Sequence[RunData]) -> list[str]:
    """Short unique section names: the directory name, with its parent when names collide."""
    names = [r.path.resolve().name for r in runs]
    names = [f"{r.path.resolve().parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names)]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, examples: int = 3,
                 title: str = "obliviate report") -> Report:
    """Write ``report.html`` (self-contained), ``report.md`` and ``figures/*.png`` into ``out_dir``."""
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    names = _names(runs)
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    html_parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
                  "<meta name='viewport' content='width=device-width, initial-scale=1'>",
                  f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
                  f"<h1>{_e(title)}</h1><p class='note'>Generated {stamp} by obliviate {obliviate.__version__} "
                  f"from {len(runs)} run(s).</p>"]
    md_parts = [f"# {markdown_cell(title)}", "", f"Generated {stamp} by obliviate {obliviate.__version__}.", ""]
    figure_files = []

    def save(fig: ReportFigure, prefix: str) -> str:
        path = out_dir / "figures" / f"{prefix}-{fig.name}.png"
        atomic_write_bytes(path, fig.png)
        figure_files.append(path)
        return f"figures/{path.name}"

    if len(runs) > 1:
        rows = overview_rows(runs, names)
        html_parts.append("<h2>Overview</h2>" + html_table(OVERVIEW_HEADER, rows))
        md_parts += ["## Overview", "", markdown_table(OVERVIEW_HEADER, rows), ""]
        overview = overview_figure(runs, names)
        if overview:
            html_parts.append(img_tag(overview))
            md_parts += [f"![{overview.title}]({save(overview, 'all')})", ""]
    for i, (run, name) in enumerate(zip(runs, names)):
        figs = run_figures(run)
        prefix = f"{i + 1:02d}-{_slug(name)}"
        html_parts.append(run_html(run, name, figs, examples))
        md_parts.append(run_markdown(run, name, {fig.title: save(fig, prefix) for fig in figs}))
    html_parts.append("</body></html>\n")
    html_path = atomic_write_text(out_dir / "report.html", "\n".join(html_parts))
    md_path = atomic_write_text(out_dir / "report.md", "\n".join(md_parts))
    return Report(html=html_path, markdown=md_path, figures=figure_files)
