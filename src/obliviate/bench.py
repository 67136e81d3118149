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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from obliviate.data.benchmark import load_benchmark
from obliviate.data.synthetic import SyntheticConfig, generate_benchmark, write_benchmark
from obliviate.methods import build_method
from obliviate.models.loading import DEFAULT_MODEL
from obliviate.pipeline import PipelineConfig, run_pipeline
from obliviate.reporting.ranking import number_or_none, rank
from obliviate.reporting.report import write_report
from obliviate.reporting.tables import SUMMARY, format_number, markdown_table
from obliviate.runs import RunDir, atomic_write_text, plain_name


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

    @classmethod
    def from_yaml(cls, path: str | Path) -> "BenchConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML ({exc})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "BenchConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: the top level must be a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {', '.join(unknown)} (valid: {', '.join(sorted(known))})")
        if bool(data.get("benchmark")) == bool(data.get("synthetic") is not None):
            raise ValueError(f"{source}: give exactly one of 'benchmark' (a directory or hub id) or 'synthetic'")
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
