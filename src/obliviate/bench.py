"""One-command benchmark: methods x forget splits x seeds on one benchmark.

The target (finetuned on the train split) is made once per seed, the oracle once per forget split
and seed, and each is evaluated once; every cell (method, split, seed) then only unlearns and
evaluates. Each cell is a full pipeline run directory (``cells/<method>-<split>-s<seed>/``), so the
report, registry and audit commands work on it. Finished cells are skipped on re-run (resumable).

    benchmark: path/to/tofu          # or a synthetic benchmark directory, or `synthetic: {n_entities: 20}`
    model: smollm2-135m
    forget_splits: [forget01, forget05]
    methods: [npo, graddiff, {name: simnpo, options: {beta: 2.5}}]
    seeds: [0]
    finetune: {epochs: 10, lr: 2.0e-4}
    unlearn: {epochs: 5, lr: 1.0e-5}

MUSE's scalability and sustainability (Shi et al. 2024, arXiv 2407.06460, C5 and C6) run on a MUSE
benchmark instead (``muse:`` a MUSE-layout directory or hub id, or ``muse_synthetic: {n_forget: 8}``):
the target is finetuned on the raw forget + retain corpora and the retain model on retain alone (the
``finetune`` recipe); then for each method and seed, ``scale: [1, 2, 4]`` unlearns nested forget sets
(the first s/max(scale) of raw/forget) from the target, and ``sequential: K`` splits raw/forget in K
consecutive parts and unlearns them one after another, each from the previous result. After each
unlearning: VerbMem (forget), KnowMem (forget, retain) and PrivLeak against the retain model, on the
benchmark's full evaluation sets; rows in ``muse.json`` / ``muse.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from obliviate import api
from obliviate.data.benchmark import load_benchmark
from obliviate.data.muse import (
    EVAL_OPTIONAL_ROLES,
    EVAL_ROLES,
    TRAIN_ROLES,
    MuseBenchmark,
    MuseSyntheticConfig,
    load_muse,
    write_synthetic_muse,
)
from obliviate.data.synthetic import SyntheticConfig, generate_benchmark, write_benchmark
from obliviate.data.text import TextCorpus, documents_as_qa
from obliviate.evaluation.muse import evaluate_muse_model, muse_row, save_muse
from obliviate.methods import build_method
from obliviate.models.loading import DEFAULT_MODEL
from obliviate.pipeline import PipelineConfig, run_pipeline
from obliviate.reporting.ranking import number_or_none, rank
from obliviate.reporting.report import write_report
from obliviate.reporting.tables import SUMMARY, format_number, markdown_table
from obliviate.runs import RunDir, atomic_write_text, plain_name, read_json


@dataclass
class MethodSpec:
    """A method with its options, optionally with WAGLE weight masks and/or GUARD sample weights
    (their option dicts, as in ``obliviate.attribution``; ``{}`` means defaults)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    wagle: dict[str, Any] | None = None
    guard: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        label = self.name
        if self.options:
            label += "-" + "-".join(f"{k}{v}" for k, v in sorted(self.options.items()))
        for part in ("wagle", "guard"):
            opts = getattr(self, part)
            if opts is not None:
                label += f"+{part}" + "".join(f"-{k}{v}" for k, v in sorted(opts.items()))
        # The label names the cell's directory: option values (a mask path, say) must not leave it.
        return plain_name(label)


