"""Attacks on a finished run: relearning, quantisation, probes and the privacy evaluation.

A pipeline run (``obliviate demo`` / ``run_pipeline``) holds ``target/model``, ``oracle/model``,
``unlearn/model``, ``eval/oracle.json`` and a ``config.yaml`` naming its benchmark; each function
here opens it with :func:`open_run`, attacks the unlearned model (and the oracle, as the baseline of
what the attack gives a model that never saw the forget set), and writes ``attacks/<name>.json``
into the run directory, atomically:

- ``relearn.json``: :func:`obliviate.attacks.relearn.relearn_attack`;
- ``quantise.json``: ``{"none": row, "8": row, "4": row}``, each row the ``summary_row`` of the
  TOFU evaluation (forget quality against the oracle's ``eval/oracle.json``); the backend and
  options go to ``quantise_config.json``;
- ``probes.json``: ``{"probes": {probe: {model: forget row}}, "skipped": {probe: why}, ...}``;
- ``privacy.json``: ``{"results": {model: privacy_eval result}, "rows": {model: flat row}}``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from obliviate.attacks import relearn as rl
from obliviate.attacks.probes import context_probe, few_shot_probe, paraphrase_probe
from obliviate.attacks.quantise import load_bnb_quantised, quantise_model_rtn
from obliviate.attacks.relearn import RelearnConfig, relearn_attack
from obliviate.data.benchmark import Benchmark, load_benchmark
from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat
from obliviate.data.qa import DataError, QADataset
from obliviate.evaluation.evaluate import (
    eval_sets_from_benchmark,
    evaluate_model,
    evaluation_settings,
    load_eval,
    summary_row,
)
from obliviate.evaluation.privacy import privacy_of_models, privacy_rows
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.processes import processes
from obliviate.runs import RunDir, atomic_write_json

MODEL_LABELS = ("unlearned", "oracle", "target")
LAYOUT = {"unlearned": Path("unlearn/model"), "oracle": Path("oracle/model"), "target": Path("target/model")}
RELEARN_SOURCES = ("forget_subset", "attributes", "retain_neighbours", "file")
PROBES = ("paraphrase", "few_shot", "context")


@dataclass
class AttackRun:
    """The models and data of a finished run, and how it formatted prompts."""

    path: Path
    benchmark: Benchmark
    models: dict[str, Path]  # label (unlearned, oracle, target) -> model directory
    base_model: str | None = None
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    max_length: int = 512
    dtype: str = "float32"
    max_new_tokens: int = 200
    batch_size: int = 32
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> str:
        return str(processes().device)  # this process's accelerator under accelerate launch

    def has(self, label: str) -> bool:
        return label in self.models

    def load(self, label: str):
        """(model, tokenizer) of a label, loaded once."""
        if label not in self.models:
            raise FileNotFoundError(f"{self.path}: the run has no {label} model "
                                    f"(found: {', '.join(self.models) or 'none'})")
        if label not in self._loaded:
            path = str(self.models[label])
            self._loaded[label] = (load_model(path, dtype=self.dtype, device=self.device), load_tokenizer(path))
        return self._loaded[label]

    def fmt(self, tokenizer) -> ChatFormat:
        return ChatFormat(tokenizer, system_prompt=self.system_prompt, max_length=self.max_length)

    def forget_set(self) -> QADataset:
        """The forget rows as evaluated (with paraphrases and perturbed answers where the benchmark has them)."""
        return self.benchmark.split("eval_forget" if self.benchmark.has("eval_forget") else "forget")

    def oracle_eval(self) -> dict | None:
        path = self.path / "eval" / "oracle.json"
        return load_eval(path) if path.is_file() else None

    def stored_eval(self, label: str, sets: dict[str, QADataset], tokenizer) -> dict | None:
        """The run's own ``eval/<label>.json`` when it is an evaluation of this run's ``label`` model
        (the run's layout, not a model given explicitly) made exactly as this run would make it now
        (``evaluation_settings``: same rows, prompt format, batch size, token budget, dtype, device), so its
        numbers are those a new evaluation would give; otherwise None. An evaluation with an oracle
        has the forget quality against ``eval/oracle.json``, the file :meth:`oracle_eval` reads."""
        path = self.path / "eval" / f"{label}.json"
        if self.models.get(label) != self.path / LAYOUT[label] or not path.is_file():
            return None
        stored = load_eval(path)
        model, _ = self.load(label)
        wanted = evaluation_settings(model, sets, self.fmt(tokenizer), self.batch_size, self.max_new_tokens, None)
        return stored if stored.get("made_with") == wanted else None

    def write(self, name: str, result: dict) -> Path:
        path = atomic_write_json(self.path / "attacks" / f"{name}.json", result)
        unlearned = self.models.get("unlearned")
        RunDir(self.path).record_result(path, "attack", method=name, model=str(unlearned) if unlearned else None,
                      metrics=result.get("summary", result))
        return path


def open_run(run_dir: str | Path, benchmark: str | Path | None = None, unlearned: str | Path | None = None,
             oracle: str | Path | None = None, target: str | Path | None = None) -> AttackRun:
    """Open a pipeline run directory; any model or the benchmark can be given explicitly instead."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} not found")
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    bench_spec = benchmark or config.get("benchmark")
    if bench_spec is None:
        raise ValueError(f"{path}/config.yaml names no benchmark; pass one explicitly")
    given = {"unlearned": unlearned, "oracle": oracle, "target": target}
    models = {}
    for label in MODEL_LABELS:
        chosen = given[label]
        candidate = Path(chosen) if chosen is not None else path / LAYOUT[label]
        if (candidate / "config.json").is_file():
            models[label] = candidate
        elif chosen is not None:
            raise FileNotFoundError(f"{candidate}: not a model directory (no config.json)")
    if "unlearned" not in models:
        raise FileNotFoundError(f"{path}: no unlearned model at unlearn/model; pass it explicitly")
    return AttackRun(path=path, benchmark=load_benchmark(bench_spec), models=models, base_model=config.get("model"),
                     system_prompt=config.get("system_prompt", DEFAULT_SYSTEM_PROMPT),
                     max_length=int(config.get("max_length", 512)), dtype=str(config.get("dtype", "float32")),
                     max_new_tokens=int(config.get("max_new_tokens", 200)),
                     batch_size=int(config.get("eval_batch_size", 32)))


