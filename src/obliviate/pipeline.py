"""The main job: plant knowledge, build the oracle, unlearn, evaluate all three, and judge.

    benchmark -> finetune target (train split) and oracle (retain split, same recipe)
              -> evaluate oracle, then target (forget quality needs the oracle's truth ratios)
              -> unlearn the forget split from the target -> evaluate the unlearned model
              -> privacy of all three (MIA AUC forget vs holdout, PrivLeak vs the oracle, EM/ES)
              -> table + verdict, written to the run directory

Each stage is its own run directory inside the pipeline's (``target/``, ``oracle/``, ``unlearn/``),
so an interrupted pipeline resumes stage by stage with ``resume=True``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from obliviate import api
from obliviate.data.benchmark import Benchmark, load_benchmark
from obliviate.models.loading import DEFAULT_MODEL
from obliviate.runs import RunDir, atomic_write_text


@dataclass
class Thresholds:
    """What "forgotten" and "utility kept" mean in the verdict."""

    min_forget_quality: float = 0.05  # KS p-value vs the oracle: no evidence the two differ
    max_forget_rouge_gap: float = 0.1  # unlearned forget ROUGE at most this far above the oracle's
    min_utility_ratio: float = 0.9  # unlearned model utility >= this x the target's


@dataclass
class PipelineConfig:
    model: str = DEFAULT_MODEL
    method: str = "npo"
    method_options: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    unlearn: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    system_prompt: str | None = api.DEFAULT_SYSTEM_PROMPT
    max_length: int = 512
    eval_batch_size: int = 32
    max_new_tokens: int = 200
    thresholds: Thresholds = field(default_factory=Thresholds)
    wagle: dict[str, Any] | str | None = None  # WAGLE options or a mask file (obliviate.attribution)
    guard: dict[str, Any] | str | None = None  # GUARD options or a weights file


def verdict(rows: dict[str, dict[str, Any]], t: Thresholds) -> dict[str, Any]:
    u, o, tgt = rows["unlearned"], rows["oracle"], rows["target"]
    fq = u.get("forget_quality")
    rouge_gap = u["forget_rouge"] - o["forget_rouge"]
    forgotten = fq is not None and fq >= t.min_forget_quality and rouge_gap <= t.max_forget_rouge_gap
    mu_t, mu_u = tgt.get("model_utility"), u.get("model_utility")
    ratio = (mu_u / mu_t) if mu_t else None
    kept = ratio is not None and ratio >= t.min_utility_ratio
    return {
        "forgotten": forgotten,
        "utility_kept": kept,
        "forget_quality": fq,
        "forget_rouge_gap_to_oracle": round(rouge_gap, 4),
        "utility_ratio_to_target": None if ratio is None else round(ratio, 4),
        "thresholds": asdict(t),
        "target_memorised": tgt["forget_rouge"] > o["forget_rouge"],
    }


def run_pipeline(bench: Benchmark | str | Path, out: str | Path, cfg: PipelineConfig, *, overwrite: bool = False,
                 resume: bool = False, progress: bool = True, echo=print,
                 shared: dict[str, Path] | None = None) -> dict[str, Any]:
    """Run every stage and return ``{"models": {label: summary row}, "verdict": ...}``.

    ``shared`` lets several runs (``obliviate bench`` cells) reuse one target and one oracle: it
    maps ``target``/``oracle`` to their finetuning run directories and ``target_eval``/
    ``oracle_eval``/``privacy`` to result files, each made by the first run that needs it."""
    from obliviate.evaluation.evaluate import load_eval, save_eval, summary_row
    from obliviate.evaluation.sacrifice import sacrifice_rates
    from obliviate.evaluation.tofu import forget_quality
    from obliviate.reporting.model_card import model_card_info, write_model_card

    bench = bench if isinstance(bench, Benchmark) else load_benchmark(bench)
    run = RunDir.create(out, overwrite=overwrite, resume=resume and Path(out).exists())
    run.write_config({"command": "pipeline", "benchmark": bench.source, **asdict(cfg)})
    run.set_status("running")
    recorder = api.RunRecorder(run, "pipeline", resume)
    common = dict(dtype=cfg.dtype, system_prompt=cfg.system_prompt, max_length=cfg.max_length, progress=progress)
    eval_common = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, **common)
    sets = _eval_sets(bench)
    shared = shared or {}

    def evaluated(label: str, model_dir: Path, oracle=None) -> dict:
        # A cell keeps its own copy of every result so it is a complete run directory.
        path, cache = run.file(f"eval/{label}.json"), shared.get(f"{label}_eval")
        for source in (path, cache):
            if source is not None and Path(source).exists() and (resume or source == cache):
                result = load_eval(source)
                if source == cache:
                    save_eval(result, path)
                return result
        echo(f"[obliviate] evaluating {label}")
        result = api.evaluate(model_dir, sets, run.path, label=label, oracle_eval=oracle, **eval_common)
        if cache is not None:
            save_eval(result, cache)
        return result

    try:
        echo("[obliviate] finetuning the target on the train split")
        target = api.finetune(cfg.model, bench.split("train"), shared.get("target", run.file("target")), cfg.finetune,
                              resume=resume or "target" in shared, **common)
        echo("[obliviate] finetuning the oracle on the retain split (same recipe)")
        oracle = api.finetune(cfg.model, bench.split("retain"), shared.get("oracle", run.file("oracle")), cfg.finetune,
                              resume=resume or "oracle" in shared, **common)
        oracle_eval = evaluated("oracle", oracle)
        target_eval = evaluated("target", target, oracle_eval)
        echo(f"[obliviate] unlearning the forget split with {cfg.method}")
        trajectory = _Trajectory(run, target, sets, oracle_eval, target_eval, cfg, len(bench.split("forget")), resume)
        unlearned = _unlearn(target, bench, run.file("unlearn"), cfg, resume, common, trajectory.on_eval)
        unlearned_eval = evaluated("unlearned", unlearned, oracle_eval)
        trajectory.finish(unlearned_eval, run.file("unlearn"))
        privacy = _privacy(run, bench, {"target": target, "oracle": oracle, "unlearned": unlearned}, cfg, resume,
                           echo, shared.get("privacy"))
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        recorder.finish("failed")
        raise
    rows = {"target": summary_row(target_eval), "oracle": summary_row(oracle_eval),
            "unlearned": summary_row(unlearned_eval)}
    # The oracle against itself (p = 1 by construction), so the table has no hole.
    oracle_r = oracle_eval["sets"]["forget"]["per_sample"]["truth_ratio_raw"]
    rows["oracle"]["forget_quality"] = forget_quality(oracle_r, oracle_r)
    for label, ev in (("oracle", oracle_eval), ("unlearned", unlearned_eval)):
        rows[label].update({f"sacrifice_{k}": v for k, v in sacrifice_rates(target_eval, ev).items()})
    if privacy is not None:
        from obliviate.evaluation.privacy import privacy_rows

        for label, extra in privacy_rows(privacy, "oracle").items():
            rows[label].update(extra)
    result = {"models": rows, "verdict": verdict(rows, cfg.thresholds), "benchmark": bench.source}
    run.write_json("metrics.json", result)
    atomic_write_text(run.file("summary.md"), summary_markdown(result))
    # The unlearned checkpoint's card, now with the metrics (fingerprints only, never content).
    write_model_card(unlearned, model_card_info(run.path))
    run.set_status("done")
    recorder.finish("done", children=tuple(run.file(s) for s in ("target", "oracle", "unlearn") if run.file(s).exists()))
    return result


class _Trajectory:
    """Forget quality and model utility along the unlearning run, for the report's trade-off curve:
    the target at step 0, a full evaluation every ``unlearn.eval_every`` optimizer steps (the loop's
    ``on_eval``), and the unlearned model at the last step (its own evaluation, not repeated here);
    written to ``trajectory.json`` after each point, so a resumed run keeps the points it has."""

    KEYS = ("forget_quality", "model_utility", "forget_rouge", "forget_probability", "forget_truth_ratio",
            "retain_rouge")

    def __init__(self, run: RunDir, target: Path, sets, oracle_eval: dict, target_eval: dict, cfg: PipelineConfig,
                 n_forget: int, resume: bool):
        from obliviate.training.loop import planned_steps

        self.run, self.target, self.sets, self.oracle_eval, self.cfg = run, target, sets, oracle_eval, cfg
        train = api._train_config(cfg.unlearn, api.UNLEARN_DEFAULTS)  # what api.unlearn will train with
        self.every, self.last = train.eval_every, planned_steps(train, n_forget)
        self.points = {row["step"]: row for row in run.read_json("trajectory.json")} \
            if resume and run.has("trajectory.json") else {}
        self.points[0] = self._row(0, target_eval)
        self.fmt = None

    def _row(self, step: int, result: dict) -> dict:
        from obliviate.evaluation.evaluate import summary_row

        row = summary_row(result)
        return {"step": step, **{k: row.get(k) for k in self.KEYS}}

    def _write(self) -> None:
        if self.every:
            self.run.write_json("trajectory.json", [self.points[s] for s in sorted(self.points)])

    @property
    def on_eval(self):
        return self._evaluate if self.every and self.cfg.method != "unierase" else None

    def _evaluate(self, model, step: int) -> None:
        if step >= self.last:
            return  # the unlearned model's own evaluation is this point (finish)
        from obliviate.data.chat import ChatFormat
        from obliviate.evaluation.evaluate import evaluate_model
        from obliviate.models.loading import load_tokenizer

        if self.fmt is None:
            self.fmt = ChatFormat(load_tokenizer(str(self.target)), system_prompt=self.cfg.system_prompt,
                                  max_length=self.cfg.max_length)
        was_training = model.training
        model.eval()
        result = evaluate_model(model, self.fmt.tokenizer, self.sets, fmt=self.fmt, batch_size=self.cfg.eval_batch_size,
                                max_new_tokens=self.cfg.max_new_tokens, oracle=self.oracle_eval, progress=False)
        model.train(was_training)
        self.points[step] = self._row(step, result)
        self._write()

    def finish(self, unlearned_eval: dict, unlearn_dir: Path) -> None:
        stats = unlearn_dir / "train_stats.json"
        if self.every and stats.exists():
            from obliviate.runs import read_json

            steps = int(read_json(stats)["steps"])
            self.points[steps] = self._row(steps, unlearned_eval)
            self._write()


def _unlearn(target: Path, bench: Benchmark, out: Path, cfg: PipelineConfig, resume: bool, common: dict,
             on_eval=None) -> Path:
    if cfg.method == "unierase":
        from obliviate.unierase import run_unierase

        # A closed-form edit has no steps to resume: a finished run is reused, anything else redone.
        if resume and RunDir(Path(out)).status() == "done":
            return Path(out) / "model"
        return run_unierase(target, bench.split("forget"), bench.split("retain"), out, options=cfg.method_options,
                            dtype=common["dtype"], system_prompt=common["system_prompt"],
                            max_length=common["max_length"], overwrite=resume)
    return api.unlearn(target, bench.split("forget"), bench.split("retain"), out, method=cfg.method,
                       method_options=cfg.method_options, train=cfg.unlearn, resume=resume, wagle=cfg.wagle,
                       guard=cfg.guard, on_eval=on_eval, **common)


def _privacy(run: RunDir, bench: Benchmark, models: dict[str, Path], cfg: PipelineConfig, resume: bool,
             echo, cache: Path | None = None) -> dict | None:
    """MIA AUCs (forget vs holdout), EM/ES of each model, with the base model as the reference
    attack's reference; written to ``privacy.json``. None when the benchmark has no holdout split.
    ``cache`` holds the target's and oracle's results for runs that share them."""
    from obliviate.evaluation.privacy import privacy_of_models
    from obliviate.runs import atomic_write_json, read_json

    if not bench.has("holdout"):
        return None
    if resume and run.has("privacy.json"):
        return run.read_json("privacy.json")
    echo("[obliviate] privacy evaluation (membership inference, memorisation)")
    done = read_json(cache) if cache is not None and Path(cache).exists() else {}
    todo = {label: path for label, path in models.items() if label not in done}
    results = {**done, **privacy_of_models(todo, bench.split("forget"), bench.split("holdout"), reference=cfg.model,
                                           dtype=cfg.dtype, system_prompt=cfg.system_prompt,
                                           max_length=cfg.max_length, batch_size=cfg.eval_batch_size)}
    if cache is not None and not done:
        atomic_write_json(cache, {k: v for k, v in results.items() if k in ("target", "oracle")})
    run.write_json("privacy.json", results)
    return results


def _eval_sets(bench: Benchmark):
    from obliviate.evaluation.evaluate import eval_sets_from_benchmark

    return eval_sets_from_benchmark(bench)


COLUMNS = [("forget_quality", "forget quality"), ("model_utility", "model utility"), ("forget_rouge", "forget ROUGE-L"),
           ("forget_probability", "forget prob."), ("forget_truth_ratio", "forget truth ratio"),
           ("retain_rouge", "retain ROUGE-L")]


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2e}" if isinstance(x, float) and 0 < abs(x) < 1e-3 else f"{x:.3f}"


def summary_markdown(result: dict[str, Any]) -> str:
    lines = ["| model | " + " | ".join(c for _, c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, row in result["models"].items():
        lines.append(f"| {label} | " + " | ".join(_fmt(row.get(k)) for k, _ in COLUMNS) + " |")
    v = result["verdict"]
    lines += ["", f"Forgotten: **{'yes' if v['forgotten'] else 'no'}** (forget quality {_fmt(v['forget_quality'])}, "
              f"forget ROUGE {v['forget_rouge_gap_to_oracle']:+.3f} vs the oracle).",
              f"Utility kept: **{'yes' if v['utility_kept'] else 'no'}** (unlearned / target model utility = "
              f"{_fmt(v['utility_ratio_to_target'])}).",
              f"Target memorised the forget set: {'yes' if v['target_memorised'] else 'NO: unlearning is not meaningful'}."]
    return "\n".join(lines) + "\n"