@dataclass
class BenchConfig:
    benchmark: str | None = None
    synthetic: dict[str, Any] | None = None
    model: str = DEFAULT_MODEL
    forget_splits: list[str] = field(default_factory=lambda: ["forget10"])
    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec("npo")])
    seeds: list[int] = field(default_factory=lambda: [0])
    finetune: dict[str, Any] = field(default_factory=dict)
    unlearn: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 200
    eval_batch_size: int = 32
    dtype: str = "float32"
    muse: str | None = None  # a MUSE benchmark (directory or hub id): scalability / sustainability runs
    muse_synthetic: dict[str, Any] | None = None  # or a synthetic one (data.muse.MuseSyntheticConfig options)
    scale: list[int] = field(default_factory=list)  # MUSE scalability: nested forget sets, s/max(scale) each
    sequential: int = 0  # MUSE sustainability: raw/forget in this many parts, unlearned one after another
    verbmem_max_new_tokens: int = 128
    knowmem_max_new_tokens: int = 32

    @property
    def is_muse(self) -> bool:
        return bool(self.muse) or self.muse_synthetic is not None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "BenchConfig":
        """The YAML file's options; ``overrides`` (command-line flags) replace its keys."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML ({exc})") from None
        if isinstance(data, dict):
            data = {**data, **(overrides or {})}
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "BenchConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: the top level must be a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {', '.join(unknown)} (valid: {', '.join(sorted(known))})")
        sources = [bool(data.get("benchmark")), data.get("synthetic") is not None, bool(data.get("muse")),
                   data.get("muse_synthetic") is not None]
        if sum(sources) != 1:
            raise ValueError(f"{source}: give exactly one of 'benchmark' (a directory or hub id) or 'synthetic', "
                             "or for MUSE runs 'muse' (a MUSE directory or hub id) or 'muse_synthetic'")
        _check_muse_options(data, source, muse=sources[2] or sources[3])
        methods = []
        for i, m in enumerate(data.get("methods", ["npo"])):
            if isinstance(m, str):
                methods.append(MethodSpec(m))
            elif isinstance(m, dict) and "name" in m and set(m) <= {"name", "options", "wagle", "guard"}:
                methods.append(MethodSpec(m["name"], dict(m.get("options") or {}),
                                          *(None if m.get(k) is None else dict(m[k] or {})
                                            for k in ("wagle", "guard"))))
            else:
                raise ValueError(f"{source}: methods[{i}] must be a name or "
                                 "{name: ..., options: {...}, wagle: {...}, guard: {...}}")
        cfg = cls(**{**data, "methods": methods})
        for m in cfg.methods:  # fail now, not after hours of finetuning
            try:
                build_method(m.name, **m.options)
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None
        if not cfg.seeds or not cfg.forget_splits:
            raise ValueError(f"{source}: seeds and forget_splits must not be empty")
        return cfg


def _check_muse_options(data: dict[str, Any], source: str, muse: bool) -> None:
    scale, sequential = data.get("scale") or [], data.get("sequential") or 0
    if not muse:
        if scale or sequential:
            raise ValueError(f"{source}: 'scale' and 'sequential' are MUSE runs: give 'muse' or 'muse_synthetic'")
        return
    if not isinstance(scale, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                              for s in scale):
        raise ValueError(f"{source}: 'scale' must be a list of positive integers (e.g. [1, 2, 4]), got {scale!r}")
    if len(set(scale)) != len(scale):
        raise ValueError(f"{source}: 'scale' lists a value twice: {scale}")
    if not isinstance(sequential, int) or isinstance(sequential, bool) or sequential < 0:
        raise ValueError(f"{source}: 'sequential' must be a number of parts (0: none), got {sequential!r}")
    if not scale and not sequential:
        raise ValueError(f"{source}: a MUSE bench needs 'scale' (e.g. [1, 2, 4]) and/or 'sequential' (e.g. 3)")
    if data.get("muse_synthetic") is not None:
        try:
            MuseSyntheticConfig.from_dict(data["muse_synthetic"] or {})
        except ValueError as exc:
            raise ValueError(f"{source}: muse_synthetic: {exc}") from None


def _benchmark_dir(cfg: BenchConfig, out: Path) -> str:
    if cfg.benchmark:
        return cfg.benchmark
    directory = out / "benchmark"
    if not (directory / "benchmark.json").exists():
        scfg = SyntheticConfig.from_dict(cfg.synthetic or {})
        write_benchmark(generate_benchmark(scfg), directory, scfg)
    return str(directory)


def run_bench(cfg: BenchConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
              echo=print) -> list[dict[str, Any]]:
    """Run every cell not yet finished; write ``leaderboard.json``/``.md`` and an HTML report."""
    out = Path(out)
    # Cells have their own fingerprints; what they share (data, model, recipes) must not change, while
    # methods, seeds and splits may be added to a benchmark directory.
    shared_options = {k: v for k, v in _plain(cfg).items() if k not in ("methods", "seeds", "forget_splits")}
    run = RunDir.open(out, kind="bench", fingerprint={"config": shared_options}, overwrite=overwrite,
                      resume=out.exists() and not overwrite, inputs=(cfg.benchmark, cfg.model))
    run.write_text("bench.yaml", yaml.safe_dump(_plain(cfg), sort_keys=False))
    with run.running("bench", resume=out.exists() and not overwrite):
        bench_dir = _benchmark_dir(cfg, out)
        cells = []
        for seed in cfg.seeds:
            for split in cfg.forget_splits:
                bench = load_benchmark(bench_dir, forget_split=split)
                # Through run.file, so the bench's run.json lists them and --overwrite removes them.
                shared = {"target": run.file(f"target-s{seed}"), "oracle": run.file(f"oracle-{split}-s{seed}"),
                          "target_eval": run.file("evals", f"target-{split}-s{seed}.json"),
                          "oracle_eval": run.file("evals", f"oracle-{split}-s{seed}.json")}
                for method in cfg.methods:
                    cell = run.file("cells", f"{method.label}-{split}-s{seed}")
                    status = RunDir(cell).status() if cell.exists() else None
                    if status == "done":
                        echo(f"[obliviate] {cell.name}: done, skipped")
                    else:
                        echo(f"[obliviate] {cell.name}")
                        pcfg = PipelineConfig(model=cfg.model, method=method.name, method_options=method.options,
                                              wagle=method.wagle, guard=method.guard,
                                              finetune={**cfg.finetune, "seed": seed},
                                              unlearn={**cfg.unlearn, "seed": seed},
                                              dtype=cfg.dtype, max_new_tokens=cfg.max_new_tokens,
                                              eval_batch_size=cfg.eval_batch_size)
                        run_pipeline(bench, cell, pcfg, resume=cell.exists(), progress=progress, echo=echo,
                                     shared=shared)
                    metrics = RunDir(cell).read_json("metrics.json")
                    cells.append({"cell": cell.name, "method": method.label, "split": split, "seed": seed,
                                  **{k: metrics["models"]["unlearned"].get(k) for k in
                                     ("forget_quality", "model_utility", "forget_rouge", "retain_rouge",
                                      "sacrifice_truth_ratio", "sacrifice_rouge", "sacrifice_probability")},
                                  "forgotten": metrics["verdict"]["forgotten"],
                                  "utility_kept": metrics["verdict"]["utility_kept"]})
        board = leaderboard(cells)
        run.write_json("leaderboard.json", {"cells": cells, "leaderboard": board})
        atomic_write_text(run.file("leaderboard.md"), leaderboard_markdown(board))
        write_report([out / "cells" / c["cell"] for c in cells], out / "report")
    return board


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def leaderboard(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Methods in the one leaderboard order (``reporting.ranking``: Pareto front on mean forget quality
    and mean model utility, then forget quality, then utility), ``rank`` and ``front`` set. Means
    are over splits and seeds; ``n`` cells each."""
    by_method: dict[str, list[dict]] = {}
    for c in cells:
        by_method.setdefault(c["method"], []).append(c)
    rows = [{"method": m, "n": len(cs), "forget_quality": _mean([c["forget_quality"] for c in cs]),
             "model_utility": _mean([c["model_utility"] for c in cs]),
             "forget_rouge": _mean([c["forget_rouge"] for c in cs]),
             "forgotten": sum(bool(c["forgotten"]) for c in cs),
             "utility_kept": sum(bool(c["utility_kept"]) for c in cs)}
            for m, cs in by_method.items()]
    ranked = rank(rows, lambda r: number_or_none(r["forget_quality"]), lambda r: number_or_none(r["model_utility"]))
    return [{**r.item, "rank": r.rank, "front": r.front} for r in ranked]