# ------------------------------------------------------------------------------------------- relearning

def relearn_split(run: AttackRun, source: str = "forget_subset", *, fraction: float = 0.15,
                  attributes: Sequence[str] = (), file: str | Path | None = None, max_rows: int | None = None,
                  seed: int = 0):
    """The relearn set and held-out forget questions for ``source`` (one of ``RELEARN_SOURCES``)."""
    forget = run.forget_set()
    if source == "forget_subset":
        return rl.forget_subset(forget, fraction, seed)
    if source == "attributes":
        return rl.attribute_subset(forget, attributes)
    if source == "retain_neighbours":
        return rl.retain_neighbours(forget, run.benchmark.split("retain"), max_rows, seed)
    if source == "file":
        if file is None:
            raise ValueError("relearning from a file needs the file")
        _, tokenizer = run.load("unlearned")
        return rl.from_file(file, forget, tokenizer)
    raise ValueError(f"unknown relearn set '{source}' (choose from {', '.join(RELEARN_SOURCES)})")


def run_relearn(run: AttackRun, cfg=None, source: str = "forget_subset", progress: bool = False,
                **split_options) -> dict:
    """Relearning attack on the unlearned model and the oracle, with the benchmark's holdout rows as
    the oracle-free control when it has them; writes ``attacks/relearn.json``."""
    cfg = cfg or RelearnConfig()
    split = relearn_split(run, source, **split_options)
    model, tokenizer = run.load("unlearned")
    oracle = run.load("oracle")[0] if run.has("oracle") else None
    target = run.load("target")[0] if run.has("target") else None
    holdout = run.benchmark.split("holdout") if run.benchmark.has("holdout") else None  # the oracle-free control
    result = relearn_attack(model, tokenizer, split, cfg, oracle=oracle, target=target, fmt=run.fmt(tokenizer),
                            progress=progress, holdout=holdout)
    run.write("relearn", result)
    return result


# ------------------------------------------------------------------------------------------- quantisation

def _bnb_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def run_quantise(run: AttackRun, bits: Sequence[int] = (8, 4), backend: str = "auto", group_size: int | None = 128,
                 progress: bool = False) -> dict:
    """Evaluate the unlearned model in full precision ("none") and quantised to each of ``bits``.
    The full-precision row is the run's own ``eval/unlearned.json`` when it was made exactly as this
    evaluation would be (:meth:`AttackRun.stored_eval`): the same numbers, one evaluation fewer.

    ``backend``: ``rtn`` (fake round-to-nearest, any device), ``bnb`` (bitsandbytes on a CUDA GPU:
    LLM.int8 / NF4) or ``auto`` (bnb when a GPU and bitsandbytes are there, else rtn). Writes
    ``attacks/quantise.json`` (rows only) and ``attacks/quantise_config.json``.
    """
    if backend not in ("auto", "rtn", "bnb"):
        raise ValueError(f"backend must be auto, rtn or bnb, got {backend!r}")
    used = ("bnb" if _bnb_available() else "rtn") if backend == "auto" else backend
    sets = eval_sets_from_benchmark(run.benchmark)
    oracle = run.oracle_eval()
    model, tokenizer = run.load("unlearned")

    def evaluate(m, label: str) -> dict:
        return summary_row(evaluate_model(m, tokenizer, sets, fmt=run.fmt(tokenizer), batch_size=run.batch_size,
                                          max_new_tokens=run.max_new_tokens, oracle=oracle, progress=progress,
                                          label=label))

    stored = run.stored_eval("unlearned", sets, tokenizer)
    result: dict[str, Any] = {"none": summary_row(stored) if stored is not None else evaluate(model, "unlearned")}
    for b in bits:
        if used == "bnb":
            quantised = load_bnb_quantised(run.models["unlearned"], b)
        else:
            quantised = quantise_model_rtn(model, bits=int(b), group_size=group_size)
        result[str(b)] = evaluate(quantised, f"unlearned-{b}bit")
        del quantised
    run.write("quantise", result)
    run.write("quantise_config", {"backend": used, "bits": [int(b) for b in bits],
                                  "group_size": group_size if used == "rtn" else None,
                                  "forget_quality_vs": "eval/oracle.json" if oracle is not None else None})
    return result