def leaderboard_markdown(rows: list[dict[str, Any]]) -> str:
    header = ["rank", "method", "cells", "forget quality", "model utility", "forget ROUGE-L", "forgotten",
              "utility kept"]
    body = [[r["rank"], r["method"], r["n"], *(format_number(r[k], SUMMARY) for k in
                                              ("forget_quality", "model_utility", "forget_rouge")),
             f"{r['forgotten']}/{r['n']}", f"{r['utility_kept']}/{r['n']}"] for r in rows]
    return markdown_table(header, body) + "\n"


def _plain(cfg: BenchConfig) -> dict[str, Any]:
    return asdict(cfg)


# --------------------------------------------------------------------------------------------
# MUSE: scalability (nested forget sets) and sustainability (sequential requests)

MUSE_HEADER = ["method", "mode", "step", "seed", "forget docs", "VerbMem (forget)", "KnowMem (forget)",
               "KnowMem (retain)", "PrivLeak"]


def _muse_dir(cfg: BenchConfig, out: Path) -> str:
    if cfg.muse:
        return cfg.muse
    directory = out / "muse-benchmark"
    if not (directory / "muse.json").exists():
        write_synthetic_muse(directory, MuseSyntheticConfig.from_dict(cfg.muse_synthetic or {}))
    return str(directory)