# ------------------------------------------------------------------------------------------- probes

def probe_sets(run: AttackRun, probes: Sequence[str] = PROBES, shots: int = 3,
               seed: int = 0) -> tuple[dict[str, QADataset], dict[str, str]]:
    """The forget set under each probe ("none" = unchanged), and the probes that cannot run, with why."""
    forget = run.forget_set()
    builders = {"paraphrase": lambda: paraphrase_probe(forget),
                "few_shot": lambda: few_shot_probe(forget, run.benchmark.split("retain"), shots, seed),
                "context": lambda: context_probe(forget)}
    sets, skipped = {"none": forget}, {}
    for name in probes:
        if name not in builders:
            raise ValueError(f"unknown probe '{name}' (choose from {', '.join(PROBES)})")
        try:
            sets[name] = builders[name]()
        except DataError as exc:
            skipped[name] = str(exc)
    return sets, skipped


def run_probes(run: AttackRun, probes: Sequence[str] = PROBES, models: Sequence[str] = MODEL_LABELS,
               shots: int = 3, seed: int = 0, progress: bool = False) -> dict:
    """TOFU forget metrics of each model on each probed forget set; forget quality compares with the
    oracle under the *same* probe. Writes ``attacks/probes.json``."""
    sets, skipped = probe_sets(run, probes, shots, seed)
    labels = [m for m in models if run.has(m)]
    # The oracle first: its truth ratios under a probe are the reference for that probe.
    labels.sort(key=lambda m: m != "oracle")
    out: dict[str, dict] = {}
    for probe, ds in sets.items():
        oracle_eval, rows = None, {}
        for label in labels:
            model, tokenizer = run.load(label)
            try:
                result = evaluate_model(model, tokenizer, {"forget": ds}, fmt=run.fmt(tokenizer),
                                        batch_size=run.batch_size, max_new_tokens=run.max_new_tokens,
                                        oracle=oracle_eval if ds.has_truth_ratio_fields else None,
                                        progress=progress, label=label)
            except DataError as exc:  # e.g. a probed question longer than max_length
                if probe == "none":
                    raise
                skipped[probe] = str(exc)
                break
            if label == "oracle":
                oracle_eval = result
            row = summary_row(result)
            row.pop("model_utility", None)
            if label == "oracle" and ds.has_truth_ratio_fields:
                row["forget_quality"] = 1.0  # the oracle against itself
            rows[label] = row
        if probe not in skipped:
            out[probe] = rows
    result = {"n_forget": len(sets["none"]), "probes": out, "skipped": skipped,
              "config": {"probes": list(probes), "models": labels, "shots": shots, "seed": seed}}
    run.write("probes", result)
    return result


# ------------------------------------------------------------------------------------------- privacy

def run_privacy(run: AttackRun, reference: bool = True, batch_size: int | None = None) -> dict:
    """MIA AUCs, EM/ES (and exposure) of every model of the run, forget vs holdout, and PrivLeak of
    each against the oracle. ``reference`` adds the reference attack with the run's base model.
    Writes ``attacks/privacy.json``."""
    if not run.benchmark.has("holdout"):
        raise DataError(run.benchmark.source, None, "the privacy evaluation needs a holdout split (non-members)")
    ref = run.base_model if reference else None
    results = privacy_of_models(run.models, run.benchmark.split("forget"), run.benchmark.split("holdout"),
                                reference=ref, dtype=run.dtype, system_prompt=run.system_prompt,
                                max_length=run.max_length, batch_size=batch_size or run.batch_size,
                                device=run.device)
    out = {"rows": privacy_rows(results, "oracle" if "oracle" in results else None), "reference_model": ref,
           "results": results}
    run.write("privacy", out)
    return out