def scale_sizes(n_docs: int, scale: list[int]) -> dict[int, int]:
    """Forget documents per scale step: the first round(n * s / max(scale)) documents, at least one."""
    top = max(scale)
    if n_docs < top:
        raise ValueError(f"scale up to {top} needs at least {top} forget documents, the corpus has {n_docs}")
    return {s: max(1, round(n_docs * s / top)) for s in sorted(scale)}


def sequential_parts(n_docs: int, k: int) -> list[tuple[int, int]]:
    """K consecutive, disjoint (start, end) ranges covering the forget corpus, sizes differing by at most one."""
    if n_docs < k:
        raise ValueError(f"sequential: {k} parts need at least {k} forget documents, the corpus has {n_docs}")
    bounds = [round(i * n_docs / k) for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run_muse_bench(cfg: BenchConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
                   echo=print) -> list[dict[str, Any]]:
    """MUSE scalability / sustainability runs (module doc); writes ``muse.json``, ``muse.md`` and an HTML
    report of the unlearning runs; returns the rows (retain model and target first, per seed)."""
    out = Path(out)
    shared_options = {k: v for k, v in _plain(cfg).items() if k not in ("methods", "seeds", "scale", "sequential")}
    resume = out.exists() and not overwrite
    run = RunDir.open(out, kind="bench", fingerprint={"config": shared_options}, overwrite=overwrite, resume=resume,
                      inputs=(cfg.muse, cfg.model))
    run.write_text("bench.yaml", yaml.safe_dump(_plain(cfg), sort_keys=False))
    with run.running("bench", resume=resume):
        bench = load_muse(_muse_dir(cfg, out))
        bench.require(TRAIN_ROLES + EVAL_ROLES, "a MUSE bench")
        bench.read_all(TRAIN_ROLES + ("retain2",) + EVAL_ROLES + EVAL_OPTIONAL_ROLES)  # bad rows fail now
        muse = _MuseRuns(cfg, bench, run, progress, echo)
        for seed in cfg.seeds:
            muse.seed(seed)
        run.write_json("muse.json", {"benchmark": bench.describe(), "rows": muse.rows})
        atomic_write_text(run.file("muse.md"), muse_markdown(muse.rows))
        if muse.cells:
            write_report(muse.cells, out / "report", title="obliviate MUSE bench")
    return muse.rows


class _MuseRuns:
    """The MUSE bench's runs: per seed the target and retain model, then each method's scale steps and
    sequential requests; ``rows`` and ``cells`` (the unlearning runs) grow as they finish."""

    def __init__(self, cfg: BenchConfig, bench: MuseBenchmark, run: RunDir, progress: bool, echo):
        self.cfg, self.bench, self.run, self.echo = cfg, bench, run, echo
        self.common: dict[str, Any] = dict(dtype=cfg.dtype, progress=progress)
        self.forget = bench.texts("forget")
        self.sizes = scale_sizes(len(self.forget), cfg.scale) if cfg.scale else {}
        self.parts = sequential_parts(len(self.forget), cfg.sequential) if cfg.sequential else []
        self.retain_docs = bench.texts("retain").docs + (bench.texts("retain2").docs if bench.has("retain2") else [])
        self.retain = documents_as_qa(TextCorpus(self.retain_docs, f"{bench.source}:raw/retain"))
        self.rows: list[dict[str, Any]] = []
        self.cells: list[Path] = []

    def seed(self, seed: int) -> None:
        cfg, run = self.cfg, self.run
        self.echo(f"[obliviate] seed {seed}: finetuning the target on forget + retain, the retain model on retain")
        full = documents_as_qa(TextCorpus(self.forget.docs + self.retain_docs,
                                          f"{self.bench.source}:raw/forget+retain"))
        recipe = {**cfg.finetune, "seed": seed}
        target = api.finetune(cfg.model, full, run.file(f"target-s{seed}"), recipe, resume=True, **self.common)
        retain_model = api.finetune(cfg.model, self.retain, run.file(f"retain-s{seed}"), recipe, resume=True,
                                    **self.common)
        retain_result = self.evaluate(run.path, f"retain-s{seed}", retain_model, None)
        retain_auc = retain_result["privleak_auc"]
        for name, result in (("retain", retain_result),
                             ("target", self.evaluate(run.path, f"target-s{seed}", target, retain_auc))):
            self.rows.append({"method": name, "mode": "base", "step": 0, "seed": seed, "forget_docs": 0,
                              **muse_row(result), "cell": None})
        for method in cfg.methods:
            for step, n in self.sizes.items():
                self.unlearn(method, seed, retain_auc, target, "scale", step, (0, n))
            model = target
            for step, part in enumerate(self.parts, 1):
                model = self.unlearn(method, seed, retain_auc, model, "sequential", step, part)

    def unlearn(self, method: MethodSpec, seed: int, retain_auc: float | None, model: Path, mode: str, step: int,
                part: tuple[int, int]) -> Path:
        """Unlearn forget documents ``part`` (start, end) from ``model`` into a cell, evaluate it, add its row."""
        start, end = part
        cell = self.run.file("cells", f"{method.label}-{'scale' if mode == 'scale' else 'seq'}{step}-s{seed}")
        self.echo(f"[obliviate] {cell.name}: unlearning forget documents {start}..{end - 1}")
        forget = documents_as_qa(TextCorpus(self.forget.docs[start:end],
                                            f"{self.forget.source}[{start}:{end}] ({mode} {step})"))
        path = api.unlearn(model, forget, self.retain, cell, method=method.name, method_options=method.options,
                           train={**self.cfg.unlearn, "seed": seed}, resume=cell.exists(), wagle=method.wagle,
                           guard=method.guard, **self.common)
        result = self.evaluate(cell, "unlearned", path, retain_auc)
        # Sequential requests accumulate: after step k, every document up to ``end`` has been unlearned.
        self.rows.append({"method": method.label, "mode": mode, "step": step, "seed": seed,
                          "forget_docs": end if mode == "sequential" else end - start, **muse_row(result),
                          "cell": cell.name})
        self.cells.append(cell)
        return path

    def evaluate(self, run_dir: Path, label: str, model: Path, retain_auc: float | None) -> dict[str, Any]:
        """MUSE evaluation of a saved model into ``run_dir/muse/<label>.json``, or that file when a
        previous run wrote it."""
        path = RunDir(run_dir).file("muse", f"{label}.json")
        if path.exists():
            return read_json(path)
        self.echo(f"[obliviate] MUSE evaluation of {model}")
        cfg = self.cfg
        result = evaluate_muse_model(model, self.bench, label=label, retain_auc=retain_auc, dtype=cfg.dtype,
                                     batch_size=cfg.eval_batch_size, verbmem_max_new_tokens=cfg.verbmem_max_new_tokens,
                                     knowmem_max_new_tokens=cfg.knowmem_max_new_tokens)
        save_muse(result, run_dir, label, model=str(model))
        return result


def muse_markdown(rows: list[dict[str, Any]]) -> str:
    body = [[r["method"], r["mode"], r["step"], r["seed"], r["forget_docs"],
             *(format_number(r[k], SUMMARY) for k in ("verbmem_forget", "knowmem_forget", "knowmem_retain",
                                                      "privleak"))] for r in rows]
    return markdown_table(MUSE_HEADER, body) + "\n"
